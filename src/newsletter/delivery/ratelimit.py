"""Pacing: how fast messages may leave, as a token bucket that backs off.

Input: a rate in messages per second (None for no limit), and a clock and a
sleep (real time unless a test injects its own). Output: :meth:`Pacer.acquire`
returns when the next message may go. The hour and day caps are not here: they
are counted in the database at each claim, over every process and send
(:mod:`newsletter.storage.caps`).
When the relay says "slow down" (421, 451, 454 or timeouts) the rate halves,
down to one message every two seconds, and grows back by a tenth of the
configured rate per second of good replies (additive increase,
multiplicative decrease: providers throttle senders that keep pushing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

MIN_RATE = 0.5
# A wait of exactly (1 - tokens) / rate can refill to 0.999...: that is a token.
# Without the slack, a clock that advances by exactly the wait (an injected
# one, or a coarse one) would wait again for an amount it cannot add, for ever.
_ROUNDING = 1e-9


class Pacer:
    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.limit = rate
        self.rate = rate
        self._configured = rate  # for the whole send, however many processes share it
        self._clock = clock
        self._sleep = sleep
        self._tokens = 1.0
        self._last = clock()
        self._lock = asyncio.Lock()

    def share(self, processes: int) -> None:
        """Several processes send at once (a shared send): each keeps to its share of the
        configured rate, so that together they keep to it."""
        if self._configured is None:
            return
        new = self._configured / max(1, processes)
        at_limit = self.rate == self.limit
        self.limit = new
        if self.rate is not None:
            self.rate = new if at_limit else min(self.rate, new)

    @property
    def active(self) -> bool:
        """False when acquire() would return at once (no rate)."""
        return self.rate is not None

    async def acquire(self) -> None:
        if not self.active:
            return  # no pacing: skip the lock, this is on every message's path
        async with self._lock:  # first come, first served
            while self.rate is not None:
                now = self._clock()
                burst = max(1.0, self.rate)
                self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0 - _ROUNDING:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)

    def slow_down(self) -> None:
        """The relay asked us to back off."""
        base = self.rate if self.rate is not None else 50.0
        self.rate = max(MIN_RATE, base / 2)

    def went_well(self) -> None:
        """A message was accepted: creep back up towards the configured rate."""
        if self.rate is None or self.rate == self.limit:
            return
        step = (self.limit or 50.0) / 10 / max(self.rate, 1.0)
        ceiling = self.limit if self.limit is not None else float("inf")
        self.rate = min(ceiling, self.rate + step)
        if self.limit is None and self.rate >= 50.0:
            self.rate = None
