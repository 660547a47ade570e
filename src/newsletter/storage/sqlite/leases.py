"""SQLite leases: a lock row with an expiry that one process at a time may hold.

Input: the database path and a lock name. Output: :class:`SqliteLease`
(:class:`newsletter.storage.base.Lease`), which raises :class:`LockHeld` when
another live process holds the name. The holder renews the lease from a
background thread every ``ttl / 4``; a holder that dies (kill -9, power cut)
stops renewing, and ``ttl`` seconds after its last renewal the lease is free
(at once, when the dead holder ran on this machine and its process is gone).
A renewal that finds the row no longer its own stops renewing and sets
:attr:`SqliteLease.lost`; so does a holder none of whose renewals succeeded for
``ttl`` seconds (a locked or unreachable database): its lease may have run out
and been taken, and it cannot know otherwise. The row names its holder
(``host:pid:object:machine``) and when it took the lock, so :class:`LockHeld`
can say which process to wait for.

"This machine" is the host name *and* the kernel's boot id *and* the PID
namespace (Linux: /proc/sys/kernel/random/boot_id, the inode of
/proc/self/ns/pid): two containers that share a host name but not a PID
namespace see different processes under one pid, and neither may free the
other's lease by finding "its" pid gone. Where they cannot be read, the owner
says so and no holder is freed early (its lease runs out after ``ttl``); an
owner written by an older version (``host:pid:object``) is not either.
Expiry compares the holder's and the taker's clocks (``time.time()``): see
:class:`newsletter.storage.base.Lease`.
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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}:{_MACHINE}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        # time.monotonic() just before the last write that made the lease ours for ttl
        # more seconds; None while it is not held.
        self._renewed: float | None = None
        self._failure = ""  # what the renewals that failed since then said

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
        started = time.monotonic()
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
        self._renewed, self._failure = started, ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._thread.start()

    @property
    def lost(self) -> str | None:
        # Judged here too, not only by the renewal thread: a renewal stuck waiting for a
        # lock past the expiry must not let the holder go on as if it were still its own.
        renewed = self._renewed
        if self._lost is None and renewed is not None:
            silent = time.monotonic() - renewed
            if silent >= self.ttl:
                self._lost = _unrenewed(silent, self._failure)
        return self._lost

    def check(self) -> None:
        lost = self.lost
        if lost is not None:
            raise LeaseLost(self.name, lost)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if self.lost is not None:
                return
            started = time.monotonic()
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
            except sqlite3.Error as exc:
                # A busy database now and then must not end the renewals: try again at
                # the next tick. Once none has succeeded for ttl, `lost` says so.
                self._failure = str(exc)
                continue
            except BaseException as exc:
                # A bug: the renewals end, so the lease is no longer known to be ours.
                self._lost = _unrenewed(time.monotonic() - (self._renewed or started), repr(exc))
                raise
            if self._lost is None:
                self._renewed, self._failure = started, ""

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._renewed = None
        conn = self._conn()
        try:
            conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (self.name, self.owner))
        finally:
            conn.close()


def _holder(owner: str) -> str:
    host, _, rest = owner.partition(":")
    return f"process {rest.partition(':')[0]} on {host}"


def _unrenewed(seconds: float, said: str) -> str:
    """What :attr:`SqliteLease.lost` says when the holder's own renewals kept failing."""
    why = f": {said}" if said else ""
    return f"whichever run took it after this one could not renew it for {seconds:.0f} seconds{why}"


def _machine() -> str:
    """This kernel and PID namespace (boot id/namespace inode), or "unknown"."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text("ascii").strip()
        namespace = Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return "unknown"
    return f"{boot}/{namespace}" if boot and ":" not in boot else "unknown"


_MACHINE = _machine()


def _dead_here(owner: str) -> bool:
    """True when the owner ran on this machine (host name, boot id and PID namespace) and
    its process is gone (kill -9, crash): its lease can be taken at once instead of after
    it runs out."""
    host, pid_text, _, machine = [*owner.split(":", 3), "", "", ""][:4]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    if machine != _MACHINE or _MACHINE == "unknown":
        # Another container with our host name, an older version's owner, or a
        # machine that cannot say: its pid means nothing here.
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False
