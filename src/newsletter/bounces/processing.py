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
"""

from __future__ import annotations

from dataclasses import dataclass

from newsletter.bounces.deciding import Decision, decide
from newsletter.bounces.reading import Feedback, read
from newsletter.storage.base import FeedbackStore
from newsletter.storage.evidence import Evidence, Recorded, SoftBounces, digest_of
from newsletter.verp import Verp

__all__ = ["Processed", "process"]


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
    feedback = read(raw, verp, delivered_to=delivered_to, unsubscribe_to=unsubscribe_to)
    named = feedback.delivery
    sent_to = store.sent_to(named.send_id, named.seq) if named is not None else None
    decision = decide(feedback, sent_to, token_key=token_key, member_lists=store.member_lists)
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
    return Processed(feedback, decision, store.record(evidence, soft, now=now))
