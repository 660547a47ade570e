"""The feedback report of a send: what came back about it, in rates, domains and reasons.

Input: a send's record, its send log counts by state, and every piece of evidence
about its deliveries (:meth:`~newsletter.storage.base.FeedbackStore.for_send`).
Output: a :class:`FeedbackReport`: the hard bounce, soft bounce, complaint and
unsubscribe counts and their rates among the messages attempted, the domains and
reasons (status codes) they came with most, and the latest events. Pure: nothing
is read or written here; ``newsletter bounces report`` prints it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from newsletter.storage.base import SendRecord
from newsletter.storage.evidence import COUNTED_KINDS, Kept

__all__ = ["FeedbackReport", "feedback_report"]

# The states of a recipient a message was attempted for (not pending, not left out).
_ATTEMPTED = ("sent", "rejected", "deferred", "unknown", "sending")
_COUNTED = ("suppress", "soft", "unsubscribe")


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    issue_id: str
    list_name: str
    send_id: int
    audience: int
    attempted: int
    counts: dict[str, int]  # by COUNTED_KINDS: recipients, each once per kind
    domains: list[tuple[str, Counter[str]]] = field(default_factory=list)  # most first
    reasons: list[tuple[str, int]] = field(default_factory=list)  # status code or kind
    latest: list[Kept] = field(default_factory=list)  # newest first
    review: int = 0  # kept for review

    def rate(self, kind: str) -> float:
        return self.counts[kind] / self.attempted if self.attempted else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "issue_id": self.issue_id,
            "list": self.list_name,
            "send_id": self.send_id,
            "audience": self.audience,
            "attempted": self.attempted,
            "counts": self.counts,
            "rates": {kind: round(self.rate(kind), 6) for kind in self.counts},
            "domains": [{"domain": d, **dict(c)} for d, c in self.domains],
            "reasons": [{"reason": r, "count": n} for r, n in self.reasons],
            "kept_for_review": self.review,
            "latest": [_event(k) for k in self.latest],
        }


def _event(k: Kept) -> dict[str, object]:
    return {
        "id": k.id,
        "received_at": k.received_at,
        "kind": k.kind,
        "email": k.email,
        "status": k.status,
        "outcome": k.outcome,
        "source": k.source,
    }


def feedback_report(
    record: SendRecord,
    states: Mapping[str, int],
    kept: Sequence[Kept],
    *,
    top: int = 5,
    latest: int = 10,
) -> FeedbackReport:
    """The report of ``record`` (module docstring)."""
    # What changed someone's mail, as FeedbackStore.counts has it: not notes, not review.
    counted = [
        k for k in kept if k.kind in COUNTED_KINDS and (k.action in _COUNTED or k.kind == "refused")
    ]
    counts = dict.fromkeys(COUNTED_KINDS, 0)
    seen: set[tuple[str, int | None]] = set()
    domains: dict[str, Counter[str]] = {}
    reasons: Counter[str] = Counter()
    for k in sorted(counted, key=lambda k: k.id):
        if (k.kind, k.seq) in seen:
            continue  # a recipient counts once per kind, whatever number of messages said it
        seen.add((k.kind, k.seq))
        counts[k.kind] += 1
        domain = (k.email or "").rpartition("@")[2].lower() or "(unknown)"
        domains.setdefault(domain, Counter())[k.kind] += 1
        reasons[k.status or k.kind] += 1
    by_size = sorted(domains.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    return FeedbackReport(
        issue_id=record.issue_id,
        list_name=record.list_name,
        send_id=record.id,
        audience=record.audience,
        attempted=sum(states.get(state, 0) for state in _ATTEMPTED),
        counts=counts,
        domains=by_size[:top],
        reasons=sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:top],
        latest=sorted(kept, key=lambda k: -k.id)[:latest],
        review=sum(1 for k in kept if k.action == "review"),
    )
