"""Scheduled sends: slots across DST, the catch-up window, the lock, and issue lookup."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import example_data, run_cli
from newsletter.delivery.campaign import RunResult
from newsletter.delivery.sending import SendReport
from newsletter.errors import NewsletterError
from newsletter.schedule.runner import DueResult, SlotFailed, check_and_send, run_schedule
from newsletter.schedule.slots import instant, latest, parse_schedule, upcoming
from newsletter.storage.sqlite import SqliteStorage
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.leases import SqliteLease as Lease
from newsletter.storage.sqlite.send_log import SendRecord

NY = "America/New_York"
UTC = dt.UTC


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def test_local_time_holds_across_daylight_saving() -> None:
    plan = parse_schedule("Thu 09:00", NY, 6)
    slots = upcoming(plan, utc(2026, 10, 20), 4)
    assert [s.local_day.isoformat() for s in slots] == [
        "2026-10-22", "2026-10-29", "2026-11-05", "2026-11-12",
    ]  # fmt: skip
    assert [s.at.astimezone(plan.zone).strftime("%H:%M") for s in slots] == ["09:00"] * 4
    # EDT (UTC-4) before 1 November, EST (UTC-5) after
    assert [s.at.hour for s in slots] == [13, 13, 14, 14]


def test_skipped_hour_is_sent_once_just_after_the_change() -> None:
    plan = parse_schedule("Sun 02:30", NY, 6)
    at = instant(plan, dt.date(2026, 3, 8))  # 02:00-03:00 does not exist that night
    assert at == utc(2026, 3, 8, 7, 30)
    assert at.astimezone(plan.zone).strftime("%H:%M %Z") == "03:30 EDT"
    assert len([s for s in upcoming(plan, utc(2026, 3, 7), 2) if s.local_day.day == 8]) == 1


def test_repeated_hour_is_sent_once_at_its_first_occurrence() -> None:
    plan = parse_schedule("Sun 01:30", NY, 6)
    at = instant(plan, dt.date(2026, 11, 1))  # 01:00-02:00 happens twice that night
    assert at == utc(2026, 11, 1, 5, 30)  # 01:30 EDT, not 01:30 EST an hour later
    assert at.astimezone(plan.zone).strftime("%H:%M %Z") == "01:30 EDT"
    assert len([s for s in upcoming(plan, utc(2026, 10, 31), 2) if s.local_day.day == 1]) == 1


@pytest.mark.parametrize(
    ("spec", "zone", "message"),
    [
        ("Thursday at nine", NY, "not a schedule"),
        ("Thu 25:00", NY, "not a time of day"),
        ("Funday 09:00", NY, "not a day of the week"),
        ("Thu 09:00", "Mars/Olympus", "not a time zone"),
    ],
)
def test_bad_schedules_are_explained(spec: str, zone: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec, zone, 6)


def test_catch_up_window() -> None:
    plan = parse_schedule("Thu 09:00", NY, 6)
    slot_time = utc(2026, 12, 3, 14, 0)
    assert latest(plan, slot_time - dt.timedelta(minutes=1), within=plan.catch_up) is None
    assert latest(plan, slot_time, within=plan.catch_up) is not None
    assert latest(plan, slot_time + dt.timedelta(hours=5), within=plan.catch_up) is not None
    assert latest(plan, slot_time + dt.timedelta(hours=7), within=plan.catch_up) is None


# -------------------------------------------------------------- check_and_send


class Recorder:
    """Stands in for the send path (tested on its own): records what it was asked."""

    def __init__(self, exit_code: int = 0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.exit_code = exit_code

    def __call__(self, path: Path, list_name: str) -> SendReport:
        self.calls.append((path.name, list_name))
        counts = dict.fromkeys(
            ("pending", "sending", "sent", "rejected", "deferred", "unknown", "suppressed"), 0
        )
        counts["sent" if self.exit_code == 0 else "deferred"] = 1
        record = SendRecord(1, path.stem, list_name, "", 1, 0)
        return SendReport(record, False, RunResult(counts, 1, 0.1))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sched.sqlite3"


@pytest.fixture
def conn(db_path: Path) -> SqliteStorage:
    return SqliteStorage.open(db_path, create=True)


def issue_for(write_issue: Callable[..., Path], day: str) -> Path:
    data = example_data()
    data["date"] = day
    return write_issue(data, name=f"{day}.yaml")


def run_at(
    now: dt.datetime, project: Path, conn: SqliteStorage, db_path: Path, sender: Recorder
) -> object:
    return check_and_send(
        schedule=parse_schedule("Thu 09:00", NY, 6),
        lists=["research-news"],
        issues_dir=project / "issues",
        storage=conn,
        now=now,
        send_issue=sender,
    )


def test_due_issue_is_sent_once(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    issue_for(write_issue, "2026-12-03")
    sender = Recorder()
    before = run_at(utc(2026, 12, 3, 13, 59), project, conn, db_path, sender)
    assert before.state == "nothing-due" and sender.calls == []  # type: ignore[attr-defined]
    due = run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    assert due.state == "sent"  # type: ignore[attr-defined]
    assert sender.calls == [("2026-12-03.yaml", "research-news")]
    again = run_at(utc(2026, 12, 3, 15, 0), project, conn, db_path, sender)  # cron again
    assert again.state == "done-already" and len(sender.calls) == 1  # type: ignore[attr-defined]


def test_machine_down_then_back_within_the_window_and_after_it(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    issue_for(write_issue, "2026-12-03")
    issue_for(write_issue, "2026-12-10")
    sender = Recorder()
    late = run_at(utc(2026, 12, 3, 18, 30), project, conn, db_path, sender)  # 4.5 h late
    assert late.state == "sent"  # type: ignore[attr-defined]
    missed = run_at(utc(2026, 12, 11, 9, 0), project, conn, db_path, sender)  # 19 h late
    assert missed.state == "missed" and "not sent late" in missed.message  # type: ignore[attr-defined]
    assert sender.calls == [("2026-12-03.yaml", "research-news")]
    quiet = run_at(utc(2026, 12, 11, 10, 0), project, conn, db_path, sender)
    assert quiet.state == "nothing-due"  # type: ignore[attr-defined]  # reported once


def test_interrupted_send_is_resumed_by_the_next_run(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    issue_for(write_issue, "2026-12-03")
    failing = Recorder(exit_code=3)
    first = run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, failing)
    assert first.state == "incomplete"  # type: ignore[attr-defined]
    # a restart mid-send leaves the slot "sending": the next run goes on with it
    conn.slots.set(first.slot, "sending")  # type: ignore[attr-defined]
    sender = Recorder()
    second = run_at(utc(2026, 12, 3, 14, 5), project, conn, db_path, sender)
    assert second.state == "sent" and sender.calls  # type: ignore[attr-defined]


def test_overlapping_runs_cannot_both_send(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    issue_for(write_issue, "2026-12-03")
    now = utc(2026, 12, 3, 14, 0)
    other = Lease(db_path, "schedule")
    other.acquire(now.timestamp())
    try:
        sender = Recorder()
        blocked = run_at(now, project, conn, db_path, sender)
        assert blocked.state == "locked" and sender.calls == []  # type: ignore[attr-defined]
    finally:
        other.release()
    sender = Recorder()
    assert run_at(now, project, conn, db_path, sender).state == "sent"  # type: ignore[attr-defined]
    # a lease whose owner died runs out
    dead = Lease(db_path, "schedule", ttl=60)
    dead.acquire(now.timestamp())
    dead._stop.set()  # as if the process had been killed: no more renewals
    assert (
        Lease(db_path, "schedule")._conn().execute("SELECT count(*) FROM locks").fetchone()[0] == 1
    )
    later = Lease(db_path, "schedule")
    later.acquire(now.timestamp() + 61)
    later.release()


def test_no_issue_due_sends_nothing_and_says_so(
    project: Path, conn: SqliteStorage, db_path: Path
) -> None:
    sender = Recorder()
    result = run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    assert result.state == "no-issue" and "has no issue for 2026-12-03" in result.message  # type: ignore[attr-defined]
    assert sender.calls == []


def test_invalid_issue_fails_before_any_mail(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(
        "subject: [broken\ndate: 2026-12-03\n", encoding="utf-8"
    )
    sender = Recorder()
    with pytest.raises(SlotFailed, match="YAML syntax error"):
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    assert sender.calls == []
    assert conn.slots.recent(1)[0][3] == "failed"


def test_issue_found_by_its_date_field(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    data = example_data()
    data["date"] = "2026-12-03"
    write_issue(data, name="stem-cells-special.yaml")
    sender = Recorder()
    assert run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender).state == "sent"  # type: ignore[attr-defined]
    assert sender.calls == [("stem-cells-special.yaml", "research-news")]


def test_schedule_command_and_send_due_from_the_cli(project: Path) -> None:
    env = {
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
        "NEWSLETTER_TIMEZONE": NY,
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_TEST_NOW": "2020-12-23T10:00:00-05:00",
    }
    connect(project / "db.sqlite3", create=True).close()  # as an import would have
    shown = run_cli("schedule", cwd=project, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "Thu 09:00 America/New_York" in shown.stdout
    assert "Thu 2020-12-24 09:00 EST" in shown.stdout
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 0 and "nothing is due now" in due.stdout
    bad = run_cli("schedule", cwd=project, env={**env, "NEWSLETTER_TIMEZONE": "Nowhere/Town"})
    assert bad.returncode == 1 and "NEWSLETTER_TIMEZONE: 'Nowhere/Town'" in bad.stderr
    assert "not a time zone" in bad.stderr


def test_cron_lines_are_read_like_cron() -> None:
    weekly = parse_schedule("0 9 * * 4", NY, 6)  # Thursdays at 09:00
    assert [s.at for s in upcoming(weekly, utc(2026, 10, 20), 2)] == [
        utc(2026, 10, 22, 13), utc(2026, 10, 29, 13),
    ]  # fmt: skip
    named = parse_schedule("30 8 * * mon,thu", NY, 6)
    assert [s.local_day.weekday() for s in upcoming(named, utc(2026, 10, 20), 4)] == [3, 0, 3, 0]
    first_monday_ish = parse_schedule("0 9 1-7 * 1", "UTC", 6)  # cron: day 1-7 OR Monday
    days = [s.local_day.day for s in upcoming(first_monday_ish, utc(2026, 11, 30, 12), 9)]
    assert days[:8] == [1, 2, 3, 4, 5, 6, 7, 14]  # 1-7 December, then Monday 14th
    sunday = parse_schedule("0 9 * * 7", "UTC", 6)
    assert upcoming(sunday, utc(2026, 11, 25), 1)[0].local_day == dt.date(2026, 11, 29)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0 25 * * 4", "not a valid hour"),
        ("0 9 * * funday", "not a valid day of week"),
        ("* * * * *", "runs 1440 times a day"),
        ("0 9 5-1 * *", "not a valid cron day of month field"),
        ("0 9 31 2 *", "never runs"),
        ("0 9 30 2 *", "never runs"),
        ("0 9 31 apr,jun,sep,nov *", "never runs"),
    ],
)
def test_bad_cron_lines(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec, "UTC", 6)


def test_window_passing_on_an_unfinished_send_and_several_missed_slots(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    issue_for(write_issue, "2026-12-03")
    failing = Recorder(exit_code=3)
    assert run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, failing).state == "incomplete"  # type: ignore[attr-defined]
    late = run_at(utc(2026, 12, 3, 21, 0), project, conn, db_path, Recorder())  # 7 h on
    assert late.state == "missed" and "left unfinished" in late.message  # type: ignore[attr-defined]
    assert late.message.count("newsletter send ISSUE") == 1  # type: ignore[attr-defined]
    assert conn.slots.state(late.slot) == "expired"  # type: ignore[attr-defined]
    # down for two weeks: both slots are recorded and reported, none is sent
    sender = Recorder()
    back = run_at(utc(2026, 12, 18, 12, 0), project, conn, db_path, sender)
    assert back.state == "missed" and back.message.count("was missed") == 2  # type: ignore[attr-defined]
    assert [r[3] for r in conn.slots.recent(3)] == ["missed", "missed", "expired"]
    assert sender.calls == []


def test_an_issue_added_late_in_the_window_still_goes_out(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    sender = Recorder()
    first = run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    assert first.state == "no-issue"  # type: ignore[attr-defined]
    issue_for(write_issue, "2026-12-03")
    second = run_at(utc(2026, 12, 3, 14, 20), project, conn, db_path, sender)
    assert second.state == "sent" and sender.calls  # type: ignore[attr-defined]


def test_a_stop_during_one_list_leaves_the_others_for_the_next_run(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    issue_for(write_issue, "2026-12-03")
    calls: list[str] = []

    def stopped_send(path: Path, list_name: str) -> SendReport:
        calls.append(list_name)
        report = Recorder(exit_code=3)(path, list_name)
        report.result.stopped = "stopped by SIGTERM"
        return report

    result = check_and_send(
        schedule=parse_schedule("Thu 09:00", NY, 6),
        lists=["one", "two"],
        issues_dir=project / "issues",
        storage=conn,
        now=utc(2026, 12, 3, 14, 0),
        send_issue=stopped_send,
    )
    assert calls == ["one"] and result.state == "incomplete"
    # and the slot says why, for `newsletter schedule`
    why = "one not finished: 1 deferred; stopped: stopped by SIGTERM; not started on two"
    assert why in result.message
    assert why in conn.slots.recent(1)[0][4]


def test_the_file_named_after_the_day_is_its_issue(write_issue: Callable[..., Path]) -> None:
    from newsletter.schedule.runner import find_issue

    data = example_data()
    data["date"] = "2026-12-10"
    path = write_issue(data, name="2026-12-03.yaml")
    # named for the 3rd: the 3rd's issue (its load reports the wrong date), never the 10th's
    assert find_issue(path.parent, dt.date(2026, 12, 3)).path == path
    tenth = find_issue(path.parent, dt.date(2026, 12, 10))
    assert tenth.path is None
    assert "2026-12-03.yaml has `date: 2026-12-10` but is named for 2026-12-03" in tenth.problems[0]


# ------------------------------------------------- file name and date: week two


def copied_from_last_week(write_issue: Callable[..., Path]) -> Path:
    """This week's file, copied from last week's, whose `date:` was not updated."""
    issue_for(write_issue, "2026-11-26")
    data = example_data()
    data["date"] = "2026-11-26"
    return write_issue(data, name="2026-12-03.yaml")


def test_last_weeks_date_in_this_weeks_file_fails_the_slot_until_fixed(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    path = copied_from_last_week(write_issue)
    sender = Recorder()
    with pytest.raises(SlotFailed) as info:
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    line = path.read_text(encoding="utf-8").splitlines().index("date: '2026-11-26'") + 1
    assert str(info.value).startswith("the slot Thu 2026-12-03 09:00 EST cannot be sent:")
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:{line}: date: is 2026-11-26, but the file is named for")
    assert sender.calls == []
    (_key, day, _, state, detail) = conn.slots.recent(1)[0]
    assert (day, state) == ("2026-12-03", "failed") and "2026-11-26" in detail
    # the editor fixes the date: the next look, still in the window, sends it
    path.write_text(path.read_text(encoding="utf-8").replace("2026-11-26", "2026-12-03"))
    fixed = run_at(utc(2026, 12, 3, 14, 15), project, conn, db_path, sender)
    assert fixed.state == "sent"  # type: ignore[attr-defined]
    assert sender.calls == [("2026-12-03.yaml", "research-news")]


def test_two_files_for_one_day(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    from newsletter.schedule.runner import find_issue

    issues = project / "issues"
    day = dt.date(2026, 12, 3)
    special = example_data()
    special["date"] = "2026-12-03"
    write_issue(special, name="appeal.yaml")
    write_issue(special, name="gala.yaml")
    both = find_issue(issues, day)
    assert both.path is None and "more than one issue is dated 2026-12-03" in both.problems[0]
    with pytest.raises(NewsletterError, match=r"appeal\.yaml, .*gala\.yaml"):
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, Recorder())
    assert conn.slots.recent(1)[0][3] == "failed"
    # the file named after the day wins over files that are only dated for it
    weekly = issue_for(write_issue, "2026-12-03")
    chosen = find_issue(issues, day)
    assert chosen.path == weekly and not chosen.problems
    assert len(chosen.notes) == 2 and "appeal.yaml is also dated 2026-12-03" in chosen.notes[0]
    sender = Recorder()
    sent = run_at(utc(2026, 12, 3, 14, 5), project, conn, db_path, sender)
    assert sent.state == "sent" and "send the other by hand" in sent.message  # type: ignore[attr-defined]
    assert sender.calls == [("2026-12-03.yaml", "research-news")]
    (issues / "2026-12-03.yml").write_text(weekly.read_text(encoding="utf-8"))
    assert "two files are named for 2026-12-03" in find_issue(issues, day).problems[0]


def test_next_weeks_copy_does_not_disturb_this_week(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    """Copying this week's file to start next week's before this week's send is normal."""
    issue_for(write_issue, "2026-12-03")
    data = example_data()
    data["date"] = "2026-12-03"  # not updated yet
    write_issue(data, name="2026-12-10.yaml")
    sender = Recorder()
    assert run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender).state == "sent"  # type: ignore[attr-defined]
    assert sender.calls == [("2026-12-03.yaml", "research-news")]


def test_send_due_and_schedule_report_the_wrong_date(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    path = copied_from_last_week(write_issue)
    env = {
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
        "NEWSLETTER_TIMEZONE": NY,
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_SECRET_KEY": "k" * 40,
        "NEWSLETTER_TEST_NOW": "2026-12-02T12:00:00-05:00",
    }
    line = path.read_text(encoding="utf-8").splitlines().index("date: '2026-11-26'") + 1
    where = (
        f"issues/2026-12-03.yaml:{line}: date: is 2026-11-26, but the file is named for 2026-12-03"
    )
    connect(project / "db.sqlite3", create=True).close()  # as an import would have
    ahead = run_cli("schedule", cwd=project, env=env)  # the day before: a warning in time
    assert ahead.returncode == 0, ahead.stderr
    assert "Thu 2026-12-03 09:00 EST" in ahead.stdout and where in ahead.stdout
    due = run_cli(
        "send",
        "--due",
        cwd=project,
        env={**env, "NEWSLETTER_TEST_NOW": "2026-12-03T09:15:00-05:00"},
    )
    assert due.returncode == 1, due.stdout + due.stderr
    assert "error: the slot Thu 2026-12-03 09:00 EST cannot be sent:" in due.stderr
    assert where in due.stderr and "Nothing was sent for this slot" in due.stderr
    shown = run_cli(
        "schedule", cwd=project, env={**env, "NEWSLETTER_TEST_NOW": "2026-12-03T09:20:00-05:00"}
    )
    assert "failed" in shown.stdout and "2026-11-26" in shown.stdout.split("recent slots:")[1]
    # the slot is still in its window: shown first, with what stops it
    first, problem = shown.stdout.splitlines()[1:3]
    assert first.startswith("  Thu 2026-12-03 09:00 EST") and first.endswith("due now")
    assert problem.startswith("      cannot be sent: " + where)


@pytest.mark.parametrize("poll", ["-1", "0", "0.5", "nan", "inf", "1e9", "soon"])
def test_poll_must_be_a_sensible_number_of_seconds(project: Path, poll: str) -> None:
    env = {"NEWSLETTER_SCHEDULE": "Thu 09:00", "NEWSLETTER_DATABASE": str(project / "db")}
    result = run_cli("schedule", "run", "--poll", poll, cwd=project, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Invalid value for '--poll'" in result.stderr
    assert "scheduler:" not in result.stdout  # refused before it starts


def test_poll_longer_than_the_catch_up_window_is_refused(project: Path) -> None:
    env = {
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
        "NEWSLETTER_CATCH_UP_HOURS": "0.25",
        "NEWSLETTER_DATABASE": str(project / "db"),
    }
    result = run_cli("schedule", "run", "--poll", "1800", cwd=project, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NEWSLETTER_CATCH_UP_HOURS" in result.stderr and "0:15:00" in result.stderr


def test_a_disguised_subject_fails_the_slot(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    data = example_data()
    data["date"] = "2026-12-03"
    data["subject"] = "Your donation receipt \u202egnp.exe"
    write_issue(data, name="2026-12-03.yaml")
    sender = Recorder()
    with pytest.raises(SlotFailed, match="U\\+202E RIGHT-TO-LEFT OVERRIDE"):
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    assert sender.calls == [] and conn.slots.recent(1)[0][3] == "failed"


def test_a_missing_issues_folder_is_an_error_not_a_quiet_week(
    project: Path, conn: SqliteStorage, db_path: Path
) -> None:
    import shutil

    shutil.rmtree(project / "issues")
    with pytest.raises(SlotFailed, match="issues does not exist; check NEWSLETTER_ISSUES_DIR"):
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, Recorder())


def test_a_file_named_for_the_day_and_more_with_a_stale_date_fails_the_slot(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    """`2026-12-03-appeal.yaml` copied from last week: not a quiet week that exits 0."""
    from newsletter.schedule.runner import find_issue

    issues = project / "issues"
    data = example_data()
    data["date"] = "2026-11-26"
    path = write_issue(data, name="2026-12-03-appeal.yaml")
    sender = Recorder()
    with pytest.raises(SlotFailed) as info:
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path} is named for 2026-12-03 but has `date: 2026-11-26`")
    assert sender.calls == [] and conn.slots.recent(1)[0][3] == "failed"
    # a broken file of that name fails loudly too (it may well be today's issue)
    path.write_text('subject: "unclosed\ndate: [\n', encoding="utf-8")
    broken = find_issue(issues, dt.date(2026, 12, 3))
    assert broken.path is None and "cannot be read" in broken.problems[0]
    # other days do not care, and names that only look alike are not taken for it
    assert not find_issue(issues, dt.date(2026, 12, 10)).problems
    path.unlink()
    write_issue(data, name="2026-12-031.yaml")
    assert not find_issue(issues, dt.date(2026, 12, 3)).problems
    # dated for the day, it is the day's issue (rule 2), and the next look sends it
    (issues / "2026-12-031.yaml").unlink()
    data["date"] = "2026-12-03"
    write_issue(data, name="2026-12-03-appeal.yaml")
    sent = run_at(utc(2026, 12, 3, 14, 15), project, conn, db_path, sender)
    assert sent.state == "sent"  # type: ignore[attr-defined]
    assert sender.calls == [("2026-12-03-appeal.yaml", "research-news")]
    # the day's own file wins; the stale-dated one is then nobody's problem
    data["date"] = "2026-11-26"
    write_issue(data, name="2026-12-03-appeal.yaml")
    issue_for(write_issue, "2026-12-03")
    assert not find_issue(issues, dt.date(2026, 12, 3)).problems


def test_a_cron_line_that_never_runs_is_a_settings_error(project: Path) -> None:
    """31 February: `newsletter schedule` looked for it until the year 9999 and crashed."""
    env = {"NEWSLETTER_SCHEDULE": "0 9 31 2 *"}
    shown = run_cli("schedule", cwd=project, env=env)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert "NEWSLETTER_SCHEDULE: '0 9 31 2 *' never runs" in shown.stderr
    # days that do come, if rarely, are kept: 29 February, or the 31st or a Thursday
    connect(project / "newsletter.sqlite3", create=True).close()  # as an import would have
    for spec in ("0 9 29 2 *", "0 9 31 2 4"):
        ok = run_cli("schedule", cwd=project, env={"NEWSLETTER_SCHEDULE": spec})
        assert ok.returncode == 0, ok.stderr


def test_a_slot_whose_every_list_has_left_is_done_and_says_nothing_went_out(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    from newsletter.delivery.sending import NobodyMailable
    from newsletter.storage.sqlite.subscribers import ListStates

    issue_for(write_issue, "2026-12-03")
    calls: list[str] = []

    def everyone_left(path: Path, list_name: str) -> SendReport:
        calls.append(list_name)
        raise NobodyMailable(list_name, ListStates(0, 2, {"bounced": 1}))

    def run(now: dt.datetime) -> object:
        return check_and_send(
            schedule=parse_schedule("Thu 09:00", NY, 6),
            lists=["one", "two"],
            issues_dir=project / "issues",
            storage=conn,
            now=now,
            send_issue=everyone_left,
        )

    result = run(utc(2026, 12, 3, 14, 0))
    assert result.state == "sent" and result.exit_code == 0  # type: ignore[attr-defined]
    assert "done, nothing sent; nobody to send to on one: all 3 have left; " in (
        result.message  # type: ignore[attr-defined]
    )
    assert "nobody to send to on two" in result.message  # type: ignore[attr-defined]
    assert run(utc(2026, 12, 3, 14, 15)).state == "done-already"  # type: ignore[attr-defined]
    assert calls == ["one", "two"]


def test_a_copy_that_keeps_last_weeks_id_and_date_has_both_problems_reported_at_once(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage, db_path: Path
) -> None:
    from newsletter.schedule.runner import find_issue, issue_problems

    issue_for(write_issue, "2026-11-26")
    copied = {"id": "2026-11-26", **example_data(), "date": "2026-11-26"}
    path = write_issue(copied, name="2026-12-03.yaml")
    shown = issue_problems(find_issue(project / "issues", dt.date(2026, 12, 3)))
    assert len(shown) == 2, shown
    assert "date: is 2026-11-26" in shown[0] and "is also the id of" in shown[1]
    sender = Recorder()
    with pytest.raises(SlotFailed) as info:
        run_at(utc(2026, 12, 3, 14, 0), project, conn, db_path, sender)
    assert [p.split(": ")[1] for p in info.value.problems] == ["date", "id"]
    # the date fixed, the id still clashes: shown ahead, and the slot still refuses it
    path.write_text(
        path.read_text(encoding="utf-8").replace("date: '2026-11-26'", "date: '2026-12-03'"),
        encoding="utf-8",
    )
    (only,) = issue_problems(find_issue(project / "issues", dt.date(2026, 12, 3)))
    assert "is also the id of" in only
    with pytest.raises(SlotFailed):
        run_at(utc(2026, 12, 3, 14, 15), project, conn, db_path, sender)
    assert sender.calls == []


def test_a_database_failing_during_a_slot_is_reported_not_taken_for_the_lists_fault(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage
) -> None:
    """A store raising StorageBusy mid-send ends the run with that error; the slot stays
    'sending' (what went out is in the send log), never 'failed' ("nothing was sent")."""
    from newsletter.errors import StorageBusy

    issue_for(write_issue, "2026-12-03")
    calls: list[str] = []

    def busy(path: Path, list_name: str) -> SendReport:
        calls.append(list_name)
        raise StorageBusy("cannot use the database: database is locked")

    with pytest.raises(StorageBusy):
        check_and_send(
            schedule=parse_schedule("Thu 09:00", NY, 6),
            lists=["one", "two"],
            issues_dir=project / "issues",
            storage=conn,
            now=utc(2026, 12, 3, 14, 0),
            send_issue=busy,
        )
    assert calls == ["one"]
    assert conn.slots.recent(1)[0][3] == "sending"
    assert conn.conn.execute("SELECT count(*) FROM locks").fetchone()[0] == 0  # lease freed


def test_a_list_whose_send_lost_its_lock_after_mail_went_out_leaves_the_slot_incomplete(
    project: Path, write_issue: Callable[..., Path], conn: SqliteStorage
) -> None:
    """Mail went out before another run took the send's lock: the slot is incomplete (the
    next look, or the window's end, says so), never failed with "Nothing was sent"."""
    from newsletter.errors import LeaseLost
    from newsletter.schedule.runner import SlotIncomplete

    issue_for(write_issue, "2026-12-03")

    def lost(path: Path, list_name: str) -> SendReport:
        raise LeaseLost(f"send:x:{list_name}", "otherhost:42:1", "600 sent, 1400 pending", 600)

    with pytest.raises(SlotIncomplete) as caught:
        check_and_send(
            schedule=parse_schedule("Thu 09:00", NY, 6),
            lists=["research-news"],
            issues_dir=project / "issues",
            storage=conn,
            now=utc(2026, 12, 3, 14, 0),
            send_issue=lost,
        )
    assert "Nothing was sent" not in str(caught.value) + (caught.value.next_step or "")
    assert "600 sent" in str(caught.value)
    assert conn.slots.recent(1)[0][3] == "incomplete"


def test_a_busy_database_at_the_end_of_a_slot_does_not_hide_the_sends_own_error(
    project: Path, write_issue: Callable[..., Path], db_path: Path
) -> None:
    """The send's error names what went out unrecorded; freeing the schedule's lock on a
    database still held by another program must not replace it with "database is locked"."""
    import sqlite3

    from newsletter.delivery.campaign import SendLogBusy

    issue_for(write_issue, "2026-12-03")
    storage = SqliteStorage.open(db_path, create=True, busy_seconds=0.2)
    holding = threading.Event()
    done = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        holding.set()
        done.wait(10)
        other.execute("ROLLBACK")
        other.close()

    def busy(path: Path, list_name: str) -> SendReport:
        threading.Thread(target=hold, daemon=True).start()
        holding.wait(5)
        raise SendLogBusy("3 message(s) went out but could not be recorded: a@x, b@x, c@x")

    try:
        with pytest.raises(SendLogBusy, match="a@x, b@x, c@x"):
            check_and_send(
                schedule=parse_schedule("Thu 09:00", NY, 6),
                lists=["research-news"],
                issues_dir=project / "issues",
                storage=storage,
                now=utc(2026, 12, 3, 14, 0),
                send_issue=busy,
            )
    finally:
        done.set()
        storage.close()


# ------------------------------------------------------------- the loop of `schedule run`


class _Looks:
    """Scripted looks for run_schedule: each a DueResult or an exception; then stop."""

    def __init__(self, stop: threading.Event, script: list[DueResult | Exception]) -> None:
        self.stop, self.script, self.armed = stop, list(script), 0

    def look(self) -> DueResult:
        step = self.script.pop(0)
        if not self.script:
            self.stop.set()
        if isinstance(step, Exception):
            raise step
        return step

    def arm(self) -> None:
        self.armed += 1


def _loop(
    script: list[DueResult | Exception],
) -> tuple[list[str], list[tuple[str, str | None]], _Looks]:
    stop = threading.Event()
    looks = _Looks(stop, script)
    said: list[str] = []
    complained: list[tuple[str, str | None]] = []
    run_schedule(
        looks.look,
        poll=0.001,
        stop=stop,
        say=said.append,
        complain=lambda line, trace: complained.append((line, trace)),
        problem_of=lambda exc: str(exc) if isinstance(exc, NewsletterError) else None,
        each_look=looks.arm,
        now=lambda: utc(2026, 12, 3, 14, 0),
    )
    return said, complained, looks


def test_the_loop_says_each_thing_once_and_outlives_errors_and_bugs() -> None:
    missed = DueResult("missed", "the slot was missed")
    said, complained, looks = _loop(
        [
            DueResult("nothing-due", "nothing is due now"),
            missed,
            missed,  # the same again: not said twice
            NewsletterError("the database is locked"),
            NewsletterError("the database is locked"),  # said once
            KeyError("a bug"),
            KeyError("a bug"),  # a bug is said every time, each with its traceback
            DueResult("done-already", "the slot was handled"),
            missed,  # said again: something else was said in between
        ]
    )
    assert said == [
        "2026-12-03 14:00:00 UTC the slot was missed",
        "2026-12-03 14:00:00 UTC the slot was missed",
    ]
    assert [line for line, _ in complained] == [
        "2026-12-03 14:00:00 UTC error: the database is locked",
        "2026-12-03 14:00:00 UTC unexpected error: KeyError('a bug'); the scheduler goes on",
        "2026-12-03 14:00:00 UTC unexpected error: KeyError('a bug'); the scheduler goes on",
    ]
    assert complained[0][1] is None
    for _, trace in complained[1:]:
        assert trace is not None and trace.startswith("Traceback") and "KeyError" in trace
    assert looks.armed == 9  # the signals are installed again before every look


def test_the_loop_ends_after_a_send_stopped_by_a_signal() -> None:
    record = SendRecord(1, "2026-12-03", "research-news", "2026-12-03T14:00:00", 10, 0)
    stopped = SendReport(record, False, RunResult({}, 3, 0.1, stopped="stopped by SIGTERM"))
    said, _, looks = _loop(
        [
            DueResult("incomplete", "2026-12-03: incomplete", reports=[stopped]),
            DueResult("missed", "never looked at"),
        ]
    )
    assert said == ["2026-12-03 14:00:00 UTC 2026-12-03: incomplete"]
    assert looks.script == [DueResult("missed", "never looked at")]  # no second look
