"""SQLite leases: a lock row with an expiry that one process at a time may hold.

Input: the database path and a lock name. Output: :class:`SqliteLease`
(:class:`newsletter.storage.base.Lease`), which raises :class:`LockHeld` when
another live process holds the name; the renewal thread and the holder's
identity are :class:`newsletter.storage.renewal.RenewingLease`'s. A holder that
dies (kill -9, power cut) stops renewing, and ``ttl`` seconds after its last
renewal the lease is free (at once, when the dead holder ran on this machine
and its process is gone). The row names its holder and when it took the lock,
so :class:`LockHeld` can say which process to wait for. Each step opens its own
short connection: the renewal thread never shares one with the thread that
holds the lease. Expiry compares the holder's and the taker's clocks
(``time.time()``): see :class:`newsletter.storage.base.Lease`.
Used for the schedule (one run acts on a slot) and for each send (one process
works on an issue's send to a list at a time).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from newsletter.storage.base import LEASE_SECONDS
from newsletter.storage.renewal import RenewingLease, dead_here, held_by, holder_of
from newsletter.storage.sqlite.connection import translated

__all__ = ["LEASE_SECONDS", "SqliteLease"]


@translated
class SqliteLease(RenewingLease):
    """A lock row with an expiry in one SQLite file."""

    _transient = (sqlite3.Error,)

    def __init__(
        self, db_path: Path, name: str, ttl: float = LEASE_SECONDS, *, busy_seconds: float = 30.0
    ) -> None:
        super().__init__(name, ttl)
        self.db_path = db_path
        self.busy_seconds = busy_seconds

    def _conn(self) -> sqlite3.Connection:
        # mode=rw, as connection.py opens it: a lease never creates a database (one
        # removed since it was opened would otherwise come back empty).
        conn = sqlite3.connect(
            f"{self.db_path.absolute().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=self.busy_seconds,
        )
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def acquire(self, now: float) -> None:
        super().acquire(now)

    def release(self) -> None:
        super().release()

    def _take(self, now: float) -> None:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT owner, expires, since FROM locks WHERE name = ?", (self.name,)
            )
            held = row.fetchone()
            if (
                held is not None
                and held[0] != self.owner
                and held[1] > now
                and not dead_here(held[0])
            ):
                conn.execute("ROLLBACK")
                raise held_by(self.name, held[0], held[2], held[1])
            conn.execute(
                "INSERT INTO locks (name, owner, expires, since, renewed) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires, renewed = excluded.renewed, "
                "since = CASE WHEN locks.owner = excluded.owner "
                "THEN locks.since ELSE excluded.since END",
                (self.name, self.owner, now + self.ttl, now, now),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _extend(self) -> str | None:
        conn = self._conn()
        try:
            stamp = time.time()
            renewed = conn.execute(
                "UPDATE locks SET expires = ?, renewed = ? WHERE name = ? AND owner = ?",
                (stamp + self.ttl, stamp, self.name, self.owner),
            ).rowcount
            if renewed:
                return None
            row = conn.execute("SELECT owner FROM locks WHERE name = ?", (self.name,)).fetchone()
            return holder_of(row[0]) if row is not None else "nobody (freed)"
        finally:
            conn.close()

    def _free(self) -> None:
        conn = self._conn()
        try:
            conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (self.name, self.owner))
        finally:
            conn.close()
