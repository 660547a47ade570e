"""Leases, the part every backend shares: the holder's identity and the renewal thread.

Input: a backend's three row operations (take the lock row, extend it, free
it). Output: :class:`RenewingLease`, a :class:`newsletter.storage.base.Lease`
that renews itself from a background thread every ``ttl / 4`` and knows when
it is lost: a renewal found the row taken by another holder, or none of its
renewals succeeded for ``ttl`` seconds (a locked or unreachable database), so
that it may have run out and been taken meanwhile.

The owner names its holder as ``host:pid:object:machine``, where "machine" is
the kernel's boot id and the PID namespace (Linux: /proc/sys/kernel/random/boot_id,
the inode of /proc/self/ns/pid): two containers that share a host name but not
a PID namespace see different processes under one pid, and neither may free
the other's lease by finding "its" pid gone (:func:`dead_here`). Where they
cannot be read, the owner says so and no holder is freed early.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from newsletter.errors import LeaseLost, LockHeld
from newsletter.storage.base import LEASE_SECONDS

__all__ = ["LEASE_SECONDS", "RenewingLease", "dead_here", "held_by", "holder_of", "host_pid"]


class RenewingLease:
    """A lease renewed by a background thread while held; a backend gives the row steps.

    ``_take(now)`` makes the row ours or raises LockHeld; ``_extend()`` renews it and
    returns None, or who holds it now when it is no longer ours; ``_free()`` deletes it
    if it is still ours. ``_transient`` are the errors a renewal shrugs off until the
    next tick (a busy or unreachable database)."""

    _transient: tuple[type[BaseException], ...] = ()

    def __init__(self, name: str, ttl: float = LEASE_SECONDS) -> None:
        self.name = name
        self.ttl = ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}:{MACHINE}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        # time.monotonic() just before the last write that made the lease ours for ttl
        # more seconds; None while it is not held.
        self._renewed: float | None = None
        self._failure = ""  # what the renewals that failed since then said

    # -- the backend's row steps
    def _take(self, now: float) -> None:
        raise NotImplementedError

    def _extend(self) -> str | None:
        raise NotImplementedError

    def _free(self) -> None:
        raise NotImplementedError

    # -- the Lease protocol
    def acquire(self, now: float) -> None:
        started = time.monotonic()
        self._take(now)
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
                taken_by = self._extend()
            except self._transient as exc:
                # A busy database now and then must not end the renewals: try again at
                # the next tick. Once none has succeeded for ttl, `lost` says so.
                self._failure = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                continue
            except BaseException as exc:
                # A bug: the renewals end, so the lease is no longer known to be ours.
                self._lost = _unrenewed(time.monotonic() - (self._renewed or started), repr(exc))
                raise
            if taken_by is not None:
                self._lost = taken_by
                return
            if self._lost is None:
                self._renewed, self._failure = started, ""

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._renewed = None
        self._free()


def host_pid(owner: str) -> tuple[str, str]:
    """(host, pid) of a lock row's owner (``host:pid:object:machine``)."""
    host, _, rest = owner.partition(":")
    return host, rest.partition(":")[0]


def holder_of(owner: str) -> str:
    """How a lock row's owner is named to people: "process PID on HOST"."""
    host, pid = host_pid(owner)
    return f"process {pid} on {host}"


def held_by(name: str, owner: str, since: float | None, until: float) -> LockHeld:
    """The LockHeld error for the lock ``name`` that ``owner`` holds."""
    return LockHeld(name, *host_pid(owner), since, until)


def _unrenewed(seconds: float, said: str) -> str:
    """What :attr:`RenewingLease.lost` says when the holder's own renewals kept failing."""
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


MACHINE = _machine()


def dead_here(owner: str) -> bool:
    """True when the owner ran on this machine (host name, boot id and PID namespace) and
    its process is gone (kill -9, crash): its lease can be taken at once instead of after
    it runs out."""
    host, pid_text, _, machine = [*owner.split(":", 3), "", "", ""][:4]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    if machine != MACHINE or MACHINE == "unknown":
        # Another container with our host name, an older version's owner, or a
        # machine that cannot say: its pid means nothing here.
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    # A zombie (killed, not yet reaped by its parent: a `send --workers` helper) still
    # answers signal 0, but it will never renew or record anything again.
    try:
        stat = Path(f"/proc/{int(pid_text)}/stat").read_text("ascii", errors="replace")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
