"""PostgreSQL send log: every recipient's fate in one send, shared by many sender processes.

Input: an autocommit psycopg connection, the send's issue and list, outcomes.
Output: claimed recipients and counts, as :class:`newsletter.storage.base.SendLogStore`
says; the states and their meaning are those of the SQLite send log
(:mod:`newsletter.storage.sqlite.send_log`), which explains them.

What differs is that several processes, on several hosts, work on one send at
once (:attr:`PostgresStorage.shared_sends`):

- a **claim** takes due rows with ``FOR UPDATE SKIP LOCKED`` and marks them
  ``sending`` with its holder (the claiming process's lease owner) in one
  statement, committed before it returns: two processes never get the same
  recipient, and no row lock outlives the claim (none is held across SMTP);
- a **freeze** takes an advisory lock named after the issue, so that two freezes
  of one issue (two lists, or two processes starting the same send) take turns;
  the second of one pair finds the first's row and raises SendExists;
- **mark_interrupted** turns ``sending`` rows into ``unknown`` only when their
  claimant's lease has run out by the server's clock (or they have none, as rows
  copied from SQLite), so any process may call it while others are sending;
- **record** takes the outcomes of the holder's own rows, ``unknown`` ones too: a
  process counted dead that was only slow still knows what became of them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any, get_args

import psycopg
from psycopg import errors as pg_errors

from newsletter.errors import SendExists
from newsletter.models import DELIVERY_STATES, Delivery, DeliveryState, Outcome, Recipient
from newsletter.storage.base import RequeueState, SendRecord, Worker, batches
from newsletter.storage.caps import CapReached, Caps, Claim, allowed
from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import NOW, translated
from newsletter.storage.postgres.subscribers import text_attributes
from newsletter.storage.renewal import dead_here, host_pid

__all__ = ["FREEZE_BATCH", "PgSendLog"]

FREEZE_BATCH = 5000
# Blank, or only the invisible characters a spreadsheet leaves (no-break space, BOM,
# zero-width space, word joiner, soft hyphen), as merge_fields.clean has it.
_BLANK_NAME = "' ' || chr(160) || chr(65279) || chr(8203) || chr(8288) || chr(173)"
_BLANK_VALUE = _BLANK_NAME + " || chr(9) || chr(10) || chr(13)"
# A person who left the send's list or was suppressed since the freeze.
_GONE = (
    "(EXISTS (SELECT 1 FROM suppressions s WHERE s.email = d.email) "
    "OR EXISTS (SELECT 1 FROM list_optouts o WHERE o.email = d.email "
    "AND o.list_name = (SELECT list_name FROM sends WHERE id = %(send)s)))"
)
# Who a send to list %(list)s goes to now (as PgSubscribers.audience has it) ...
_AUDIENCE = (
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
    "WHERE m.list_name = %(list)s "
    "AND NOT EXISTS (SELECT 1 FROM suppressions x WHERE x.email = u.email) "
    "AND NOT EXISTS (SELECT 1 FROM list_optouts o WHERE o.list_name = %(list)s "
    "AND o.email = u.email) "
)
# ... and the addresses another list's send of issue %(issue)s has (see HAS_IT in
# the SQLite send log: every state but 'suppressed').
_OTHERS_HAVE = (
    "(SELECT d.email FROM sends s JOIN deliveries d ON d.send_id = s.id "
    "AND d.state IN ('pending', 'sending', 'sent', 'deferred', 'unknown', 'rejected') "
    "WHERE s.issue_id = %(issue)s AND s.list_name <> %(list)s) "
)
_EMPTY = (
    "sum(CASE WHEN f.name = 'first_name' THEN (btrim(a.first_name, " + _BLANK_NAME + ") = '')::int "
    "WHEN f.name = 'last_name' THEN (btrim(a.last_name, " + _BLANK_NAME + ") = '')::int "
    "ELSE (coalesce(btrim(a.attributes ->> f.name, " + _BLANK_VALUE + "), '') = '')::int END)"
)
_RETURNING = (
    " RETURNING d.seq, d.email, d.first_name, d.last_name, d.attempts, d.state, "
    "coalesce(d.attributes, (SELECT u.attributes FROM subscribers u WHERE u.email = d.email))"
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@translated
class PgSendLog:
    """The send log on PostgreSQL (:class:`newsletter.storage.base.SendLogStore`)."""

    def __init__(self, conn: psycopg.Connection[Any], location: Location) -> None:
        self.conn = conn
        self.location = location

    def find(self, issue_id: str, list_name: str) -> SendRecord | None:
        row = self.conn.execute(
            "SELECT id, issue_id, list_name, created_at, audience, suppressed, duplicates "
            "FROM sends WHERE issue_id = %s AND list_name = %s",
            (issue_id, list_name),
        ).fetchone()
        return None if row is None else SendRecord(*row)

    def lists_sent(self, issue_id: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT list_name FROM sends WHERE issue_id = %s ORDER BY list_name", (issue_id,)
        )
        return [str(r[0]) for r in rows]

    def freeze(
        self, issue_id: str, list_name: str, audience: Iterable[Recipient], suppressed: int
    ) -> SendRecord:
        """Record who this send goes to, once: all rows or none (one transaction), the
        freezes of one issue one at a time (an advisory lock on the issue's name)."""
        with self.conn.transaction():
            self.conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('freeze:' || %s, 0))", (issue_id,)
            )
            try:
                with self.conn.transaction():  # a savepoint: the violation is ours to name
                    row = self.conn.execute(
                        "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed)"
                        " VALUES (%s, %s, %s, 0, %s) RETURNING id",
                        (issue_id, list_name, _now(), suppressed),
                    ).fetchone()
            except pg_errors.UniqueViolation as exc:
                raise SendExists(issue_id, list_name) from exc
            assert row is not None
            send_id = int(row[0])
            others = self._build_others(issue_id, list_name)
            total = duplicates = 0
            for members in batches(audience, FREEZE_BATCH):
                batch = members
                if others:
                    have = {
                        r[0]
                        for r in self.conn.execute(
                            "SELECT email FROM freeze_others WHERE email = ANY(%s)",
                            ([r.email for r in members],),
                        )
                    }
                    if have:
                        batch = [r for r in members if r.email not in have]
                        duplicates += len(members) - len(batch)
                with self.conn.cursor().copy(
                    "COPY deliveries (send_id, seq, email, first_name, last_name, attributes, "
                    "state) FROM STDIN"
                ) as copy:
                    for i, r in enumerate(batch):
                        copy.write_row(
                            (
                                send_id,
                                total + i,
                                r.email,
                                r.first_name,
                                r.last_name,
                                json.dumps(dict(r.attributes)) if r.attributes else "{}",
                                "pending",
                            )
                        )
                total += len(batch)
            self.conn.execute(
                "UPDATE sends SET audience = %s, duplicates = %s WHERE id = %s",
                (total, duplicates, send_id),
            )
        record = self.find(issue_id, list_name)
        assert record is not None
        return record

    def _build_others(self, issue_id: str, list_name: str) -> bool:
        """Fill the temporary table freeze_others (dropped at commit) with the addresses
        other sends of ``issue_id`` have; False, and no table, when there are none."""
        found = self.conn.execute(
            "SELECT 1 FROM sends WHERE issue_id = %s AND list_name <> %s LIMIT 1",
            (issue_id, list_name),
        ).fetchone()
        if found is None:
            return False
        self.conn.execute("CREATE TEMP TABLE freeze_others (email text PRIMARY KEY) ON COMMIT DROP")
        self.conn.execute(
            "INSERT INTO freeze_others " + _OTHERS_HAVE + "ON CONFLICT DO NOTHING",
            {"issue": issue_id, "list": list_name},
        )
        self.conn.execute("ANALYZE freeze_others")
        return True

    def duplicates(self, issue_id: str, list_name: str, first: int = 5) -> tuple[int, list[str]]:
        params = {"issue": issue_id, "list": list_name, "first": first}
        if not self.conn.execute(
            "SELECT 1 FROM sends WHERE issue_id = %(issue)s AND list_name <> %(list)s LIMIT 1",
            params,
        ).fetchone():
            return 0, []
        row = self.conn.execute(
            "SELECT count(*) " + _AUDIENCE + "AND u.email IN " + _OTHERS_HAVE, params
        ).fetchone()
        count = int(row[0]) if row else 0
        if not count:
            return 0, []
        kept = self.conn.execute(
            "SELECT u.email " + _AUDIENCE + "AND u.email NOT IN " + _OTHERS_HAVE
            + "ORDER BY m.subscriber_id LIMIT %(first)s",
            params,
        )  # fmt: skip
        return count, [r[0] for r in kept]

    def empty_values(
        self, issue_id: str, list_name: str, fields: Sequence[str]
    ) -> tuple[int, list[int]]:
        record = self.find(issue_id, list_name)
        counts = dict.fromkeys(fields, 0)
        params: dict[str, object] = {"issue": issue_id, "list": list_name, "fields": list(fields)}
        if record is not None:
            params["send"] = record.id
            row = self.conn.execute(
                "SELECT count(*) FROM deliveries "
                "WHERE send_id = %(send)s AND state IN ('pending', 'deferred')",
                params,
            ).fetchone()
            rows = (
                "SELECT d.first_name, d.last_name, coalesce(d.attributes, (SELECT u.attributes "
                "FROM subscribers u WHERE u.email = d.email), '{}'::jsonb) AS attributes "
                "FROM deliveries d WHERE d.send_id = %(send)s "
                "AND d.state IN ('pending', 'deferred')"
            )
        else:
            row = self.conn.execute(
                "SELECT count(*) " + _AUDIENCE + "AND u.email NOT IN " + _OTHERS_HAVE, params
            ).fetchone()
            rows = (
                "SELECT u.first_name, u.last_name, u.attributes "
                + _AUDIENCE + "AND u.email NOT IN " + _OTHERS_HAVE
            )  # fmt: skip
        total = int(row[0]) if row else 0
        if fields and total:
            found = self.conn.execute(
                "SELECT f.name, " + _EMPTY + " FROM (" + rows + ") a, "
                "unnest(%(fields)s::text[]) AS f(name) GROUP BY f.name",
                params,
            )
            counts.update({str(r[0]): int(r[1] or 0) for r in found})
        return total, [counts[f] for f in fields]

    def mark_interrupted(self, send_id: int) -> int:
        """Rows whose claimant's lease has run out (or that have none): fate unknown.

        A claimant that ran on this machine and whose process is gone (kill -9) is dead
        now, not once its lease runs out: its lease is freed first (as SQLite's are)."""
        holding = self.conn.execute(
            "SELECT DISTINCT l.name, l.owner FROM deliveries d JOIN locks l "
            "ON l.owner = d.claimed_by WHERE d.send_id = %s AND d.state = 'sending' "
            f"AND l.expires > {NOW}",
            (send_id,),
        ).fetchall()
        for name, owner in holding:
            if dead_here(owner):
                self.conn.execute("DELETE FROM locks WHERE name = %s AND owner = %s", (name, owner))
        cur = self.conn.execute(
            "UPDATE deliveries d SET state = 'unknown', updated_at = %s, "
            "detail = 'the run stopped during this transaction; it may have been delivered' "
            "WHERE d.send_id = %s AND d.state = 'sending' AND NOT EXISTS (SELECT 1 FROM locks l "
            f"WHERE l.owner = d.claimed_by AND l.expires > {NOW})",
            (_now(), send_id),
        )
        return cur.rowcount

    def pause(self, send_id: int, reason: str | None) -> None:
        with self.conn.transaction():
            self.conn.execute("UPDATE sends SET paused = %s WHERE id = %s", (reason, send_id))

    def paused(self, send_id: int) -> str | None:
        row = self.conn.execute("SELECT paused FROM sends WHERE id = %s", (send_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def make_deferred_due(self, send_id: int) -> None:
        self.conn.execute(
            "UPDATE deliveries SET retry_at = 0 WHERE send_id = %s AND state = 'deferred'",
            (send_id,),
        )

    def requeue(self, send_id: int, state: RequeueState) -> int:
        if state not in get_args(RequeueState):
            raise ValueError(f"cannot requeue the state {state!r}; only unknown or rejected")
        cur = self.conn.execute(
            "UPDATE deliveries SET state = 'pending', retry_at = NULL, updated_at = %s "
            "WHERE send_id = %s AND state = %s",
            (_now(), send_id, state),
        )
        return cur.rowcount

    def claim(
        self, send_id: int, limit: int, now: float, *, holder: str = "", caps: Caps | None = None
    ) -> Claim:
        """Mark up to ``limit`` due recipients ``sending`` (committed) and return them;
        nothing claimed and no cap reached means nothing is due (claims that found only
        people who left since the freeze try again). Capped claims take turns on an
        advisory lock and count the room inside their transaction."""
        while True:
            found, good, capped = self._claim_once(send_id, limit, now, holder, caps)
            if good or not found:
                return Claim(good, capped)

    def _claim_once(
        self, send_id: int, limit: int, now: float, holder: str, caps: Caps | None
    ) -> tuple[bool, list[Delivery], CapReached | None]:
        stamp = _now()
        params: dict[str, object] = {"send": send_id, "now": now, "holder": holder or None}
        # Whether each picked person left or was suppressed is worked out once, in
        # the pick, not once for each column the update sets.
        update = (
            "UPDATE deliveries d SET "
            "state = CASE WHEN picked.gone THEN 'suppressed' ELSE 'sending' END, "
            "attempts = d.attempts + CASE WHEN picked.gone THEN 0 ELSE 1 END, "
            "detail = CASE WHEN picked.gone THEN 'unsubscribed or suppressed after the "
            "send started' ELSE d.detail END, "
            "updated_at = %(stamp)s, claimed_by = %(holder)s "
            "FROM picked WHERE d.send_id = %(send)s AND d.seq = picked.seq" + _RETURNING
        )
        params["stamp"] = stamp
        capped = None
        with self.conn.transaction():
            if caps is not None:
                limit, capped = self._room(caps, now, limit)
                if not limit:
                    # A cap is only what holds a claim back when something is due.
                    return False, [], capped if self._due(send_id, now) else None
            params["limit"] = limit
            rows = self.conn.execute(
                "WITH picked AS (SELECT d.seq, " + _GONE + " AS gone FROM deliveries d "
                "WHERE d.send_id = %(send)s AND d.state = 'pending' ORDER BY d.seq "
                "LIMIT %(limit)s FOR UPDATE OF d SKIP LOCKED) " + update,
                params,
            ).fetchall()
            # RETURNING keeps no order: pending ones in audience order, then the deferred.
            rows.sort(key=lambda r: r[0])
            if len(rows) < limit:
                params["limit"] = limit - len(rows)
                rows += sorted(
                    self.conn.execute(
                        "WITH picked AS (SELECT d.seq, " + _GONE + " AS gone FROM deliveries d "
                        "WHERE d.send_id = %(send)s AND d.state = 'deferred' "
                        "AND d.retry_at <= %(now)s ORDER BY d.retry_at, d.seq "
                        "LIMIT %(limit)s FOR UPDATE OF d SKIP LOCKED) " + update,
                        params,
                    ).fetchall(),
                    key=lambda r: r[0],
                )
        good = [
            Delivery(r[0], Recipient(r[1], r[2], r[3], text_attributes(r[6])), r[4])
            for r in rows
            if r[5] == "sending"
        ]
        return bool(rows), good, capped

    def _room(self, caps: Caps, now: float, limit: int) -> tuple[int, CapReached | None]:
        """How many a claim may take under ``caps``, inside its transaction, after every
        other capped claim committed (the lock is held to this transaction's end)."""
        # One lock per schema: the caps count this schema's sends (another schema is
        # another deployment, whose claims need not wait for these).
        self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('send caps:' || current_schema(), 0))"
        )

        def counted_in(since: str) -> tuple[int, str | None]:
            found = self.conn.execute(
                "SELECT count(*), min(updated_at) FROM deliveries "
                "WHERE state IN ('sent', 'sending', 'unknown') AND updated_at >= %s",
                (since,),
            ).fetchone()
            return (0, None) if found is None else (int(found[0]), found[1])

        return allowed(caps, now, limit, counted_in)

    def _due(self, send_id: int, now: float) -> bool:
        """Whether a claim at ``now`` would find a recipient of the send to take."""
        row = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE send_id = %(send)s "
            "AND state = 'pending') OR EXISTS (SELECT 1 FROM deliveries "
            "WHERE send_id = %(send)s AND state = 'deferred' AND retry_at <= %(now)s)",
            {"send": send_id, "now": now},
        ).fetchone()
        return bool(row and row[0])

    def record(
        self, send_id: int, outcomes: Iterable[tuple[int, Outcome]], *, holder: str = ""
    ) -> None:
        done = list(outcomes)
        if not done:
            return
        columns = (
            [seq for seq, _ in done],
            [o.state for _, o in done],
            [o.code for _, o in done],
            [o.detail[:500] for _, o in done],
            [o.retry_at for _, o in done],
        )
        # Unknown ones only when a holder says they are its own (see the module docstring).
        mine = (
            "(d.state = 'sending' AND d.claimed_by = %(holder)s "
            "OR d.state = 'unknown' AND d.claimed_by = %(holder)s)"
            if holder
            else "d.state = 'sending'"
        )
        self.conn.execute(
            "UPDATE deliveries d SET state = v.state, code = v.code, detail = v.detail, "
            "retry_at = v.retry_at, updated_at = %(stamp)s "
            "FROM unnest(%(seqs)s::int[], %(states)s::text[], %(codes)s::int[], "
            "%(details)s::text[], %(retry)s::float8[]) AS v(seq, state, code, detail, retry_at) "
            "WHERE d.send_id = %(send)s AND d.seq = v.seq AND " + mine,
            {
                "stamp": _now(),
                "seqs": columns[0],
                "states": columns[1],
                "codes": columns[2],
                "details": columns[3],
                "retry": columns[4],
                "send": send_id,
                "holder": holder,
            },
        )

    def release(self, send_id: int, seqs: Iterable[int], *, holder: str = "") -> None:
        self.conn.execute(
            "UPDATE deliveries SET state = 'pending', attempts = attempts - 1 "
            "WHERE send_id = %s AND seq = ANY(%s) AND state = 'sending' "
            "AND (%s = '' OR claimed_by = %s)",
            (send_id, list(seqs), holder, holder),
        )

    def counts(self, send_id: int) -> dict[str, int]:
        found: dict[str, int] = dict.fromkeys(DELIVERY_STATES, 0)
        for state, n in self.conn.execute(
            "SELECT state, count(*) FROM deliveries WHERE send_id = %s GROUP BY state",
            (send_id,),
        ):
            found[state] = int(n)
        return found

    def in_state(
        self, send_id: int, state: DeliveryState, limit: int = 1000
    ) -> list[tuple[str, str]]:
        rows = self.conn.execute(
            "SELECT email, coalesce(detail, '') FROM deliveries "
            "WHERE send_id = %s AND state = %s ORDER BY seq LIMIT %s",
            (send_id, state, limit),
        )
        return [(r[0], r[1]) for r in rows]

    def last_errors(self, send_id: int, limit: int = 10) -> list[tuple[str, str, str, str]]:
        rows = self.conn.execute(
            "SELECT updated_at, email, state, "
            "coalesce(code::text || ' ', '') || coalesce(detail, '') FROM deliveries "
            "WHERE send_id = %s AND state IN ('rejected', 'deferred', 'unknown') "
            "ORDER BY updated_at DESC NULLS LAST LIMIT %s",
            (send_id, limit),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def next_retry(self, send_id: int) -> float | None:
        row = self.conn.execute(
            "SELECT min(retry_at) FROM deliveries WHERE send_id = %s AND state = 'deferred'",
            (send_id,),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def workers(self, send_id: int) -> list[Worker]:
        rows = self.conn.execute(
            "SELECT l.owner, l.since, l.renewed, l.expires, (SELECT count(*) FROM deliveries d "
            "WHERE d.send_id = s.id AND d.state = 'sending' AND d.claimed_by = l.owner) "
            "FROM sends s JOIN locks l ON starts_with(l.name, "
            "'send:' || s.issue_id || ':' || s.list_name || '/') "
            f"WHERE s.id = %s AND l.expires > {NOW} ORDER BY l.since, l.owner",
            (send_id,),
        )
        # A process of this machine that is gone is no live process, lease or not (one
        # killed before it could hand its lease back, say).
        return [
            Worker(*host_pid(str(owner)), since, renewed, float(expires), int(claimed))
            for owner, since, renewed, expires, claimed in rows
            if not dead_here(str(owner))
        ]
