"""Scheduled sends: is a send due now, and if so, send it, once, whoever else is running.

Input: a :class:`~newsletter.schedule.slots.Schedule`, the issues folder, a
:class:`~newsletter.storage.base.Storage`, the current time and a
``send_issue`` function (the same one ``newsletter send`` uses). Output: a
:class:`DueResult` saying what happened. ``newsletter send --due`` (cron, systemd timers) calls
:func:`check_and_send` once; ``newsletter schedule run`` calls it in a loop,
:func:`run_schedule`, which says each thing once and outlives every error.

Exactly once, across restarts and overlaps:

- a lease in the database (``storage.lease``) lets one run at a time act on the
  schedule; a run that dies loses its lease after ``LEASE_SECONDS``;
- each slot's fate is recorded (``storage.slots``), so a slot already sent is
  left alone and an interrupted one is resumed (the send log does the rest);
- a slot is only acted on within its catch-up window: after that it is
  recorded as missed and reported, never sent days late.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from newsletter.delivery.sending import NobodyMailable, SendReport, check_merge_fields
from newsletter.errors import (
    CampaignAborted,
    CanaryWaiting,
    LeaseLost,
    LockHeld,
    NewsletterError,
    StorageError,
    ValidationFailed,
)
from newsletter.render import issue_ids
from newsletter.render.loading import Loaded, load_issue, load_society, named_day
from newsletter.render.yaml_input import read_yaml
from newsletter.schedule.slots import Schedule, Slot, latest, slots_between, upcoming
from newsletter.storage.base import LEASE_SECONDS, SlotStore, Storage

LOCK_NAME = "schedule"

# What one look at the schedule did (DueResult.state).
DueState = Literal[
    "nothing-due", "done-already", "locked", "missed", "no-issue", "sent", "incomplete"
]


@dataclass(slots=True)
class DueResult:
    state: DueState
    message: str
    slot: Slot | None = None
    reports: list[SendReport] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.state in ("incomplete", "missed") else 0


@dataclass(frozen=True, slots=True)
class IssueChoice:
    """Which file is a day's issue, and what stands in the way of sending it."""

    day: dt.date
    path: Path | None
    problems: list[str] = field(default_factory=list)  # the day's issue cannot be sent
    notes: list[str] = field(default_factory=list)  # worth saying, but nothing is wrong


def _indented(problems: list[str]) -> str:
    """One problem a line, indented; a problem's own detail lines one step further in."""
    return "\n".join("  " + p.replace("\n", "\n  ") for p in problems)


class SlotFailed(NewsletterError):
    """The due slot's issue cannot be sent as it is; nothing went out, and the next look retries."""

    next_step: str | None = "Nothing was sent for this slot."

    def __init__(self, when: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"the slot {when} cannot be sent:\n" + _indented(problems))


class SlotIncomplete(SlotFailed):
    """Some of the slot's lists could not be sent, or only part of one; the next look retries."""

    next_step = None

    def __init__(self, when: str, issue_id: str, done: list[str], problems: list[str]) -> None:
        self.problems = problems
        sent = f"sent to {', '.join(done)}; " if done else ""
        NewsletterError.__init__(
            self,
            f"{issue_id} for the slot {when}: {sent}not sent to every list:\n"
            + _indented(problems)
            + "\nThe next look within the catch-up window tries the lists not done again.",
        )


def find_issue(issues_dir: Path, day: dt.date) -> IssueChoice:
    """The issue file for ``day``, by these rules, in order:

    1. the file named after the day (``2026-12-03.yaml`` or ``.yml``). Its
       ``date:`` must say the same day; loading it checks that (a copy of last
       week's file fails loudly instead of being skipped). Other files dated
       that day are left for a send by hand, and said so;
    2. failing that, the one file not named after a day whose ``date:`` is the
       day (``stem-cells-special.yaml``); two such files are an error;
    3. a file named after another day but dated this one is never this day's
       issue (it is that other day's, and its own day reports the mismatch);
       when it is the only candidate, it is reported as a problem here too.
    """
    wanted = day.isoformat()
    if not issues_dir.is_dir():
        # Not "no issue this week": every week would pass silently.
        return IssueChoice(
            day,
            None,
            [f"the issues folder {issues_dir} does not exist; check NEWSLETTER_ISSUES_DIR"],
        )
    problems: list[str] = []
    notes: list[str] = []
    named = [
        p for p in (issues_dir / f"{wanted}.yaml", issues_dir / f"{wanted}.yml") if p.is_file()
    ]
    if len(named) > 1:
        problems.append(
            f"two files are named for {wanted} ({', '.join(str(p) for p in named)}); keep one"
        )
    by_date: list[Path] = []
    misnamed: list[tuple[Path, dt.date]] = []
    unreadable: list[Path] = []
    # Named as if for the day (2026-12-03-appeal.yaml) but not dated it, or not
    # readable: most likely this day's issue with a stale date or a typo.
    prefixed: list[tuple[Path, str | None]] = []
    for path in sorted(issues_dir.glob("*.y*ml")):
        if path in named or path.name.startswith(".") or not path.is_file():
            continue
        other_day = named_day(path)
        if other_day is not None and named:
            continue  # the day has its file: no need to open every other week's
        date = _date_field(path)
        if other_day is None and date != wanted and _starts_with_day(path, wanted):
            prefixed.append((path, date))
        if date is None:
            if other_day is None:
                unreadable.append(path)
        elif date == wanted:
            if other_day is None:
                by_date.append(path)
            else:
                misnamed.append((path, other_day))
    if named:
        chosen: Path | None = named[0]
        notes += [
            f"{p} is also dated {wanted}; the schedule sends the file named after the day, "
            "so send the other by hand if it should go out too"
            for p in by_date
        ]
    elif len(by_date) > 1:
        chosen = None
        problems.append(
            f"more than one issue is dated {wanted} ({', '.join(str(p) for p in by_date)}); "
            f"keep one, or name the one to send {wanted}.yaml"
        )
    elif by_date:
        chosen = by_date[0]
    else:
        chosen = None
        problems += [
            f"{p} has `date: {wanted}` but is named for {other}, so it is the issue for "
            f"neither day: rename it to {wanted}{p.suffix} or set its date to {other}"
            for p, other in misnamed
        ]
        # Not a quiet week: a file named for the day that is not dated it fails
        # the slot, as a misdated 2026-12-03.yaml does, so cron sees it.
        problems += [
            f"{p} is named for {wanted} but "
            + (
                f"has `date: {date}`: set `date: {wanted}`"
                if date is not None
                else f"cannot be read (`newsletter build {p}` says why): fix it"
            )
            + ", or rename it if it is not this day's issue"
            for p, date in prefixed
        ]
        done = {p for p, _ in prefixed}
        notes += [
            f"{p} could not be read, so its date is unknown" for p in unreadable if p not in done
        ]
    return IssueChoice(day, None if problems else chosen, problems, notes)


def issue_problems(
    choice: IssueChoice,
    society_file: Path | None = None,
    *,
    storage: Storage | None = None,
    lists: Sequence[str] = (),
) -> list[str]:
    """What would stop the send of ``choice`` if it were due now, to show ahead of time:
    the files' problems and, given the database, a merge field one of ``lists`` lacks."""
    if choice.problems or choice.path is None:
        return choice.problems
    loaded, problems = _load(load_issue, choice.path)
    problems += _id_clashes(choice.path)
    if society_file is not None:
        problems += _load(load_society, society_file)[1]
    if loaded is not None and storage is not None and loaded.merge_fields:
        for name in lists:
            try:
                check_merge_fields(storage, loaded.value.id, name, loaded.merge_fields)
            except ValidationFailed as exc:
                problems += [f"list {name}: {p}" for p in exc.problems]
    return problems


@dataclass(frozen=True, slots=True)
class PlannedSlot:
    """A slot ahead (or due now), the issue it would send, and what would stop it."""

    slot: Slot
    choice: IssueChoice
    problems: list[str]
    due_now: bool


def planned_slots(
    schedule: Schedule,
    now: dt.datetime,
    *,
    storage: Storage,
    issues_dir: Path,
    lists: Sequence[str],
    society_file: Path | None = None,
    count: int = 5,
) -> Iterator[PlannedSlot]:
    """``newsletter schedule``: the slot due now unless it is done (its window is still
    open), then the next ``count``, each as it is looked at."""
    due = latest(schedule, now, within=schedule.catch_up)
    current = [due] if due is not None and storage.slots.state(due) != "done" else []
    for slot in current + upcoming(schedule, now, count):
        choice = find_issue(issues_dir, slot.local_day)
        problems = issue_problems(choice, society_file, storage=storage, lists=lists)
        yield PlannedSlot(slot, choice, problems, slot is due)


def _id_clashes(path: Path) -> list[str]:
    """Other files in the folder that claim this issue's id: the build (and so the send)
    refuses them, so the slot reports them with the file's other problems, at once."""
    return [str(p) for p in issue_ids.clashes(path)] if path.is_file() else []


def _load(load: Callable[[Path], Loaded[Any]], path: Path) -> tuple[Loaded[Any] | None, list[str]]:
    """The file at ``path`` loaded (None when invalid), and why it cannot go into a send:
    invalid, or refused (bidi controls)."""
    try:
        loaded = load(path)
    except ValidationFailed as exc:
        return None, [str(p) for p in exc.problems]
    except NewsletterError as exc:
        return None, [str(exc)]
    return loaded, [str(p) for p in loaded.refused_by_send]


def _starts_with_day(path: Path, wanted: str) -> bool:
    """Whether the name is the day and more (``2026-12-03-appeal.yaml``, not ``2026-12-031``)."""
    rest = path.stem.removeprefix(wanted)
    return path.stem.startswith(wanted) and rest[:1] not in ("", *"0123456789")


_DATES: dict[Path, tuple[tuple[int, ...], str | None]] = {}


def _date_field(path: Path) -> str | None:
    """The text of a file's top-level ``date:``, or None when it cannot be read.

    Kept per file version: `newsletter schedule` looks up six days and
    `schedule run` looks every minute, over a folder that gains a file a week."""
    try:
        stat = path.stat()
    except OSError:
        return None
    version = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
    known = _DATES.get(path)
    if known is not None and known[0] == version:
        return known[1]
    data = read_yaml(path).data
    date = str(data["date"]).strip() if isinstance(data, dict) and "date" in data else None
    _DATES[path] = (version, date)
    return date


def check_and_send(
    *,
    schedule: Schedule,
    lists: list[str],
    issues_dir: Path,
    storage: Storage,
    now: dt.datetime,
    send_issue: Callable[[Path, str], SendReport],
    society_file: Path | None = None,
    lease_ttl: float = LEASE_SECONDS,
) -> DueResult:
    """Do what is due at ``now``: nothing, report a missed slot, or send (or resume).

    ``society_file`` is checked with the issue, so that a problem in it fails
    the slot once rather than every list's send in turn."""
    slots = storage.slots
    slot = latest(schedule, now, within=schedule.catch_up)
    if slot is None:
        return _nothing_or_missed(schedule, slots, now)
    if slots.state(slot) == "done":
        return DueResult("done-already", f"the slot {_when(schedule, slot)} was handled", slot)
    # "no-issue" and "failed" are looked at again while the window lasts: the
    # editor may add or fix the file in time.
    lease = storage.lease(LOCK_NAME, lease_ttl)
    try:
        lease.acquire(now.timestamp())
    except LockHeld as exc:
        return DueResult("locked", str(exc), slot)
    try:
        result = _send_slot(schedule, slot, slots, lists, issues_dir, send_issue, society_file)
    except BaseException:
        # The error in flight (a send's account of what went out unrecorded, say) is
        # what matters; a database still busy must not replace it with its own.
        with contextlib.suppress(StorageError):
            lease.release()
        raise
    try:
        lease.release()
    except StorageError as exc:
        result.message += (
            f"; the schedule's lock could not be freed ({exc}); it frees itself within "
            f"{lease.ttl:.0f} s"
        )
    return result


def _send_slot(
    schedule: Schedule,
    slot: Slot,
    slots: SlotStore,
    lists: list[str],
    issues_dir: Path,
    send_issue: Callable[[Path, str], SendReport],
    society_file: Path | None,
) -> DueResult:
    when = _when(schedule, slot)
    choice = find_issue(issues_dir, slot.local_day)
    if choice.problems:
        slots.set(slot, "failed", detail="; ".join(choice.problems))
        raise SlotFailed(when, choice.problems)
    path = choice.path
    if path is None:
        detail = f"no issue file for {slot.local_day} in {issues_dir}"
        slots.set(slot, "no-issue", detail="; ".join([detail, *choice.notes]))
        return DueResult(
            "no-issue",
            f"the slot {when} is due but {issues_dir} has no issue for {slot.local_day} "
            f"(no {slot.local_day}.yaml, and no other file with `date: {slot.local_day}`); "
            "nothing was sent" + "".join(f"; {n}" for n in choice.notes),
            slot,
        )
    clashes = _id_clashes(path)
    try:
        loaded = load_issue(path)  # fail loudly, before any mail goes out
    except ValidationFailed as exc:
        problems = [str(p) for p in exc.problems] + clashes
        slots.set(slot, "failed", detail="; ".join(problems))
        raise SlotFailed(when, problems) from None
    except NewsletterError as exc:
        slots.set(slot, "failed", detail=str(exc))
        raise
    problems = [str(p) for p in loaded.refused_by_send] + clashes
    if society_file is not None:
        problems += _load(load_society, society_file)[1]
    if problems:
        slots.set(slot, "failed", detail="; ".join(problems))
        raise SlotFailed(when, problems)
    issue = loaded.value
    if issue.date != slot.local_day and named_day(path) is None:
        # Chosen by its date a moment ago; edited since. Look again next time.
        problem = f"{path}: its date changed to {issue.date} while it was being read"
        slots.set(slot, "failed", detail=problem)
        raise SlotFailed(when, [problem])
    slots.set(slot, "sending", issue.id)
    reports, nobody = _send_lists(when, slot, slots, issue.id, path, lists, send_issue)
    unfinished = [_unfinished(r) for r in reports if r.exit_code != 0]
    if len(reports) + len(nobody) < len(lists):
        # Asked to stop (SIGTERM, Ctrl-C) before the later lists.
        handled = {r.record.list_name for r in reports}
        waiting = [n for n in lists if n not in handled and n not in nobody]
        unfinished.append(f"not started on {', '.join(waiting)} (the run was stopped)")
    complete = not unfinished
    notes = [*unfinished, *nobody.values()]
    slots.set(slot, "done" if complete else "incomplete", issue.id, detail="; ".join(notes))
    verb: DueState = "sent" if complete else "incomplete"
    # Every list's members may have left: done, but "sent" would claim mail went out.
    said = verb if reports else "done, nothing sent"
    message = f"{issue.id} for the slot {when}: {said}" + "".join(
        f"; {n}" for n in [*notes, *choice.notes]
    )
    return DueResult(verb, message, slot, reports)


def _send_lists(
    when: str,
    slot: Slot,
    slots: SlotStore,
    issue_id: str,
    path: Path,
    lists: list[str],
    send_issue: Callable[[Path, str], SendReport],
) -> tuple[list[SendReport], dict[str, str]]:
    """Send the slot's issue to each list in turn; raise when one of them could not be.

    Also returns, by list name, a note for each list whose members have all left: that is
    people's choice, not a fault, and retrying it all morning would change
    nothing. A list with no members at all (never imported) is a fault."""
    reports: list[SendReport] = []
    errors: list[str] = []
    done: list[str] = []
    begun: list[str] = []  # stopped by the relay part-way: some of it may have gone out
    nobody: dict[str, str] = {}
    for name in lists:
        try:
            reports.append(send_issue(path, name))
        except NobodyMailable as exc:
            nobody[name] = f"nobody to send to on {name}: {exc.summary}"
            continue
        except StorageError:
            # The database failing is no fault of this list: the slot stays as it is
            # (what went out is in the send log) and the run reports it, as before.
            raise
        except NewsletterError as exc:
            # One list that cannot be sent (empty, its send locked by a run by
            # hand) does not hold back the others, and is not hidden by them.
            errors.append(f"list {name}: {exc}")
            if isinstance(exc, CanaryWaiting) or (
                isinstance(exc, CampaignAborted | LeaseLost) and exc.sent
            ):
                # Some of it went out, or its canary did and the list waits for a person:
                # the slot is incomplete, not failed.
                begun.append(name)
            continue
        done.append(name)
        if (reports[-1].result.stopped or "").startswith("stopped by SIG"):
            break  # asked to stop: the other lists wait for the next run
    if errors and not done and not begun:
        slots.set(slot, "failed", issue_id, detail="; ".join([*errors, *nobody.values()]))
        raise SlotFailed(when, [*errors, *nobody.values()])
    if errors:
        slots.set(slot, "incomplete", issue_id, detail="; ".join([*errors, *nobody.values()]))
        raise SlotIncomplete(when, issue_id, done, [*errors, *nobody.values()])
    return reports, nobody


def _unfinished(report: SendReport) -> str:
    """Why a list's send is not finished, for the slot's record and ``newsletter schedule``."""
    c = report.result.counts
    left = ", ".join(
        f"{c[state]} {state}"
        for state in ("pending", "sending", "deferred", "unknown", "rejected")
        if c.get(state)
    )
    stopped = f"; stopped: {report.result.stopped}" if report.result.stopped else ""
    return f"{report.record.list_name} not finished: {left or 'nothing left'}{stopped}"


def _nothing_or_missed(schedule: Schedule, slots: SlotStore, now: dt.datetime) -> DueResult:
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
                "the rest is not sent late"
            )
        else:
            continue
        last = slot
    if not notes:
        return DueResult("nothing-due", "nothing is due now")
    return DueResult(
        "missed",
        # One piece of advice for every slot named: sending by hand starts a missed
        # slot's issue, or finishes an unfinished one from where it stopped.
        "; ".join(notes) + f" (catch-up window {schedule.catch_up}). Send by hand with "
        "`newsletter send ISSUE` if it should still go out",
        last,
    )


def _when(schedule: Schedule, slot: Slot) -> str:
    return slot.at.astimezone(schedule.zone).strftime("%a %Y-%m-%d %H:%M %Z")


def run_schedule(
    look: Callable[[], DueResult],
    *,
    poll: float,
    stop: threading.Event,
    say: Callable[[str], None],
    complain: Callable[[str, str | None], None],
    problem_of: Callable[[Exception], str | None],
    each_look: Callable[[], None] | None = None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> None:
    """``newsletter schedule run``: look every ``poll`` seconds until ``stop`` is set.

    ``look`` is one :func:`check_and_send`; ``each_look`` runs before it (the CLI
    installs its signal handlers again: a send's event loop takes the signals over
    and resets them when it ends). What a look did is said (``say``, stamped) once,
    not at every poll; an error a user can cause (``problem_of`` gives its message,
    None for a bug) is complained of once, a bug each time with its traceback, and
    the loop goes on: a long-running service must outlive both. A send stopped by a
    signal (SIGTERM, Ctrl-C arrived during it) ends the loop."""
    said = ""  # say each thing once, not at every poll
    while not stop.is_set():
        if each_look is not None:
            each_look()
        stamp = now().strftime("%Y-%m-%d %H:%M:%S UTC")
        try:
            result = look()
            if result.state not in ("nothing-due", "done-already") and result.message != said:
                say(f"{stamp} {result.message}")
                said = result.message
            if any((r.result.stopped or "").startswith("stopped by SIG") for r in result.reports):
                stop.set()  # the signal arrived during the send, which has stopped cleanly
        except Exception as exc:  # noqa: BLE001 - a long-running service must outlive a bug
            problem = problem_of(exc)
            if problem is None:
                complain(
                    f"{stamp} unexpected error: {exc!r}; the scheduler goes on",
                    traceback.format_exc(),
                )
            elif problem != said:
                # A failed send (or a database that fails) is said once; the
                # scheduler keeps going for the next look.
                complain(f"{stamp} error: {problem}", None)
                said = problem
        stop.wait(poll)
