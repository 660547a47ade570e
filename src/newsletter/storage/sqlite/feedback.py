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
    COUNTED_KINDS,
    INSERT_COLUMNS,
    KEPT_COLUMNS,
    DeliveryTo,
    Evidence,
    Kept,
    Recorded,
    Refusal,
    SentTo,
    SoftBounces,
    already,
    insert_values,
    kept_row,
    planned,
    unpacked,
    window_start,
)
from newsletter.storage.sqlite.connection import translated
from newsletter.storage.sqlite.subscribers import SubscriberStore

__all__ = ["FeedbackLog"]


@translated
class FeedbackLog:
    """Feedback on SQLite (:class:`newsletter.storage.base.FeedbackStore`)."""

    def __init__(self, conn: sqlite3.Connection, subscribers: SubscriberStore) -> None:
        self.conn = conn
        self.subscribers = subscribers

    def sent_to(self, send_id: int, seq: int) -> SentTo | None:
        row = self.conn.execute(
            "SELECT d.send_id, d.seq, d.email, s.issue_id, s.list_name, d.state "
            "FROM deliveries d JOIN sends s ON s.id = d.send_id "
            "WHERE d.send_id = ? AND d.seq = ?",
            (send_id, seq),
        ).fetchone()
        return None if row is None else SentTo(*row)

    def latest_delivery(self, email: str, issue_id: str | None = None) -> SentTo | None:
        # deliveries_by_email (schema 5): a year of weekly sends to a hundred thousand
        # is five million rows, and a provider's batch of bounces asks once per event.
        row = self.conn.execute(
            "SELECT d.send_id, d.seq, d.email, s.issue_id, s.list_name, d.state "
            "FROM deliveries d JOIN sends s ON s.id = d.send_id "
            "WHERE d.email = ? AND d.state NOT IN ('pending', 'suppressed') "
            "AND (? = '' OR s.issue_id = ?) ORDER BY d.send_id DESC LIMIT 1",
            (email, issue_id or "", issue_id or ""),
        ).fetchone()
        return None if row is None else SentTo(*row)

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

    def get(self, evidence_id: int) -> Kept | None:
        row = self.conn.execute(
            f"SELECT {KEPT_COLUMNS}, raw FROM feedback WHERE id = ?",  # noqa: S608 - constants
            (evidence_id,),
        ).fetchone()
        return None if row is None else kept_row(tuple(row[:-1]), unpacked(row[-1]))

    def about(self, email: str) -> list[Kept]:
        rows = self.conn.execute(
            f"SELECT {KEPT_COLUMNS} FROM feedback WHERE email = ? ORDER BY id",  # noqa: S608
            (email,),
        )
        return [kept_row(tuple(r)) for r in rows]

    def resolve(self, evidence_id: int, outcome: str) -> bool:
        with self.conn:
            changed = self.conn.execute(
                "UPDATE feedback SET action = 'note', outcome = ? "
                "WHERE id = ? AND action = 'review'",
                (outcome, evidence_id),
            ).rowcount
        return bool(changed)

    def kept_for_review(self, limit: int = 50) -> tuple[int, list[Kept]]:
        total = self.conn.execute("SELECT count(*) FROM feedback WHERE action = 'review'")
        rows = self.conn.execute(
            f"SELECT {KEPT_COLUMNS} FROM feedback WHERE action = 'review' "  # noqa: S608
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return int(total.fetchone()[0]), [kept_row(tuple(r)) for r in rows]

    def counts(self, send_id: int, since: str | None = None) -> dict[str, int]:
        found = dict.fromkeys(COUNTED_KINDS, 0)
        rows = self.conn.execute(
            "SELECT kind, count(DISTINCT seq) FROM feedback WHERE send_id = ? "
            "AND (action IN ('suppress', 'soft', 'unsubscribe') OR kind = 'refused') "
            "AND received_at >= ? "
            "GROUP BY kind",
            (send_id, since or ""),
        )
        for kind, number in rows:
            if kind in found:
                found[kind] = int(number)
        return found

    def deliveries_of(self, email: str) -> list[DeliveryTo]:
        rows = self.conn.execute(
            "SELECT s.issue_id, s.list_name, d.send_id, d.state, coalesce(d.detail, ''), "
            "coalesce(d.updated_at, s.created_at) FROM deliveries d "
            "JOIN sends s ON s.id = d.send_id WHERE d.email = ? ORDER BY d.send_id",
            (email,),
        )
        return [
            DeliveryTo(str(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]), str(r[5]))
            for r in rows
        ]

    def latest_issue(self) -> str | None:
        row = self.conn.execute("SELECT issue_id FROM sends ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    def attempted_since(self, send_id: int, since: str) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM deliveries WHERE send_id = ? AND state IN "
            "('sent', 'rejected', 'deferred', 'unknown') AND updated_at >= ?",
            (send_id, since),
        ).fetchone()
        return int(row[0]) if row else 0

    def for_send(self, send_id: int) -> list[Kept]:
        rows = self.conn.execute(
            f"SELECT {KEPT_COLUMNS} FROM feedback WHERE send_id = ? ORDER BY id",  # noqa: S608
            (send_id,),
        )
        return [kept_row(tuple(r)) for r in rows]

    def refusals(self, send_id: int, limit: int = 1000) -> list[Refusal]:
        rows = self.conn.execute(
            "SELECT d.seq, d.email, coalesce(d.code, 0), coalesce(d.detail, '') "
            "FROM deliveries d WHERE d.send_id = ? AND d.state = 'rejected' AND NOT EXISTS "
            "(SELECT 1 FROM feedback f WHERE f.send_id = d.send_id AND f.seq = d.seq "
            "AND f.source = 'smtp') ORDER BY d.seq LIMIT ?",
            (send_id, limit),
        )
        return [Refusal(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    def mailbox_mark(self, mailbox: str) -> tuple[int, int] | None:
        row = self.conn.execute(
            "SELECT uidvalidity, last_uid FROM mailbox_marks WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

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

    def member_lists(self, email: str, *, with_left: bool = False) -> list[str]:
        return [name for name, left in self.subscribers.lists_of(email) if with_left or not left]
