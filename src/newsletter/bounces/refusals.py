"""Refusals in our own SMTP session, and a send's health: the relay's 5xx → bounces.

Input: the recipients of a send that the relay refused (the send log's ``rejected``
rows, with the reply's code and text), the :class:`~newsletter.storage.base.FeedbackStore`,
the soft-bounce policy and a :class:`HealthLimits`. Output: each refusal recorded as
evidence (source ``smtp``) with its decision, as a bounce that came back by mail would
be; and :meth:`SendHealth.check`: None while the send is healthy, else the reason to
pause it.

A refusal is judged by the enhanced status code in the reply (RFC 3463), never by its
words, exactly as a bounce with that code is (``deciding.permanent_weight``): only a
code about the address itself makes a hard bounce (5.1.1 no such user, 5.1.2 no such
domain, 5.2.1 disabled, ...); a full mailbox (5.2.2) or a vague code (5.0.0) counts as
a soft bounce; a policy or content refusal (``5.7.x``: blocked, spam, DMARC) says
nothing about the address and suppresses nobody: a provider that blocks the society's
mail for a day must not empty its list. Those are noted, and the health check is what
stops such a send: refusals count with the hard bounces there. A reply without an
enhanced code is only noted.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from newsletter.bounces.deciding import permanent_weight
from newsletter.bounces.status_codes import IN_WORDS
from newsletter.storage.base import FeedbackStore
from newsletter.storage.evidence import Action, Evidence, Refusal, SoftBounces, digest_of

__all__ = ["PAUSE_ADVICE", "HealthLimits", "SendHealth", "judge_refusal", "record_refusals"]


@dataclass(frozen=True, slots=True)
class Judged:
    kind: str  # hard, soft, refused
    action: Action
    status: str
    why: str
    reason: str | None = None


def judge_refusal(code: int, detail: str) -> Judged:
    """What a 5xx reply at RCPT (or DATA) means for the address (module docstring): as
    a bounce with that status code would (:func:`~newsletter.bounces.deciding.permanent_weight`)."""
    found = IN_WORDS.search(detail[:200])
    status = ".".join(found.groups()) if found else ""
    said = f"{code} {detail}".strip()
    if not status:
        return Judged("refused", "note", "", f"refused without an enhanced status code "
                      f"({said}): not counted as a bounce")  # fmt: skip
    weight = permanent_weight(status) if status.startswith("5.") else "soft"
    if weight == "hard":
        return Judged("hard", "suppress", status, f"refused by the receiving server ({said})",
                      "bounced")  # fmt: skip
    if weight == "soft":
        return Judged("soft", "soft", status, f"refused by the receiving server ({said}): "
                      "counted as a soft bounce")  # fmt: skip
    return Judged("refused", "note", status, f"refused for a reason that is not the address "
                  f"({said}): not counted as a bounce")  # fmt: skip


def record_refusals(store: FeedbackStore, send_id: int, soft: SoftBounces) -> int:
    """Record every refusal of send ``send_id`` not recorded yet; how many were."""
    done = 0
    last: list[Refusal] = []
    while (batch := store.refusals(send_id)) and batch != last:
        last = batch
        for refusal in batch:
            seq, email, code, detail = refusal.seq, refusal.email, refusal.code, refusal.detail
            judged = judge_refusal(code, detail)
            raw = f"{code} {detail}".encode("utf-8", "replace")
            store.record(
                Evidence(
                    digest=digest_of(f"smtp {send_id} {seq} ".encode() + raw),
                    source="smtp",
                    kind=judged.kind,
                    action=judged.action,
                    why=judged.why,
                    raw=raw,
                    reason=judged.reason,
                    email=email,
                    send_id=send_id,
                    seq=seq,
                    reported=email,
                    status=judged.status,
                    diagnostic=f"{code} {detail}"[:500],
                ),
                soft,
            )
            done += 1
    return done


@dataclass(frozen=True, slots=True)
class HealthLimits:
    """When a send pauses itself: hard bounces over ``hard`` or complaints over
    ``complaints`` (fractions) of what this run attempted, counted as at least
    ``sample`` messages so that the first few bounces of a run do not stop it."""

    hard: float = 0.05
    complaints: float = 0.003
    sample: int = 1000


class SendHealth:
    """A send's bounce and complaint rates in the current run, checked as it goes."""

    def __init__(
        self, store: FeedbackStore, send_id: int, limits: HealthLimits, soft: SoftBounces
    ) -> None:
        self.store = store
        self.send_id = send_id
        self.limits = limits
        self.soft = soft
        # This run's feedback only: a run resumed after a pause starts counting afresh,
        # so that "check, then run the same command again" goes on.
        self.since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    def check(self, attempted: int) -> str | None:
        """Record the new refusals, then the reason to pause, or None. ``attempted`` is
        this process's count; the rates are the whole send's since this run began (on a
        send that several hosts share, each sees the same)."""
        record_refusals(self.store, self.send_id, self.soft)
        counts = self.store.counts(self.send_id, since=self.since)
        tried = max(attempted, self.store.attempted_since(self.send_id, self.since))
        floor = max(tried, self.limits.sample)
        for found, limit, what, setting in (
            # A block of our mail (5.7.x) suppresses nobody, but is as good a reason to stop.
            (counts["hard"] + counts["refused"], self.limits.hard,
             "hard bounces and refusals", "NEWSLETTER_SEND_PAUSE_HARD_BOUNCES"),
            (counts["complaint"], self.limits.complaints, "spam complaints",
             "NEWSLETTER_SEND_PAUSE_COMPLAINTS"),
        ):  # fmt: skip
            if found > limit * floor:
                return (
                    f"{found} {what} among the {tried} messages attempted since this run "
                    f"began (over {limit:.1%} of {floor}, {setting})"
                )
        return None


# What to do about a send that paused itself, said after its reason.
PAUSE_ADVICE = (
    "Mail to this list may be going to old, mistyped or unwilling addresses, and "
    "providers block senders whose rates are like this: see `newsletter bounces report`. "
    "When the list is right, run the same command again to go on (the count starts again)."
)
