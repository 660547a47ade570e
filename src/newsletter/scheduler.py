"""Scheduled sends: is a send due now, and if so, send it, once, whoever else is running.

Input: a :class:`~newsletter.schedule.Schedule`, the issues folder, the
database, the current time and a ``send_issue`` function (the same one
``newsletter send`` uses). Output: a :class:`DueResult` saying what
happened. ``newsletter send --due`` (cron, systemd timers) calls
:func:`check_and_send` once; ``newsletter schedule run`` calls it in a loop.

Exactly once, across restarts and overlaps:

- a lease in the database (:class:`Lease`) lets one run at a time act on the
  schedule; a run that dies loses its lease after ``LEASE_SECONDS``;
- each slot's fate is recorded (``slots`` table), so a slot already sent is
  left alone and an interrupted one is resumed (the send log does the rest);
- a slot is only acted on within its catch-up window: after that it is
  recorded as missed and reported, never sent days late.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from newsletter.errors import NewsletterError
from newsletter.loading import load_issue
from newsletter.locks import Lease, LockHeld
from newsletter.schedule import Schedule, Slot, latest, slots_between
from newsletter.sending import SendReport

LOCK_NAME = "schedule"


@dataclass(slots=True)
class DueResult:
    state: str  # nothing-due | done-already | locked | missed | no-issue | sent | incomplete
    message: str
    slot: Slot | None = None
    reports: list[SendReport] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.state in ("incomplete", "missed") else 0


def find_issue(issues_dir: Path, day: dt.date) -> Path | None:
    """The issue file for ``day``: named after it (2026-12-03.yaml) or with ``date: 2026-12-03``.

    A file that cannot be read as YAML counts when its name starts with the
    day, so that a broken issue for today fails loudly instead of being
    skipped as "no issue".
    """
    wanted = day.isoformat()
    found: list[Path] = []
    for path in sorted(issues_dir.glob("*.y*ml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            data = None
        date = str(data.get("date")) if isinstance(data, dict) and "date" in data else None
        # The date field decides; the name counts only when there is no
        # readable date (a broken file for today must fail, not be skipped).
        if date == wanted or (date is None and path.stem.startswith(wanted)):
            found.append(path)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise NewsletterError(f"more than one issue is dated {wanted} ({names}); keep one")
    return found[0] if found else None


class Slots:
    """The record of what became of each slot."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def state(self, slot: Slot) -> str | None:
        row = self.conn.execute("SELECT state FROM slots WHERE key = ?", (slot.key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, slot: Slot, state: str, issue_id: str | None = None, detail: str = "") -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "INSERT INTO slots (key, local_day, issue_id, state, detail, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "issue_id = coalesce(excluded.issue_id, slots.issue_id), state = excluded.state, "
                "detail = excluded.detail, updated_at = excluded.updated_at",
                (
                    slot.key,
                    slot.local_day.isoformat(),
                    issue_id,
                    state,
                    detail[:2000],
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                ),
            )

    def recent(self, limit: int = 10) -> list[tuple[str, str, str | None, str, str]]:
        rows = self.conn.execute(
            "SELECT key, local_day, issue_id, state, detail FROM slots ORDER BY key DESC LIMIT ?",
            (limit,),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def check_and_send(
    *,
    schedule: Schedule,
    lists: list[str],
    issues_dir: Path,
    conn: sqlite3.Connection,
    db_path: Path,
    now: dt.datetime,
    send_issue: Callable[[Path, str], SendReport],
) -> DueResult:
    """Do what is due at ``now``: nothing, report a missed slot, or send (or resume)."""
    slots = Slots(conn)
    slot = latest(schedule, now, within=schedule.catch_up)
    if slot is None:
        return _nothing_or_missed(schedule, slots, now)
    if slots.state(slot) == "done":
        return DueResult("done-already", f"the slot {_when(schedule, slot)} was handled", slot)
    # "no-issue" and "failed" are looked at again while the window lasts: the
    # editor may add or fix the file in time.
    lease = Lease(db_path, LOCK_NAME)
    try:
        lease.acquire(now.timestamp())
    except LockHeld as exc:
        return DueResult("locked", str(exc), slot)
    try:
        return _send_slot(schedule, slot, slots, lists, issues_dir, send_issue)
    finally:
        lease.release()


def _send_slot(
    schedule: Schedule,
    slot: Slot,
    slots: Slots,
    lists: list[str],
    issues_dir: Path,
    send_issue: Callable[[Path, str], SendReport],
) -> DueResult:
    when = _when(schedule, slot)
    path = find_issue(issues_dir, slot.local_day)
    if path is None:
        slots.set(slot, "no-issue", detail=f"no issue file dated {slot.local_day} in {issues_dir}")
        return DueResult(
            "no-issue",
            f"the slot {when} is due but {issues_dir} has no issue dated {slot.local_day}; "
            "nothing was sent",
            slot,
        )
    try:
        issue = load_issue(path).value  # fail loudly, before any mail goes out
    except NewsletterError as exc:
        slots.set(slot, "failed", detail=str(exc))
        raise
    slots.set(slot, "sending", issue.id)
    reports: list[SendReport] = []
    for name in lists:
        reports.append(send_issue(path, name))
        if (reports[-1].result.stopped or "").startswith("stopped by SIG"):
            break  # asked to stop: the other lists wait for the next run
    complete = len(reports) == len(lists) and all(r.exit_code == 0 for r in reports)
    slots.set(slot, "done" if complete else "incomplete", issue.id)
    verb = "sent" if complete else "incomplete"
    return DueResult(verb, f"{issue.id} for the slot {when}: {verb}", slot, reports)


def _nothing_or_missed(schedule: Schedule, slots: Slots, now: dt.datetime) -> DueResult:
    if not slots.recent(1):
        # A first run knows of no earlier slot it was meant to keep: a slot
        # before the schedule was set up is not "missed".
        return DueResult("nothing-due", "nothing is due now")
    notes: list[str] = []
    last: Slot | None = None
    for slot in slots_between(schedule, now - dt.timedelta(days=8), now):
        state = slots.state(slot)
        when = _when(schedule, slot)
        if state is None:
            slots.set(slot, "missed", detail="no run acted on it within its catch-up window")
            notes.append(f"the slot {when} was missed; it is not sent late")
        elif state in ("sending", "incomplete"):
            slots.set(slot, "expired", detail="its catch-up window ended before the send finished")
            notes.append(
                f"the send for the slot {when} was left unfinished and its window has passed; "
                "the rest is not sent late (`newsletter send ISSUE` finishes it by hand)"
            )
        else:
            continue
        last = slot
    if not notes:
        return DueResult("nothing-due", "nothing is due now")
    return DueResult(
        "missed",
        "; ".join(notes) + f" (catch-up window {schedule.catch_up}). Send by hand with "
        "`newsletter send ISSUE` if it should still go out",
        last,
    )


def _when(schedule: Schedule, slot: Slot) -> str:
    return slot.at.astimezone(schedule.zone).strftime("%a %Y-%m-%d %H:%M %Z")
