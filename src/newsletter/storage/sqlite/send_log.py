"""SQLite send log: the durable record of every recipient's fate in one send.

Input: an open database connection, the send's issue and list, and outcomes.
Output: claimed recipients and counts. The first send of an issue to a list
freezes its audience into ``deliveries`` (one transaction). From then on each
recipient moves ``pending → sending → sent | rejected | deferred`` and every
move is committed: a recipient is marked ``sending`` *before* its SMTP
transaction starts and gets its outcome *after* it ends, so after a crash the
rows still in ``sending`` are exactly the ones whose fate is unknown. They are
reported by address and only resent when the user asks.

A person gets an issue once, however many of its lists they are on: a freeze
leaves out every address that another list's send of the same issue already
has (see :data:`HAS_IT`), counts them in ``sends.duplicates``, and so each
address has at most one live delivery row per issue. The list of the send
that reached someone first decides their List-Id and unsubscribe link.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import get_args

from newsletter.errors import SendExists
from newsletter.models import DELIVERY_STATES, Delivery, DeliveryState, Outcome, Recipient
from newsletter.storage.base import RequeueState, SendRecord, Worker, batches
from newsletter.storage.caps import CapReached, Caps, Claim, allowed
from newsletter.storage.renewal import dead_here, host_pid
from newsletter.storage.sqlite.connection import translated
from newsletter.storage.sqlite.subscribers import decode_attributes

__all__ = ["FREEZE_BATCH", "HAS_IT", "STATES", "Delivery", "Outcome", "SendLog", "SendRecord"]

STATES = DELIVERY_STATES
# INDEXED BY: without statistics SQLite prefers the primary key (send_id, seq)
# for "ORDER BY seq" and filters on state, which walks past every recipient
# already sent on every claim: a 1,000,000-recipient send slowed from 3,400 to
# 200 messages a second before this. The state index finds the next ones directly.
_SELECT = (
    "SELECT seq, email, first_name, last_name, attempts, "
    "EXISTS (SELECT 1 FROM suppressions s WHERE s.email = d.email) "
    "OR EXISTS (SELECT 1 FROM list_optouts o WHERE o.email = d.email "
    "AND o.list_name = (SELECT list_name FROM sends WHERE id = d.send_id)), "
    # Rows frozen before attributes were kept read them from the subscriber.
    "coalesce(d.attributes, (SELECT u.attributes FROM subscribers u WHERE u.email = d.email)) "
    "FROM deliveries AS d INDEXED BY deliveries_by_state "
)
_SELECT_DUE = _SELECT.replace("deliveries_by_state", "deliveries_retry")
FREEZE_BATCH = 5000
# For the preview of a send not frozen yet: the list's audience (as
# SubscriberStore.audience has it) and the addresses other sends of the issue have.
_AUDIENCE = (
    "FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id WHERE m.list_name = ?2 "
    "AND NOT EXISTS (SELECT 1 FROM suppressions x WHERE x.email = u.email) "
    "AND NOT EXISTS (SELECT 1 FROM list_optouts o WHERE o.list_name = ?2 AND o.email = u.email) "
)
_OTHERS_HAVE = (
    "(SELECT d.email FROM sends s JOIN deliveries d INDEXED BY deliveries_by_state "
    "ON d.send_id = s.id AND d.state IN "
    "('pending', 'sending', 'sent', 'deferred', 'unknown', 'rejected') "
    "WHERE s.issue_id = ?1 AND s.list_name != ?2) "
)
# States of a delivery row that mean its address has the issue or will get it:
# a freeze of the same issue to another list leaves that address out.
# 'rejected' counts too: the receiving server refused the address for this
# issue, and the remedy (--retry-rejected) resends from the send that holds
# the row; a second row on another list could then deliver it twice.
# 'suppressed' does not: that row was never sent (the person left that list
# after it froze), and they may still want it from a list they stayed on.
# Written out in the queries below (no SQL built from strings).
# Whether row ``a`` (first_name, last_name, attributes) has no value for the
# field named by ``f.value``, summed: blanks and the invisible characters a
# spreadsheet leaves (BOM, zero-width space, soft hyphen) are no value, as
# merge_fields.clean has it.
_EMPTY = (
    "sum(CASE f.value "
    "WHEN 'first_name' THEN trim(a.first_name, ' ' || char(160, 65279, 8203, 8288, 173)) = '' "
    "WHEN 'last_name' THEN trim(a.last_name, ' ' || char(160, 65279, 8203, 8288, 173)) = '' "
    "ELSE NOT EXISTS (SELECT 1 FROM json_each(a.attributes) j WHERE j.key = f.value "
    "AND trim(j.value, ' ' || char(160, 65279, 8203, 8288, 173, 9, 10, 13)) != '') END)"
)
HAS_IT = ("pending", "sending", "sent", "deferred", "unknown", "rejected")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@translated
class SendLog:
    """The send log on SQLite (:class:`newsletter.storage.base.SendLogStore`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def find(self, issue_id: str, list_name: str) -> SendRecord | None:
        row = self.conn.execute(
            "SELECT id, issue_id, list_name, created_at, audience, suppressed, duplicates "
            "FROM sends WHERE issue_id = ? AND list_name = ?",
            (issue_id, list_name),
        ).fetchone()
        return None if row is None else SendRecord(*row)

    def lists_sent(self, issue_id: str) -> list[str]:
        """The lists ``issue_id`` has a send to (started, finished or not), by name."""
        rows = self.conn.execute(
            "SELECT list_name FROM sends WHERE issue_id = ? ORDER BY list_name", (issue_id,)
        )
        return [str(r[0]) for r in rows]

    def freeze(
        self, issue_id: str, list_name: str, audience: Iterable[Recipient], suppressed: int
    ) -> SendRecord:
        """Record who this send goes to, once. All rows or none (one transaction).

        Members that another list's send of the same issue already has are left
        out and counted. BEGIN IMMEDIATE makes two freezes of one issue take
        turns, so the second always sees the first's rows."""
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            others = self._build_others(cur, issue_id, list_name)
            try:
                send_id = cur.execute(
                    "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
                    "VALUES (?, ?, ?, 0, ?) RETURNING id",
                    (issue_id, list_name, _now(), suppressed),
                ).fetchone()[0]
            except sqlite3.IntegrityError as exc:
                # UNIQUE (issue_id, list_name): the interface names this, not the driver.
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_CONSTRAINT_UNIQUE":
                    raise
                raise SendExists(issue_id, list_name) from exc
            total = duplicates = 0
            for members in batches(audience, FREEZE_BATCH):
                batch = members
                if others:
                    # One indexed lookup per batch: no scan of other sends per member.
                    have = {
                        row[0]
                        for row in cur.execute(
                            "SELECT email FROM temp.freeze_others "
                            "WHERE email IN (SELECT value FROM json_each(?))",
                            (json.dumps([r.email for r in members]),),
                        )
                    }
                    if have:
                        batch = [r for r in members if r.email not in have]
                        duplicates += len(members) - len(batch)
                cur.executemany(
                    "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, "
                    "attributes, state) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    (
                        (
                            send_id,
                            total + i,
                            r.email,
                            r.first_name,
                            r.last_name,
                            json.dumps(dict(r.attributes)) if r.attributes else "{}",
                        )
                        for i, r in enumerate(batch)
                    ),
                )
                total += len(batch)
            cur.execute(
                "UPDATE sends SET audience = ?, duplicates = ? WHERE id = ?",
                (total, duplicates, send_id),
            )
            cur.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                cur.execute("ROLLBACK")
            raise
        finally:
            cur.execute("DROP TABLE IF EXISTS temp.freeze_others")
        record = self.find(issue_id, list_name)
        assert record is not None
        return record

    @staticmethod
    def _build_others(cur: sqlite3.Cursor, issue_id: str, list_name: str) -> bool:
        """Fill temp.freeze_others with the addresses other sends of ``issue_id`` have.

        Built once per freeze, and only when such sends exist: one pass over
        their rows through the state index, then a keyed table to look in."""
        ids = [
            row[0]
            for row in cur.execute(
                "SELECT id FROM sends WHERE issue_id = ? AND list_name != ?",
                (issue_id, list_name),
            )
        ]
        if not ids:
            return False
        cur.execute("DROP TABLE IF EXISTS temp.freeze_others")
        cur.execute("CREATE TEMP TABLE freeze_others (email TEXT PRIMARY KEY) WITHOUT ROWID")
        for send_id in ids:
            cur.execute(
                "INSERT OR IGNORE INTO temp.freeze_others SELECT email "
                "FROM deliveries INDEXED BY deliveries_by_state WHERE send_id = ? "
                "AND state IN ('pending', 'sending', 'sent', 'deferred', 'unknown', 'rejected')",
                (send_id,),
            )
        return True

    def duplicates(self, issue_id: str, list_name: str, first: int = 5) -> tuple[int, list[str]]:
        """What :meth:`freeze` would do to ``list_name``'s audience now, read only (for the
        preview): how many it would leave out because another list's send of ``issue_id``
        has them, and the first ``first`` addresses it would keep (when any are left out)."""
        if not self.conn.execute(
            "SELECT 1 FROM sends WHERE issue_id = ? AND list_name != ? LIMIT 1",
            (issue_id, list_name),
        ).fetchone():
            return 0, []
        # "IN (subquery)" makes SQLite build one keyed copy of the other sends'
        # addresses and look each member up in it: no scan per member.
        count = self.conn.execute(
            "SELECT count(*) " + _AUDIENCE + "AND u.email IN " + _OTHERS_HAVE,
            (issue_id, list_name),
        ).fetchone()[0]
        if not count:
            return 0, []
        kept = self.conn.execute(
            "SELECT u.email "
            + _AUDIENCE
            + "AND u.email NOT IN "
            + _OTHERS_HAVE
            + "ORDER BY m.subscriber_id LIMIT ?3",
            (issue_id, list_name, first),
        )
        return int(count), [row[0] for row in kept]

    def empty_values(
        self, issue_id: str, list_name: str, fields: Sequence[str]
    ) -> tuple[int, list[int]]:
        """(whom the send of ``issue_id`` to ``list_name`` would mail now, how many of them
        have no value for each of ``fields``: ``first_name``, ``last_name`` or a column's
        stored name). Before the freeze: the audience less those another list's send of
        the issue has (as :meth:`freeze` would leave them out); after: its recipients
        still to be mailed. Read only."""
        record = self.find(issue_id, list_name)
        counts = dict.fromkeys(fields, 0)
        params: tuple[object, ...]
        if record is not None:
            total = self.conn.execute(
                "SELECT count(*) FROM deliveries "
                "WHERE send_id = ? AND state IN ('pending', 'deferred')",
                (record.id,),
            ).fetchone()[0]
            # Built of module constants only; every value is a parameter.
            sql = (
                "SELECT f.value, " + _EMPTY + " FROM (SELECT d.first_name, d.last_name, "  # noqa: S608
                "coalesce(d.attributes, (SELECT u.attributes FROM subscribers u "
                "WHERE u.email = d.email), '{}') AS attributes FROM deliveries d "
                "WHERE d.send_id = ?1 AND d.state IN ('pending', 'deferred')) a, json_each(?2) f "
                "GROUP BY f.value"
            )
            params = (record.id, json.dumps(list(fields)))
        else:
            total = self.conn.execute(
                "SELECT count(*) " + _AUDIENCE + "AND u.email NOT IN " + _OTHERS_HAVE,
                (issue_id, list_name),
            ).fetchone()[0]
            sql = (
                "SELECT f.value, " + _EMPTY + " FROM (SELECT u.first_name, u.last_name, "  # noqa: S608
                "u.attributes " + _AUDIENCE + "AND u.email NOT IN " + _OTHERS_HAVE + ") a, "
                "json_each(?3) f GROUP BY f.value"
            )
            params = (issue_id, list_name, json.dumps(list(fields)))
        if fields and total:
            counts.update({str(r[0]): int(r[1] or 0) for r in self.conn.execute(sql, params)})
        return int(total), [counts[f] for f in fields]

    def mark_interrupted(self, send_id: int) -> int:
        """Rows left in ``sending`` by a run that died: their fate is unknown."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn.execute(
                "UPDATE deliveries INDEXED BY deliveries_by_state "
                "SET state = 'unknown', updated_at = ?, "
                "detail = 'the run stopped during this transaction; it may have been delivered' "
                "WHERE send_id = ? AND state = 'sending'",
                (_now(), send_id),
            ).rowcount

    def pause(self, send_id: int, reason: str | None) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("UPDATE sends SET paused = ? WHERE id = ?", (reason, send_id))

    def paused(self, send_id: int) -> str | None:
        row = self.conn.execute("SELECT paused FROM sends WHERE id = ?", (send_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def make_deferred_due(self, send_id: int) -> None:
        """A new run retries every deferred recipient straight away."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "UPDATE deliveries INDEXED BY deliveries_by_state SET retry_at = 0 "
                "WHERE send_id = ? AND state = 'deferred'",
                (send_id,),
            )

    def requeue(self, send_id: int, state: RequeueState) -> int:
        """Put every recipient in ``state`` (unknown or rejected) back in the queue."""
        if state not in get_args(RequeueState):
            raise ValueError(f"cannot requeue the state {state!r}; only unknown or rejected")
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn.execute(
                "UPDATE deliveries INDEXED BY deliveries_by_state "
                "SET state = 'pending', retry_at = NULL, updated_at = ? "
                "WHERE send_id = ? AND state = ?",
                (_now(), send_id, state),
            ).rowcount

    def claim(
        self, send_id: int, limit: int, now: float, *, holder: str = "", caps: Caps | None = None
    ) -> Claim:
        """Mark up to ``limit`` due recipients ``sending`` (committed) and return them.

        Nothing claimed and no cap reached means nothing is due: claims that found
        only suppressed recipients try again. With ``caps``, the room is counted in
        the same write transaction (one writer at a time: claims take turns)."""
        while True:
            found, good, capped = self._claim_once(send_id, limit, now, holder, caps)
            if good or not found:
                return Claim(good, capped)

    def _claim_once(
        self, send_id: int, limit: int, now: float, holder: str, caps: Caps | None
    ) -> tuple[bool, list[Delivery], CapReached | None]:
        capped = None
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if caps is not None:
                limit, capped = self._room(caps, now, limit)
                if not limit:
                    # A cap is only what holds a claim back when something is due.
                    return False, [], capped if self._due(send_id, now) else None
            # Two index range scans (send_id, state, seq), never a sort of the queue.
            rows = self.conn.execute(
                _SELECT + "WHERE send_id = ? AND state = 'pending' ORDER BY seq LIMIT ?",
                (send_id, limit),
            ).fetchall()
            if len(rows) < limit:
                # Due deferred ones, through (send_id, state, retry_at): not a walk
                # over every deferred recipient that is not due yet.
                rows += self.conn.execute(
                    _SELECT_DUE + "WHERE send_id = ? AND state = 'deferred' AND retry_at <= ? "
                    "LIMIT ?",
                    (send_id, now, limit - len(rows)),
                ).fetchall()
            stamp = _now()
            # Someone who unsubscribed after the audience was frozen is not mailed.
            self.conn.executemany(
                "UPDATE deliveries SET state = ?, updated_at = ?, claimed_by = ?, "
                "attempts = attempts + (? = 'sending'), "
                "detail = CASE WHEN ? = 'suppressed' THEN 'unsubscribed or suppressed after the "
                "send started' ELSE detail END WHERE send_id = ? AND seq = ?",
                (
                    (state, stamp, holder or None, state, state, send_id, r[0])
                    for r in rows
                    for state in ("suppressed" if r[5] else "sending",)
                ),
            )
        good = [
            Delivery(r[0], Recipient(r[1], r[2], r[3], decode_attributes(r[6])), r[4] + 1)
            for r in rows
            if not r[5]
        ]
        return bool(rows), good, capped

    def _room(self, caps: Caps, now: float, limit: int) -> tuple[int, CapReached | None]:
        """How many a claim may take under ``caps`` (inside the claim's transaction)."""

        def counted_in(since: str) -> tuple[int, str | None]:
            # Through deliveries_sent_at (state, updated_at): the rows of the window only.
            n, oldest = self.conn.execute(
                "SELECT count(*), min(updated_at) FROM deliveries INDEXED BY deliveries_sent_at "
                "WHERE state IN ('sent', 'sending', 'unknown') AND updated_at >= ?",
                (since,),
            ).fetchone()
            return int(n), oldest

        return allowed(caps, now, limit, counted_in)

    def _due(self, send_id: int, now: float) -> bool:
        """Whether a claim at ``now`` would find a recipient of the send to take."""
        row = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE send_id = ? AND state = 'pending') "
            "OR EXISTS (SELECT 1 FROM deliveries WHERE send_id = ? AND state = 'deferred' "
            "AND retry_at <= ?)",
            (send_id, send_id, now),
        ).fetchone()
        return bool(row[0])

    def record(
        self, send_id: int, outcomes: Iterable[tuple[int, Outcome]], *, holder: str = ""
    ) -> None:
        """Commit the outcomes of finished transactions, as one batch. ``holder`` is not
        needed here: one process at a time works on a send, under the send's lease."""
        stamp = _now()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "UPDATE deliveries SET state = ?, code = ?, detail = ?, retry_at = ?, "
                "updated_at = ? WHERE send_id = ? AND seq = ? AND state = 'sending'",
                (
                    (o.state, o.code, o.detail[:500], o.retry_at, stamp, send_id, seq)
                    for seq, o in outcomes
                ),
            )

    def release(self, send_id: int, seqs: Iterable[int], *, holder: str = "") -> None:
        """Claimed but never attempted (the run is stopping): back to pending, no doubt."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "UPDATE deliveries SET state = 'pending', attempts = attempts - 1 "
                "WHERE send_id = ? AND seq = ? AND state = 'sending'",
                ((send_id, s) for s in seqs),
            )

    def counts(self, send_id: int) -> dict[str, int]:
        found: dict[str, int] = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute(
            "SELECT state, count(*) FROM deliveries WHERE send_id = ? GROUP BY state", (send_id,)
        ):
            found[state] = n
        return found

    def in_state(
        self, send_id: int, state: DeliveryState, limit: int = 1000
    ) -> list[tuple[str, str]]:
        """(address, detail) of recipients in ``state``, in audience order."""
        rows = self.conn.execute(
            "SELECT email, coalesce(detail, '') FROM deliveries INDEXED BY deliveries_by_state "
            "WHERE send_id = ? AND state = ? "
            "ORDER BY seq LIMIT ?",
            (send_id, state, limit),
        )
        return [(r[0], r[1]) for r in rows]

    def last_errors(self, send_id: int, limit: int = 10) -> list[tuple[str, str, str, str]]:
        """(time, address, state, detail) of the latest failures."""
        rows = self.conn.execute(
            "SELECT updated_at, email, state, coalesce(code || ' ', '') || coalesce(detail, '') "
            "FROM deliveries WHERE send_id = ? AND state IN ('rejected', 'deferred', 'unknown') "
            "ORDER BY updated_at DESC LIMIT ?",
            (send_id, limit),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def next_retry(self, send_id: int) -> float | None:
        row = self.conn.execute(
            "SELECT min(retry_at) FROM deliveries INDEXED BY deliveries_retry "
            "WHERE send_id = ? AND state = 'deferred'",
            (send_id,),
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def workers(self, send_id: int) -> list[Worker]:
        """The run holding the send's lease, if its lease has not run out (by this
        machine's clock: see the Lease protocol)."""
        rows = self.conn.execute(
            "SELECT l.owner, l.since, l.renewed, l.expires FROM sends s JOIN locks l "
            "ON l.name = 'send:' || s.issue_id || ':' || s.list_name "
            "WHERE s.id = ? AND l.expires > ?",
            (send_id, time.time()),
        ).fetchall()
        if not rows:
            return []
        claimed = self.conn.execute(
            "SELECT count(*) FROM deliveries INDEXED BY deliveries_by_state "
            "WHERE send_id = ? AND state = 'sending'",
            (send_id,),
        ).fetchone()[0]
        # A process of this machine that is gone is no live process, lease or not.
        return [
            Worker(*host_pid(str(owner)), since, renewed, float(expires), claimed)
            for owner, since, renewed, expires in rows
            if not dead_here(str(owner))
        ]
