"""SQLite leases: a lock row with an expiry that one process at a time may hold.

Input: the database path and a lock name. Output: :class:`SqliteLease`
(:class:`newsletter.storage.base.Lease`), which raises :class:`LockHeld` when
another live process holds the name. The holder renews the lease from a
background thread every ``ttl / 4``; a holder that dies (kill -9, power cut)
stops renewing, and ``ttl`` seconds after its last renewal the lease is free
(at once, when the dead holder ran on this machine and its process is gone).
A renewal that finds the row no longer its own stops renewing and sets
:attr:`SqliteLease.lost`. The row names its holder (``host:pid:...``) and when
it took the lock, so :class:`LockHeld` can say which process to wait for.
Used for the schedule (one run acts on a slot) and for each send (one process
works on an issue's send to a list at a time).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

from newsletter.errors import LeaseLost, LockHeld
from newsletter.storage.base import LEASE_SECONDS
from newsletter.storage.sqlite.connection import translated

__all__ = ["LEASE_SECONDS", "SqliteLease"]


@translated
class SqliteLease:
    """A lock row with an expiry, renewed by a background thread while held.

    Each step opens its own short connection: the renewal thread never shares
    one with the thread that holds the lease."""

    def __init__(
        self, db_path: Path, name: str, ttl: float = LEASE_SECONDS, *, busy_seconds: float = 30.0
    ) -> None:
        self.db_path = db_path
        self.name = name
        self.ttl = ttl
        self.busy_seconds = busy_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def _conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=self.busy_seconds)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def acquire(self, now: float) -> None:
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
                and not _dead_here(held[0])
            ):
                conn.execute("ROLLBACK")
                host, _, rest = held[0].partition(":")
                raise LockHeld(self.name, host, rest.partition(":")[0], held[2], held[1])
            conn.execute(
                "INSERT INTO locks (name, owner, expires, since) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires, since = CASE WHEN locks.owner = excluded.owner "
                "THEN locks.since ELSE excluded.since END",
                (self.name, self.owner, now + self.ttl, now),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._thread.start()

    @property
    def lost(self) -> str | None:
        return self._lost

    def check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(self.name, self._lost)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                conn = self._conn()
                try:
                    renewed = conn.execute(
                        "UPDATE locks SET expires = ? WHERE name = ? AND owner = ?",
                        (time.time() + self.ttl, self.name, self.owner),
                    ).rowcount
                    if not renewed:
                        row = conn.execute(
                            "SELECT owner FROM locks WHERE name = ?", (self.name,)
                        ).fetchone()
                        self._lost = _holder(row[0]) if row is not None else "nobody (freed)"
                        return
                finally:
                    conn.close()
            except sqlite3.Error:
                # A busy database now and then must not end the renewals: try
                # again at the next tick, well before the lease runs out.
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        conn = self._conn()
        try:
            conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (self.name, self.owner))
        finally:
            conn.close()


def _holder(owner: str) -> str:
    host, _, rest = owner.partition(":")
    return f"process {rest.partition(':')[0]} on {host}"


def _dead_here(owner: str) -> bool:
    """True when the owner ran on this machine and its process is gone (kill -9, crash):
    its lease can be taken at once instead of after it runs out."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False
