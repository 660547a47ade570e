"""Campaign runner: a frozen audience → every recipient sent, rejected, deferred or unknown.

Input: the send log and the send's id, the issue's :class:`MessageTemplate`,
a :class:`Transport` and :class:`SendOptions`. Output: a :class:`RunResult`.

How it keeps "never twice, never skipped":

- recipients are claimed from the log in batches and committed as
  ``sending`` before any of them is handed to a connection;
- outcomes are committed in batches of at most ``flush_every`` (and at least
  every ``flush_interval`` seconds); a batch whose commit fails stays for the
  next one;
- a connection that fails before the message body went out gives
  ``deferred`` (retried, no doubt); one that fails after gives ``unknown``;
- a stop (Ctrl-C, SIGTERM, too many errors) lets the messages in flight
  finish, puts the claimed-but-unstarted back to ``pending`` and commits
  before :meth:`Campaign.run` returns;
- a run that is no longer the only one stops the same way: the ``guard``
  (the send's lease: who holds it now, once another run took it) is asked
  before every claim, before each message starts and every
  :data:`GUARD_EVERY` seconds while the run waits for deferred retries, and
  :attr:`RunResult.lost` says who took it;
- a database that another program holds (:class:`StorageBusy`) stops the run
  the same way: no more claims, the messages in flight finish (no worker is
  cancelled mid-transaction because of it), every outcome stays in memory
  and the run keeps trying to commit them, backing off, for up to
  ``SendOptions.busy_wait`` seconds in all (5 minutes; said once through
  ``on_note``). Then the run ends as a stopped run, or, if the database is
  still held, with :class:`SendLogBusy`, which lists the messages that went
  out unrecorded (they will show as unknown and must not be resent). Any other
  :class:`StorageError` (a damaged file, a full disk) ends the run the same
  way without the wait, with :class:`SendLogFailed`.

The event loop never waits on the database while it sends: every store call
of a run (claim, record, release, next_retry, counts) goes to one
:class:`~newsletter.delivery.log_thread.LogThread` and is awaited, so SMTP
sessions go on while a commit (an fsync, a round trip across a network) is
under way. That thread is the only one that touches the store during the run
and ends with it, on errors and cancellation too; a :class:`StorageError`
raised there stops the run as above, and any other error (a bug) ends it
with that error. The constructor's one read (counts) stays synchronous: no
SMTP has started yet. One task, the
pump, makes every call, one at a time, so a flush never waits behind more
than the one call under way; workers never wait on the store (what they
cannot start on a stop is released in one commit as the run ends).

The hour and day caps (``per_hour``, ``per_day``) are counted by every claim
in the database, over every process and every send there
(:mod:`newsletter.storage.caps`): a claim never takes more than they leave
room for, rows in flight counted as sent. A claim they hold back says which
cap and when room comes; once this run's recipients are done the run waits
for it (an hour's cap always; a day's only within ``max_wait``, otherwise it
stops and says when to run again).

Waits (the reconnect back-off, the busy back-off, the wait for deferred
retries) go through the injected ``sleep``; a test that injects one also
injects the ``clock`` that it moves, and the pacer then runs on both.

The unknown window after a crash is the rows this run holds in ``sending``
(claimed, or being claimed, and not yet committed out). It is a window on
claims: a claim reserves its rows before it goes to the thread, a row leaves
only once its outcome or its release is committed, and no claim takes the
window past its size, which is

- **2 * connections + flush_every** (8 + 8 + 64 = 80 with the defaults, the
  bound before the thread) while commits are quick, and
- at most **10 * connections + flush_every / 2** (112) when they are slow,
  as the queue deepens to cover them (below).

Claims are sized to the commit latency: the queue's depth is what the
connections would take during three calls in the thread (their rate when
never kept waiting, measured, times the measured call time), at least the
connection count (as before) and at most ``SLACK + 1`` times it (9 * 8 = 72).
A claim goes out as soon as the queue is down by half its depth (at least
3/4 of the connection count: one recipient per commit would cost more than
the message) or empty, so the next claim is in the thread while the queue
drains. The window makes room for a deep queue by flushing outcomes before
``flush_every`` ("flush under pressure") and grows only when that is not
enough. When a flush and a claim are both due they take turns.

Little's law sets the limit: the rate is at most the window over the time a
row stays in it (two commits at least, a claim and a flush), and one thread
makes at most 1/latency commits a second, so with 50 ms commits a run keeps
some 400-450 messages a second (against ~100 with the store called in the
loop), enough for 8 connections to a relay that takes 20 ms a message
(``benchmarks/bench_slow_commit.py``). A flush and the next claim are not
merged into one transaction, though that would halve the commits: it needs
a new store operation, and its failure would tie outcomes that must be kept
for the next flush to a claim whose rows the run never got; the window above
is enough for the rates a relay allows. A busy database does not widen the
window: it stops the claims, and the rows it holds are those already claimed;
a run that gives up on the database leaves no more than them in ``sending``,
and its error names the ones that were delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from newsletter.bounces.refusals import HealthLimits
from newsletter.delivery.log_thread import LogThread
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.ratelimit import Pacer
from newsletter.delivery.transports import Envelope, RelayPool, Session, Transport
from newsletter.errors import (
    CampaignAborted,
    ConnectFailed,
    StorageBusy,
    StorageError,
    StorageUnavailable,
    shown_time,
)
from newsletter.models import Delivery, Outcome
from newsletter.storage.base import SendLogStore
from newsletter.storage.caps import CapReached, Caps, CapWindow, Claim
from newsletter.storage.evidence import SoftBounces
from newsletter.verp import Verp

P = ParamSpec("P")
T = TypeVar("T")
# How far past the connection count the queue may grow to cover slow commits (the
# unknown window grows by as much; module docstring).
SLACK = 8
# How often the guard is asked while the run waits for deferred retries (seconds).
GUARD_EVERY = 1.0
# The back-off between tries to commit while the database is busy: it doubles from the
# first to the last (each try also waits the store's own busy timeout first).
BUSY_BACKOFF = (0.5, 8.0)
# Why a run that found the database busy stopped (RunResult.stopped).
BUSY_STOP = "the database is busy: another program holds it"
# How many delivered addresses the error of a run that could not record them names.
LISTED = 20


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
    # How long in all a run keeps trying to commit the outcomes it holds while another
    # program holds the database (the store's own busy timeout included), before it
    # gives up and says which messages went out unrecorded (module docstring).
    busy_wait: float = 300.0
    # When the send pauses itself for its bounce and complaint rates (None: never), and
    # how soft bounces count, for the refusals the run records (bounces.refusals).
    health: HealthLimits | None = None
    soft: SoftBounces = field(default_factory=SoftBounces)


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
    # The reason itself says when to run again (a day's cap: tomorrow); otherwise the
    # same command resumes now. A flag, not a look for "again" in a reason that may
    # quote a relay ("451 4.7.1 Try again later").
    stop_says_when: bool = False
    lost: str | None = None  # who took the run's lease, when the guard stopped it
    paused: str | None = None  # why the send paused itself (its health), when it did

    @property
    def rate(self) -> float:
        return self.attempted / self.elapsed if self.elapsed > 0 else 0.0


# How often a process of a shared send looks at the others (seconds).
SHARE_EVERY = 2.0
# How often a run looks at its own bounce and complaint rates: every so many seconds,
# and every so many messages (at most 100, and four times in the health's sample).
HEALTH_EVERY = 2.0
HEALTH_EVERY_MESSAGES = 100


@dataclass(slots=True)
class _HealthWatch:
    """When a run last asked its ``health`` (SendHealth.check), and when it asks next."""

    check: Callable[[int], str | None]
    step: int  # messages between two looks
    at: float = field(default_factory=time.monotonic)
    attempted: int = 0

    @classmethod
    def of(cls, check: Callable[[int], str | None], options: SendOptions) -> _HealthWatch:
        sample = options.health.sample if options.health else HEALTH_EVERY_MESSAGES
        return cls(check, max(1, min(HEALTH_EVERY_MESSAGES, sample // 4)))

    def due(self, attempted: int) -> bool:
        return time.monotonic() - self.at >= HEALTH_EVERY or attempted - self.attempted >= self.step


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
        guard: Callable[[], str | None] | None = None,
        on_note: Callable[[str], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        holder: str = "",
        shared: bool = False,
        verp: Verp | None = None,
        health: Callable[[int], str | None] | None = None,
    ) -> None:
        """``guard`` says, when asked, who else now holds the run's lease (None while
        it is ours): the run then stops as on any stop (module docstring). ``on_note``
        gets what the run has to say while it goes on (that it waits for a busy
        database). ``sleep`` (default :func:`asyncio.sleep`) is every wait's; given,
        the pacer runs on it and on ``clock`` too (without it, on real time: a clock
        frozen for the retry times must not freeze the pacing). ``holder`` is the owner of
        the run's lease, which every claim and record carries (a shared send tells its
        processes' rows apart by it). ``shared``: other processes may work on this send at
        once; every SHARE_EVERY seconds the run then takes over the rows of those whose lease
        ran out (they become unknown) and keeps to its share of the rate. ``verp``: each
        message's MAIL FROM names its delivery (:mod:`newsletter.verp`), so that its bounce
        says whom it is about; without it every message has ``envelope_sender``.
        ``health`` is asked, in the database's thread, every HEALTH_EVERY seconds and once
        at the end, with the number of messages this run attempted: it records what the
        relay refused and returns the reason to pause the send (its bounce or complaint
        rate is too high), or None."""
        self.log = log
        self.holder = holder
        self.shared = shared
        self._shared_at = 0.0  # time.monotonic() of the last look at the other processes
        self.send_id = send_id
        self.template = template
        self.transport = transport
        self.options = options
        self.envelope_sender = envelope_sender
        self.verp = verp
        self._health = None if health is None else _HealthWatch.of(health, options)
        self._paused: str | None = None
        self.clock = clock
        self.on_progress = on_progress
        self.guard = guard
        self.on_note = on_note
        self._sleep = sleep or asyncio.sleep
        self._lost: str | None = None
        self.pacer = Pacer(
            options.rate, clock=clock if sleep is not None else time.monotonic, sleep=self._sleep
        )
        # The hour and day caps are counted by every claim, in the database (over every
        # process and send); a claim they held back says so, and the run waits or stops.
        self._caps = (
            Caps(options.per_hour, options.per_day) if options.per_hour or options.per_day else None
        )
        self._capped: CapReached | None = None  # the cap that held back the last claim
        # The cap the run last said it waits for, and until when: said once, and again
        # only for a long wait until another time (not once a message at a steady cap).
        self._said_cap: tuple[CapWindow, float | None] | None = None
        # The queue's depth is kept by the pump, within the window (module docstring).
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._min_claim = max(1, options.connections * 3 // 4)
        self._open = 0  # rows of the window: claimed (or being claimed), not committed out
        self._working = 0  # deliveries taken from the queue and not done with
        self._commit_time = 0.0  # seconds a call takes in the thread (moving average)
        self._take_rate = 0.0  # deliveries a second the workers could take, busy all the time
        self._taken = 0  # deliveries the workers finished since the last claim went out
        self._spent = 0.0  # seconds they spent on them (sending, pacing, reconnecting)
        self._unstarted: list[int] = []  # claimed, never attempted: released as the run ends
        self._oldest = 0.0  # when the oldest outcome not yet committed came (monotonic)
        self._wake = asyncio.Event()  # something the pump may act on changed
        self._db: LogThread | None = None
        self._abort: CampaignAborted | None = None
        self._results: list[tuple[int, Outcome]] = []
        self._addresses: dict[int, str] = {}  # seq -> address of each outcome not committed
        self._failure: StorageError | None = None  # the store error that ended the run
        self._busy: StorageBusy | None = None  # the last busy error, once there was one
        self._busy_waited = 0.0  # seconds spent on busy tries and back-offs, in all
        self._said_busy = False  # the note that the run waits for the database
        self._backoff = BUSY_BACKOFF[0]
        self._errors_in_a_row = 0
        self._stop_reason: str | None = None
        self._stop_says_when = False
        self._stopping = asyncio.Event()
        self._attempted = 0
        counts = log.counts(send_id)
        self.progress = Progress(total=counts["pending"] + counts["deferred"])

    def _guarded(self) -> bool:
        """Whether the lease was lost (the run stops): asked before each claim and message."""
        if self._lost is None and self.guard is not None:
            holder = self.guard()
            if holder is not None:
                self._lost = holder
                self.stop(f"another run ({holder}) took this send's lock")
        return self._lost is not None

    def stop(self, reason: str, *, says_when: bool = False) -> None:
        """Finish what is in flight, then end the run (safe from a signal handler).
        ``says_when``: the reason says when to run again (see RunResult.stop_says_when)."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop_says_when = says_when
        self._stopping.set()
        self._wake.set()

    async def run(self) -> RunResult:
        started = time.monotonic()
        db = self._db = LogThread()
        # Several relays keep their connections from one message's session to the next
        # for the run, and close them at its end (transports.relays).
        pool = self.transport if isinstance(self.transport, RelayPool) else None
        if pool is not None:
            pool.keep_connections()
        try:
            workers = [asyncio.create_task(self._worker()) for _ in range(self.options.connections)]
            tasks = list(workers)
            try:
                # The pump ends when nothing is left or on a stop; then the queue
                # drains. A worker only ends on a bug, and then the run must end
                # too, not wait for a queue nobody reads.
                tasks.append(asyncio.create_task(self._pump()))
                await self._until_first(tasks[-1], workers)
                tasks.append(asyncio.create_task(self._queue.join()))
                await self._until_first(tasks[-1], workers)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if pool is not None:
                    await pool.close_kept()
                await self._record_the_rest()
                if self._health is not None and self._failure is None:
                    # The last refusals, recorded; a run with nothing left pauses nothing.
                    await self._look_at_health(final=True)
            counts: dict[str, int] | None = None
            if self._failure is None:
                try:
                    counts = await self._patiently(self._call, self.log.counts, self.send_id)
                except StorageError as exc:
                    self._failure = exc
            if self._failure is not None or counts is None:
                assert self._failure is not None
                raise self._in_doubt(self._failure) from self._failure
            if self._abort is not None:
                raise self._abort
        finally:
            self._db = None
            db.close()
        return RunResult(
            counts=counts,
            attempted=self._attempted,
            elapsed=time.monotonic() - started,
            stopped=self._stop_reason,
            stop_says_when=self._stop_says_when,
            lost=self._lost,
            paused=self._paused,
        )

    @property
    def _thread(self) -> LogThread:
        assert self._db is not None, "the store is only called during run()"
        return self._db

    async def _until_first(
        self, main: asyncio.Task[None], helpers: list[asyncio.Task[None]]
    ) -> None:
        done, _ = await asyncio.wait([main, *helpers], return_when=asyncio.FIRST_COMPLETED)
        if main not in done:
            main.cancel()
            self.stop("a worker failed")
            for task in done:
                task.result()  # re-raises the error, after run() records what it can
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

    # -- the pump: every call to the store ---------------------------------------
    def _depth(self) -> tuple[int, int]:
        """(how many claimed recipients the queue should hold, the window now).

        The depth lasts the workers three calls in the thread (a claim can wait behind a
        flush) at the rate they would take recipients if never kept waiting. (The rate
        they do take them at would not do: while the queue runs dry it is the rate of
        the claims, and the depth would never grow.) The window is the larger of
        2 * connections + flush_every (as before) and connections + depth +
        flush_every / 2: a deep queue first takes its room from the outcomes that wait
        for a flush (the flush comes sooner), and only past that widens the window."""
        connections = self.options.connections
        wanted = math.ceil(3 * self._take_rate * self._commit_time)
        depth = max(connections, min(wanted, (SLACK + 1) * connections))
        flush_every = self.options.flush_every
        return depth, max(2 * connections + flush_every, connections + depth + flush_every // 2)

    async def _pump(self) -> None:
        """The pump's calls (below); a store that fails stops the run instead of ending it
        at once: run() lets the messages in flight finish, then says what is in doubt."""
        try:
            await self._pump_calls()
        except StorageError as exc:
            self._failure = exc
            self.stop(f"the database failed: {exc}")

    async def _pump_calls(self) -> None:
        """Claim ahead and commit outcomes, one call in the thread at a time.

        One task decides every call, so that none waits behind another for long, and
        each carries as many rows as it may: a flush is due at ``flush_every`` outcomes,
        after ``flush_interval`` seconds, or when the outcomes waiting for it hold the
        room a claim needs; a claim when the queue is down by half its depth (3/4 of the
        connection count at least) and the window has that room, or when it is empty.
        When both are due they take turns. On a stop it claims no more, and goes on
        flushing until the messages in flight are done. A busy database stops the run
        (a claim that finds it busy is not tried again) and each flush waits for it
        (:meth:`_patiently`)."""
        drained = False  # the last claim found nothing due
        claimed_last = False
        while True:
            self._wake.clear()
            if self.shared and time.monotonic() - self._shared_at >= SHARE_EVERY:
                await self._look_at_the_others()
            if self._health is not None and self._health.due(self._attempted):
                await self._look_at_health()
            stopping = self._stopping.is_set()
            queued = self._queue.qsize()
            if stopping and not queued and not self._working:
                return
            if self._taken and self._spent > 0:
                rate = self.options.connections * self._taken / self._spent
                self._take_rate = _ewma(self._take_rate, rate)
                self._taken, self._spent = 0, 0.0
            depth, window = self._depth()
            room = window - self._open
            least = max(self._min_claim, depth // 2)
            needed = least if queued else 1
            want = min(depth - queued, room)
            claim = not (stopping or drained) and want >= needed
            waited = time.monotonic() - self._oldest
            flush = bool(self._results) and (
                len(self._results) >= self.options.flush_every
                or waited >= self.options.flush_interval
                or (not (stopping or drained) and depth - queued >= needed > room)
            )
            if claim and (not flush or not claimed_last):
                if self._guarded():
                    continue  # stopping now: no claim, the loop finishes what is in flight
                try:
                    claimed = await self._claim(want)
                except StorageBusy as exc:
                    self._busy_stop(exc)  # nothing was claimed; the loop finishes the rest
                    continue
                drained = self._after_claim(claimed)
                claimed_last = True
            elif flush:
                await self._patiently(self._flush)
                claimed_last = False
            elif drained and not queued and not self._working:
                if not await self._nothing_due():
                    return
                drained = False
            elif self._results:
                # A timer, not wait_for: this wait comes twice a message.
                loop = asyncio.get_running_loop()
                due = loop.call_later(self.options.flush_interval - waited, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    due.cancel()
            else:
                await self._wake.wait()

    def _after_claim(self, claimed: Claim) -> bool:
        """Keep what a claim says of the caps; True when it took nobody (drained)."""
        drained = not claimed.deliveries
        self._capped = claimed.capped if drained else None
        return drained

    async def _look_at_the_others(self) -> None:
        """A shared send: count the live processes (the rate is shared among them) and turn
        the rows of those whose lease ran out unknown. A busy database skips a look."""
        self._shared_at = time.monotonic()
        try:
            await self._call(self.log.mark_interrupted, self.send_id)
            workers = await self._call(self.log.workers, self.send_id)
        except StorageBusy:
            return
        self.pacer.share(len(workers))
        if isinstance(self.transport, RelayPool):
            self.transport.share(len(workers))  # each relay's rate, as the send's

    async def _nothing_due(self) -> bool:
        """The last claim found nothing and the work in flight is done: commit it, then
        wait for what may still come (False: the run ends)."""
        await self._patiently(self._flush)
        if self._capped is not None:
            capped, self._capped = self._capped, None
            return await self._wait_for_room(capped)
        if self.shared and await self._others_in_flight():
            # Another process still has recipients in flight: they may come back (it
            # stops and releases them) or be counted unknown (it died), and this run's
            # summary is of the whole send. Look again shortly.
            await self._unless_stopped(self._sleep(SHARE_EVERY))
            return True
        # Deferred retries that come due soon are waited for; otherwise the run ends.
        return await self._wait_for_retries()

    async def _others_in_flight(self) -> bool:
        """A shared send with nothing due: whether rows are still ``sending`` (this run's own
        are all committed by now), after the rows of dead processes were counted unknown."""
        await self._look_at_the_others()
        counts = await self._call(self.log.counts, self.send_id)
        return counts["sending"] > 0

    async def _wait_for_retries(self) -> bool:
        """Wait until a deferred recipient is due; False when the run should end."""
        try:
            retry_at = await self._call(self.log.next_retry, self.send_id)
        except StorageBusy as exc:
            self._busy_stop(exc)  # every outcome is committed: the deferred wait for a rerun
            return False
        if retry_at is None:
            return False
        wait = retry_at - self.clock()
        if wait > self.options.max_wait:
            self.stop(
                f"deferred recipients are due for another try in {wait:.0f} s, later than "
                f"a run waits (NEWSLETTER_SEND_MAX_WAIT, {self.options.max_wait:.0f} s)"
            )
            return False
        await self._guarded_sleep(wait)
        return True

    async def _wait_for_room(self, capped: CapReached) -> bool:
        """A claim found a cap full and this run's recipients are all done: wait until the
        cap has room and claim again (True), or stop (False) when a day's cap has none
        before a run would stop waiting anyway (``max_wait``)."""
        per = "an hour" if capped.window == "hour" else "a day"
        messages = "message" if capped.cap == 1 else "messages"
        cap = f"the cap of {capped.cap} {messages} {per} (over every send in this database)"
        if capped.room_at is None:
            # Nothing counted has a time (a claim never sees this): look again soon.
            wait, when = SHARE_EVERY, "the messages in flight are done"
        else:
            wait = max(0.01, capped.room_at - self.clock())
            when = shown_time(capped.room_at)
        if capped.window == "day" and wait > self.options.max_wait:
            if self.shared and await self._others_in_flight():
                # Another process still has recipients in flight: wait for them (they end,
                # or are counted unknown), so that this run's summary is the whole send's.
                await self._guarded_sleep(SHARE_EVERY)
                return True
            self.stop(
                f"{cap} is reached; the next message may go at {when}: run the same command "
                "again then to continue",
                says_when=True,
            )
            return False
        said = self._said_cap
        if self.on_note is not None and (
            said is None or said[0] != capped.window or (wait >= 60 and said[1] != capped.room_at)
        ):
            self._said_cap = (capped.window, capped.room_at)
            self.on_note(f"{cap} is reached; waiting until {when} to send more")
        # A shared send looks again sooner: another process's rows that end unsent make room.
        await self._guarded_sleep(min(wait, SHARE_EVERY) if self.shared else wait)
        return True

    async def _guarded_sleep(self, wait: float) -> None:
        """Sleep ``wait`` seconds unless the run stops or loses its lease first."""
        # In slices, asking the guard between them: a lease lost during a wait of up to
        # max_wait is noticed within GUARD_EVERY seconds, not at the next claim. Counted
        # down by what was slept, so that a clock frozen by a test cannot make it endless.
        left = max(0.01, wait)
        while left > 0:
            if self._guarded():
                return  # stopping: the pump ends the run
            step = min(GUARD_EVERY, left)
            if not await self._unless_stopped(self._sleep(step)):
                return
            left -= step

    def _busy_stop(self, exc: StorageBusy) -> None:
        self._busy = exc
        # Not the error's own words ("try again when it is done"): a stopped run is
        # resumed by running the same command, which the CLI says after the reason.
        self.stop(BUSY_STOP)

    async def _patiently(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``await fn(...)``, tried again while the database is busy.

        A busy database stops the run (no more claims); the tries go on with a back-off
        until ``busy_wait`` seconds in all went on them (tries and back-offs, over the
        whole run), and the first busy one is said through ``on_note``. Past that the
        busy error is raised, at once for every later call."""
        budget = self.options.busy_wait
        while True:
            if self._busy is not None and self._busy_waited >= budget:
                raise self._busy
            started = time.monotonic()
            try:
                return await fn(*args, **kwargs)
            except StorageBusy as exc:
                self._busy_waited += time.monotonic() - started
                self._busy_stop(exc)
                if self._busy_waited >= budget:
                    raise
                if not self._said_busy and self.on_note is not None:
                    self._said_busy = True
                    self.on_note(
                        f"the database is busy ({exc}). This run takes no more recipients, "
                        "lets the messages in flight finish and keeps trying to record their "
                        f"outcomes for up to {budget:.0f} s; leave it running, or what it has "
                        "not recorded will show as unknown"
                    )
                pause = min(self._backoff, budget - self._busy_waited)
                await self._sleep(pause)
                self._busy_waited += pause
                self._backoff = min(2 * self._backoff, BUSY_BACKOFF[1])

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """One call in the thread, timed: the depth follows how long calls take."""
        started = time.monotonic()
        result = await self._thread.call(fn, *args, **kwargs)
        self._commit_time = _ewma(self._commit_time, time.monotonic() - started)
        return result

    async def _claim(self, limit: int) -> Claim:
        """Claim up to ``limit`` recipients in the thread and queue them."""
        self._open += limit  # reserved before the claim can commit anything
        started = time.monotonic()
        future = self._thread.submit(
            self.log.claim,
            self.send_id,
            limit,
            self.clock(),
            holder=self.holder,
            caps=self._caps,
        )
        try:
            claimed = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The claim commits in the thread all the same: wait for it, so that its
            # rows are in the queue and go back to pending when the run ends.
            with contextlib.suppress(Exception):
                self._admit(limit, await asyncio.shield(future))
            raise
        except BaseException:
            self._open -= limit  # nothing was claimed
            raise
        self._admit(limit, claimed)
        self._commit_time = _ewma(self._commit_time, time.monotonic() - started)
        return claimed

    def _admit(self, reserved: int, claimed: Claim) -> None:
        self._open += len(claimed.deliveries) - reserved
        for delivery in claimed.deliveries:
            self._queue.put_nowait(delivery)

    async def _record_the_rest(self) -> None:
        """As the run ends: commit the outcomes left and put the unstarted back to pending,
        each waiting for a busy database (a store error is kept for run() to raise)."""
        try:
            await self._patiently(self._flush)
        except StorageError as exc:
            self._failure = self._failure or exc
        finally:
            try:
                await self._patiently(self._release_unstarted)
            except StorageError as exc:
                self._failure = self._failure or exc

    async def _release_unstarted(self) -> None:
        while not self._queue.empty():
            self._unstarted.append(self._queue.get_nowait().seq)
        if self._unstarted:
            left, self._unstarted = self._unstarted, []
            try:
                await self._call(self.log.release, self.send_id, left, holder=self.holder)
            except BaseException:
                self._unstarted[:0] = left  # still ours, still `sending`: counted as in doubt
                raise
            self._committed(len(left))

    def _in_doubt(self, failure: StorageError) -> StorageError:
        """The error that ends a run whose store failed: what it could not record."""
        delivered = [self._addresses[seq] for seq, o in self._results if o.state == "sent"]
        states: dict[str, int] = {}
        for _, outcome in self._results:
            if outcome.state != "sent":
                states[outcome.state] = states.get(outcome.state, 0) + 1
        if self._unstarted:
            states["never started"] = len(self._unstarted)
        busy = isinstance(failure, StorageBusy)
        head = str(failure)
        if busy:
            head += f" (this run tried for {self._busy_waited:.0f} s to record its outcomes)"
        error: SendLogBusy | SendLogFailed
        message = head + ". " + _unrecorded(delivered, states)
        error = SendLogBusy(message) if busy else SendLogFailed(message)
        error.delivered = delivered
        error.unrecorded = len(delivered) + sum(states.values())
        return error

    # -- workers --------------------------------------------------------------
    async def _worker(self) -> None:
        # A worker never waits on the store: what it cannot start is put back
        # to pending in one commit when the run ends (it only happens on a stop).
        session: Session | None = None
        try:
            while True:
                delivery = await self._queue.get()
                self._working += 1
                self._wake.set()
                took = time.monotonic()
                try:
                    if self._stopping.is_set() or self._guarded():
                        self._unstarted.append(delivery.seq)
                        continue
                    if session is not None and not session.usable:
                        # The relay closed it while it sat idle: do not spend a
                        # recipient's attempt on a dead connection.
                        await session.close()
                        session = None
                    session = await self._ensure_session(session)
                    if session is None or (
                        self.pacer.active and not await self._unless_stopped(self.pacer.acquire())
                    ):
                        self._unstarted.append(delivery.seq)
                        continue
                    outcome = await self._send(session, delivery)
                    if outcome is None:
                        self._unstarted.append(delivery.seq)
                    else:
                        self._settle(delivery, outcome)
                    if not session.usable:
                        await session.close()
                        session = None
                    # A transport that never waits (the outbox, memory) would
                    # otherwise run through the whole queue in one go, deaf to a
                    # stop, a signal, a failed worker and the pump.
                    await asyncio.sleep(0)
                finally:
                    self._working -= 1
                    self._wake.set()  # the pump may be waiting for the last one to finish
                    self._queue.task_done()
                    self._taken += 1
                    self._spent += time.monotonic() - took
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
                if not await self._unless_stopped(self._sleep(delay)):
                    return None
                delay = min(delay * 2, 30.0)
            except CampaignAborted as exc:
                self._abort = exc
                self.stop(str(exc))
                return None
        return session

    async def _send(self, session: Session, delivery: Delivery) -> Outcome | None:
        """The outcome, or None when the relay refused the campaign before this message."""
        data = await self.template.personalised(
            delivery.recipient, date=dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        )
        self._attempted += 1
        try:
            return await session.send(
                Envelope(self._sender_of(delivery), delivery.recipient.email, data)
            )
        except CampaignAborted as exc:
            # The relay refused the sender: nothing was sent to this recipient.
            self._abort = exc
            self.stop(str(exc))
            return None

    def _sender_of(self, delivery: Delivery) -> str:
        if self.verp is None:
            return self.envelope_sender
        return self.verp.sender(self.send_id, delivery.seq)

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
        if not self._results:
            self._oldest = time.monotonic()
        self._results.append((delivery.seq, outcome))
        self._addresses[delivery.seq] = delivery.recipient.email
        self.progress.done += 1
        self.progress.by_state[outcome.state] = self.progress.by_state.get(outcome.state, 0) + 1
        if self.on_progress is not None:
            self.on_progress(self.progress)
        self._wake.set()

    def _error(self, what: str) -> bool:
        """Count an error; True when there have been too many in a row (the run stops)."""
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= self.options.max_consecutive_errors:
            self.stop(f"{self._errors_in_a_row} errors in a row, the last: {what.strip()}")
            return True
        return False

    async def _look_at_health(self, *, final: bool = False) -> None:
        """Ask ``health``; a reason pauses the send (a stop: the same command resumes),
        unless ``final``: the run is over, and what it recorded is all that was asked."""
        assert self._health is not None
        self._health.at, self._health.attempted = time.monotonic(), self._attempted
        try:
            reason = await self._thread.call(self._health.check, self._attempted)
        except StorageError:
            # Looked at again in a moment: the refusals wait in the send log meanwhile,
            # and a database that fails for good stops the run through its own calls.
            return
        if reason is not None and not final and not self._stopping.is_set():
            self._paused = reason
            self.stop(f"paused: {reason}", says_when=True)

    # -- committing outcomes --------------------------------------------------
    async def _flush(self) -> None:
        if not self._results:
            return
        batch, self._results = self._results, []
        started = time.monotonic()
        future = self._thread.submit(self.log.record, self.send_id, batch, holder=self.holder)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            # The commit goes on in the thread: wait for it, so that a failed one
            # leaves its outcomes for the last flush of the run.
            with contextlib.suppress(Exception):
                await asyncio.shield(future)
            if future.exception() is None:
                self._recorded(batch)
            else:
                self._restore(batch)
            raise
        except BaseException:
            self._restore(batch)  # not lost: the next flush writes them
            raise
        self._recorded(batch)
        self._commit_time = _ewma(self._commit_time, time.monotonic() - started)

    def _restore(self, batch: list[tuple[int, Outcome]]) -> None:
        if not self._results:
            self._oldest = time.monotonic()
        self._results[:0] = batch

    def _recorded(self, batch: list[tuple[int, Outcome]]) -> None:
        for seq, _ in batch:
            del self._addresses[seq]
        self._committed(len(batch))

    def _committed(self, rows: int) -> None:
        """``rows`` left ``sending`` for good: they leave the window."""
        self._open -= rows


class SendLogBusy(StorageBusy):
    """The database stayed busy past ``busy_wait``: the run ended with outcomes it could
    not record; the message lists them (``delivered``: the addresses that got the message)."""

    delivered: list[str]
    unrecorded: int = 0  # outcomes (and unstarted claims) that are not in the send log


class SendLogFailed(StorageUnavailable):
    """The database failed during a run (damaged, full disk): as :class:`SendLogBusy`."""

    delivered: list[str]
    unrecorded: int = 0


def _unrecorded(delivered: list[str], others: dict[str, int]) -> str:
    """What a run whose store failed leaves in doubt, in words."""
    if not delivered and not others:
        return "It stopped; every outcome of this run was recorded, nothing is in doubt"
    said = []
    if delivered:
        shown = ", ".join(delivered[:LISTED])
        more = f" and {len(delivered) - LISTED} more" if len(delivered) > LISTED else ""
        said.append(
            f"It stopped, and {len(delivered)} message(s) went out whose outcome could not "
            f"be recorded: {shown}{more}. They will show as unknown, but they were "
            "delivered: do NOT resend them with --resend-unknown (they would get the "
            "message twice)"
        )
    if others:
        parts = ", ".join(f"{n} {state}" for state, n in others.items())
        said.append(
            f"{'It stopped, and' if not delivered else 'Also'} {sum(others.values())} "
            f"recipient(s) of this run were not recorded ({parts}) and will show as unknown"
        )
    return "; ".join(said) if len(said) == 1 else ". ".join(said)


def _ewma(old: float, sample: float) -> float:
    """A moving average that follows a change within a few samples."""
    return sample if old == 0.0 else 0.7 * old + 0.3 * sample
