"""PostgreSQL subscriber store: lists, members, opt-outs and the suppression list on the server.

Input: an autocommit psycopg connection and parsed rows or addresses. Output:
counts, members with their state, and :class:`Recipient` streams, exactly as
:mod:`newsletter.storage.sqlite.subscribers` gives them (the reference): same
return values, same errors, same order (text ordered byte by byte, as SQLite
does, whatever the database's collation).

An import streams the file's rows with ``COPY`` into a temporary table of its
own transaction, checking them as they come, and only then writes them set by
set; reading the file takes no lock on newsletter's tables, and either every
good row lands or none does. Lists are streamed by subscriber id in keyset
batches, so memory stays flat. Suppressing is one ``INSERT ... ON CONFLICT DO
UPDATE`` whose condition keeps the weightier reason (complained > bounced >
unsubscribed), so two processes suppressing one address at once cannot lose
the weightier one; every suppression and its lifting is logged with who did it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg

from newsletter.audience.csv_import import SUPPRESSION_REASONS, ParsedRow
from newsletter.errors import Problem
from newsletter.models import Recipient
from newsletter.storage.base import (
    BATCH,
    MAX_PROBLEMS,
    ImportReport,
    ListStates,
    Member,
    Suppression,
    batches,
    lift_reason,
)
from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import translated
from newsletter.storage.signups import (
    ErasureCheck,
    ImportConsent,
    import_consent_params,
    import_consent_sql,
    refuse_late_erasures,
)

__all__ = ["AUDIENCE_SQL", "MEMBERS_SQL", "PgSubscribers", "text_attributes"]

# The file's rows, checked, for the length of the import's transaction only
# (ON COMMIT DROP: a rolled-back or finished import leaves nothing behind).
# ``sets`` are the non-empty cells, ``drops`` the columns present but empty: the
# two halves of the SQLite backend's JSON merge patch (RFC 7396), which for a
# flat object is "add or replace these keys, remove those".
_STAGE_SQL = (
    "CREATE TEMP TABLE import_rows (seq integer NOT NULL, email text NOT NULL, first text, "
    "last text, sets jsonb NOT NULL, drops text[] NOT NULL, state text, reason text, "
    "since text, fresh boolean NOT NULL DEFAULT false) ON COMMIT DROP"
)
_COPY_SQL = (
    "COPY import_rows (seq, email, first, last, sets, drops, state, reason, since) FROM STDIN"
)
_COPY_TYPES = ["integer", "text", "text", "text", "jsonb", "text[]", "text", "text", "text"]

# Keyset batches follow list_members' primary key (list_name, subscriber_id):
# each batch is an index range scan, never a sort of the remaining members.
MEMBERS_SQL = (
    "SELECT u.id, u.email, u.first_name, u.last_name, u.attributes, s.reason, s.created_at, "
    "o.created_at "
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "LEFT JOIN suppressions s ON s.email = u.email "
    "LEFT JOIN list_optouts o ON o.list_name = m.list_name AND o.email = u.email "
    "WHERE m.list_name = %(list)s AND m.subscriber_id > %(last)s AND u.id > %(last)s "
    "ORDER BY m.subscriber_id LIMIT %(batch)s"
)
# The fifth column holds only the attributes asked for, or NULL when none are:
# a send keeps what its issue uses.
AUDIENCE_SQL = (
    "SELECT u.id, u.email, u.first_name, u.last_name, "
    "CASE WHEN cardinality(%(columns)s::text[]) = 0 THEN NULL ELSE "
    "(SELECT jsonb_object_agg(j.key, j.value) FROM jsonb_each(u.attributes) j "
    "WHERE j.key = ANY(%(columns)s::text[])) END "
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "WHERE m.list_name = %(list)s AND m.subscriber_id > %(last)s AND u.id > %(last)s "
    "AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = u.email) "
    "AND NOT EXISTS (SELECT 1 FROM list_optouts o "
    "WHERE o.list_name = %(list)s AND o.email = u.email) "
    "ORDER BY m.subscriber_id LIMIT %(batch)s"
)


def text_attributes(stored: dict[str, Any] | None) -> dict[str, str]:
    """Stored attributes (jsonb, which psycopg gives as a dict) as a recipient carries
    them: text values only, as :func:`newsletter.storage.sqlite.subscribers.decode_attributes`
    does with SQLite's JSON text."""
    if not stored:
        return {}
    return {k: v for k, v in stored.items() if isinstance(v, str)}


def _now() -> str:
    # The same text as the SQLite backend writes: `db copy` moves rows as they are,
    # and exports read the same either way. These times are records, never compared
    # across hosts to decide anything (leases use the server's clock).
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@translated
class PgSubscribers:
    """Subscribers on PostgreSQL (:class:`newsletter.storage.base.Subscribers`)."""

    def __init__(self, conn: psycopg.Connection[Any], location: Location) -> None:
        self.conn = conn
        self.location = location

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

        The rows are checked as they are read and streamed (COPY) into a temporary
        table; only once the whole file is in do the writes to newsletter's tables
        start, so no row of theirs is locked while a large file is read (an
        unsubscribe click meanwhile does not wait), and a ten-row import into a
        database of a million touches ten rows."""
        report = ImportReport(list_name)
        columns: dict[str, None] = {}  # the file's own columns, in order
        refused = False
        # KeyboardInterrupt included: leaving the block by any exception rolls back,
        # and the temporary table goes with it.
        with self.conn.transaction() as tx:
            self.conn.execute(_STAGE_SQL)
            with self.conn.cursor() as cur:
                with cur.copy(_COPY_SQL) as copy:
                    copy.set_types(_COPY_TYPES)
                    for row in self._checked(rows, report, columns, skip_invalid, erased):
                        copy.write_row(row)
                if report.skipped and not skip_invalid:
                    refused = True
                    raise psycopg.Rollback(tx)
                if erased is not None:
                    # An erasure made while the file was read: none commits until this
                    # import has (SHARE blocks their inserts), and those before are seen.
                    cur.execute("LOCK TABLE erasures IN SHARE MODE")
                    for _ in range(refuse_late_erasures(cur.execute, "import_rows", "%s", erased)):
                        report.refuse_erased(0)
                now = _now()
                if consent is not None:  # before the rows: it asks who joins the list now
                    keep, record = import_consent_sql("import_rows", "%s")
                    text, rows_params = import_consent_params(consent, list_name)
                    cur.execute(keep, text)
                    report.consented = cur.execute(record, rows_params).rowcount
                self._apply(cur, list_name, report, actor, now)
                report.columns = list(columns)
                self._columns(cur, list_name, report.columns, now)
        report.committed = not refused
        if report.committed and report.added + report.updated >= BATCH:
            self._analyze()
        return report

    def _analyze(self) -> None:
        """Refresh the planner's statistics after a bulk import, as PostgreSQL's manual
        advises. Until autovacuum gets to it (a minute or more), the tables' statistics
        predate the import: the planner then takes a list of 100,000 for a hundred and
        sorts all the remaining members for every batch of :meth:`audience` instead of
        reading the primary key in order (measured: 130 ms a batch instead of 2)."""
        # The import is committed; stale statistics only make the next reads slower
        # until autovacuum analyses, so a failure here (another ANALYZE or a VACUUM
        # holding the tables longer than a moment) must not report the import failed.
        with contextlib.suppress(psycopg.Error), self.conn.transaction():
            self.conn.execute("SET LOCAL lock_timeout = '2s'")
            self.conn.execute("ANALYZE subscribers, list_members, suppressions, list_optouts")

    @staticmethod
    def _checked(
        rows: Iterable[ParsedRow | Problem],
        report: ImportReport,
        columns: dict[str, None],
        skip_invalid: bool,
        erased: ErasureCheck | None,
    ) -> Iterator[tuple[object, ...]]:
        """The good rows as COPY takes them, in file order; problems go into ``report``
        (rows counted once however many problems they have). After the first bad row,
        when bad rows are not skipped, nothing will be written: the rest is only
        looked through for more problems."""
        last_bad: int | None = None
        seq = 0
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
                continue
            if erased is not None and erased(row.email):
                report.refuse_erased(row.line)
                continue
            if len(columns) < len(row.attributes):
                columns.update(dict.fromkeys(row.attributes))
            seq += 1
            yield (
                seq,
                row.email,
                row.first_name,
                row.last_name,
                {k: v for k, v in row.attributes.items() if v},
                # An empty cell removes that attribute; one the file has no column for stays.
                [k for k, v in row.attributes.items() if not v],
                row.state,
                row.reason if row.state == "suppressed" else None,
                row.since,
            )

    def _apply(
        self, cur: psycopg.Cursor[Any], list_name: str, report: ImportReport, actor: str, now: str
    ) -> None:
        """Write the checked rows of import_rows set by set, in file order where order
        shows (new subscribers get their ids in it, the log its entries)."""
        # The same address again further down the file: the first one counts, as on SQLite.
        report.duplicates = cur.execute(
            "DELETE FROM import_rows r USING import_rows f WHERE f.email = r.email "
            "AND f.seq < r.seq"
        ).rowcount
        # A temporary table is never analysed by autovacuum: without this the planner
        # guesses its size, and may scan every subscriber for a ten-row import.
        cur.execute("ANALYZE import_rows")
        params = {"list": list_name, "now": now, "actor": actor}
        # New subscribers first. One inserted meanwhile by another session is waited
        # for and then left to the update below, which sees it committed: nothing
        # either import wrote is lost.
        cur.execute(
            "WITH fresh AS (INSERT INTO subscribers (email, first_name, last_name, attributes, "
            "created_at) SELECT email, coalesce(first, ''), coalesce(last, ''), sets, %(now)s "
            "FROM import_rows ORDER BY seq ON CONFLICT (email) DO NOTHING RETURNING email) "
            "UPDATE import_rows r SET fresh = true FROM fresh f WHERE f.email = r.email",
            params,
        )
        # Those already there: only rows the file changes are written (importing the
        # same file again leaves no dead rows behind).
        cur.execute(
            "UPDATE subscribers u SET first_name = coalesce(r.first, u.first_name), "
            "last_name = coalesce(r.last, u.last_name), "
            "attributes = (u.attributes || r.sets) - r.drops "
            "FROM import_rows r WHERE r.email = u.email AND NOT r.fresh "
            "AND (u.first_name, u.last_name, u.attributes) IS DISTINCT FROM "
            "(coalesce(r.first, u.first_name), coalesce(r.last, u.last_name), "
            "(u.attributes || r.sets) - r.drops)"
        )
        report.added = cur.execute(
            "INSERT INTO list_members (list_name, subscriber_id, added_at) "
            "SELECT %(list)s, u.id, %(now)s FROM import_rows r "
            "JOIN subscribers u ON u.email = r.email ORDER BY r.seq ON CONFLICT DO NOTHING",
            params,
        ).rowcount
        staged = cur.execute("SELECT count(*) FROM import_rows").fetchone()
        report.updated = (int(staged[0]) if staged else 0) - report.added
        # An export's newsletter_since is when the person left, and stays so: the log
        # records when this import wrote it. Only suppressions this import made are
        # logged (RETURNING): one another session made meanwhile is its own.
        report.newly_suppressed = cur.execute(
            "WITH made AS (INSERT INTO suppressions (email, reason, list_name, created_at) "
            "SELECT email, reason, %(list)s, coalesce(since, %(now)s) FROM import_rows "
            "WHERE reason IS NOT NULL ORDER BY seq ON CONFLICT DO NOTHING RETURNING email) "
            "INSERT INTO suppression_log (email, action, reason, list_name, actor, created_at) "
            "SELECT r.email, 'suppress', r.reason, %(list)s, %(actor)s, %(now)s "
            "FROM import_rows r JOIN made ON made.email = r.email ORDER BY r.seq",
            params,
        ).rowcount
        report.opted_out = cur.execute(
            "INSERT INTO list_optouts (list_name, email, created_at) "
            "SELECT %(list)s, email, coalesce(since, %(now)s) FROM import_rows "
            "WHERE state = 'opted-out' ORDER BY seq ON CONFLICT DO NOTHING",
            params,
        ).rowcount
        # Left this list or everything: importing did not undo it.
        found = cur.execute(
            "SELECT count(*) FROM import_rows i "
            "WHERE EXISTS (SELECT 1 FROM suppressions s WHERE s.email = i.email) "
            "OR EXISTS (SELECT 1 FROM list_optouts o "
            "WHERE o.list_name = %(list)s AND o.email = i.email)",
            params,
        ).fetchone()
        report.suppressed = int(found[0]) if found else 0

    def _columns(
        self, cur: psycopg.Cursor[Any], list_name: str, columns: Sequence[str], now: str
    ) -> None:
        cur.execute(
            "INSERT INTO list_columns (list_name, name, added_at) "
            "SELECT %s, unnest(%s::text[]), %s ON CONFLICT DO NOTHING",
            (list_name, list(columns), now),
        )

    # -- reading --------------------------------------------------------------
    def lists(self) -> list[tuple[str, int]]:
        rows = self.conn.execute(
            "SELECT list_name, count(*) FROM list_members GROUP BY list_name "
            'ORDER BY list_name COLLATE "C"'
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    def count(self, list_name: str) -> tuple[int, int]:
        """(members, of whom suppressed or opted out)."""
        row = self.conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE s.email IS NOT NULL OR o.email IS NOT NULL) "
            "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
            "LEFT JOIN suppressions s ON s.email = u.email "
            "LEFT JOIN list_optouts o ON o.list_name = m.list_name AND o.email = u.email "
            "WHERE m.list_name = %s",
            (list_name,),
        ).fetchone()
        assert row is not None  # an aggregate always has a row
        return int(row[0]), int(row[1])

    def states(self, list_name: str) -> ListStates:
        """The members of ``list_name`` by state: subscribed, opted out, suppressed by reason."""
        rows = self.conn.execute(
            "SELECT s.reason, o.email IS NOT NULL, count(*) FROM list_members m "
            "JOIN subscribers u ON u.id = m.subscriber_id "
            "LEFT JOIN suppressions s ON s.email = u.email "
            "LEFT JOIN list_optouts o ON o.list_name = m.list_name AND o.email = u.email "
            "WHERE m.list_name = %s GROUP BY 1, 2",
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
            "SELECT name FROM (SELECT jsonb_object_keys(u.attributes) AS name "
            "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
            "WHERE m.list_name = %(list)s "
            "UNION SELECT name FROM list_columns WHERE list_name = %(list)s) names "
            'ORDER BY name COLLATE "C"',
            {"list": list_name},
        )
        return [str(r[0]) for r in rows]

    def columns(self, list_name: str) -> list[str]:
        """The columns ``list_name`` was ever imported with, beyond email and names, in the
        order they came: what merge fields a send to it can use."""
        rows = self.conn.execute(
            "SELECT name FROM list_columns WHERE list_name = %s "
            'ORDER BY added_at COLLATE "C", name COLLATE "C"',
            (list_name,),
        )
        return [str(r[0]) for r in rows]

    def recipient(self, email: str) -> Recipient | None:
        """The subscriber ``email`` (normalised) as a message addresses them, or None."""
        row = self.conn.execute(
            "SELECT email, first_name, last_name, attributes FROM subscribers WHERE email = %s",
            (email,),
        ).fetchone()
        if row is None:
            return None
        return Recipient(row[0], row[1], row[2], text_attributes(row[3]))

    def members(self, list_name: str) -> Iterator[Member]:
        """Every member with its state (suppressed, opted out), by subscriber id."""
        for r in self._batched(MEMBERS_SQL, {"list": list_name}):
            yield Member(r[1], r[2], r[3], dict(r[4]), r[5], r[6], r[7])

    def audience(self, list_name: str, columns: Sequence[str] = ()) -> Iterator[Recipient]:
        """Who a send to ``list_name`` goes to: members minus suppressions and opt-outs, by
        subscriber id, each with the attributes named in ``columns`` (the issue's)."""
        wanted = {"list": list_name, "columns": list(columns)}
        for r in self._batched(AUDIENCE_SQL, wanted):
            yield Recipient(r[1], r[2], r[3], text_attributes(r[4]))

    def _batched(self, sql: str, params: Mapping[str, object]) -> Iterator[tuple[Any, ...]]:
        """Rows of ``sql`` (keyed on subscriber id, first column) in keyset batches: flat
        memory, and no cursor or transaction held open between batches (the caller may
        write on this connection while it reads, as a freeze does)."""
        last = 0
        while True:
            rows = self.conn.execute(sql, {**params, "last": last, "batch": BATCH}).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def suppression(self, email: str) -> str | None:
        found = self.conn.execute(
            "SELECT reason FROM suppressions WHERE email = %s", (email,)
        ).fetchone()
        return None if found is None else str(found[0])

    def suppression_info(self, email: str) -> Suppression | None:
        """Why and since when ``email`` is suppressed, or None."""
        found = self.conn.execute(
            "SELECT reason, list_name, created_at FROM suppressions WHERE email = %s", (email,)
        ).fetchone()
        return None if found is None else Suppression(email, found[0], found[1], found[2])

    def suppression_history(self, email: str) -> list[tuple[str, str, str, str | None, str]]:
        """The suppression log of ``email``, oldest first:
        (when, action, reason, list, who)."""
        rows = self.conn.execute(
            "SELECT created_at, action, reason, list_name, actor FROM suppression_log "
            "WHERE email = %s ORDER BY id",
            (email,),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # -- changes --------------------------------------------------------------
    def remove(self, list_name: str, emails: Iterable[str]) -> int:
        """Take addresses off a list (they stay in other lists); returns how many were on it."""
        with self.conn.transaction():
            return sum(self._remove(list_name, batch) for batch in batches(emails, BATCH))

    def _remove(self, list_name: str, emails: list[str]) -> int:
        return self.conn.execute(
            "DELETE FROM list_members WHERE list_name = %s AND subscriber_id IN "
            "(SELECT id FROM subscribers WHERE email = ANY(%s::text[]))",
            (list_name, emails),
        ).rowcount

    def suppress(
        self, email: str, reason: str, *, list_name: str | None = None, actor: str = "cli"
    ) -> bool:
        """Never mail ``email`` again, on any list. Returns False if it already was, for
        this reason or a weightier one.

        A weightier reason replaces a lighter one (complained > bounced > unsubscribed):
        the person may lift an ``unsubscribed`` suppression themselves by ticking a list,
        so a complaint recorded later must not stay hidden behind it. Two sessions at
        once take turns on the row (ON CONFLICT waits for the other's insert or update,
        then judges the weight against what it committed). Every change is also written
        to ``suppression_log`` with who made it, in the same transaction."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"unknown suppression reason {reason!r}")
        now = _now()
        with self.conn.transaction():
            changed = self.conn.execute(
                "INSERT INTO suppressions AS s (email, reason, list_name, created_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (email) DO UPDATE SET "
                "reason = excluded.reason, list_name = excluded.list_name, "
                "created_at = excluded.created_at "
                "WHERE (CASE excluded.reason WHEN 'complained' THEN 3 WHEN 'bounced' THEN 2 "
                "ELSE 1 END) > (CASE s.reason WHEN 'complained' THEN 3 WHEN 'bounced' THEN 2 "
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
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (email, action, reason, list_name, actor, now),
        )

    def opt_out(self, list_name: str, email: str) -> bool:
        """``email`` leaves ``list_name``: no later send to that list reaches it, even after a
        re-import. Returns False if it had already left."""
        changed = self.conn.execute(
            "INSERT INTO list_optouts (list_name, email, created_at) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (list_name, email, _now()),
        ).rowcount
        return bool(changed)

    def opt_in(self, list_name: str, email: str) -> bool:
        """Undo :meth:`opt_out` (the subscriber asked to come back)."""
        changed = self.conn.execute(
            "DELETE FROM list_optouts WHERE list_name = %s AND email = %s", (list_name, email)
        ).rowcount
        return bool(changed)

    def lists_of(self, email: str) -> list[tuple[str, bool]]:
        """The lists ``email`` is a member of, each with whether it has left it."""
        rows = self.conn.execute(
            "SELECT m.list_name, EXISTS (SELECT 1 FROM list_optouts o "
            "WHERE o.list_name = m.list_name AND o.email = u.email) "
            "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
            'WHERE u.email = %s ORDER BY m.list_name COLLATE "C"',
            (email,),
        )
        return [(str(r[0]), bool(r[1])) for r in rows]

    def unsuppress(self, email: str, *, reason: str, actor: str) -> str | None:
        """Lift the suppression of ``email``; ``reason`` and ``actor`` are recorded.

        Returns the reason it had been suppressed for, or None if it was not.
        ValueError if ``reason`` is not one line of text (see :func:`lift_reason`)."""
        reason = lift_reason(reason)
        with self.conn.transaction():
            row = self.conn.execute(
                "DELETE FROM suppressions WHERE email = %s RETURNING reason", (email,)
            ).fetchone()
            if row is not None:
                self._log(email, "unsuppress", reason, None, actor, _now())
        return None if row is None else str(row[0])

    def choose_lists(self, email: str, wanted: Collection[str], *, actor: str) -> str | None:
        """Save a preferences form in one transaction; returns the suppression reason after.

        ``email`` stays on (or comes back to) the lists in ``wanted`` that it is a member
        of and leaves its others. Leaving every one suppresses it (``unsubscribed``), so
        that lists created or imported later do not reach it either; choosing one lifts an
        ``unsubscribed`` suppression, never a ``bounced`` or ``complained`` one.

        Each change is conditional on the row it changes, not on what was read before
        it: a complaint recorded meanwhile by another session is waited for and then
        kept (the lifting deletes only a row still ``unsubscribed``)."""
        now = _now()
        with self.conn.transaction():
            names = [name for name, _left in self.lists_of(email)]  # by name: one lock order
            staying = [name for name in names if name in wanted]
            leaving = [name for name in names if name not in wanted]
            self.conn.execute(
                "DELETE FROM list_optouts WHERE email = %s AND list_name = ANY(%s::text[])",
                (email, staying),
            )
            self.conn.execute(
                "INSERT INTO list_optouts (list_name, email, created_at) "
                "SELECT unnest(%s::text[]), %s, %s ON CONFLICT DO NOTHING",
                (leaving, email, now),
            )
            if not staying:
                made = self.conn.execute(
                    "INSERT INTO suppressions (email, reason, list_name, created_at) "
                    "VALUES (%s, 'unsubscribed', NULL, %s) ON CONFLICT DO NOTHING",
                    (email, now),
                ).rowcount
                if made:
                    self._log(email, "suppress", "unsubscribed", None, actor, now)
                    return "unsubscribed"
            else:
                lifted = self.conn.execute(
                    "DELETE FROM suppressions WHERE email = %s AND reason = 'unsubscribed'",
                    (email,),
                ).rowcount
                if lifted:
                    why = "chose a list on the preferences page"
                    self._log(email, "unsuppress", why, None, actor, now)
                    return None
            return self.suppression(email)
