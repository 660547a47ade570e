"""Scheduling stage: a weekly schedule and a clock → the send slot that is due, if any.

Input: a :class:`Schedule` (days of the week and a local time, or a cron
line; a time zone; a catch-up window) and the current time. Output: :class:`Slot` values, each an
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
import difflib
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPEC = re.compile(r"^\s*([A-Za-z,\s]+?)\s+(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True, slots=True)
class Schedule:
    spec: str
    times: tuple[dt.time, ...]  # local times of day, sorted
    weekdays: frozenset[int]  # 0 = Monday
    zone: ZoneInfo
    catch_up: dt.timedelta
    days_of_month: frozenset[int] | None = None  # None: any day (cron's '*')
    months: frozenset[int] | None = None
    either_day: bool = False  # cron: day of month OR day of week, when both are given

    def runs_on(self, day: dt.date) -> bool:
        if self.months is not None and day.month not in self.months:
            return False
        by_week = day.weekday() in self.weekdays
        if self.days_of_month is None:
            return by_week
        by_month = day.day in self.days_of_month
        return (by_month or by_week) if self.either_day else by_month

    def describe(self) -> str:
        return f"{self.spec} {self.zone.key}"


@dataclass(frozen=True, slots=True)
class Slot:
    local_day: dt.date  # the day the issue is for
    at: dt.datetime  # the instant, in UTC

    @property
    def key(self) -> str:
        return self.at.strftime("%Y-%m-%dT%H:%MZ")


def time_zone(name: str) -> ZoneInfo:
    """The zoneinfo zone called ``name``; raises ValueError with an example (and a guess)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    from zoneinfo import available_timezones

    names = sorted(available_timezones())
    by_case = {n.lower(): n for n in names}
    guess = by_case.get(name.strip().lower()) or next(
        iter(difflib.get_close_matches(name, names, n=1)), None
    )
    shown = repr(name) if len(name) <= 60 else repr(name[:60] + "...")
    hint = f"did you mean {guess!r}? " if guess else ""
    raise ValueError(
        f"{shown} is not a time zone name; {hint}use a zoneinfo name such as "
        "'America/New_York', 'Europe/London' or 'UTC'"
    )


def parse_schedule(spec: str, zone: str, catch_up_hours: float) -> Schedule:
    """``"Thu 09:00"``, ``"Mon,Thu 09:00"`` or a cron line (``"0 9 * * 4"``) in ``zone``.

    Raises ValueError with a reason a person can act on."""
    tz = time_zone(zone)
    if catch_up_hours < 0:
        raise ValueError("the catch-up window cannot be negative")
    catch_up = dt.timedelta(hours=catch_up_hours)
    fields = spec.split()
    if len(fields) == 5 and re.match(r"[\d*]", fields[0]):
        return _parse_cron(spec.strip(), fields, tz, catch_up)
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(
            f"{spec!r} is not a schedule like 'Thu 09:00', 'Mon,Thu 09:00' or '0 9 * * 4'"
        )
    days: set[int] = set()
    for word in re.split(r"[,\s]+", match.group(1).strip()):
        key = word[:3].lower()
        if key not in DAYS:
            raise ValueError(f"{word!r} is not a day of the week (Mon, Tue, ... Sun)")
        days.add(DAYS.index(key))
    hour, minute = int(match.group(2)), int(match.group(3))
    if hour > 23 or minute > 59:
        raise ValueError(f"{match.group(2)}:{match.group(3)} is not a time of day")
    return Schedule(spec.strip(), (dt.time(hour, minute),), frozenset(days), tz, catch_up)


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
MAX_TIMES_A_DAY = 24


def _parse_cron(spec: str, fields: list[str], zone: ZoneInfo, catch_up: dt.timedelta) -> Schedule:
    minute, hour, dom, month, dow = fields
    minutes = _cron_field(minute, 0, 59, "minute")
    hours = _cron_field(hour, 0, 23, "hour")
    days_of_month = _cron_field(dom, 1, 31, "day of month")
    months = _cron_field(month, 1, 12, "month", _MONTHS, 1)
    cron_days = _cron_field(dow, 0, 7, "day of week", _CRON_DAYS, 0)
    times = tuple(sorted(dt.time(h, m) for h in hours for m in minutes))
    if len(times) > MAX_TIMES_A_DAY:
        raise ValueError(
            f"{spec!r} runs {len(times)} times a day; a newsletter schedule allows "
            f"{MAX_TIMES_A_DAY} at most"
        )
    if dom != "*" and dow == "*":
        # Only the day of the month decides: "31 2" (31 February) never comes,
        # and `newsletter schedule` would look for it until the year 9999.
        longest = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # by month, leap years
        if not any(d <= longest[m] for m in months for d in days_of_month):
            raise ValueError(
                f"{spec!r} never runs: none of the months it names has the day of the month "
                "it names"
            )
    # cron counts Sunday as 0 (or 7); Python's weekday() counts Monday as 0.
    weekdays = frozenset((d - 1) % 7 for d in cron_days)
    return Schedule(
        spec,
        times,
        weekdays,
        zone,
        catch_up,
        days_of_month=None if dom == "*" else frozenset(days_of_month),
        months=None if month == "*" else frozenset(months),
        either_day=dom != "*" and dow != "*",
    )


def _cron_field(
    text: str, low: int, high: int, what: str, names: tuple[str, ...] = (), first: int = 0
) -> set[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        match = re.fullmatch(r"(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(\d+))?", part)
        if not match:
            raise ValueError(f"{text!r} is not a valid cron {what} field")
        span, step = match.group(1), int(match.group(2) or 1)
        if span == "*":
            start, end = low, high
        else:
            ends = [_cron_value(v, low, high, what, names, first) for v in span.split("-")]
            start, end = ends[0], ends[-1]
        if step < 1 or start > end:
            raise ValueError(f"{text!r} is not a valid cron {what} field")
        values.update(range(start, end + 1, step))
    return values


def _cron_value(
    word: str, low: int, high: int, what: str, names: tuple[str, ...], first: int
) -> int:
    if word[:3] in names:
        return names.index(word[:3]) + first
    if not word.isdigit() or not low <= int(word) <= high:
        raise ValueError(f"{word!r} is not a valid {what} ({low}-{high})")
    return int(word)


def instant(schedule: Schedule, day: dt.date, at: dt.time | None = None) -> dt.datetime:
    """The UTC instant of a slot at local time ``at`` on local ``day`` (see the DST notes)."""
    naive = dt.datetime.combine(day, at or schedule.times[0])
    # fold=0: the first of a repeated time. In a gap, fold=0 uses the offset
    # from before the change, which lands the same distance after it:
    # 02:30 EST = 03:30 EDT.
    return naive.replace(tzinfo=schedule.zone, fold=0).astimezone(dt.UTC)


def slots_between(schedule: Schedule, start: dt.datetime, end: dt.datetime) -> list[Slot]:
    """Every slot with ``start < at <= end`` (both aware datetimes), in time order."""
    out: list[Slot] = []
    day = start.astimezone(schedule.zone).date() - dt.timedelta(days=1)
    last = end.astimezone(schedule.zone).date() + dt.timedelta(days=1)
    while day <= last:
        if schedule.runs_on(day):
            for at in schedule.times:
                when = instant(schedule, day, at)
                if start < when <= end:
                    out.append(Slot(day, when))
        day += dt.timedelta(days=1)
    return sorted(out, key=lambda slot: slot.at)


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


def next_day(schedule: Schedule, now: dt.datetime) -> dt.date:
    """The local day of the first slot after ``now``: the day whose issue is next."""
    return upcoming(schedule, now, 1)[0].local_day
