"""Scheduling stage: a weekly schedule and a clock → the send slot that is due, if any.

Input: a :class:`Schedule` (days of the week, a local time, a time zone, a
catch-up window) and the current time. Output: :class:`Slot` values, each an
exact instant (UTC) with the local day it belongs to, and whether it is due,
missed or in the future. Pure functions: the clock is a parameter.

Daylight saving, deliberately:

- 09:00 local stays 09:00 local: slots are computed on the local calendar
  with zoneinfo, never by adding 7 times 24 hours.
- A local time that does not exist (the hour skipped when clocks go forward,
  e.g. 02:30 in New York on the second Sunday of March) is sent at the same
  distance after the change: 03:30 local, one instant, once.
- A local time that happens twice (the hour repeated when clocks go back)
  is sent at its first occurrence (``fold=0``), once.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPEC = re.compile(r"^\s*([A-Za-z,\s]+?)\s+(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True, slots=True)
class Schedule:
    weekdays: frozenset[int]  # 0 = Monday
    at: dt.time
    zone: ZoneInfo
    catch_up: dt.timedelta

    def describe(self) -> str:
        days = ",".join(DAYS[d].capitalize() for d in sorted(self.weekdays))
        return f"{days} {self.at:%H:%M} {self.zone.key}"


@dataclass(frozen=True, slots=True)
class Slot:
    local_day: dt.date  # the day the issue is for
    at: dt.datetime  # the instant, in UTC

    @property
    def key(self) -> str:
        return self.at.strftime("%Y-%m-%dT%H:%MZ")


def parse_schedule(spec: str, zone: str, catch_up_hours: float) -> Schedule:
    """``"Thu 09:00"`` or ``"Mon,Thu 09:00"`` in the time zone ``zone``; ValueError if not."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"{spec!r} is not a schedule like 'Thu 09:00' or 'Mon,Thu 09:00'")
    days: set[int] = set()
    for word in re.split(r"[,\s]+", match.group(1).strip()):
        key = word[:3].lower()
        if key not in DAYS:
            raise ValueError(f"{word!r} is not a day of the week (Mon, Tue, ... Sun)")
        days.add(DAYS.index(key))
    hour, minute = int(match.group(2)), int(match.group(3))
    if hour > 23 or minute > 59:
        raise ValueError(f"{match.group(2)}:{match.group(3)} is not a time of day")
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{zone!r} is not a time zone name like 'America/New_York'") from None
    if catch_up_hours < 0:
        raise ValueError("the catch-up window cannot be negative")
    return Schedule(frozenset(days), dt.time(hour, minute), tz, dt.timedelta(hours=catch_up_hours))


def instant(schedule: Schedule, day: dt.date) -> dt.datetime:
    """The UTC instant of the slot on local ``day`` (see the module notes on DST)."""
    naive = dt.datetime.combine(day, schedule.at)
    # fold=0: the first of a repeated time. In a gap, fold=0 uses the offset
    # from before the change, which lands the same distance after it:
    # 02:30 EST = 03:30 EDT.
    return naive.replace(tzinfo=schedule.zone, fold=0).astimezone(dt.UTC)


def slots_between(schedule: Schedule, start: dt.datetime, end: dt.datetime) -> list[Slot]:
    """Every slot with ``start < at <= end`` (both aware datetimes)."""
    out: list[Slot] = []
    day = start.astimezone(schedule.zone).date() - dt.timedelta(days=1)
    last = end.astimezone(schedule.zone).date() + dt.timedelta(days=1)
    while day <= last:
        if day.weekday() in schedule.weekdays:
            at = instant(schedule, day)
            if start < at <= end:
                out.append(Slot(day, at))
        day += dt.timedelta(days=1)
    return out


def latest(schedule: Schedule, now: dt.datetime, *, within: dt.timedelta) -> Slot | None:
    """The most recent slot at or before ``now`` and no older than ``within``."""
    found = slots_between(schedule, now - within - dt.timedelta(seconds=1), now)
    return found[-1] if found else None


def upcoming(schedule: Schedule, now: dt.datetime, count: int) -> list[Slot]:
    out: list[Slot] = []
    start = now
    while len(out) < count:
        batch = slots_between(schedule, start, start + dt.timedelta(days=8))
        out.extend(batch)
        start += dt.timedelta(days=8)
    return out[:count]
