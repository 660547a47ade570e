"""SQLite feedback store: bounces, complaints and mailed unsubscribes, with their evidence.

Input: :class:`~newsletter.storage.evidence.Evidence` (a message from the mail
system and the decision made about it) and the soft-bounce policy. Output: the
evidence kept (compressed, cut to RAW_KEEP), the suppression it made, in the same
write transaction (``BEGIN IMMEDIATE``: one writer at a time, so two processes
counting one address's soft bounces take turns), and the evidence read back.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

from newsletter.storage.evidence import (
    INSERT_COLUMNS,
    Evidence,
    Recorded,
    SoftBounces,
    already,
    insert_values,
    planned,
    window_start,
)
from newsletter.storage.feedback_reads import FeedbackReads
from newsletter.storage.sqlite.connection import translated
from newsletter.storage.sqlite.subscribers import SubscriberStore

__all__ = ["FeedbackLog"]


@translated
class FeedbackLog(FeedbackReads):
    """Feedback on SQLite (:class:`newsletter.storage.base.FeedbackStore`)."""

    def __init__(self, conn: sqlite3.Connection, subscribers: SubscriberStore) -> None:
        self.conn = conn
        self.subscribers = subscribers

    def record(self, evidence: Evidence, soft: SoftBounces, *, now: str | None = None) -> Recorded:
        received = now or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        since = window_start(received, soft)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.execute(
                "SELECT id, outcome, action FROM feedback WHERE digest = ?", (evidence.digest,)
            ).fetchone()
            if before is not None:
                return Recorded(int(before[0]), False, already(str(before[1])), action=before[2])
            plan = planned(evidence, lambda: self._soft_sends(evidence, since), soft)
            cursor = self.conn.execute(
                f"INSERT INTO feedback ({INSERT_COLUMNS}) "  # noqa: S608 - constants
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                insert_values(evidence, received, plan.outcome),
            )
            evidence_id = int(cursor.lastrowid or 0)
            made = False
            if plan.suppress is not None:
                assert evidence.email
                made = self.subscribers.suppress_within(
                    evidence.email,
                    plan.suppress,
                    actor=f"feedback #{evidence_id} ({evidence.source})",
                )
            left = [
                n for n in plan.leave if self.subscribers.opt_out_within(n, evidence.email or "")
            ]
            if plan.suppress is not None or plan.leave:
                self.conn.execute(
                    "UPDATE feedback SET outcome = ? WHERE id = ?",
                    (plan.done(made, left), evidence_id),
                )
        return Recorded(
            evidence_id, True, plan.done(made, left), plan.suppress if made else None,
            evidence.action,
        )  # fmt: skip

    def _soft_sends(self, evidence: Evidence, since: str) -> int:
        """The sends with a soft bounce for this address since ``since``, this one too."""
        row = self.conn.execute(
            "SELECT count(DISTINCT send_id) FROM (SELECT send_id FROM feedback "
            "WHERE email = ? AND action = 'soft' AND received_at >= ? UNION SELECT ?)",
            (evidence.email, since, evidence.send_id),
        ).fetchone()
        return int(row[0])

    def resolve(self, evidence_id: int, outcome: str) -> bool:
        with self.conn:
            changed = self.conn.execute(
                "UPDATE feedback SET action = 'note', outcome = ? "
                "WHERE id = ? AND action = 'review'",
                (outcome, evidence_id),
            ).rowcount
        return bool(changed)

    def set_mailbox_mark(self, mailbox: str, uidvalidity: int, last_uid: int) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.conn:
            self.conn.execute(
                "INSERT INTO mailbox_marks (mailbox, uidvalidity, last_uid, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (mailbox) DO UPDATE SET "
                "uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, "
                "updated_at = excluded.updated_at",
                (mailbox, uidvalidity, last_uid, now),
            )
