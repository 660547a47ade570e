"""Processing feedback: one raw message from the mail system → its decision, kept.

Input: the bytes of one message (from a pipe, a file, a mailbox), how it came
(``source``), the deployment's :class:`~newsletter.verp.Verp` and soft-bounce
policy, and the :class:`~newsletter.storage.base.FeedbackStore`. Output: a
:class:`Processed`: what the message said (:mod:`~newsletter.bounces.reading`),
what it means (:mod:`~newsletter.bounces.deciding`) and what recording it did
(the evidence id, and any suppression or opt-out), committed before this returns.

Every message is kept, understood or not, so that nothing the mail system says is
lost: what could not be read or matched waits for review with the reason. The
same message processed again (a mailbox fetched twice) is recognised by its
digest and changes nothing. A database that cannot be reached raises
:class:`~newsletter.errors.StorageError`: nothing was recorded, and the message
should be offered again later.

A provider's webhook event (:func:`process_event`, from
:mod:`newsletter.bounces.providers`) goes the same way, to the same decisions. It
names its delivery by our VERP address when the provider reports the envelope
sender (SES, Mailgun). Otherwise (SendGrid, Postmark) by its recipient: with our
Message-ID, the delivery of that issue to that address (the Message-ID is made from
both, so one naming another recipient names nobody); without it, the latest
delivery to the address. The decision's reason says which. A VERP-shaped sender
whose signature does not match names nobody: no guess by address for a forgery.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from newsletter.audience.csv_import import normalise_address
from newsletter.bounces.deciding import Decision, decide
from newsletter.bounces.providers import NAMES, ProviderEvent
from newsletter.bounces.reading import Feedback, read
from newsletter.delivery.message import issue_of_message_id
from newsletter.storage.base import FeedbackStore
from newsletter.storage.evidence import Evidence, Recorded, SentTo, SoftBounces, digest_of
from newsletter.verp import Delivered, Verp

__all__ = ["Processed", "process", "process_event", "understood"]


@dataclass(frozen=True, slots=True)
class Processed:
    feedback: Feedback
    decision: Decision
    recorded: Recorded


def process(
    raw: bytes,
    store: FeedbackStore,
    *,
    verp: Verp | None,
    source: str,
    soft: SoftBounces,
    token_key: bytes | None = None,
    unsubscribe_to: str | None = None,
    delivered_to: str | None = None,
    now: str | None = None,
) -> Processed:
    """Read, decide and record one message (module docstring). ``token_key`` checks the
    token of a mailed unsubscribe; ``unsubscribe_to`` is our List-Unsubscribe mailto:
    address, where any message is a request to unsubscribe."""
    feedback, decision, evidence = understood(
        raw, store, verp=verp, source=source, token_key=token_key,
        unsubscribe_to=unsubscribe_to, delivered_to=delivered_to,
    )  # fmt: skip
    return Processed(feedback, decision, store.record(evidence, soft, now=now))


def understood(
    raw: bytes,
    store: FeedbackStore,
    *,
    verp: Verp | None,
    source: str,
    token_key: bytes | None = None,
    unsubscribe_to: str | None = None,
    delivered_to: str | None = None,
) -> tuple[Feedback, Decision, Evidence]:
    """What :func:`process` would record for ``raw``, read and decided, recording
    nothing (``bounces reprocess`` looks before it records)."""
    feedback = read(raw, verp, delivered_to=delivered_to, unsubscribe_to=unsubscribe_to)
    named = feedback.delivery
    sent_to = store.sent_to(named.send_id, named.seq) if named is not None else None
    decision = decide(feedback, sent_to, token_key=token_key, member_lists=store.member_lists)
    if decision.action == "unsubscribe" and sent_to is None and decision.email:
        # A mailed request names no delivery (it came to the unsubscribe address, not a
        # VERP one): it is counted with the latest send to that address on that list.
        latest = store.latest_delivery(decision.email)
        if latest is not None and latest.list_name in decision.lists:
            sent_to = latest
    reported = decision.reported
    evidence = Evidence(
        digest=digest_of(raw),
        source=source,
        kind=feedback.kind,
        action=decision.action,
        why=decision.why,
        raw=raw,
        reason=decision.reason,
        email=decision.email,
        send_id=sent_to.send_id if sent_to else None,
        seq=sent_to.seq if sent_to else None,
        reported=reported.email if reported else "",
        status=reported.status if reported else "",
        diagnostic=reported.diagnostic if reported else "",
        feedback_type=feedback.feedback_type,
        message_id=feedback.message_id,
        lists=decision.lists,
    )
    return feedback, decision, evidence


def process_event(
    event: ProviderEvent,
    store: FeedbackStore,
    *,
    verp: Verp | None,
    soft: SoftBounces,
    now: str | None = None,
) -> Processed:
    """Match, decide and record one provider's event (module docstring). Its digest is
    the provider's event id when it gives one (a retry carries the same id), else its
    bytes: either way the same event twice is recorded once."""
    named, sent_to, how = _match(event, store, verp)
    # The provider's label decides only when it gave no code (event.assumed): the
    # decision judges by a class code then, and says so; the evidence keeps the real one.
    judged_by = tuple(
        replace(r, status=event.assumed, diagnostic=f"assumed: {r.diagnostic or 'no code given'}")
        if event.assumed and not r.status
        else r
        for r in event.recipients
    )
    feedback = Feedback(event.kind, named, judged_by, why=event.why,
                        feedback_type=event.feedback_type,
                        message_id=event.message_id[:200])  # fmt: skip
    who = sent_to.email if sent_to else None
    if event.noted:
        decision = Decision("note", f"{event.noted}; {how}", email=who)
    elif event.kind in ("hard", "soft", "complaint") and sent_to is None:
        decision = Decision("review", f"a {NAMES[event.provider]} report that names no "
                            f"delivery of this database: {how}")  # fmt: skip
    else:
        decision = decide(feedback, sent_to)
        if decision.action != "review" or sent_to is not None:
            decision = replace(decision, why=f"{decision.why}; {how}")
        if event.assumed and decision.action in ("suppress", "soft"):
            decision = replace(decision, why=f"{decision.why} ({event.why})")
    reported = decision.reported
    real = next((r for r in event.recipients if reported and r.email == reported.email), None)
    identity = f"id {event.event_id}".encode() if event.event_id else b"raw " + event.raw
    evidence = Evidence(
        digest=digest_of(f"webhook:{event.provider} ".encode() + identity),
        source=f"webhook:{event.provider}",
        kind=event.kind,
        action=decision.action,
        why=decision.why,
        raw=event.raw,
        reason=decision.reason,
        email=decision.email,
        send_id=sent_to.send_id if sent_to else None,
        seq=sent_to.seq if sent_to else None,
        reported=reported.email if reported else event.email,
        status=real.status if real else (reported.status if reported else ""),
        diagnostic=reported.diagnostic if reported else "",
        feedback_type=event.feedback_type,
        message_id=event.message_id[:200],
    )
    return Processed(feedback, decision, store.record(evidence, soft, now=now))


def _match(
    event: ProviderEvent, store: FeedbackStore, verp: Verp | None
) -> tuple[Delivered | None, SentTo | None, str]:
    """(the delivery the event names, as the send log has it, and how it was matched)."""
    sender = event.envelope_sender
    if sender and verp is not None:
        named = verp.read(sender)
        if named is not None:
            found = store.sent_to(named.send_id, named.seq)
            return (
                named,
                found,
                "matched by its VERP address"
                + (
                    ""
                    if found
                    else f" (send {named.send_id}, recipient {named.seq}, which this "
                    "database does not have)"
                ),
            )
        local, _, domain = sender.lower().rpartition("@")
        if domain == verp.domain.lower() and local.startswith(verp.local.lower() + "+"):
            return None, None, ("its envelope sender is shaped like our VERP address but its "
                                "signature does not match (forged or altered)")  # fmt: skip
    try:
        address = normalise_address(event.email) if event.email else ""
    except ValueError:
        address = ""
    if not address:
        return None, None, "it names no usable recipient address"
    if event.message_id:
        issue = issue_of_message_id(event.message_id, address)
        if issue is None:
            return None, None, (f"its Message-ID {event.message_id[:100]} is not ours for "
                                "that address (another recipient's, a test copy's, or not "
                                "ours)")  # fmt: skip
        found = store.latest_delivery(address, issue)
        how = f"matched by its recipient and our Message-ID (issue {issue})"
        return _delivered(found), found, how if found else f"no delivery of issue {issue} to it"
    found = store.latest_delivery(address)
    return (
        _delivered(found),
        found,
        (
            "matched by its recipient alone, to the latest delivery to that address (no VERP "
            "address or Message-ID of ours in the event)"
            if found
            else "no delivery to that address in this database"
        ),
    )


def _delivered(found: SentTo | None) -> Delivered | None:
    return Delivered(found.send_id, found.seq) if found else None
