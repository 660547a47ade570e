"""The send use case in process (delivery.send_issue): its callbacks, the confirmation, the dry run.

A real SQLite file in tmp_path and the memory transport; the CLI's own output is
tested through the CLI in test_send_cli.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import EXAMPLE, build_file, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.build import BuildResult
from newsletter.delivery.campaign import Campaign, Progress, SendOptions
from newsletter.delivery.send_issue import (
    SendDeclined,
    SendHooks,
    SendPlan,
    SendRequest,
    send_issue,
)
from newsletter.delivery.sending import SendReport
from newsletter.delivery.transports import MemoryTransport, Transport
from newsletter.storage.sqlite import SqliteStorage

LIST = "research-news"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True)
    rows = [ParsedRow(i + 2, f"reader{i}@example.org", f"R{i}", "Test") for i in range(7)]
    assert storage.subscribers.import_rows(LIST, rows, skip_invalid=False).committed
    storage.close()
    return path


@pytest.fixture
def built(project: Path) -> BuildResult:
    return build_file(project / "issues" / EXAMPLE.name, project)


def _send(
    project: Path,
    db: Path,
    built: BuildResult,
    transport: Callable[[], Transport],
    hooks: SendHooks,
    *,
    dry_run: bool = False,
) -> SendReport:
    return send_issue(
        SendRequest(project / "issues" / EXAMPLE.name, LIST, dry_run=dry_run),
        build=lambda: built,
        open_storage=lambda: SqliteStorage.open(db),
        transport=transport,
        sender=sender(),
        options=SendOptions(connections=2, flush_interval=0.01),
        envelope_sender="bounces@example.org",
        templates_dir=project / "templates",
        out_dir=project / "out",
        hooks=hooks,
    )


def test_the_callbacks_come_in_order_and_the_send_runs(
    project: Path, db: Path, built: BuildResult
) -> None:
    seen: list[str] = []
    plans: list[SendPlan] = []
    relay = MemoryTransport()

    def confirm(plan: SendPlan) -> bool:
        seen.append("confirm")
        return True

    def plan(p: SendPlan) -> None:
        seen.append("plan")
        plans.append(p)

    def start(c: Campaign) -> None:
        seen.append("start")

    def progress(p: Progress) -> None:
        if "progress" not in seen:
            seen.append("progress")

    report = _send(
        project,
        db,
        built,
        lambda: relay,
        SendHooks(
            note=lambda n: seen.append(f"note {n}"),
            plan=plan,
            confirm=confirm,
            on_start=start,
            on_progress=progress,
        ),
    )
    assert seen == ["plan", "confirm", "start", "progress"]
    assert plans[0].issue_id == built.issue_id and plans[0].list_name == LIST
    assert plans[0].preview.audience == 7 and not plans[0].preview.resumed
    assert plans[0].via == "memory" and plans[0].message_size == len(built.eml)
    assert report.result.counts["sent"] == 7 == len(relay.sent)
    assert report.exit_code == 0 and report.outbox is None
    storage = SqliteStorage.open(db)
    assert storage.archive.get(built.issue_id) is not None  # the first send froze it
    storage.close()


def test_declining_writes_nothing_and_frees_the_lease(
    project: Path, db: Path, built: BuildResult
) -> None:
    relay = MemoryTransport()
    with pytest.raises(SendDeclined):
        _send(project, db, built, lambda: relay, SendHooks(confirm=lambda plan: False))
    assert relay.sent == []
    storage = SqliteStorage.open(db)
    assert storage.send_log.find(built.issue_id, LIST) is None  # nothing frozen
    assert storage.archive.get(built.issue_id) is None
    lease = storage.lease(f"send:{built.issue_id}:{LIST}")
    lease.acquire(time.time())  # free: it would raise LockHeld otherwise
    lease.release()
    storage.close()


def test_a_dry_run_writes_samples_and_leaves_the_database_alone(
    project: Path, db: Path, built: BuildResult
) -> None:
    def no_relay() -> Transport:
        raise AssertionError("a dry run never makes the real transport")

    report = _send(project, db, built, no_relay, SendHooks(), dry_run=True)
    assert report.result.counts["sent"] == 7
    assert report.outbox == project / "out" / built.issue_id / "outbox"
    assert len(list(report.outbox.glob("*.eml"))) == 5
    storage = SqliteStorage.open(db)
    assert storage.send_log.find(built.issue_id, LIST) is None
    assert storage.archive.get(built.issue_id) is None
    storage.close()
