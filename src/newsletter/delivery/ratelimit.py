"""Pacing: how fast messages may leave, as a token bucket that backs off.

Input: a rate in messages per second (None for no limit), an optional
per-hour cap, and a clock and a sleep (real time unless a test injects its
own). Output: :meth:`Pacer.acquire` returns when the next message may go.
When the relay says "slow down" (421, 451, 454 or timeouts) the rate halves,
down to one message every two seconds, and grows back by a tenth of the
configured rate per second of good replies (additive increase,
multiplicative decrease: providers throttle senders that keep pushing).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
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
        per_hour: int | None = None,
        sent_last_hour: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.limit = rate
        self.rate = rate
        self._configured = rate  # for the whole send, however many processes share it
        self.per_hour = per_hour
        self._clock = clock
        self._sleep = sleep
        self._tokens = 1.0
        self._last = clock()
        # Messages sent in the last hour by earlier runs count against the cap:
        # a restart must not reset the window. Spread them over the past hour.
        now = clock()
        self._hour: deque[float] = deque(
            now - 3600 + 3600 * (i + 1) / (sent_last_hour + 1) for i in range(sent_last_hour)
        )
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

    def resync(self, sent_last_hour: int) -> None:
        """Count messages others sent in the last hour (several processes of a shared send,
        as the database has them) against the hourly cap; never fewer than this one knows."""
        missing = sent_last_hour - len(self._hour)
        if missing <= 0:
            return
        now = self._clock()
        spread = [now - 3600 + 3600 * (i + 1) / (missing + 1) for i in range(missing)]
        self._hour = deque(sorted([*spread, *self._hour]))

    @property
    def active(self) -> bool:
        """False when acquire() would return at once (no rate, no hourly cap)."""
        return self.rate is not None or bool(self.per_hour)

    async def acquire(self) -> None:
        if not self.active:
            return  # no pacing: skip the lock, this is on every message's path
        async with self._lock:  # first come, first served
            if self.per_hour:
                await self._hourly()
            if self.rate is None:
                return
            while True:
                now = self._clock()
                burst = max(1.0, self.rate)
                self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0 - _ROUNDING:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)

    async def _hourly(self) -> None:
        assert self.per_hour is not None
        while True:
            now = self._clock()
            while self._hour and self._hour[0] <= now - 3600:
                self._hour.popleft()
            if len(self._hour) < self.per_hour:
                self._hour.append(now)
                return
            await self._sleep(self._hour[0] + 3600 - now)

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
