"""A database another program holds during a send: the run stops, waits, and loses no outcome.

Real SQLite files in tmp_path, opened with a busy timeout of 0.2 s; a second
connection in a thread runs ``BEGIN EXCLUSIVE`` and holds it for a while, as a
person with "DB Browser for SQLite" open mid-edit, or a big import, would. The
transport is the memory one, waiting a few ms per message as a relay does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import EXAMPLE, build_file, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.build import BuildResult
from newsletter.delivery.campaign import (
    BUSY_STOP,
    LISTED,
    Campaign,
    RunResult,
    SendLogBusy,
    SendOptions,
)
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.send_issue import RESUME_DATABASE, SendHooks, SendRequest, send_issue
from newsletter.delivery.sending import SendReport, prepare
from newsletter.delivery.transports import Envelope, MemoryTransport
from newsletter.errors import StorageBusy
from newsletter.models import Outcome
from newsletter.storage.sqlite import SqliteStorage

LIST = "research-news"
BUSY_SECONDS = 0.2  # the store's own wait for a lock, per call


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    import shutil

    from conftest import REPO

    project = tmp_path_factory.mktemp("project")
    for folder in ("templates", "issues"):
        shutil.copytree(REPO / folder, project / folder)
    shutil.copy(REPO / "society.yaml", project / "society.yaml")
    return build_file(project / "issues" / EXAMPLE.name, project)


def database(path: Path, recipients: int) -> None:
    storage = SqliteStorage.open(path, create=True)
    rows = [
        ParsedRow(i + 2, f"reader{i:04d}@example.org", "Reader", "Test") for i in range(recipients)
    ]
    assert storage.subscribers.import_rows(LIST, rows, skip_invalid=False).committed
    storage.close()


@dataclass
class Holder:
    """Another program: holds the database's write lock for ``seconds`` once started."""

    path: Path
    seconds: float
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)  # let go early
    freed: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()
        assert self.held.wait(5), "the lock was never taken"

    def _hold(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            self.held.set()
            self.release.wait(self.seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()
            self.freed.set()

    def join(self) -> None:
        self.release.set()
        assert self.thread is not None
        self.thread.join(30)
        assert self.freed.is_set()


def hold_after(box: MemoryTransport, holder: Holder, messages: int) -> None:
    """Start ``holder`` when the transport is about to take its ``messages``-th message."""

    def script(envelope: Envelope) -> Outcome | None:
        if len(box.sent) == messages and holder.thread is None:
            holder.start()
        return None  # delivered as usual

    box.script = script


def counts(path: Path, send_id: int) -> dict[str, int]:
    storage = SqliteStorage.open(path)
    try:
        return storage.send_log.counts(send_id)
    finally:
        storage.close()


def states(path: Path, send_id: int, emails: list[str]) -> set[str]:
    """The states the send log has for ``emails``."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT email, state FROM deliveries WHERE send_id = ?", (send_id,))
        wanted = set(emails)
        return {state for email, state in rows if email in wanted}
    finally:
        conn.close()


def test_a_lock_held_for_a_while_stops_the_run_and_every_delivery_is_recorded(
    tmp_path: Path, built: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "db.sqlite3"
    database(path, 400)
    storage = SqliteStorage.open(path, busy_seconds=BUSY_SECONDS)
    record = prepare(storage, built.issue_id, LIST).record
    send_id = record.id
    box = MemoryTransport(delay=0.004)
    holder = Holder(path, seconds=1.5)  # several busy tries and back-offs
    hold_after(box, holder, 60)
    notes: list[str] = []
    run = Campaign(
        storage.send_log,
        send_id,
        MessageTemplate(built.rendered, sender()),
        box,
        SendOptions(connections=4, flush_interval=0.02),
        envelope_sender="bounces@example.org",
        on_note=notes.append,
    )
    started = time.monotonic()
    result: RunResult = asyncio.run(run.run())
    took = time.monotonic() - started
    holder.join()
    storage.close()
    assert result.stopped == BUSY_STOP == "the database is busy: another program holds it"
    final = counts(path, send_id)
    # Every message the transport accepted is recorded as sent; none is left in doubt,
    # and the claimed but unstarted went back to pending.
    assert final["sent"] == len(box.sent) == result.attempted, final
    assert 60 <= final["sent"] < 400
    assert final["sending"] == 0 and final["unknown"] == 0, final
    assert final["sent"] + final["pending"] == 400, final
    assert result.counts == final
    # Said once that it waits, and it did wait for the lock to go.
    assert len(notes) == 1, notes
    assert "keeps trying to record their outcomes for up to 300 s" in notes[0]
    assert took >= 1.5
    # The CLI's summary of such a run says how to go on.
    from newsletter.cli import _summarise

    _summarise(SendReport(record, resumed=False, result=result), dry_run=False)
    said = capsys.readouterr().out
    assert f"stopped early: {BUSY_STOP}. Run the same command to resume." in said


def test_a_lock_that_outlasts_the_wait_names_what_went_out_unrecorded(
    tmp_path: Path, built: BuildResult, project: Path
) -> None:
    path = tmp_path / "db.sqlite3"
    database(path, 300)
    box = MemoryTransport(delay=0.004)
    holder = Holder(path, seconds=4.0)
    hold_after(box, holder, 60)
    notes: list[str] = []
    # No flush before the lock (a long interval, a large batch): all of the first 60
    # and those in flight are in memory when the database becomes busy.
    options = SendOptions(connections=4, flush_every=1000, flush_interval=60.0, busy_wait=1.0)
    with pytest.raises(SendLogBusy) as raised:
        send_issue(
            SendRequest(project / "issues" / EXAMPLE.name, LIST),
            build=lambda: built,
            open_storage=lambda: SqliteStorage.open(path, busy_seconds=BUSY_SECONDS),
            transport=lambda: box,
            sender=sender(),
            options=options,
            envelope_sender="bounces@example.org",
            templates_dir=project / "templates",
            out_dir=tmp_path / "out",
            hooks=SendHooks(note=notes.append),
        )
    error = raised.value
    assert isinstance(error, StorageBusy)  # what the scheduler and the CLI know
    assert holder.freed.wait(10)  # on its own, after its 4 s
    holder.join()
    sent = [e.recipient for e in box.sent]
    assert len(sent) >= 60
    # Nothing was recorded after the lock came: everything delivered is listed, in order.
    assert error.delivered == sent
    assert error.unrecorded >= len(sent)
    message = str(error)
    assert "database is locked" in message
    assert f"{len(sent)} message(s) went out whose outcome could not be recorded" in message
    assert ", ".join(sent[:LISTED]) + f" and {len(sent) - LISTED} more" in message
    assert sent[LISTED] not in message
    assert "do NOT resend them with --resend-unknown" in message
    assert error.next_step == RESUME_DATABASE
    assert "without --resend-unknown" in RESUME_DATABASE
    # In the log they are still `sending` (the next run shows them as unknown); none
    # of them was recorded as sent, and nothing was lost or sent twice.
    final = counts(path, 1)
    assert states(path, 1, sent) == {"sending"}
    assert final["sent"] == 0 and final["sending"] == error.unrecorded, final
    assert final["sending"] + final["pending"] == 300, final
    assert any("keeps trying to record" in n for n in notes), notes
    # Freeing the send's lock found the database still held: said, not raised instead.
    assert any("the send's lock could not be freed" in n for n in notes), notes


def test_a_busy_database_waits_through_the_injected_sleep(
    tmp_path: Path, built: BuildResult
) -> None:
    """The back-off goes through ``sleep``: a lock outlasting it costs only the store's
    own busy timeouts, and the bound is counted on what was slept."""
    path = tmp_path / "db.sqlite3"
    database(path, 50)
    storage = SqliteStorage.open(path, busy_seconds=0.05)
    send_id = prepare(storage, built.issue_id, LIST).record.id
    slept: list[float] = []
    holder = Holder(path, seconds=60.0)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    box = MemoryTransport()
    hold_after(box, holder, 20)
    run = Campaign(
        storage.send_log,
        send_id,
        MessageTemplate(built.rendered, sender()),
        box,
        SendOptions(connections=2, flush_interval=60.0, busy_wait=20.0),
        envelope_sender="bounces@example.org",
        sleep=sleep,
    )
    started = time.monotonic()
    with pytest.raises(SendLogBusy) as raised:
        asyncio.run(run.run())
    took = time.monotonic() - started
    holder.join()
    storage.close()
    # 0.5, 1, 2, 4, 8, 8... until 20 s in all with the tries: no wall time spent on them.
    assert slept[:4] == [0.5, 1.0, 2.0, 4.0] and max(slept) == 8.0, slept
    assert sum(slept) == pytest.approx(20.0, abs=1.0)
    assert took < 10, took
    assert raised.value.delivered == [e.recipient for e in box.sent]
    assert "this run tried for 20 s" in str(raised.value)
