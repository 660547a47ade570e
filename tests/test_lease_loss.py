"""A send whose lease another run takes: it stops claiming, records what was in flight, says so.

In process, on a real SQLite file: the send use case (delivery.send_issue) with a
memory transport that waits as a relay does, and a lease of 0.4 s (renewed every
0.1 s). The other run's takeover is written into the locks table with sqlite3,
as a run on another machine would take a lease that had run out. A lease taken
while the run waits for deferred retries is noticed within seconds too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import EXAMPLE, build_file, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.build import BuildResult
from newsletter.delivery.campaign import GUARD_EVERY, Campaign, Progress, SendOptions
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.send_issue import SendHooks, SendRequest, send_issue
from newsletter.delivery.sending import prepare, run_send
from newsletter.delivery.transports import Envelope, MemoryTransport
from newsletter.errors import LeaseLost
from newsletter.models import Outcome
from newsletter.storage.sqlite import SqliteStorage

LIST = "research-news"
AUDIENCE = 200
OPTIONS = SendOptions(connections=2, flush_interval=0.01)


def _database(path: Path) -> None:
    storage = SqliteStorage.open(path, create=True)
    rows = [
        ParsedRow(i + 2, f"reader{i:04d}@example.org", "Reader", "Test") for i in range(AUDIENCE)
    ]
    assert storage.subscribers.import_rows(LIST, rows, skip_invalid=False).committed
    storage.close()


def _counts(path: Path) -> dict[str, int]:
    storage = SqliteStorage.open(path)
    try:
        record = storage.send_log.find("2020-12-23", LIST)
        assert record is not None
        return storage.send_log.counts(record.id)
    finally:
        storage.close()


def test_a_send_whose_lease_is_taken_stops_and_records_what_was_in_flight(
    project: Path, tmp_path: Path
) -> None:
    path = tmp_path / "db.sqlite3"
    _database(path)
    built = build_file(project / "issues" / EXAMPLE.name, project)
    relay = MemoryTransport(delay=0.01)  # 2 connections: ~200 messages a second
    name = f"send:{built.issue_id}:{LIST}"
    taken = []

    def progress(p: Progress) -> None:
        if p.done == 10 and not taken:
            # Another run takes the lease (as if ours had run out): the next
            # renewal, within 0.1 s, finds it gone.
            other = sqlite3.connect(path, isolation_level=None)
            other.execute(
                "UPDATE locks SET owner = 'elsewhere:4242:1', expires = ? WHERE name = ?",
                (time.time() + 60, name),
            )
            other.close()
            taken.append(p.done)

    campaigns: list[Campaign] = []
    with pytest.raises(LeaseLost) as lost:
        send_issue(
            SendRequest(project / "issues" / EXAMPLE.name, LIST),
            build=lambda: built,
            open_storage=lambda: SqliteStorage.open(path),
            transport=lambda: relay,
            sender=sender(),
            options=OPTIONS,
            envelope_sender="bounces@example.org",
            templates_dir=project / "templates",
            out_dir=tmp_path / "out",
            hooks=SendHooks(on_start=campaigns.append, on_progress=progress),
            lease_ttl=0.4,
        )
    assert taken, "the takeover never happened"
    sent = len(relay.sent)
    assert 10 <= sent < AUDIENCE, f"the run did not stop: {sent} of {AUDIENCE} went out"
    counts = _counts(path)
    # Every message that went out is recorded; the unstarted are pending again; no row
    # is left `sending` (what was in flight finished and was recorded).
    assert counts["sent"] == sent, counts
    assert counts["sending"] == 0, counts
    assert counts["pending"] == AUDIENCE - sent, counts
    assert counts["unknown"] == counts["deferred"] == counts["rejected"] == 0, counts
    message = str(lost.value)
    assert f"this run lost the {name!r} lock to process 4242 on elsewhere" in message
    assert f"this run made {sent} attempt(s)" in message
    assert f"{sent} sent, 0 rejected, 0 deferred, 0 unknown and {AUDIENCE - sent} pending" in (
        message
    )
    assert "Run the same command again to resume once the other run is done" in message
    assert lost.value.exit_code != 0
    assert campaigns[0].progress.done == sent
    # The other run's lease is left alone.
    check = sqlite3.connect(path)
    assert check.execute("SELECT owner FROM locks WHERE name = ?", (name,)).fetchone() == (
        "elsewhere:4242:1",
    )
    check.close()


def test_the_campaign_asks_its_guard_before_each_claim_and_message(
    project: Path, tmp_path: Path
) -> None:
    path = tmp_path / "db.sqlite3"
    _database(path)
    built: BuildResult = build_file(project / "issues" / EXAMPLE.name, project)
    template = MessageTemplate(built.rendered, sender())
    storage = SqliteStorage.open(path)
    relay = MemoryTransport(delay=0.005)
    asked = [0]

    def guard() -> str | None:
        asked[0] += 1
        return "process 7 on elsewhere" if len(relay.sent) >= 25 else None

    prepared = prepare(storage, built.issue_id, LIST)
    report = asyncio.run(
        run_send(
            storage,
            prepared,
            template,
            relay,
            OPTIONS,
            envelope_sender="bounces@example.org",
            guard=guard,
        )
    )
    result = report.result
    assert result.lost == "process 7 on elsewhere"
    assert result.stopped == "another run (process 7 on elsewhere) took this send's lock"
    sent = len(relay.sent)
    # At most one message per connection was under way when the guard answered.
    assert 25 <= sent <= 25 + OPTIONS.connections
    assert result.counts["sent"] == sent and result.counts["sending"] == 0
    assert result.counts["pending"] == AUDIENCE - sent
    assert asked[0] >= sent  # asked before every message started
    storage.close()


def _defer_first_try_of(email: str) -> Callable[[Envelope], Outcome | None]:
    """A relay's script: ``email``'s first attempt is deferred, every other one goes."""
    tried: list[str] = []

    def script(envelope: Envelope) -> Outcome | None:
        if envelope.recipient == email and email not in tried:
            tried.append(email)
            return Outcome("deferred", 451, "4.7.1 try again later")
        return None

    return script


def test_a_lease_taken_while_the_run_waits_for_retries_is_noticed_within_seconds(
    project: Path, tmp_path: Path
) -> None:
    path = tmp_path / "db.sqlite3"
    _database(path)
    built = build_file(project / "issues" / EXAMPLE.name, project)
    relay = MemoryTransport(delay=0.002, script=_defer_first_try_of("reader0000@example.org"))
    name = f"send:{built.issue_id}:{LIST}"
    taken: list[float] = []

    def progress(p: Progress) -> None:
        if p.done == AUDIENCE and not taken:
            # Everyone has an outcome: the run now waits 60 s for the deferred one (up
            # to NEWSLETTER_SEND_MAX_WAIT, 900 s). Another run takes the lease meanwhile.
            other = sqlite3.connect(path, isolation_level=None)
            other.execute(
                "UPDATE locks SET owner = 'elsewhere:4242:1', expires = ? WHERE name = ?",
                (time.time() + 600, name),
            )
            other.close()
            taken.append(time.monotonic())

    options = replace(OPTIONS, retry_delays=(60.0,), rate=1e6)
    with pytest.raises(LeaseLost) as lost:
        send_issue(
            SendRequest(project / "issues" / EXAMPLE.name, LIST),
            build=lambda: built,
            open_storage=lambda: SqliteStorage.open(path),
            transport=lambda: relay,
            sender=sender(),
            options=options,
            envelope_sender="bounces@example.org",
            templates_dir=project / "templates",
            out_dir=tmp_path / "out",
            hooks=SendHooks(on_progress=progress),
            lease_ttl=0.4,
        )
    noticed = time.monotonic() - taken[0]
    # The renewal (every 0.1 s) finds it taken; the wait asks the guard every second.
    assert noticed < 1.0 + GUARD_EVERY + 1.0, f"noticed after {noticed:.1f} s"
    counts = _counts(path)
    assert counts["sent"] == AUDIENCE - 1 and counts["deferred"] == 1, counts
    assert counts["sending"] == 0, counts
    assert "1 deferred" in str(lost.value)


class _FakeTime:
    """A clock, and a sleep that moves it: the campaign's waits without wall time."""

    def __init__(self) -> None:
        # Not the epoch's 1.7e9: the pacer's waits after a deferral can be 1e-7 s,
        # which a float that large cannot add (the clock would never move).
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def test_the_wait_for_retries_asks_the_guard_through_the_injected_sleep(
    project: Path, tmp_path: Path
) -> None:
    path = tmp_path / "db.sqlite3"
    _database(path)
    built = build_file(project / "issues" / EXAMPLE.name, project)
    storage = SqliteStorage.open(path)
    prepared = prepare(storage, built.issue_id, LIST)
    fake = _FakeTime()
    relay = MemoryTransport(script=_defer_first_try_of("reader0000@example.org"))
    asked: list[float] = []

    def guard() -> str | None:
        asked.append(fake.now)
        return None

    run = Campaign(
        storage.send_log,
        prepared.record.id,
        MessageTemplate(built.rendered, sender()),
        relay,
        replace(OPTIONS, retry_delays=(600.0,)),
        envelope_sender="bounces@example.org",
        clock=fake.clock,
        sleep=fake.sleep,
        guard=guard,
    )
    started = time.monotonic()
    result = asyncio.run(run.run())
    assert time.monotonic() - started < 10  # not the 600 s of the retry delay
    assert result.counts["sent"] == AUDIENCE and result.stopped is None, result
    assert len(relay.sent) == AUDIENCE
    # The wait (600 s less the few the pacer spent after the deferral) went by in slices
    # of GUARD_EVERY, with the guard asked before each.
    waits = [s for s in fake.slept if s == GUARD_EVERY]
    assert len(waits) >= 550
    assert fake.now >= 1000.0 + 600.0
    assert len(asked) >= AUDIENCE + len(waits)
    storage.close()
