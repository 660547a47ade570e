"""Several relays as one transport, each with its own connections, rate and weight.

Input: the :class:`Relay` list (each a :class:`Transport`, SMTP in practice, with the
most connections it may have open, its rate in messages a second and its weight).
Output: sessions, as any transport gives, and :meth:`RelayPool.report`: how many
messages went through each relay, and when one was taken out of use and back.

**One session, one message.** A session of the pool is one relay's connection for
one message: after its message it says it is no longer usable, so the campaign
closes it and opens the next (:meth:`RelayPool.open`), which is where the next
relay is chosen. Closing gives the connection back to its relay for the next
session (from :meth:`RelayPool.keep_connections` to :meth:`RelayPool.close_kept`: the
campaign's run), so
turning from relay to relay costs no connection.

**By weight.** The relay for each message is chosen by smooth weighted round robin
(nginx's) among the relays in use: weights 3 and 1 give three messages of every
four to the first, interleaved. A relay's ``connections`` and ``rate`` are limits,
not shares: a session waits for a connection of the relay whose turn it is rather
than take another's, so the split holds; a relay whose limits cannot carry its
share slows the whole send (give it a smaller weight). Weight 0 is a standby,
used only while every relay with a weight is out of use.

**Failover.** A relay is taken out of use after :data:`TRIP_AFTER` failures in a
row: a connection that cannot be opened, a 4xx reply, a connection lost, a fate
unknown. Its turns go to the others, by their weights. After a back-off
(``backoff[0]`` seconds, doubled at each failed return, at most ``backoff[1]``)
the next session probes it, one at a time; a probe that goes well (the relay takes
the message, or refuses the recipient with a 5xx: it is working) takes it back into
use, one that fails takes it out again for longer.

**Exactly once.** The campaign records each recipient before and after the one
``send`` of its session, as with one relay; the pool only decides where it goes. A
message that a relay did not take because of the relay itself (a connection that
failed before the message body went out, or 421: the service closing, which never
accepts the message) is handed to another relay within the same ``send``: nothing
reached anyone, so nothing can arrive twice, and the recipient need not wait for
the campaign's retry. Every other outcome is the message's, as with one relay: a
451 is deferred and retried later by the campaign, through whichever relay's turn
it is then; an unknown fate (the body went out, no reply) is never sent elsewhere.
A connection that cannot be opened is tried on the next relay; only when none can
be opened, or none is in use, does :meth:`RelayPool.open` raise
:class:`~newsletter.errors.ConnectFailed`, as one relay's transport does.

Pacing: each relay has its own :class:`~newsletter.delivery.ratelimit.Pacer` (its
``rate``, which halves when that relay says "slow down" and grows back), besides
the send's own. The hour and day caps stay the send's (counted in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from newsletter.delivery.ratelimit import Pacer
from newsletter.delivery.transports.base import Envelope, Session, Transport
from newsletter.errors import CampaignAborted, ConnectFailed
from newsletter.models import Outcome

# Failures in a row that take a relay out of use: more than one (a single lost
# connection happens to any relay), few enough that a relay that answers 4xx to
# everything costs only a handful of deferred messages.
TRIP_AFTER = 3
# Seconds out of use: the first back-off, doubled at each failed probe up to the last.
BACKOFF = (30.0, 600.0)


@dataclass(frozen=True, slots=True)
class Relay:
    """One relay of the pool and its limits."""

    transport: Transport
    connections: int = 8  # open at once, idle ones included
    rate: float | None = None  # messages a second (None: no limit of its own)
    weight: float = 1.0  # its share of the messages; 0: a standby
    name: str = ""  # how the report names it (the settings' index); default: its description


@dataclass(frozen=True, slots=True)
class RelayEvent:
    at: float  # Unix time
    kind: Literal["out", "back", "still out", "refused"]
    detail: str


@dataclass(frozen=True, slots=True)
class RelayReport:
    """What went through one relay in the pool's life (one run of a send)."""

    name: str
    description: str
    weight: float
    sent: int
    rejected: int
    deferred: int  # given back to the campaign, to be tried again later
    unknown: int
    handed_on: int  # messages it did not take (421, a connection lost) sent by another
    connect_failures: int
    events: tuple[RelayEvent, ...]
    in_use: bool  # at the end


@dataclass(slots=True)
class _State:
    relay: Relay
    name: str
    pacer: Pacer
    backoff: float
    busy: int = 0  # sessions on it, and connections being opened for one
    idle: list[Session] = field(default_factory=list)
    failures: int = 0  # in a row
    down_until: float | None = None  # out of use until then (monotonic)
    probing: bool = False  # a session is trying it again after its back-off
    current: float = 0.0  # smooth weighted round robin
    counts: dict[str, int] = field(default_factory=dict)
    handed_on: int = 0
    connect_failures: int = 0
    events: list[RelayEvent] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.relay.weight if self.relay.weight > 0 else 1.0

    @property
    def has_room(self) -> bool:
        return self.busy < self.relay.connections


class RelayPool:
    """A :class:`Transport` over several relays (the module docstring says how)."""

    def __init__(
        self,
        relays: Sequence[Relay],
        *,
        trip_after: int = TRIP_AFTER,
        backoff: tuple[float, float] = BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not relays or not any(r.weight > 0 for r in relays):
            raise ValueError("a relay pool needs at least one relay with a weight above 0")
        self._trip_after = trip_after
        self._backoff = backoff
        self._clock = clock
        self._wall = wall
        self._states = [
            _State(r, r.name or r.transport.description, Pacer(r.rate), backoff[0]) for r in relays
        ]
        self.description = f"{len(relays)} relay{'s' if len(relays) > 1 else ''}: " + ", ".join(
            f"{r.transport.description} (weight {r.weight:g})" for r in relays
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._processes = 1  # sharing the send (share)
        self._keep = False  # connections are kept for the next session (keep_connections)

    @property
    def connections(self) -> int:
        """Connections the relays may have at once in all: the send's worker count."""
        return sum(s.relay.connections for s in self._states)

    def share(self, processes: int) -> None:
        """Several processes send at once: each keeps to its share of every relay's rate."""
        self._processes = processes
        for state in self._states:
            state.pacer.share(processes)

    def keep_connections(self) -> None:
        """From now on a session's connection is kept for the next session on its relay,
        until :meth:`close_kept` (the campaign's run). Otherwise each session's connection
        is closed with it (a test copy, a signup mail)."""
        self._keep = True

    async def close_kept(self) -> None:
        """Close the connections kept, and keep no more."""
        self._keep = False
        for state in self._states:
            while state.idle:
                await state.idle.pop().close()

    def report(self) -> list[RelayReport]:
        return [
            RelayReport(
                name=s.name,
                description=s.relay.transport.description,
                weight=s.relay.weight,
                sent=s.counts.get("sent", 0),
                rejected=s.counts.get("rejected", 0),
                # Those it handed on were sent elsewhere: not deferred in the send log.
                deferred=s.counts.get("deferred", 0) - s.handed_on,
                unknown=s.counts.get("unknown", 0),
                handed_on=s.handed_on,
                connect_failures=s.connect_failures,
                events=tuple(s.events),
                in_use=s.down_until is None,
            )
            for s in self._states
        ]

    # -- Transport ------------------------------------------------------------
    async def open(self) -> Session:
        self._bind()
        failed: list[str] = []
        taken = await self._acquire(set(), failed)
        if taken is None:
            raise ConnectFailed(self._none_usable(failed))
        return _PoolSession(self, *taken)

    def _bind(self) -> None:
        # asyncio objects belong to one event loop, and the signup mailer runs one per
        # mail: a new loop starts afresh (the old one's connections cannot be used).
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            self._wakeup = asyncio.Event()
            for state in self._states:
                state.idle.clear()
                state.busy = 0
                state.probing = False
                state.pacer = Pacer(state.relay.rate)
                state.pacer.share(self._processes)
        self._loop = loop

    def _changed(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _none_usable(self, failed: list[str]) -> str:
        if failed:
            return "no relay could be reached: " + "; ".join(failed)
        now = self._clock()
        out = [
            f"{s.name} for {max(0.0, s.down_until - now):.0f} s more"
            if s.down_until < math.inf
            else f"{s.name} for good (it refused the send)"
            for s in self._states
            if s.down_until is not None
        ]
        return "every relay is out of use (" + ", ".join(out) + ")"

    async def _acquire(
        self, tried: set[int], failed: list[str]
    ) -> tuple[_State, Session, bool] | None:
        """A relay's connection for one message (its state, the connection, whether it is
        a probe), from the relays not in ``tried``; None when none can be had."""
        while True:
            turn = await self._turn(tried)
            if turn is None:
                return None
            state, probe = turn
            try:
                inner = await self._connection(state)
            except ConnectFailed as exc:
                self._free(state, probe)
                state.connect_failures += 1
                self._failed(state, f"cannot connect: {exc}", probe=probe)
                tried.add(self._states.index(state))
                failed.append(f"{state.name}: {exc}")
                continue
            except CampaignAborted as exc:
                # The login refused, no STARTTLS: that relay's settings are wrong. The
                # others carry the send; with none left, the campaign stops.
                self._free(state, probe)
                if not self._refuse(state, str(exc)):
                    raise CampaignAborted(f"{state.name}: {exc}") from None
                tried.add(self._states.index(state))
                failed.append(f"{state.name}: {exc}")
                continue
            except BaseException:
                self._free(state, probe)
                raise
            return state, inner, probe

    async def _turn(self, tried: set[int]) -> tuple[_State, bool] | None:
        """The relay whose turn it is, with a connection's room taken on it; True when it
        is a probe. Waits while the chosen relay has no room, or a probe is under way and
        no relay is in use; None when no relay may be used now."""
        while True:
            now = self._clock()
            free = [s for i, s in enumerate(self._states) if i not in tried]
            up = [s for s in free if s.down_until is None]
            weighted = [s for s in up if s.relay.weight > 0]
            tier = weighted or up  # the standbys only while no weighted relay is in use
            for state in free:
                primary = state.relay.weight > 0 or not any(
                    s.relay.weight > 0 and s.down_until is None for s in self._states
                )
                if (
                    primary
                    and state.down_until is not None
                    and now >= state.down_until
                    and not state.probing
                    and state.has_room
                ):
                    state.probing = True
                    state.busy += 1
                    return state, True
            if tier:
                pick = max(tier, key=lambda s: s.current + s.share)
                if pick.has_room:
                    total = sum(s.share for s in tier)
                    for state in tier:
                        state.current += state.share
                    pick.current -= total
                    pick.busy += 1
                    return pick, False
            elif not any(s.probing for s in free):
                return None
            downs = [
                s.down_until - now
                for s in free
                if s.down_until and now < s.down_until < math.inf  # refused: never again
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(downs, default=None))

    async def _connection(self, state: _State) -> Session:
        while state.idle:
            kept = state.idle.pop()
            if kept.usable:
                return kept
            await kept.close()  # the relay closed it while it was idle
        return await state.relay.transport.open()

    def _free(self, state: _State, probe: bool) -> None:
        state.busy -= 1
        if probe:
            state.probing = False
        self._changed()

    async def _give_back(self, state: _State, inner: Session, probe: bool) -> None:
        self._free(state, probe)
        if self._keep and inner.usable and state.down_until is None:
            state.idle.append(inner)
        else:
            await inner.close()

    # -- health ---------------------------------------------------------------
    def _outcome(self, state: _State, outcome: Outcome, probe: bool) -> None:
        state.counts[outcome.state] = state.counts.get(outcome.state, 0) + 1
        if outcome.state in ("sent", "rejected"):
            if outcome.state == "sent":
                state.pacer.went_well()
            self._went_well(state, probe)
        else:
            if outcome.state == "deferred":
                state.pacer.slow_down()
            self._failed(state, f"{outcome.code or ''} {outcome.detail}".strip(), probe=probe)

    def _went_well(self, state: _State, probe: bool) -> None:
        if state.down_until is None:
            state.failures = 0
        elif probe:
            state.down_until = None
            state.failures = 0
            state.backoff = self._backoff[0]
            state.current = 0.0  # no catching up on the turns it missed
            state.events.append(RelayEvent(self._wall(), "back", "a message went through"))
            self._changed()

    def _refuse(self, state: _State, why: str) -> bool:
        """Take ``state`` out of use for the rest of the run (it refused the campaign:
        its login, its TLS, the sender); False when no other relay is left to use."""
        others = [s for s in self._states if s is not state and s.down_until != math.inf]
        if not others:
            return False
        if state.down_until != math.inf:
            state.down_until = math.inf
            state.events.append(RelayEvent(self._wall(), "refused", f"{why}; not used again"))
            self._changed()
        return True

    def _failed(self, state: _State, what: str, *, probe: bool) -> None:
        if state.down_until is not None:
            # Out of use already: what was in flight when it went out does not count.
            if probe:
                state.backoff = min(2 * state.backoff, self._backoff[1])
                state.down_until = self._clock() + state.backoff
                state.events.append(RelayEvent(self._wall(), "still out", what))
                self._changed()
            return
        state.failures += 1
        if state.failures >= self._trip_after:
            state.down_until = self._clock() + state.backoff
            state.events.append(
                RelayEvent(
                    self._wall(), "out", f"{state.failures} failures in a row, the last: {what}"
                )
            )
            self._changed()

    async def _send(self, session: _PoolSession, envelope: Envelope) -> Outcome:
        tried: set[int] = set()
        while True:
            if session.inner is None:  # a session sent on again after a failed hand-on
                again = await self._acquire(set(), [])
                if again is None:
                    return Outcome("deferred", None, "no relay could be reached")
                session.state, session.inner, session.probe = again
            state, inner = session.state, session.inner
            if state.pacer.active:
                await state.pacer.acquire()
            try:
                outcome = await inner.send(envelope)
            except CampaignAborted as exc:
                # The relay refused the sender (nothing of this message was taken): the
                # others carry the send; with none left, say which relay, to fix it.
                if not self._refuse(state, str(exc)):
                    raise CampaignAborted(f"{state.name}: {exc}") from None
                tried.add(self._states.index(state))
                inner, session.inner = session.inner, None
                await self._give_back(state, inner, session.probe)
                session.probe = False
                other = await self._acquire(tried, [])
                if other is None:
                    raise CampaignAborted(f"{state.name}: {exc}") from None
                state.handed_on += 1
                session.state, session.inner, session.probe = other
                continue
            probe, session.probe = session.probe, False
            self._outcome(state, outcome, probe)
            if probe:
                state.probing = False  # answered: the next probe, if any, may go
            if not _relay_did_not_take_it(outcome):
                return outcome
            tried.add(self._states.index(state))
            # Its room is given back first: two sessions each waiting for the other's
            # relay would otherwise wait for ever.
            inner, session.inner = session.inner, None
            await self._give_back(state, inner, False)
            other = await self._acquire(tried, [])
            if other is None:
                return outcome  # deferred: the campaign tries again later
            state.handed_on += 1
            session.state, session.inner, session.probe = other


def _relay_did_not_take_it(outcome: Outcome) -> bool:
    """A deferral that is the relay's, not the message's: a connection that failed before
    the body went out (no code) or 421, the service closing (RFC 5321 3.8), which takes
    nothing. Another relay may send it now; it cannot arrive twice."""
    return outcome.state == "deferred" and outcome.code in (None, 421)


class _PoolSession:
    """One message's session on one relay of the pool (see the module docstring)."""

    def __init__(self, pool: RelayPool, state: _State, inner: Session, probe: bool) -> None:
        self.pool = pool
        self.state = state
        self.inner: Session | None = inner  # None once handed on and no relay took it
        self.probe = probe
        self._sent = False
        self._closed = False

    @property
    def usable(self) -> bool:
        # One message each: the next session is where the next relay is chosen.
        return not self._sent and not self._closed and bool(self.inner and self.inner.usable)

    async def send(self, envelope: Envelope) -> Outcome:
        try:
            return await self.pool._send(self, envelope)
        finally:
            self._sent = True

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.inner is not None:
                await self.pool._give_back(self.state, self.inner, self.probe)
