"""Campaign runner: a frozen audience → every recipient sent, rejected, deferred or unknown.

Input: the send log and the send's id, the issue's :class:`MessageTemplate`,
a :class:`Transport` and :class:`SendOptions`. Output: a :class:`RunResult`.

How it keeps "never twice, never skipped":

- recipients are claimed from the log in small batches and committed as
  ``sending`` before any of them is handed to a connection;
- outcomes are committed in batches of at most ``flush_every`` (and at least
  every ``flush_interval`` seconds), so after a crash the rows still in
  ``sending`` are at most the queue, the connections and one batch
  (8 + 8 + 64 = 80 with the defaults) and are reported as unknown;
- a connection that fails before the message body went out gives
  ``deferred`` (retried, no doubt); one that fails after gives ``unknown``;
- a stop (Ctrl-C, SIGTERM, too many errors) lets the messages in flight
  finish, puts the claimed-but-unstarted back to ``pending`` and commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.ratelimit import Pacer
from newsletter.delivery.transports import Envelope, Session, Transport
from newsletter.errors import CampaignAborted, ConnectFailed
from newsletter.storage.base import SendLogStore
from newsletter.storage.sqlite.send_log import Delivery, Outcome


@dataclass(frozen=True, slots=True)
class SendOptions:
    connections: int = 8
    rate: float | None = None  # messages per second over all connections
    per_hour: int | None = None
    per_day: int | None = None  # counted over every send in the database
    retry_delays: tuple[float, ...] = (30.0, 120.0, 600.0)  # before the 2nd, 3rd, 4th attempt
    max_wait: float = 900.0  # how long a run waits for deferred retries before it stops
    max_consecutive_errors: int = 25
    flush_every: int = 64
    flush_interval: float = 0.25


@dataclass(slots=True)
class Progress:
    """Counts of this run, updated as outcomes arrive (for progress bars)."""

    total: int
    done: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class RunResult:
    counts: dict[str, int]  # the whole send, from the log, after this run
    attempted: int  # transactions in this run
    elapsed: float
    stopped: str | None = None  # why the run ended early, if it did

    @property
    def rate(self) -> float:
        return self.attempted / self.elapsed if self.elapsed > 0 else 0.0


class Campaign:
    def __init__(
        self,
        log: SendLogStore,
        send_id: int,
        template: MessageTemplate,
        transport: Transport,
        options: SendOptions,
        *,
        envelope_sender: str,
        clock: Callable[[], float] = time.time,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.log = log
        self.send_id = send_id
        self.template = template
        self.transport = transport
        self.options = options
        self.envelope_sender = envelope_sender
        self.clock = clock
        self.on_progress = on_progress
        now = clock()
        last_hour = log.sent_since(now - 3600) if options.per_hour else 0
        self.pacer = Pacer(options.rate, per_hour=options.per_hour, sent_last_hour=last_hour)
        self._day_left: int | None = None
        if options.per_day:
            self._day_left = options.per_day - log.sent_since(now - 86400)
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=options.connections)
        self._room = asyncio.Event()
        self._abort: CampaignAborted | None = None
        self._results: list[tuple[int, Outcome]] = []
        self._errors_in_a_row = 0
        self._stop_reason: str | None = None
        self._stopping = asyncio.Event()
        self._attempted = 0
        counts = log.counts(send_id)
        self.progress = Progress(total=counts["pending"] + counts["deferred"])

    def stop(self, reason: str) -> None:
        """Finish what is in flight, then end the run (safe from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopping.set()

    async def run(self) -> RunResult:
        started = time.monotonic()
        workers = [asyncio.create_task(self._worker()) for _ in range(self.options.connections)]
        flusher = asyncio.create_task(self._flusher())
        try:
            # The feeder ends when nothing is left; a worker only ends on a bug,
            # and then the run must end too, not wait for a queue nobody reads.
            feeder = asyncio.create_task(self._feed())
            await self._until_first(feeder, workers)
            joined = asyncio.create_task(self._queue.join())
            await self._until_first(joined, workers)
        finally:
            for task in (*workers, flusher):
                task.cancel()
            await asyncio.gather(*workers, flusher, return_exceptions=True)
            self._flush()
            self._release_queued()
        if self._abort is not None:
            raise self._abort
        return RunResult(
            counts=self.log.counts(self.send_id),
            attempted=self._attempted,
            elapsed=time.monotonic() - started,
            stopped=self._stop_reason,
        )

    async def _until_first(
        self, main: asyncio.Task[None], workers: list[asyncio.Task[None]]
    ) -> None:
        done, _ = await asyncio.wait([main, *workers], return_when=asyncio.FIRST_COMPLETED)
        if main not in done:
            main.cancel()
            self.stop("a worker failed")
            for task in done:
                task.result()  # re-raises the bug, after the finally above records what it can
        main.result()

    async def _unless_stopped(self, awaitable: Awaitable[object]) -> bool:
        """Wait for ``awaitable`` unless a stop comes first (pacing, reconnect back-off)."""
        task = asyncio.ensure_future(awaitable)
        stopping = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if task in done:
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    # -- feeding the queue ----------------------------------------------------
    async def _feed(self) -> None:
        # Claim in batches of at least 3/4 of the queue: every claim is one
        # durable commit, and one message per commit would cost more than the
        # message itself. The queue stays as small as the connection count.
        batch = max(1, self._queue.maxsize * 3 // 4)
        while not self._stopping.is_set():
            free = self._queue.maxsize - self._queue.qsize()
            if free < batch and self._queue.qsize() > 0:
                self._room.clear()
                await self._room.wait()
                continue
            claimed = self.log.claim(self.send_id, free, self.clock())
            if claimed:
                for delivery in claimed:
                    self._queue.put_nowait(delivery)
                continue
            # Nothing is due now: let the work in flight finish, then wait for
            # deferred retries that come due soon, or end the run.
            await self._queue.join()
            self._flush()
            retry_at = self.log.next_retry(self.send_id)
            if retry_at is None:
                return
            wait = retry_at - self.clock()
            if wait > self.options.max_wait:
                self.stop(
                    f"deferred recipients are due for another try in {wait:.0f} s, later than "
                    f"a run waits (NEWSLETTER_SEND_MAX_WAIT, {self.options.max_wait:.0f} s)"
                )
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(0.01, wait))

    def _release_queued(self) -> None:
        left: list[int] = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait().seq)
        if left:
            self.log.release(self.send_id, left)

    # -- workers --------------------------------------------------------------
    async def _worker(self) -> None:
        session: Session | None = None
        try:
            while True:
                delivery = await self._queue.get()
                self._room.set()
                try:
                    if self._stopping.is_set():
                        self.log.release(self.send_id, [delivery.seq])
                        continue
                    if self._day_left is not None:
                        if self._day_left <= 0:
                            self.log.release(self.send_id, [delivery.seq])
                            self.stop(
                                f"the cap of {self.options.per_day} messages a day is reached; "
                                "run the same command again tomorrow to continue"
                            )
                            continue
                        self._day_left -= 1
                    if session is not None and not session.usable:
                        # The relay closed it while it sat idle: do not spend a
                        # recipient's attempt on a dead connection.
                        await session.close()
                        session = None
                    session = await self._ensure_session(session)
                    if session is None or (
                        self.pacer.active and not await self._unless_stopped(self.pacer.acquire())
                    ):
                        self.log.release(self.send_id, [delivery.seq])
                        continue
                    outcome = await self._send(session, delivery)
                    if outcome is None:
                        self.log.release(self.send_id, [delivery.seq])
                    else:
                        self._settle(delivery, outcome)
                    if not session.usable:
                        await session.close()
                        session = None
                finally:
                    self._queue.task_done()
        finally:
            if session is not None:
                await session.close()

    async def _ensure_session(self, session: Session | None) -> Session | None:
        delay = 0.5
        while session is None and not self._stopping.is_set():
            try:
                return await self.transport.open()
            except ConnectFailed as exc:
                if self._error(f"cannot connect: {exc}"):
                    return None
                if not await self._unless_stopped(asyncio.sleep(delay)):
                    return None
                delay = min(delay * 2, 30.0)
            except CampaignAborted as exc:
                self._abort = exc
                self.stop(str(exc))
                return None
        return session

    async def _send(self, session: Session, delivery: Delivery) -> Outcome | None:
        """The outcome, or None when the relay refused the campaign before this message."""
        data = self.template.personalise(
            delivery.recipient, date=dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        )
        self._attempted += 1
        try:
            return await session.send(
                Envelope(self.envelope_sender, delivery.recipient.email, data)
            )
        except CampaignAborted as exc:
            # The relay refused the sender: nothing was sent to this recipient.
            self._abort = exc
            self.stop(str(exc))
            return None

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        if outcome.state == "deferred":
            delays = self.options.retry_delays
            n = delivery.attempts - 1
            retry_at = self.clock() + delays[n] if n < len(delays) else None
            outcome = Outcome("deferred", outcome.code, outcome.detail, retry_at)
            self.pacer.slow_down()
        if outcome.state == "sent":
            self._errors_in_a_row = 0
            self.pacer.went_well()
        elif outcome.state in ("deferred", "unknown"):
            self._error(f"{delivery.recipient.email}: {outcome.code or ''} {outcome.detail}")
        self._results.append((delivery.seq, outcome))
        self.progress.done += 1
        self.progress.by_state[outcome.state] = self.progress.by_state.get(outcome.state, 0) + 1
        if self.on_progress is not None:
            self.on_progress(self.progress)
        if len(self._results) >= self.options.flush_every:
            self._flush()

    def _error(self, what: str) -> bool:
        """Count an error; True when there have been too many in a row (the run stops)."""
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= self.options.max_consecutive_errors:
            self.stop(f"{self._errors_in_a_row} errors in a row, the last: {what.strip()}")
            return True
        return False

    # -- committing outcomes --------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.options.flush_interval)
            self._flush()

    def _flush(self) -> None:
        if self._results:
            batch, self._results = self._results, []
            try:
                self.log.record(self.send_id, batch)
            except BaseException:
                self._results[:0] = batch  # not lost: the next flush writes them
                raise
