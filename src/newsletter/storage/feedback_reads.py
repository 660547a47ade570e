"""The feedback store's reads, the same SQL on both backends.

Input: a backend's connection (SQLite's or psycopg's: both have ``execute``) and the
placeholder its driver takes. Output: the read half of
:class:`~newsletter.storage.base.FeedbackStore` (the deliveries a report names, the
evidence kept, a send's counts, the mailbox marks), mixed into
:class:`~newsletter.storage.sqlite.feedback.FeedbackLog` and
:class:`~newsletter.storage.postgres.feedback.PgFeedback`, which keep what differs:
their writes, with each one's own transactions and locks. Each backend's
``translated`` wraps these methods too, so its driver's errors become ours.
"""

from __future__ import annotations

from typing import Any

from newsletter.storage.evidence import (
    COUNTED_KINDS,
    KEPT_COLUMNS,
    DeliveryTo,
    Kept,
    Refusal,
    SentTo,
    frozen_columns,
    kept_row,
    scan_mentions,
    unpacked,
)

__all__ = ["FeedbackReads"]


def _delivery_to(r: Any) -> DeliveryTo:
    return DeliveryTo(
        str(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]), str(r[5]),
        str(r[6]), str(r[7]), frozen_columns(r[8]), int(r[9]),
        None if r[10] is None else int(r[10]),
    )  # fmt: skip


class FeedbackReads:
    """Reads written with ``?`` placeholders, given to the driver with its own."""

    conn: Any
    subscribers: Any
    PLACEHOLDER = "?"
    BACKEND_NEUTRAL = True  # each backend's `translated` wraps these (storage.boundary)

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        # No query here holds a literal "?" or "%": the swap is safe for both drivers.
        return self.conn.execute(sql.replace("?", self.PLACEHOLDER), params)

    def sent_to(self, send_id: int, seq: int) -> SentTo | None:
        row = self._read(
            "SELECT d.send_id, d.seq, d.email, s.issue_id, s.list_name, d.state "
            "FROM deliveries d JOIN sends s ON s.id = d.send_id "
            "WHERE d.send_id = ? AND d.seq = ?",
            (send_id, seq),
        ).fetchone()
        return None if row is None else SentTo(*row)

    def latest_delivery(self, email: str, issue_id: str | None = None) -> SentTo | None:
        # deliveries_by_email: a year of weekly sends to a hundred thousand is five
        # million rows, and a provider's batch of bounces asks once per event.
        row = self._read(
            "SELECT d.send_id, d.seq, d.email, s.issue_id, s.list_name, d.state "
            "FROM deliveries d JOIN sends s ON s.id = d.send_id "
            "WHERE d.email = ? AND d.state NOT IN ('pending', 'suppressed') "
            "AND (? = '' OR s.issue_id = ?) ORDER BY d.send_id DESC LIMIT 1",
            (email, issue_id or "", issue_id or ""),
        ).fetchone()
        return None if row is None else SentTo(*row)

    def get(self, evidence_id: int) -> Kept | None:
        row = self._read(
            f"SELECT {KEPT_COLUMNS}, raw FROM feedback WHERE id = ?",  # noqa: S608 - constants
            (evidence_id,),
        ).fetchone()
        return None if row is None else kept_row(tuple(row[:-1]), unpacked(row[-1]))

    def about(self, email: str) -> list[Kept]:
        rows = self._read(
            f"SELECT {KEPT_COLUMNS} FROM feedback WHERE email = ? ORDER BY id",  # noqa: S608
            (email,),
        )
        return [kept_row(tuple(r)) for r in rows]

    def kept_for_review(self, limit: int = 50) -> tuple[int, list[Kept]]:
        total = self._read("SELECT count(*) FROM feedback WHERE action = 'review'")
        counted = total.fetchone()
        rows = self._read(
            f"SELECT {KEPT_COLUMNS} FROM feedback WHERE action = 'review' "  # noqa: S608
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return int(counted[0]) if counted else 0, [kept_row(tuple(r)) for r in rows]

    def counts(self, send_id: int, since: str | None = None) -> dict[str, int]:
        found = dict.fromkeys(COUNTED_KINDS, 0)
        rows = self._read(
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
        rows = self._read(
            "SELECT s.issue_id, s.list_name, d.send_id, d.state, coalesce(d.detail, ''), "
            "coalesce(d.updated_at, s.created_at), d.first_name, d.last_name, d.attributes, "
            "d.attempts, d.code FROM deliveries d "
            "JOIN sends s ON s.id = d.send_id WHERE d.email = ? ORDER BY d.send_id",
            (email,),
        )
        return [_delivery_to(r) for r in rows]

    def mentioning(self, email: str) -> list[Kept]:
        """Kept messages not matched to ``email`` whose message names it (a report
        about a delivery to someone else, one matched to nobody): a subject access
        request and an erasure cover these too."""
        ids, _ = scan_mentions(self._read, email)
        return [kept for kept in map(self.get, ids) if kept is not None]

    def latest_issue(self) -> str | None:
        row = self._read("SELECT issue_id FROM sends ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    def attempted_since(self, send_id: int, since: str) -> int:
        row = self._read(
            "SELECT count(*) FROM deliveries WHERE send_id = ? AND state IN "
            "('sent', 'rejected', 'deferred', 'unknown') AND updated_at >= ?",
            (send_id, since),
        ).fetchone()
        return int(row[0]) if row else 0

    def for_send(self, send_id: int) -> list[Kept]:
        rows = self._read(
            f"SELECT {KEPT_COLUMNS} FROM feedback WHERE send_id = ? ORDER BY id",  # noqa: S608
            (send_id,),
        )
        return [kept_row(tuple(r)) for r in rows]

    def refusals(self, send_id: int, limit: int = 1000) -> list[Refusal]:
        rows = self._read(
            "SELECT d.seq, d.email, coalesce(d.code, 0), coalesce(d.detail, '') "
            "FROM deliveries d WHERE d.send_id = ? AND d.state = 'rejected' AND NOT EXISTS "
            "(SELECT 1 FROM feedback f WHERE f.send_id = d.send_id AND f.seq = d.seq "
            "AND f.source = 'smtp') ORDER BY d.seq LIMIT ?",
            (send_id, limit),
        )
        return [Refusal(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    def mailbox_mark(self, mailbox: str) -> tuple[int, int] | None:
        row = self._read(
            "SELECT uidvalidity, last_uid FROM mailbox_marks WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def member_lists(self, email: str, *, with_left: bool = False) -> list[str]:
        return [name for name, left in self.subscribers.lists_of(email) if with_left or not left]
