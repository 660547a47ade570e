"""SQLite subscriber store: lists, members, opt-outs and the suppression list, in the database.

Input: an open database connection and parsed rows or addresses. Output:
counts, members with their state, and :class:`Recipient` streams. Imports are
one transaction, after the whole file was read and checked without a lock:
either every good row lands or, when a bad row is found and bad rows are not
to be skipped, none does; a column a row does not have
keeps its stored value. Each member of a list is subscribed, opted out of
that list (``list_optouts``), or suppressed (``suppressions``: unsubscribed,
bounced, complained; every list). Suppressed and opted-out members stay on
their lists, but :meth:`SubscriberStore.audience` never yields them, and no
import lifts either state; only :meth:`SubscriberStore.unsuppress` and
:meth:`SubscriberStore.opt_in` do, and every suppression and its lifting is
logged with who did it.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence

from newsletter.audience.csv_import import SUPPRESSION_REASONS, ParsedRow
from newsletter.errors import Problem
from newsletter.models import Recipient
from newsletter.storage.base import (
    BATCH,
    MAX_LIFT_REASON,
    MAX_PROBLEMS,
    ImportReport,
    ListStates,
    Member,
    Suppression,
    lift_reason,
)
from newsletter.storage.signups import (
    ErasureCheck,
    ImportConsent,
    import_consent_params,
    import_consent_sql,
    refuse_late_erasures,
)
from newsletter.storage.sqlite.connection import translated

__all__ = [
    "MAX_LIFT_REASON",
    "ImportReport",
    "ListStates",
    "Member",
    "SubscriberStore",
    "Suppression",
    "decode_attributes",
    "lift_reason",
]


# Batches follow list_members' primary key (list_name, subscriber_id). Ordering
# by the subscribers' own id instead made SQLite sort every remaining member
# for each batch: quadratic, 200 s to freeze a list of 1,000,000.
MEMBERS_SQL = (
    "SELECT u.id, u.email, u.first_name, u.last_name, u.attributes, s.reason, s.created_at, "
    "o.created_at "
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "LEFT JOIN suppressions s ON s.email = u.email "
    "LEFT JOIN list_optouts o ON o.list_name = m.list_name AND o.email = u.email "
    "WHERE m.list_name = ? AND m.subscriber_id > ? ORDER BY m.subscriber_id LIMIT ?"
)
# The fourth column holds only the attributes asked for (?4, a JSON list of
# names), as JSON, or NULL when none are: a send keeps what its issue uses.
AUDIENCE_SQL = (
    "SELECT u.id, u.email, u.first_name, u.last_name, CASE WHEN ?4 = '[]' THEN NULL ELSE "
    "(SELECT json_group_object(j.key, j.value) FROM json_each(u.attributes) j "
    "WHERE j.key IN (SELECT value FROM json_each(?4))) END "
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "WHERE m.list_name = ?1 AND m.subscriber_id > ?2 "
    "AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = u.email) "
    "AND NOT EXISTS (SELECT 1 FROM list_optouts o WHERE o.list_name = ?1 AND o.email = u.email) "
    "ORDER BY m.subscriber_id LIMIT ?3"
)


def decode_attributes(stored: str | None) -> dict[str, str]:
    """Stored attributes (a JSON object) as a recipient carries them: text values only."""
    if not stored or stored == "{}":
        return {}
    decoded = json.loads(stored)
    return {k: v for k, v in decoded.items() if isinstance(v, str)}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@translated
class SubscriberStore:
    """Subscribers on SQLite (:class:`newsletter.storage.base.Subscribers`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- import ---------------------------------------------------------------
    def import_rows(
        self,
        list_name: str,
        rows: Iterable[ParsedRow | Problem],
        *,
        skip_invalid: bool,
        actor: str = "import",
        consent: ImportConsent | None = None,
        erased: ErasureCheck | None = None,
    ) -> ImportReport:
        """Add rows to a list in one transaction; roll back on any problem unless skipping.

        Columns a row does not have keep their stored values. An import never
        lifts an opt-out or a suppression; a row whose ``state`` says opted-out or
        suppressed (an export's) records that, with ``actor`` in the log.

        The file is read and checked first into a private temporary table, holding
        no lock, and only then written in one short transaction: reading a large
        file takes most of the time, and while the write lock is held unsubscribe
        clicks and sends wait for it."""
        report = ImportReport(list_name)
        cur = self.conn.cursor()
        # In the temporary database (a file, not memory): a million rows stay
        # out of the process, and duplicates within the file are found there.
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS import_rows (seq INTEGER PRIMARY KEY, "
            "email TEXT NOT NULL UNIQUE, first TEXT, last TEXT, patch TEXT NOT NULL, "
            "state TEXT, reason TEXT, since TEXT)"
        )
        try:
            cur.execute("BEGIN")  # touches only the temporary database: no lock on ours
            cur.execute("DELETE FROM temp.import_rows")
            last_bad: int | None = None
            columns: dict[str, None] = {}  # the file's own columns, in order
            for row in rows:
                if isinstance(row, Problem):
                    if row.line is None or row.line != last_bad:
                        report.skipped += 1
                    last_bad = row.line
                    if len(report.problems) < MAX_PROBLEMS:
                        report.problems.append(row)
                    else:
                        report.more_problems += 1
                    continue
                if report.skipped and not skip_invalid:
                    continue  # nothing will be written: only look for more problems
                if erased is not None and erased(row.email):
                    report.refuse_erased(row.line)
                    continue
                if len(columns) < len(row.attributes):
                    columns.update(dict.fromkeys(row.attributes))
                if not cur.execute(
                    "INSERT INTO temp.import_rows (email, first, last, patch, state, reason, "
                    "since) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        row.email,
                        row.first_name,
                        row.last_name,
                        # A merge patch (RFC 7396): an empty cell becomes null, which
                        # removes that attribute; one the file has no column for stays.
                        json.dumps({k: (v if v else None) for k, v in row.attributes.items()}),
                        row.state,
                        row.reason if row.state == "suppressed" else None,
                        row.since,
                    ),
                ).rowcount:
                    report.duplicates += 1
            cur.execute("COMMIT")
            if report.skipped and not skip_invalid:
                report.duplicates = 0
                return report
            cur.execute("BEGIN IMMEDIATE")
            if erased is not None:  # an erasure made while the file was read
                for _ in range(refuse_late_erasures(cur.execute, "temp.import_rows", "?", erased)):
                    report.refuse_erased(0)
            if consent is not None:  # before the rows: it asks who joins the list now
                report.consented = self._consents(cur, list_name, consent)
            self._apply(cur, list_name, report, actor, _now())
            report.columns = list(columns)
            cur.executemany(
                "INSERT INTO list_columns (list_name, name, added_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                ((list_name, column, _now()) for column in columns),
            )
            cur.execute("COMMIT")
            report.committed = True
        except BaseException:
            # KeyboardInterrupt included: an interrupted import leaves the list as it was.
            if self.conn.in_transaction:
                cur.execute("ROLLBACK")
            raise
        finally:
            if not self.conn.in_transaction:
                cur.execute("DELETE FROM temp.import_rows")
        return report

    @staticmethod
    def _consents(cur: sqlite3.Cursor, list_name: str, consent: ImportConsent) -> int:
        """The import's consent record for each staged row it adds to the list, or that
        has none for it (storage.signups.import_consent_sql)."""
        keep, record = import_consent_sql("temp.import_rows", "?")
        text, rows_params = import_consent_params(consent, list_name)
        cur.execute(keep, text)
        return int(cur.execute(record, rows_params).rowcount)

    def _apply(
        self, cur: sqlite3.Cursor, list_name: str, report: ImportReport, actor: str, now: str
    ) -> None:
        """Write the checked rows of temp.import_rows, in file order (new subscribers get
        their ids in it), set by set rather than row by row."""
        cur.execute(
            "UPDATE subscribers SET first_name = coalesce(r.first, subscribers.first_name), "
            "last_name = coalesce(r.last, subscribers.last_name), "
            "attributes = json_patch(subscribers.attributes, r.patch) "
            # Driven by the file's rows, not a scan of every subscriber: a
            # ten-row import into a database of a million stays instant.
            "FROM (SELECT email, first, last, patch FROM temp.import_rows ORDER BY seq) r "
            "WHERE r.email = subscribers.email"
        )
        cur.execute(
            "INSERT INTO subscribers (email, first_name, last_name, attributes, created_at) "
            "SELECT email, coalesce(first, ''), coalesce(last, ''), json_patch('{}', patch), ? "
            "FROM temp.import_rows WHERE true ORDER BY seq ON CONFLICT (email) DO NOTHING",
            (now,),
        )
        report.added = cur.execute(
            "INSERT INTO list_members (list_name, subscriber_id, added_at) "
            "SELECT ?, u.id, ? FROM temp.import_rows r JOIN subscribers u ON u.email = r.email "
            "WHERE true ORDER BY r.seq ON CONFLICT DO NOTHING",
            (list_name, now),
        ).rowcount
        staged = cur.execute("SELECT count(*) FROM temp.import_rows").fetchone()[0]
        report.updated = staged - report.added
        # An export's newsletter_since is when the person left, and stays so: the
        # log records when this import wrote it.
        report.newly_suppressed = cur.execute(
            "INSERT INTO suppression_log (email, action, reason, list_name, actor, created_at) "
            "SELECT r.email, 'suppress', r.reason, ?, ?, ? FROM temp.import_rows r "
            "WHERE r.reason IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = r.email) ORDER BY r.seq",
            (list_name, actor, now),
        ).rowcount
        cur.execute(
            "INSERT INTO suppressions (email, reason, list_name, created_at) "
            "SELECT email, reason, ?, coalesce(since, ?) FROM temp.import_rows "
            "WHERE reason IS NOT NULL ORDER BY seq ON CONFLICT DO NOTHING",
            (list_name, now),
        )
        report.opted_out = cur.execute(
            "INSERT INTO list_optouts (list_name, email, created_at) "
            "SELECT ?, email, coalesce(since, ?) FROM temp.import_rows "
            "WHERE state = 'opted-out' ORDER BY seq ON CONFLICT DO NOTHING",
            (list_name, now),
        ).rowcount
        # Left this list or everything: importing did not undo it.
        report.suppressed = cur.execute(
            "SELECT count(*) FROM temp.import_rows i "
            "WHERE EXISTS (SELECT 1 FROM suppressions s WHERE s.email = i.email) "
            "OR EXISTS (SELECT 1 FROM list_optouts o "
            "WHERE o.list_name = ? AND o.email = i.email)",
            (list_name,),
        ).fetchone()[0]

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

    def states(self, list_name: str) -> ListStates:
        """The members of ``list_name`` by state: subscribed, opted out, suppressed by reason."""
        rows = self.conn.execute(
            "SELECT s.reason, o.email IS NOT NULL, count(*) FROM list_members m "
            "JOIN subscribers u ON u.id = m.subscriber_id "
            "LEFT JOIN suppressions s ON s.email = u.email "
            "LEFT JOIN list_optouts o ON o.list_name = m.list_name AND o.email = u.email "
            "WHERE m.list_name = ? GROUP BY 1, 2",
            (list_name,),
        ).fetchall()
        subscribed = opted_out = 0
        suppressed: dict[str, int] = {}
        for reason, left, n in rows:
            if reason is not None:
                suppressed[reason] = suppressed.get(reason, 0) + n
            elif left:
                opted_out += n
            else:
                subscribed += n
        return ListStates(subscribed, opted_out, dict(sorted(suppressed.items())))

    def attribute_names(self, list_name: str) -> list[str]:
        """Every attribute any member of ``list_name`` has, and every column it was imported
        with (empty for all, it is still a merge field), sorted: the export's columns."""
        rows = self.conn.execute(
            "SELECT j.key FROM list_members m "
            "JOIN subscribers u ON u.id = m.subscriber_id, json_each(u.attributes) j "
            "WHERE m.list_name = ?1 UNION SELECT name FROM list_columns WHERE list_name = ?1 "
            "ORDER BY 1",
            (list_name,),
        )
        return [str(r[0]) for r in rows]

    def columns(self, list_name: str) -> list[str]:
        """The columns ``list_name`` was ever imported with, beyond email and names, in the
        order they came: what merge fields a send to it can use."""
        rows = self.conn.execute(
            "SELECT name FROM list_columns WHERE list_name = ? ORDER BY added_at, name",
            (list_name,),
        )
        return [str(r[0]) for r in rows]

    def recipient(self, email: str) -> Recipient | None:
        """The subscriber ``email`` (normalised) as a message addresses them, or None."""
        row = self.conn.execute(
            "SELECT email, first_name, last_name, attributes FROM subscribers WHERE email = ?",
            (email,),
        ).fetchone()
        if row is None:
            return None
        return Recipient(row[0], row[1], row[2], decode_attributes(row[3]))

    def members(self, list_name: str) -> Iterator[Member]:
        """Every member with its state (suppressed, opted out), in a stable order."""
        for r in self._batched(MEMBERS_SQL, list_name):
            yield Member(r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7])

    def audience(self, list_name: str, columns: Sequence[str] = ()) -> Iterator[Recipient]:
        """Who a send to ``list_name`` goes to: members minus suppressions, in batches,
        each with the attributes named in ``columns`` (the ones the issue uses)."""
        for r in self._batched(AUDIENCE_SQL, list_name, json.dumps(list(columns))):
            yield Recipient(r[1], r[2], r[3], decode_attributes(r[4]))

    def _batched(self, sql: str, list_name: str, *more: object) -> Iterator[sqlite3.Row]:
        """Rows of ``sql`` (keyed on subscriber id, first column) in batches: flat memory."""
        last = 0
        while True:
            rows = self.conn.execute(sql, (list_name, last, BATCH, *more)).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def suppression(self, email: str) -> str | None:
        row = self.conn.execute("SELECT reason FROM suppressions WHERE email = ?", (email,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def suppression_info(self, email: str) -> Suppression | None:
        """Why and since when ``email`` is suppressed, or None."""
        found = self.conn.execute(
            "SELECT reason, list_name, created_at FROM suppressions WHERE email = ?", (email,)
        ).fetchone()
        return None if found is None else Suppression(email, found[0], found[1], found[2])

    def suppression_history(self, email: str) -> list[tuple[str, str, str, str | None, str]]:
        """The suppression log of ``email``, oldest first:
        (when, action, reason, list, who)."""
        rows = self.conn.execute(
            "SELECT created_at, action, reason, list_name, actor FROM suppression_log "
            "WHERE email = ? ORDER BY id",
            (email,),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

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
        """Never mail ``email`` again, on any list. Returns False if it already was, for
        this reason or a weightier one.

        A weightier reason replaces a lighter one (complained > bounced > unsubscribed):
        the person may lift an ``unsubscribed`` suppression themselves by ticking a list,
        so a complaint recorded later must not stay hidden behind it. Every change is
        also written to ``suppression_log`` with who made it."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"unknown suppression reason {reason!r}")
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.suppress_within(email, reason, list_name=list_name, actor=actor)

    def suppress_within(
        self, email: str, reason: str, *, list_name: str | None = None, actor: str
    ) -> bool:
        """:meth:`suppress`, inside the caller's open write transaction (the feedback
        store suppresses in the transaction that keeps the evidence)."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"unknown suppression reason {reason!r}")
        now = _now()
        changed = self.conn.execute(
            "INSERT INTO suppressions (email, reason, list_name, created_at) "
            "VALUES (?1, ?2, ?3, ?4) ON CONFLICT (email) DO UPDATE SET "
            "reason = excluded.reason, list_name = excluded.list_name, "
            "created_at = excluded.created_at "
            "WHERE (CASE excluded.reason WHEN 'complained' THEN 3 WHEN 'bounced' THEN 2 "
            "ELSE 1 END) > (CASE reason WHEN 'complained' THEN 3 WHEN 'bounced' THEN 2 "
            "ELSE 1 END)",
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
            return self.opt_out_within(list_name, email)

    def opt_out_within(self, list_name: str, email: str) -> bool:
        """:meth:`opt_out`, inside the caller's open write transaction (the feedback
        store's, for a mailed unsubscribe)."""
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

        Returns the reason it had been suppressed for, or None if it was not.
        ValueError if ``reason`` is not one line of text (see :func:`lift_reason`)."""
        reason = lift_reason(reason)
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
