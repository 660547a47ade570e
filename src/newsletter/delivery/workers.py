"""Worker processes: one shared send on this host → N sender processes, watched as one.

Input: the command line a helper runs (the same ``newsletter send``, confirmed
already), how many helpers, and a way to read the send's counts. Output:
:class:`Helpers`, started once the audience is frozen (the process that asked is
the first worker, so N processes send in all), stopped with the asker's own
stop (SIGTERM: each finishes what is in flight and records it), and waited for,
with each one's exit status and the end of what it said; and :class:`Watcher`,
which reads the send's counts every half second so that one progress bar shows
what all of them have done. Only a backend that shares sends (PostgreSQL) can
take several processes; each holds its own lease and claims its own rows.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from newsletter.errors import StorageError

__all__ = ["FINISHED", "HelperResult", "Helpers", "Watcher"]

# States a recipient leaves the queue for (deferred ones may come back, but they were tried).
FINISHED = ("sent", "rejected", "deferred", "unknown", "suppressed")


@dataclass(frozen=True, slots=True)
class HelperResult:
    pid: int
    returncode: int
    said: str  # the last lines it wrote (stderr, then stdout)


class Helpers:
    """Helper processes of one send, each ``argv``; their output goes to temporary files."""

    def __init__(self, argv: Sequence[str], count: int) -> None:
        self.argv = list(argv)
        self.count = count
        self._folder = tempfile.TemporaryDirectory(prefix="newsletter-workers-")
        self._procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.stopped = False  # stop() was called: a helper ended by our SIGTERM did not fail

    def start(self) -> None:
        for i in range(self.count):
            log = Path(self._folder.name) / f"worker-{i + 2}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(  # noqa: S603  # our own program, the asker's environment
                    self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
            self._procs.append((proc, log))

    def reap(self) -> None:
        """Collect the exit status of helpers that ended (a killed one is no zombie then,
        and the others see at once that it is gone)."""
        for proc, _ in self._procs:
            proc.poll()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self._procs]

    def stop(self) -> None:
        """Ask each to stop as Ctrl-C would: finish what is in flight, record it, end."""
        self.stopped = True
        for proc, _ in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    def wait(self) -> list[HelperResult]:
        results = []
        for proc, log in self._procs:
            code = proc.wait()
            lines = log.read_text("utf-8", errors="replace").strip().splitlines()
            results.append(HelperResult(proc.pid, code, "\n".join(lines[-8:])))
        self._folder.cleanup()
        return results


class Watcher:
    """Reads the send's counts every ``every`` seconds in a thread and reports how many
    recipients all processes together have finished since it started."""

    def __init__(
        self,
        counts: Callable[[], dict[str, int]],
        on_done: Callable[[int], None],
        every: float = 0.5,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._close = close  # what it reads through, closed when it stops
        self._counts = counts
        self._on_done = on_done
        self._every = every
        self._stop = threading.Event()
        self._start = self._finished(counts())
        self.done = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="watcher")

    @staticmethod
    def _finished(counts: dict[str, int]) -> int:
        return sum(counts.get(state, 0) for state in FINISHED)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.look()

    def look(self) -> None:
        with contextlib.suppress(StorageError):  # a busy database: the bar waits a tick
            self.done = self._finished(self._counts()) - self._start
            self._on_done(self.done)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.look()
        if self._close is not None:
            self._close()
