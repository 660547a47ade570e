"""The send log's thread: one worker thread that runs a campaign's store calls, in order.

Input: a synchronous store method and its arguments. Output: an awaitable of its result (or
its exception). The campaign's event loop hands every claim and every batch of outcomes to
this thread and awaits the answer, so SMTP sessions go on while a commit (an fsync, or a
round trip to a database across the network) is under way.

One worker thread, never more: the store's connection is used by one thread at a time, and
calls run in the order they were made. The thread starts with the first call and ends at
:meth:`LogThread.close` (the campaign closes it when its run ends, also on errors and
cancellation). A call that is already running in the thread cannot be stopped; an awaiting
task that is cancelled may :func:`asyncio.shield` the future and wait for it, so that what it
committed is known (see the campaign).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class LogThread:
    """An executor with exactly one worker thread, for awaiting a synchronous store."""

    def __init__(self, name: str = "send-log") -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Queue ``fn(*args, **kwargs)`` for the thread; the future is bound to the running loop."""
        return asyncio.wrap_future(self._pool.submit(fn, *args, **kwargs))

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.submit(fn, *args, **kwargs)

    def close(self) -> None:
        """Run what is queued, then end the thread (blocks until it has ended)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LogThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
