"""Send caps: how many recipients a claim may take under the hour and day caps.

Input: the caps (:class:`Caps`), the time and, per capped window, the messages
that may have gone out in it and the oldest one's time, as a backend read them
inside its claim's transaction. Output: how many the claim may take, and the
cap that held it back (:class:`CapReached`).

Why at the claim: a cap counted in each process (as the pacer once did) lets
several processes of a shared send, or two sends of two lists, together pass
it. Counting in the database at the claim, with every claim of a capped send
taking turns (one SQLite writer; an advisory lock on PostgreSQL), holds the
cap over every process and every send.

What counts in a window is every row that may have gone out in it, by its
``updated_at``: ``sent``, ``sending`` (claimed: it may be delivered any moment,
and a claim stamps it) and ``unknown`` (a run died during its transaction: it
may have been delivered). A row in flight that ends unsent (deferred, refused,
handed back) gives its room back at a later claim; a dead run's row leaves the
window as a sent one would. Strict, then, at the price of claiming less than
could go while many rows are in flight near a cap.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from newsletter.models import Delivery

__all__ = ["MAY_HAVE_GONE", "WINDOWS", "CapReached", "CapWindow", "Caps", "Claim", "allowed"]

CapWindow = Literal["hour", "day"]
WINDOWS: dict[CapWindow, float] = {"hour": 3600.0, "day": 86400.0}
# The states of a row that may have reached its recipient (module docstring).
MAY_HAVE_GONE = ("sent", "sending", "unknown")


@dataclass(frozen=True, slots=True)
class Caps:
    """Messages that may go out in any hour and any day, over every send in the database."""

    per_hour: int | None = None
    per_day: int | None = None

    def windows(self) -> list[tuple[CapWindow, int]]:
        found: list[tuple[CapWindow, int]] = []
        if self.per_hour:
            found.append(("hour", self.per_hour))
        if self.per_day:
            found.append(("day", self.per_day))
        return found


@dataclass(frozen=True, slots=True)
class CapReached:
    """Why a claim took fewer than asked: this cap has no room left now."""

    window: CapWindow
    cap: int
    # When the oldest message counted in the window leaves it (Unix time): the earliest
    # that room can come back, unless rows now in flight end without being sent. None
    # only for a cap that nothing has counted against (a claim never sees one).
    room_at: float | None


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim took (committed ``sending``), and the cap that stopped it taking more."""

    deliveries: list[Delivery] = field(default_factory=list)
    capped: CapReached | None = None


def stamp(at: float) -> str:
    """``at`` as the send log's ``updated_at`` text (UTC, milliseconds), for comparisons."""
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds")


def moment(text: str) -> float:
    """The inverse of :func:`stamp`."""
    return dt.datetime.fromisoformat(text).timestamp()


def allowed(
    caps: Caps, now: float, limit: int, counted_in: Callable[[str], tuple[int, str | None]]
) -> tuple[int, CapReached | None]:
    """How many of ``limit`` a claim at ``now`` may take, and the cap that held it back
    (None when none did). ``counted_in(since)`` gives the rows that may have gone out
    (:data:`MAY_HAVE_GONE`) stamped at or after ``since``, and the oldest one's stamp.

    Of two caps that leave the same room (both full, say), the one whose room comes back
    later is named: with both an hour's and a day's cap full, waiting an hour is no use."""
    room, binding = limit, None
    for window, cap in caps.windows():
        counted, oldest = counted_in(stamp(now - WINDOWS[window]))
        left = max(0, cap - counted)
        at = None if oldest is None else moment(oldest) + WINDOWS[window]
        later = binding is not None and (at or 0.0) > (binding.room_at or 0.0)
        if left < room or (left == room and binding is not None and later):
            room, binding = left, CapReached(window, cap, at)
    return room, binding
