"""Deciding what a message from the mail system means for the address it names.

Input: the :class:`~newsletter.bounces.reading.Feedback` read from one message
and the delivery its VERP address names, as the send log has it
(:class:`~newsletter.storage.evidence.SentTo`, or None). Output: a
:class:`Decision`: suppress the address (``bounced``, ``complained``), count a
soft bounce, note it and do nothing, or keep it for review, with the reason in
words. Pure: nothing is read or written here.

Nobody is suppressed on a message's word alone. It must come back to a VERP
address of ours (signed: nobody else can make one), name a delivery this database
made, and, for a bounce, report a failure of that delivery's own address (its
Final-Recipient or Original-Recipient; an address it was forwarded to that
fails is kept for review). A complaint names the delivery by its VERP address
only: feedback loops often blank out the recipient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from newsletter import tokens
from newsletter.audience.csv_import import normalise_address
from newsletter.bounces.reading import Feedback, Reported, judged
from newsletter.storage.evidence import Action, SentTo

__all__ = ["Decision", "decide"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    why: str
    reason: str | None = None  # the suppression reason, for "suppress"
    email: str | None = None  # whom it is about, when matched to a delivery
    reported: Reported | None = None  # the report's recipient it was judged by
    lists: tuple[str, ...] = ()  # the lists an unsubscribe request leaves


# The lists an address is on and has not left (with_left=True: those it left too).
class MemberLists(Protocol):
    def __call__(self, email: str, *, with_left: bool = False) -> Sequence[str]: ...


def decide(
    feedback: Feedback,
    sent_to: SentTo | None,
    *,
    token_key: bytes | None = None,
    member_lists: MemberLists | None = None,
) -> Decision:
    """What ``feedback`` means (module docstring); ``sent_to`` is the delivery its VERP
    address names, looked up in the send log (None: none, or not in this database).
    ``token_key`` checks an unsubscribe request's token; ``member_lists`` gives the
    lists of the address that asked without one."""
    kind = feedback.kind
    if kind == "unknown":
        return Decision("review", feedback.why or "not understood")
    if kind == "unsubscribe":
        return _unsubscribe(feedback, token_key, member_lists or _on_no_list)
    who = sent_to.email if sent_to else None
    if kind == "auto_reply":
        return Decision("note", "an automatic reply (out of office or the like): ignored",
                        email=who)  # fmt: skip
    if kind == "not_bounce":
        return Decision("note", "a report that the message was delivered: nothing to do",
                        email=who)  # fmt: skip
    if feedback.delivery is None:
        return Decision(
            "review",
            f"a {_kind_text(kind)} that names no delivery of ours: it did not come back to one "
            "of our VERP addresses, or the address's signature does not match",
        )
    if sent_to is None:
        return Decision(
            "review",
            f"a {_kind_text(kind)} for recipient {feedback.delivery.seq} of send "
            f"{feedback.delivery.send_id}, which this database does not have",
        )
    where = f"recipient {sent_to.seq} of the send of {sent_to.issue_id} to {sent_to.list_name}"
    if kind == "complaint":
        return Decision(
            "suppress",
            f"a spam complaint (Feedback-Type {feedback.feedback_type}) about {where}",
            "complained",
            sent_to.email,
            feedback.recipients[0] if feedback.recipients else None,
        )
    matched = _matching(feedback.recipients, sent_to.email)
    if matched is None:
        shown = ", ".join(r.email or "(no address)" for r in feedback.recipients[:3])
        return Decision(
            "review",
            f"a {_kind_text(kind)} for {where}, but it reports {shown or 'no recipient'}, "
            f"not {sent_to.email} (a forward that failed, or not ours)",
        )
    verdict = judged(matched)
    said = f"{matched.status} {matched.diagnostic}".strip()
    if verdict == "hard":
        weight = permanent_weight(matched.status)
        if weight == "hard":
            return Decision(
                "suppress", f"a permanent failure ({said}) of {where}", "bounced",
                sent_to.email, matched,
            )  # fmt: skip
        if weight == "soft":
            return Decision(
                "soft", f"a permanent failure with a vague code ({said}) of {where}: counted "
                "as a soft bounce", None, sent_to.email, matched,
            )  # fmt: skip
        return Decision(
            "note", f"a refusal of the message, not of the address ({said}), for {where}: "
            "nobody suppressed", None, sent_to.email, matched,
        )  # fmt: skip
    if verdict == "soft" and matched.action == "failed":
        return Decision(
            "soft", f"a temporary failure ({said}) the MTA gave up on, for {where}", None,
            sent_to.email, matched,
        )  # fmt: skip
    if verdict == "soft":
        return Decision(
            "note",
            f"a delay ({said}) of {where}: the MTA is still trying, and reports again if it "
            "gives up",
            None,
            sent_to.email,
            matched,
        )
    if verdict == "unknown" and feedback.nonstandard and matched.action == "failed":
        # No status code to go by, only the MTA's words: counted, never suppressed at once.
        return Decision(
            "soft",
            "a bounce in an MTA's own format, without a status code "
            f"({matched.diagnostic or 'no reason given'}), for {where}: counted as a soft bounce",
            None,
            sent_to.email,
            matched,
        )
    if verdict == "unknown" and feedback.nonstandard:
        return Decision("note", f"an MTA's warning that it still tries, for {where}", None,
                        sent_to.email, matched)  # fmt: skip
    if verdict == "not_bounce":
        return Decision("note", f"delivered ({said}), for {where}", None, sent_to.email, matched)
    return Decision(
        "review", f"no valid status code for {where}'s own address", None, sent_to.email, matched
    )


# RFC 3463 codes that say the address itself is gone, by subject.detail.
_ADDRESS_GONE = {"1.0", "1.1", "1.2", "1.3", "1.6", "1.10", "2.0", "2.1", "2.4", "4.1", "4.4"}
_VAGUE = {"0.0", "3.0", "3.1", "3.2", "3.5", "4.0", "4.2", "4.3", "4.6", "4.7"}


def permanent_weight(status: str) -> Literal["hard", "soft", "none"]:
    """What a permanent failure (5.x.x) says about the address, by its code: ``hard``, it
    is gone (5.1.1 no such user, 5.1.2 no such domain, 5.2.1 disabled, 5.4.4
    unroutable, ...); ``soft``, a failure whose code does not say why (5.0.0, most of
    5.3 and 5.4) or a full mailbox (5.2.2), counted like a soft bounce; ``none``, a
    refusal of the message or of our sending (5.1.7 and 5.1.8 our sender, 5.2.3 too
    large, 5.3.4, 5.5 protocol, 5.6 content, 5.7 policy: blocked, spam, DMARC), which
    must not empty a list while a provider blocks the society's mail."""
    detail = status.partition(".")[2]
    if detail in _ADDRESS_GONE:
        return "hard"
    if detail in _VAGUE or detail == "2.2":
        return "soft"
    return "none"


def _on_no_list(email: str, *, with_left: bool = False) -> Sequence[str]:
    return ()


def _unsubscribe(feedback: Feedback, key: bytes | None, member_lists: MemberLists) -> Decision:
    """A mailed request to unsubscribe: its token says who and from which list. Without a
    valid one, only a message sent to our unsubscribe address counts (RFC 2369: sending
    there is the request), and its From address leaves every list it is on; a From is
    easy to forge, so anything else asking in words waits for a person (review)."""
    subject = tokens.read(key, feedback.token) if key and feedback.token else None
    if subject is not None and subject.kind in (tokens.Kind.UNSUBSCRIBE, tokens.Kind.LEGACY):
        if subject.list_name not in member_lists(subject.email, with_left=True):
            # A list renamed since the message went out: "left" a list that is not
            # there would leave the person on the one that is.
            return Decision(
                "review",
                f"a request to unsubscribe {subject.email} from {subject.list_name}, by our "
                "token, but the address is not on that list (renamed?): a person should "
                "take it off the list it is on",
                email=subject.email,
            )
        return Decision(
            "unsubscribe",
            f"a request to unsubscribe from {subject.list_name}, by the token of our "
            f"List-Unsubscribe (sent by {feedback.requester or 'no From address'})",
            email=subject.email,
            lists=(subject.list_name,),
        )
    bad = " (its token is not one of ours)" if feedback.token else ""
    if feedback.dmarc_failed:
        return Decision(
            "review",
            f"a request to unsubscribe{bad} by {feedback.requester or 'nobody'}, whose From "
            "failed DMARC where it was received (Authentication-Results): likely forged",
        )
    if not feedback.to_unsubscribe_address:
        return Decision(
            "review",
            f"a request to unsubscribe{bad} in words, by {feedback.requester or 'nobody'}, "
            "not sent to the unsubscribe address: a person should look (a From is easy to "
            "forge)",
        )
    try:
        asker = normalise_address(feedback.requester) if feedback.requester else ""
    except ValueError:
        asker = ""
    if not asker:
        return Decision("review", f"a request to unsubscribe{bad} from no usable From address")
    lists = tuple(member_lists(asker))
    if not lists:
        return Decision(
            "review",
            f"a request to unsubscribe{bad} from {asker}, which is on no list (perhaps "
            "subscribed with another address)",
            email=asker,
        )
    return Decision(
        "unsubscribe",
        f"a request to unsubscribe{bad} from {asker} by its From address: it leaves "
        f"{', '.join(lists)}",
        email=asker,
        lists=lists,
    )


def _kind_text(kind: str) -> str:
    return {"hard": "permanent bounce", "soft": "temporary bounce"}.get(kind, "spam complaint")


def _matching(recipients: tuple[Reported, ...], email: str) -> Reported | None:
    """The reported recipient that is ``email`` (as first given, or finally), or None."""
    wanted = _canonical(email)
    for reported in recipients:
        if wanted in (_canonical(reported.email), _canonical(reported.original)):
            return reported
    return None


def _canonical(address: str) -> str:
    if not address:
        return ""
    try:
        return normalise_address(address)
    except ValueError:
        return address.strip().lower()
