"""The campaign's store calls run in one thread: slow commits do not stall SMTP sessions.

A real SQLite send log in tmp_path, wrapped so that each commit (claim, record,
release) first sleeps, as a database across a network or a slow disk would; a
transport that keeps every envelope in memory and spends a few ms per message,
as a relay does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import EXAMPLE, build_file, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.delivery.campaign import Campaign, RunResult, SendLogFailed, SendOptions
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.sending import prepare
from newsletter.delivery.transports import Envelope, MemoryTransport, Session
from newsletter.errors import StorageUnavailable
from newsletter.models import Outcome
from newsletter.storage.caps import Caps, Claim
from newsletter.storage.sqlite import SqliteStorage
from newsletter.storage.sqlite.send_log import SendLog

CONNECTIONS = 8
# The campaign's bounds on the rows a run holds in `sending` (its module docstring).
WINDOW = 2 * CONNECTIONS + SendOptions().flush_every  # quick commits: as before the thread
WIDEST = 10 * CONNECTIONS + SendOptions().flush_every // 2  # slow commits


class Broken(Exception):
    """What a store that fails raises (a disk gone, a lost connection)."""


class SlowLog(SendLog):
    """The real send log; each commit waits ``delay`` first, and every call is checked:
    one thread at a time, never the event loop's, and the `sending` rows within the window."""

    def __init__(self, conn: sqlite3.Connection, delay: float) -> None:
        super().__init__(conn)
        self.delay = delay
        self.threads: set[str] = set()
        self.most_sending = 0
        self.fail: str | None = None  # a method that raises Broken
        self.fail_once = False
        self.fail_with: Callable[[str], Exception] = Broken
        self.during_commit: Callable[[], None] | None = None  # called in the thread
        self._busy = threading.Lock()

    def _commit(self, name: str) -> None:
        assert self._busy.acquire(blocking=False), "two threads in the store at once"
        self.threads.add(threading.current_thread().name)
        try:
            if self.during_commit is not None:
                self.during_commit()
            if self.fail == name:
                if self.fail_once:
                    self.fail = None
                raise self.fail_with(f"{name} failed")
            time.sleep(self.delay)
        finally:
            self._busy.release()

    def claim(
        self, send_id: int, limit: int, now: float, *, holder: str = "", caps: Caps | None = None
    ) -> Claim:
        self._commit("claim")
        claimed = super().claim(send_id, limit, now, holder=holder, caps=caps)
        sending = self.counts(send_id)["sending"]
        self.most_sending = max(self.most_sending, sending)
        return claimed

    def record(
        self, send_id: int, outcomes: Iterable[tuple[int, Outcome]], *, holder: str = ""
    ) -> None:
        self._commit("record")
        super().record(send_id, outcomes, holder=holder)

    def release(self, send_id: int, seqs: Iterable[int], *, holder: str = "") -> None:
        self._commit("release")
        super().release(send_id, seqs, holder=holder)


@dataclass(slots=True)
class RelayTransport:
    """A relay that takes ``seconds`` per message; every envelope is kept in ``box``."""

    seconds: float
    box: MemoryTransport = field(default_factory=MemoryTransport)
    before_send: Callable[[Envelope], None] | None = None
    description: str = "a relay in memory"

    async def open(self) -> Session:
        return _RelaySession(self, await self.box.open())


@dataclass(slots=True)
class _RelaySession:
    relay: RelayTransport
    inner: Session

    @property
    def usable(self) -> bool:
        return self.inner.usable

    async def send(self, envelope: Envelope) -> Outcome:
        if self.relay.before_send is not None:
            self.relay.before_send(envelope)
        await asyncio.sleep(self.relay.seconds)
        return await self.inner.send(envelope)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> MessageTemplate:
    import shutil

    from conftest import REPO

    project = tmp_path_factory.mktemp("project")
    for folder in ("templates", "issues"):
        shutil.copytree(REPO / folder, project / folder)
    shutil.copy(REPO / "society.yaml", project / "society.yaml")
    built = build_file(project / "issues" / EXAMPLE.name, project)
    return MessageTemplate(built.rendered, sender())


def send_log(path: Path, recipients: int, delay: float) -> tuple[SlowLog, int]:
    storage = SqliteStorage.open(path, create=True)
    rows = [
        ParsedRow(i + 2, f"reader{i:05d}@example.org", "Reader", "Test") for i in range(recipients)
    ]
    assert storage.subscribers.import_rows("research-news", rows, skip_invalid=False).committed
    prepared = prepare(storage, "2020-12-23", "research-news")
    # The real SQLite send log on the same connection, made slow to commit.
    return SlowLog(storage.conn, delay), prepared.record.id


def campaign(
    log: SlowLog, send_id: int, template: MessageTemplate, relay: RelayTransport
) -> Campaign:
    options = SendOptions(connections=CONNECTIONS)
    return Campaign(log, send_id, template, relay, options, envelope_sender="b@example.org")


def send_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("send-log")]


def test_a_slow_commit_does_not_lower_the_smtp_rate_in_proportion(
    tmp_path: Path, template: MessageTemplate
) -> None:
    rates: dict[float, RunResult] = {}
    for delay, bound in ((0.0, WINDOW), (0.05, WIDEST)):
        log, send_id = send_log(tmp_path / f"{delay}.sqlite3", 800, delay)
        # 20 ms a message: a relay across the internet (8 connections, ~350 msg/s).
        relay = RelayTransport(seconds=0.02)
        rates[delay] = asyncio.run(campaign(log, send_id, template, relay).run())
        assert rates[delay].counts["sent"] == 800
        assert len({e.recipient for e in relay.box.sent}) == 800
        # Only the log thread called the store during the run, and the window held.
        assert log.threads and all(name.startswith("send-log") for name in log.threads)
        assert 0 < log.most_sending <= bound
    ratio = rates[0.05].rate / rates[0.0].rate
    # With the store called in the loop, each 50 ms commit stopped all 8 sessions,
    # for about 6 messages per claim commit: 117 against 360 msg/s, a ratio of 0.33
    # (measured with benchmarks/bench_slow_commit.py --against). Here about 0.83;
    # loose, for a busy machine.
    assert ratio > 0.5, f"{rates[0.05].rate:.0f} vs {rates[0.0].rate:.0f} msg/s"
    assert not send_threads()


@pytest.mark.parametrize("failing", ["claim", "record"])
def test_a_store_error_in_the_thread_ends_the_run_with_it(
    tmp_path: Path, template: MessageTemplate, failing: str
) -> None:
    log, send_id = send_log(tmp_path / "db.sqlite3", 200, 0.0)
    relay = RelayTransport(seconds=0.001)
    run = campaign(log, send_id, template, relay)
    sent = 0

    def count(envelope: Envelope) -> None:
        nonlocal sent
        sent += 1
        if sent == 50:
            log.fail = failing

    relay.before_send = count
    with pytest.raises(Broken, match=f"{failing} failed"):
        asyncio.run(run.run())
    assert not send_threads()
    log.fail = None
    counts = log.counts(send_id)
    # What was sent is sent or still in doubt; nothing was skipped or sent twice.
    assert counts["sent"] + counts["sending"] + counts["pending"] == 200
    assert counts["sent"] + counts["sending"] >= len(relay.box.sent) >= counts["sent"]
    assert counts["sending"] <= WIDEST


def test_a_store_that_fails_lets_the_messages_in_flight_finish_and_names_them(
    tmp_path: Path, template: MessageTemplate
) -> None:
    """A database that fails for good (a full disk): no worker is cut off mid-message, the
    run ends with SendLogFailed, and every delivery it could not record is named."""
    log, send_id = send_log(tmp_path / "db.sqlite3", 300, 0.0)
    relay = RelayTransport(seconds=0.003)
    run = campaign(log, send_id, template, relay)
    log.fail_with = StorageUnavailable

    def fail_after_100(envelope: Envelope) -> None:
        if len(relay.box.sent) >= 100:
            log.fail = "record"  # every flush from now on

    relay.before_send = fail_after_100
    with pytest.raises(SendLogFailed) as raised:
        asyncio.run(run.run())
    assert not send_threads()
    error = raised.value
    assert isinstance(error, StorageUnavailable)
    log.fail = None
    counts = log.counts(send_id)
    sent = [e.recipient for e in relay.box.sent]
    # What the log has as sent plus what the error names is every delivery, once;
    # nothing is left in flight but what the error counts.
    recorded = {email for email, _ in log.in_state(send_id, "sent")}
    assert set(error.delivered) == set(sent) - recorded and len(error.delivered) > 0
    assert counts["sent"] + len(error.delivered) == len(sent)
    assert counts["sending"] == error.unrecorded, (counts, error.unrecorded)
    assert counts["sent"] + counts["sending"] + counts["pending"] == 300
    message = str(error)
    assert message.startswith("record failed. It stopped, and ")
    assert f"{len(error.delivered)} message(s) went out whose outcome could not be " in message
    assert "do NOT resend them with --resend-unknown" in message


def test_a_failed_flush_keeps_its_outcomes_for_the_last_one(
    tmp_path: Path, template: MessageTemplate
) -> None:
    log, send_id = send_log(tmp_path / "db.sqlite3", 300, 0.01)
    relay = RelayTransport(seconds=0.002)
    run = campaign(log, send_id, template, relay)

    armed = []

    def fail_after_100(envelope: Envelope) -> None:
        # At or past 100 (with 8 connections the count can step over 100 between
        # two calls), once.
        if len(relay.box.sent) >= 100 and not armed:
            armed.append(True)
            log.fail, log.fail_once = "record", True

    relay.before_send = fail_after_100
    with pytest.raises(Broken, match="record failed"):
        asyncio.run(run.run())
    counts = log.counts(send_id)
    # The batch that failed was written by the run's last flush, with every outcome
    # that came after it: only the messages cut off mid-transaction are in doubt.
    assert counts["sent"] == len(relay.box.sent) >= 100
    assert counts["sending"] <= CONNECTIONS
    assert counts["sent"] + counts["sending"] + counts["pending"] == 300
    assert not send_threads()


def test_a_stop_during_a_slow_commit_releases_and_records_everything(
    tmp_path: Path, template: MessageTemplate
) -> None:
    path = tmp_path / "db.sqlite3"
    log, send_id = send_log(path, 400, 0.05)
    relay = RelayTransport(seconds=0.005)
    run = campaign(log, send_id, template, relay)
    reader = sqlite3.connect(path)
    loop: asyncio.AbstractEventLoop | None = None
    commits = 0

    def committed_sending_first(envelope: Envelope) -> None:
        # Committed before the message goes: another connection sees it in `sending`.
        state = reader.execute(
            "SELECT state FROM deliveries WHERE send_id = ? AND email = ?",
            (send_id, envelope.recipient),
        ).fetchone()
        assert state == ("sending",), envelope.recipient

    def stop_in_the_fifth_commit() -> None:
        nonlocal commits
        commits += 1
        if commits == 5:
            assert loop is not None
            loop.call_soon_threadsafe(run.stop, "stopped by the test")

    async def go() -> RunResult:
        nonlocal loop
        loop = asyncio.get_running_loop()
        return await run.run()

    relay.before_send = committed_sending_first
    log.during_commit = stop_in_the_fifth_commit
    result = asyncio.run(go())
    assert result.stopped == "stopped by the test"
    counts = log.counts(send_id)
    assert counts["sending"] == 0
    assert 0 < counts["sent"] == len(relay.box.sent) == result.attempted < 400
    assert counts["sent"] + counts["pending"] == 400
    assert not send_threads()
    reader.close()


def test_a_cancelled_run_ends_its_thread_and_releases_the_queue(
    tmp_path: Path, template: MessageTemplate
) -> None:
    log, send_id = send_log(tmp_path / "db.sqlite3", 400, 0.02)
    relay = RelayTransport(seconds=0.005)
    run = campaign(log, send_id, template, relay)

    async def go() -> None:
        task = asyncio.create_task(run.run())
        while len(relay.box.sent) < 60:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert not send_threads()
    counts = log.counts(send_id)
    # Only the messages cut off mid-transaction stay in doubt; the queue went back.
    assert counts["sending"] <= CONNECTIONS
    assert counts["sent"] + counts["sending"] + counts["pending"] == 400
    assert counts["sent"] >= 60
