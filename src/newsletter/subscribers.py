"""Subscriber store: lists, members and the suppression list, in the database.

Input: an open database connection and parsed rows or addresses. Output:
counts and :class:`Recipient` streams. Imports are one transaction: either
every good row lands or, when a bad row is found and bad rows are not to be
skipped, none does. Suppressed addresses (unsubscribed, bounced, complained)
may sit on lists, but :meth:`SubscriberStore.audience` never yields them, so
no send reaches them, whichever list they were imported into.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from newsletter.csv_import import ParsedRow
from newsletter.errors import Problem
from newsletter.models import Recipient

SUPPRESSION_REASONS = ("unsubscribed", "bounced", "complained")
BATCH = 1000

# Batches follow list_members' primary key (list_name, subscriber_id). Ordering
# by the subscribers' own id instead made SQLite sort every remaining member
# for each batch: quadratic, 200 s to freeze a list of 1,000,000.
MEMBERS_SQL = (
    "SELECT u.id, u.email, u.first_name, u.last_name, u.attributes, s.reason "
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "LEFT JOIN suppressions s ON s.email = u.email "
    "WHERE m.list_name = ? AND m.subscriber_id > ? ORDER BY m.subscriber_id LIMIT ?"
)
AUDIENCE_SQL = (
    "SELECT u.id, u.email, u.first_name, u.last_name "
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "WHERE m.list_name = ?1 AND m.subscriber_id > ?2 "
    "AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = u.email) "
    "AND NOT EXISTS (SELECT 1 FROM list_optouts o WHERE o.list_name = ?1 AND o.email = u.email) "
    "ORDER BY m.subscriber_id LIMIT ?3"
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(slots=True)
class ImportReport:
    list_name: str
    added: int = 0  # new on this list
    updated: int = 0  # already on this list; names and attributes refreshed
    duplicates: int = 0  # the same address again further down the file
    suppressed: int = 0  # on the list now, but will never be mailed
    problems: list[Problem] = field(default_factory=list)
    committed: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    email: str
    first_name: str
    last_name: str
    attributes: dict[str, str]
    suppressed: str | None


class SubscriberStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- import ---------------------------------------------------------------
    def import_rows(
        self, list_name: str, rows: Iterable[ParsedRow | Problem], *, skip_invalid: bool
    ) -> ImportReport:
        """Add rows to a list in one transaction; roll back on any problem unless skipping."""
        report = ImportReport(list_name)
        seen: set[str] = set()
        now = _now()
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                if isinstance(row, Problem):
                    report.problems.append(row)
                    continue
                if row.email in seen:
                    report.duplicates += 1
                    continue
                seen.add(row.email)
                self._upsert(cur, list_name, row, now, report)
            if report.problems and not skip_invalid:
                cur.execute("ROLLBACK")
                report.added = report.updated = report.suppressed = 0
                return report
            cur.execute("COMMIT")
            report.committed = True
        except BaseException:
            # KeyboardInterrupt included: an interrupted import leaves the list as it was.
            if self.conn.in_transaction:
                cur.execute("ROLLBACK")
            raise
        return report

    def _upsert(
        self, cur: sqlite3.Cursor, list_name: str, row: ParsedRow, now: str, report: ImportReport
    ) -> None:
        sub_id = cur.execute(
            "INSERT INTO subscribers (email, first_name, last_name, attributes, created_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (email) DO UPDATE SET "
            "first_name = excluded.first_name, last_name = excluded.last_name, "
            "attributes = json_patch(subscribers.attributes, excluded.attributes) "
            "RETURNING id",
            (row.email, row.first_name, row.last_name, json.dumps(row.attributes), now),
        ).fetchone()[0]
        inserted = cur.execute(
            "INSERT INTO list_members (list_name, subscriber_id, added_at) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (list_name, sub_id, now),
        ).rowcount
        if inserted:
            report.added += 1
        else:
            report.updated += 1
        if cur.execute(
            "SELECT 1 FROM suppressions WHERE email = ?1 UNION ALL "
            "SELECT 1 FROM list_optouts WHERE list_name = ?2 AND email = ?1",
            (row.email, list_name),
        ).fetchone():
            report.suppressed += 1  # left this list or everything: importing does not undo it

    # -- reading --------------------------------------------------------------
    def lists(self) -> list[tuple[str, int]]:
        rows = self.conn.execute(
            "SELECT list_name, count(*) FROM list_members GROUP BY list_name ORDER BY list_name"
        )
        return [(r[0], r[1]) for r in rows]

    def count(self, list_name: str) -> tuple[int, int]:
        """(members, of whom suppressed)."""
        row = self.conn.execute(
            "SELECT count(*), sum(s.email IS NOT NULL OR o.email IS NOT NULL) FROM list_members m "
            "JOIN subscribers u ON u.id = m.subscriber_id "
            "LEFT JOIN suppressions s ON s.email = u.email "
            "LEFT JOIN list_optouts o ON o.list_name = m.list_name AND o.email = u.email "
            "WHERE m.list_name = ?",
            (list_name,),
        ).fetchone()
        return int(row[0]), int(row[1] or 0)

    def members(self, list_name: str) -> Iterator[Member]:
        """Every member, suppressed ones included (marked), in a stable order."""
        for r in self._batched(MEMBERS_SQL, list_name):
            yield Member(r[1], r[2], r[3], json.loads(r[4]), r[5])

    def audience(self, list_name: str) -> Iterator[Recipient]:
        """Who a send to ``list_name`` goes to: members minus suppressions, in batches."""
        for r in self._batched(AUDIENCE_SQL, list_name):
            yield Recipient(r[1], r[2], r[3])

    def _batched(self, sql: str, list_name: str) -> Iterator[sqlite3.Row]:
        """Rows of ``sql`` (keyed on subscriber id, first column) in batches: flat memory."""
        last = 0
        while True:
            rows = self.conn.execute(sql, (list_name, last, BATCH)).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def suppression(self, email: str) -> str | None:
        row = self.conn.execute("SELECT reason FROM suppressions WHERE email = ?", (email,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    # -- changes --------------------------------------------------------------
    def remove(self, list_name: str, emails: Iterable[str]) -> int:
        """Take addresses off a list (they stay in other lists); returns how many were on it."""
        removed = 0
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for email in emails:
                removed += self.conn.execute(
                    "DELETE FROM list_members WHERE list_name = ? AND subscriber_id = "
                    "(SELECT id FROM subscribers WHERE email = ?)",
                    (list_name, email),
                ).rowcount
        return removed

    def suppress(
        self, email: str, reason: str, *, list_name: str | None = None, actor: str = "cli"
    ) -> bool:
        """Never mail ``email`` again, on any list. Returns False if it already was.

        Every change is also written to ``suppression_log`` with who made it."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"unknown suppression reason {reason!r}")
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            now = _now()
            changed = self.conn.execute(
                "INSERT INTO suppressions (email, reason, list_name, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (email, reason, list_name, now),
            ).rowcount
            if changed:
                self._log(email, "suppress", reason, list_name, actor, now)
        return bool(changed)

    def _log(
        self, email: str, action: str, reason: str, list_name: str | None, actor: str, now: str
    ) -> None:
        self.conn.execute(
            "INSERT INTO suppression_log (email, action, reason, list_name, actor, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (email, action, reason, list_name, actor, now),
        )

    def opt_out(self, list_name: str, email: str) -> bool:
        """``email`` leaves ``list_name``: no later send to that list reaches it, even after a
        re-import. Returns False if it had already left."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            changed = self.conn.execute(
                "INSERT INTO list_optouts (list_name, email, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (list_name, email, _now()),
            ).rowcount
        return bool(changed)

    def opt_in(self, list_name: str, email: str) -> bool:
        """Undo :meth:`opt_out` (the subscriber asked to come back)."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            changed = self.conn.execute(
                "DELETE FROM list_optouts WHERE list_name = ? AND email = ?", (list_name, email)
            ).rowcount
        return bool(changed)

    def lists_of(self, email: str) -> list[tuple[str, bool]]:
        """The lists ``email`` is a member of, each with whether it has left it."""
        rows = self.conn.execute(
            "SELECT m.list_name, EXISTS (SELECT 1 FROM list_optouts o "
            "WHERE o.list_name = m.list_name AND o.email = u.email) "
            "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
            "WHERE u.email = ? ORDER BY m.list_name",
            (email,),
        )
        return [(r[0], bool(r[1])) for r in rows]

    def unsuppress(self, email: str, *, reason: str, actor: str) -> str | None:
        """Lift the suppression of ``email``; ``reason`` and ``actor`` are recorded.

        Returns the reason it had been suppressed for, or None if it was not."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute(
                "DELETE FROM suppressions WHERE email = ? RETURNING reason", (email,)
            ).fetchone()
            if row is not None:
                self._log(email, "unsuppress", reason, None, actor, _now())
        return None if row is None else str(row[0])

    def choose_lists(self, email: str, wanted: Collection[str], *, actor: str) -> str | None:
        """Save a preferences form in one transaction; returns the suppression reason after.

        ``email`` stays on (or comes back to) the lists in ``wanted`` that it is a member
        of and leaves its others. Leaving every one suppresses it (``unsubscribed``), so
        that lists created or imported later do not reach it either; choosing one lifts an
        ``unsubscribed`` suppression, never a ``bounced`` or ``complained`` one."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            now = _now()
            names = [name for name, _left in self.lists_of(email)]
            for name in names:
                if name in wanted:
                    self.conn.execute(
                        "DELETE FROM list_optouts WHERE list_name = ? AND email = ?", (name, email)
                    )
                else:
                    self.conn.execute(
                        "INSERT INTO list_optouts (list_name, email, created_at) "
                        "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (name, email, now),
                    )
            reason = self.suppression(email)
            staying = [name for name in names if name in wanted]
            if not staying and reason is None:
                self.conn.execute(
                    "INSERT INTO suppressions (email, reason, list_name, created_at) "
                    "VALUES (?, 'unsubscribed', NULL, ?)",
                    (email, now),
                )
                self._log(email, "suppress", "unsubscribed", None, actor, now)
                reason = "unsubscribed"
            elif staying and reason == "unsubscribed":
                self.conn.execute("DELETE FROM suppressions WHERE email = ?", (email,))
                self._log(
                    email, "unsuppress", "chose a list on the preferences page", None, actor, now
                )
                reason = None
        return reason
