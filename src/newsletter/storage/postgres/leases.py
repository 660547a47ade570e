"""PostgreSQL leases: a lock row whose expiry is judged by the server's clock.

Input: the database location and a lock name. Output: :class:`PostgresLease`
(:class:`newsletter.storage.base.Lease`); the renewal thread and the holder's
identity are :class:`newsletter.storage.renewal.RenewingLease`'s. Unlike
SQLite's, the expiry is written and compared with ``clock_timestamp()`` on the
server, so sender hosts whose clocks disagree never shorten or stretch each
other's leases. A send's process leases carry a name of their own (the send's
name, ``/``, the owner), so any number of them are held at once; the schedule's
and a one-process send's are taken by one holder at a time.
"""

from __future__ import annotations

from typing import Any

import psycopg

from newsletter.storage.base import LEASE_SECONDS
from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import NOW, connect, translated
from newsletter.storage.renewal import RenewingLease, dead_here, held_by, holder_of

__all__ = ["PostgresLease"]


@translated
class PostgresLease(RenewingLease):
    """A lock row with an expiry by the server's clock.

    Each step opens its own short connection: the renewal thread never shares
    one with the thread that holds the lease, and a connection lost between
    renewals costs nothing."""

    _transient = (psycopg.Error,)

    def __init__(
        self,
        location: Location,
        name: str,
        ttl: float = LEASE_SECONDS,
        *,
        busy_seconds: float = 30.0,
        per_process: bool = False,
    ) -> None:
        super().__init__(name, ttl)
        self.location = location
        self.busy_seconds = busy_seconds
        if per_process:
            self.name = f"{name}/{self.owner}"

    def _conn(self) -> psycopg.Connection[Any]:
        # Short: a renewal must not wait half a minute for a server that is gone.
        return connect(self.location, busy_seconds=min(self.busy_seconds, self.ttl / 4))

    def acquire(self, now: float) -> None:
        # ``now`` is the caller's clock; the server's decides (see the module docstring).
        super().acquire(now)

    def release(self) -> None:
        super().release()

    def _take(self, now: float) -> None:
        with self._conn() as conn, conn.transaction():
            held = conn.execute(
                f"SELECT owner, expires, since, expires > {NOW} FROM locks "
                "WHERE name = %s FOR UPDATE",
                (self.name,),
            ).fetchone()
            if held is not None and held[0] != self.owner and held[3] and not dead_here(held[0]):
                raise held_by(self.name, held[0], held[2], held[1])
            # Two takers of a free name: the primary key makes the second wait for the
            # first's commit, and its ON CONFLICT then sees the first as the holder.
            taken = conn.execute(
                "INSERT INTO locks (name, owner, expires, since, renewed) "
                f"VALUES (%s, %s, {NOW} + %s, {NOW}, {NOW}) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires, renewed = excluded.renewed, "
                "since = CASE WHEN locks.owner = excluded.owner THEN locks.since "
                "ELSE excluded.since END "
                f"WHERE locks.owner = excluded.owner OR locks.expires <= {NOW} "
                "OR locks.owner = %s RETURNING owner",
                (self.name, self.owner, self.ttl, held[0] if held is not None else self.owner),
            ).fetchone()
            if taken is None:
                again = conn.execute(
                    "SELECT owner, expires, since FROM locks WHERE name = %s", (self.name,)
                ).fetchone()
                assert again is not None
                raise held_by(self.name, again[0], again[2], again[1])

    def _extend(self) -> str | None:
        with self._conn() as conn:
            renewed = conn.execute(
                f"UPDATE locks SET expires = {NOW} + %s, renewed = {NOW} "
                "WHERE name = %s AND owner = %s",
                (self.ttl, self.name, self.owner),
            ).rowcount
            if renewed:
                return None
            row = conn.execute("SELECT owner FROM locks WHERE name = %s", (self.name,)).fetchone()
            return holder_of(row[0]) if row is not None else "nobody (freed)"

    def _free(self) -> None:
        with self._conn() as conn:
            conn.execute(
                "DELETE FROM locks WHERE name = %s AND owner = %s", (self.name, self.owner)
            )
