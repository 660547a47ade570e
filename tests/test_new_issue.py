"""`newsletter new [DATE]`: a draft for the next slot (or DATE), refused until it is filled in."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from newsletter.errors import ConfigError, ValidationFailed
from newsletter.render.drafting import DraftRefused, issue_day
from newsletter.render.loading import load_issue
from newsletter.schedule.slots import next_day, parse_schedule

NY = "America/New_York"
SCHEDULED = {
    "NEWSLETTER_SCHEDULE": "Thu 09:00",
    "NEWSLETTER_TIMEZONE": NY,
    "NEWSLETTER_TEST_NOW": "2026-12-02T12:00:00-05:00",  # a Wednesday
}
# The example issue's sections, in order (tests/../issues/2020-12-23.yaml).
EXAMPLE_CATEGORIES = ["Research", "Guidance", "Treatments", "Society news", "Get involved"]


def errors_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def placeholder_lines(path: Path) -> list[int]:
    """The lines of the file that hold a placeholder outside a comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [n for n, line in enumerate(lines, 1) if "TODO:" in line.split("#", 1)[0]]


def line_of(path: Path, start: str) -> int:
    """The first line of the file that starts with ``start``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith(start))


def fill_in(path: Path) -> None:
    """Do what an editor does: write real text wherever the draft says TODO:."""
    out = []
    for n, written in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        code, line = written.split("#", 1)[0], written
        if "TODO:" in code and re.search(r"\b(url|src):", code):
            line = re.sub(r'"TODO:[^"]*"', f"https://www.example.org/news/{n}", written)
        elif "TODO:" in code and '"TODO:' in code:
            line = re.sub(r'"TODO:[^"]*"', f'"Written on line {n}"', written)
        elif "TODO:" in code:
            line = written.replace(written.strip(), f"A paragraph written on line {n}.")
        out.append(line)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def test_the_next_slot_is_drafted_with_the_usual_sections_and_built_once_filled(
    project: Path,
) -> None:
    made = run_cli("new", cwd=project, env=SCHEDULED)
    assert made.returncode == 0, made.stderr
    draft = project / "issues" / "2026-12-03.yaml"
    assert made.stdout.splitlines()[0] == (
        f"wrote {Path('issues/2026-12-03.yaml')}: the issue for Thu 2026-12-03 (the next slot "
        f"of Thu 09:00 {NY}), 5 article(s) as in {Path('issues/2020-12-23.yaml')}"
    )
    data = yaml.safe_load(draft.read_text(encoding="utf-8"))
    assert str(data["date"]) == "2026-12-03" and "id" not in data  # its id is its name
    assert [a.get("category") for a in data["articles"]] == EXAMPLE_CATEGORIES
    # pictures where the last issue had them (its first and fourth articles)
    assert [("image" in a) for a in data["articles"]] == [True, False, False, True, False]
    assert data["intro"].startswith("Dear [[first_name|friend]],\n\nTODO: ")
    assert '# source: "Brain"  # optional' in draft.read_text(encoding="utf-8")

    # Unfinished: build refuses it, naming every placeholder at its own line.
    lines = placeholder_lines(draft)
    assert len(lines) == 22 and f"replace its {len(lines)} TODO: placeholders" in made.stdout
    built = run_cli("build", "issues/2026-12-03.yaml", cwd=project)
    assert built.returncode == 1 and "Traceback" not in built.stderr
    assert errors_of(built) == [f"error: {len(lines)} problems found; nothing was written:"]
    reported = [line.strip() for line in built.stderr.splitlines()[1:]]
    assert [int(line.split(":")[1]) for line in reported] == lines
    shown = Path("issues/2026-12-03.yaml")
    subject, url = (line_of(draft, "subject:"), line_of(draft, "    url:"))
    assert (
        f"  {shown}:{subject}: subject: is still a placeholder ('TODO: the subject line"
        in built.stderr
    )
    assert (
        f"  {shown}:{url}: articles[0].url: is still a placeholder ('TODO: the https:// link "
        "to the article'): write it in place of the 'TODO:' text\n"
    ) in built.stderr  # the one thing said about it: not also "must be an https:// URL"
    assert "or delete the whole `image:` (it is optional)" in built.stderr
    assert not (project / "build").exists()

    # Filled in, it builds, and its id clashes with no other issue's.
    fill_in(draft)
    assert placeholder_lines(draft) == []
    built = run_cli("build", "issues/2026-12-03.yaml", cwd=project)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("built 2026-12-03 into ")
    text = (project / "build" / "2026-12-03" / "index.txt").read_text(encoding="utf-8")
    title, summary = line_of(draft, "  - title:"), line_of(draft, "    summary: |") + 1
    assert f"Written on line {title}" in text and f"written on line {summary}." in text

    # The week after follows this, the most recent issue, not the older example.
    after = run_cli("new", "2026-12-10", cwd=project, env=SCHEDULED)
    assert after.returncode == 0, after.stderr
    assert f"as in {Path('issues/2026-12-03.yaml')}" in after.stdout
    week2 = yaml.safe_load((project / "issues" / "2026-12-10.yaml").read_text(encoding="utf-8"))
    assert [a.get("category") for a in week2["articles"]] == EXAMPLE_CATEGORIES


def test_a_date_is_drafted_without_a_schedule_and_none_without_a_date(project: Path) -> None:
    now = {"NEWSLETTER_TEST_NOW": "2026-12-02T12:00:00+00:00"}
    nothing = run_cli("new", cwd=project, env=now)
    assert nothing.returncode == 1 and "Traceback" not in nothing.stderr
    assert errors_of(nothing) == [
        "error: no schedule is set (NEWSLETTER_SCHEDULE), so there is no next slot to draft "
        "for: give the day, as in `newsletter new 2026-12-02`, or set NEWSLETTER_SCHEDULE "
        "(for example 'Thu 09:00') and NEWSLETTER_TIMEZONE"
    ]
    assert sorted(p.name for p in (project / "issues").iterdir()) == ["2020-12-23.yaml"]

    made = run_cli("new", "2026-12-05", cwd=project, env=now)
    assert made.returncode == 0, made.stderr
    assert "the issue for Sat 2026-12-05, 5 article(s)" in made.stdout  # no slot named
    with pytest.raises(ValidationFailed):
        load_issue(project / "issues" / "2026-12-05.yaml")

    # A day gone is refused unless asked for; today is not gone.
    past = run_cli("new", "2026-12-01", cwd=project, env=now)
    assert past.returncode == 1 and errors_of(past) == [
        "error: 2026-12-01 is in the past (today is 2026-12-02 in UTC); give a later day, or "
        "add --past to draft it all the same"
    ]
    assert not (project / "issues" / "2026-12-01.yaml").exists()
    assert run_cli("new", "2026-12-01", "--past", cwd=project, env=now).returncode == 0
    assert run_cli("new", "2026-12-02", cwd=project, env=now).returncode == 0
    bad = run_cli("new", "2026-02-30", cwd=project, env=now)
    assert bad.returncode == 2 and "'2026-02-30' does not match the format" in bad.stderr


def test_an_existing_file_or_a_taken_id_is_refused_and_left_alone(project: Path) -> None:
    issues = project / "issues"
    mine = issues / "2026-12-03.yaml"
    mine.write_text("subject: half written\n", encoding="utf-8")
    before = sorted(p.name for p in issues.iterdir())
    again = run_cli("new", cwd=project, env=SCHEDULED)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert errors_of(again) == [
        f"error: {Path('issues/2026-12-03.yaml')} already exists; it was left as it is. Edit "
        "it, or delete it first to start again from a new draft"
    ]
    assert mine.read_text(encoding="utf-8") == "subject: half written\n"
    assert sorted(p.name for p in issues.iterdir()) == before  # no partial file either

    # The same day under .yml is the same id: refused too.
    (issues / "2026-12-10.yml").write_text("subject: x\n", encoding="utf-8")
    other = run_cli("new", "2026-12-10", cwd=project, env=SCHEDULED)
    assert other.returncode == 1 and "2026-12-10.yml already exists" in other.stderr

    # A file that claims the day's id with `id:` would share the draft's send log.
    (issues / "appeal.yaml").write_text("# the appeal\nid: 2026-12-17\n", encoding="utf-8")
    taken = run_cli("new", "2026-12-17", cwd=project, env=SCHEDULED)
    assert taken.returncode == 1 and errors_of(taken) == [
        f"error: {Path('issues/appeal.yaml')}:2 already claims the id '2026-12-17' (with "
        "`id:`), which a draft named 2026-12-17.yaml would have too, and the send log and the "
        "archive know an issue by its id: change that file's `id:`, or give another day"
    ]
    assert not (issues / "2026-12-17.yaml").exists()

    gone = run_cli("new", cwd=project, env={**SCHEDULED, "NEWSLETTER_ISSUES_DIR": "nowhere"})
    assert gone.returncode == 1
    assert "there is no issues folder at nowhere (NEWSLETTER_ISSUES_DIR)" in gone.stderr
    assert not (project / "nowhere").exists()


@pytest.mark.parametrize(
    ("now", "day"),
    [
        ("2026-12-03T08:59:00-05:00", "2026-12-03"),  # before Thursday's slot: that day
        ("2026-12-03T09:00:00-05:00", "2026-12-10"),  # at it: it is being sent, the next
        ("2026-12-04T03:00:00+00:00", "2026-12-10"),  # Friday in UTC, still Thursday in NY
    ],
)
def test_the_next_slot_is_its_local_day(now: str, day: str) -> None:
    plan = parse_schedule("Thu 09:00", NY, 6)
    assert next_day(plan, dt.datetime.fromisoformat(now)).isoformat() == day


def test_the_local_day_is_not_the_utc_day_far_east() -> None:
    plan = parse_schedule("Fri 08:00", "Pacific/Auckland", 6)
    # 18:00 UTC on Thursday 3 December is 07:00 on Friday 4 December in Auckland.
    now = dt.datetime(2026, 12, 3, 18, tzinfo=dt.UTC)
    assert next_day(plan, now) == dt.date(2026, 12, 4)


def test_a_past_day_and_no_day_at_all_are_refused() -> None:
    today = dt.date(2026, 12, 4)
    found = issue_day(None, next_slot=today, today=today, zone="UTC", allow_past=False)
    assert found.day == today and found.from_schedule
    with pytest.raises(DraftRefused, match="2026-12-03 is in the past"):
        issue_day(dt.date(2026, 12, 3), next_slot=None, today=today, zone="UTC", allow_past=False)
    past = issue_day(dt.date(2026, 12, 3), next_slot=None, today=today, zone="UTC", allow_past=True)
    assert past.day == dt.date(2026, 12, 3) and not past.from_schedule
    with pytest.raises(ConfigError, match="no schedule is set"):
        issue_day(None, next_slot=None, today=today, zone="UTC", allow_past=False)
