"""Send caps: how many recipients a claim may take under the hour and day caps.

Input: the caps (:class:`Caps`), the time, the rows ``sending`` anywhere in the
database and, per capped window, the messages sent in it and the oldest one's
time, as a backend read them inside its claim's transaction. Output: how many
the claim may take, and the cap that held it back (:class:`CapReached`).

Why at the claim: a cap counted in each process (as the pacer once did) lets
several processes of a shared send, or two sends of two lists, together pass
it. Counting in the database at the claim, with every claim of a capped send
taking turns (one SQLite writer; an advisory lock on PostgreSQL), holds the
cap over every process and every send. A row ``sending`` counts as sent: it
may be delivered any moment, and if it is not (deferred, refused, handed back)
the room comes back at a later claim. Strict, then, at the price of claiming
less than could go while many rows are in flight near a cap.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from newsletter.models import Delivery

__all__ = ["WINDOWS", "CapReached", "CapWindow", "Caps", "Claim", "allowed"]

CapWindow = Literal["hour", "day"]
WINDOWS: dict[CapWindow, float] = {"hour": 3600.0, "day": 86400.0}


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
    # when only rows in flight fill the window.
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
    caps: Caps,
    now: float,
    limit: int,
    in_flight: int,
    sent_in: Callable[[str], tuple[int, str | None]],
) -> tuple[int, CapReached | None]:
    """How many of ``limit`` a claim at ``now`` may take, and the cap that held it back
    (None when none did). ``sent_in(since)`` gives the messages sent at or after the stamp
    ``since`` and the stamp of the oldest of them; ``in_flight`` is every ``sending`` row."""
    room, binding = limit, None
    for window, cap in caps.windows():
        sent, oldest = sent_in(stamp(now - WINDOWS[window]))
        left = max(0, cap - sent - in_flight)
        if left < room:
            at = None if oldest is None else moment(oldest) + WINDOWS[window]
            room, binding = left, CapReached(window, cap, at)
    return room, binding
