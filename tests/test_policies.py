"""The campaign's sending policies, in process: the memory transport and a real SQLite send log.

Each test runs ``Campaign(...).run()`` against :class:`MemoryTransport` (or a
transport built on it that fails to connect) over a send frozen in a SQLite
file in tmp_path, and checks the send log's final count in every state, not
only what ``run()`` returned. Where a policy reads the clock, the clock is
injected; the pacer and the reconnect back-off are driven by an injected clock and
sleep, without wall time.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLE, REPO, build_file, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.delivery.campaign import Campaign, RunResult, SendOptions
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.ratelimit import MIN_RATE, Pacer
from newsletter.delivery.sending import prepare
from newsletter.delivery.transports import Envelope, MemoryTransport, Session, Transport
from newsletter.errors import CampaignAborted, ConnectFailed
from newsletter.models import Outcome
from newsletter.storage import Storage, open_storage

SENDER = "bounces@example.org"
# Every deferral halves the pacer's rate (down to 0.5 a second), and the
# campaign's pacer runs on real time: tests with many deferrals start from a
# rate so high that even halved a dozen times it costs no noticeable wait.
FAST_RATE = 1e6
NOON = 1_700_000_000.0  # a fixed "now" for the tests that inject a frozen clock


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> MessageTemplate:
    # Built once for the module: rendering is the slow part, and no test changes it.
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "templates", project / "templates")
    shutil.copytree(REPO / "issues", project / "issues")
    shutil.copy(REPO / "society.yaml", project / "society.yaml")
    return MessageTemplate(
        build_file(project / "issues" / EXAMPLE.name, project).rendered, sender()
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    storage = open_storage(tmp_path / "send.sqlite3", create=True)
    yield storage
    storage.close()


def addresses(n: int) -> list[str]:
    return [f"reader{i:04d}@example.org" for i in range(n)]


def frozen_send(db: Storage, n: int) -> int:
    """Subscribe ``n`` readers and freeze a send of the example issue to them; its id."""
    rows = [ParsedRow(i + 2, e, f"Reader{i}", "Test") for i, e in enumerate(addresses(n))]
    assert db.subscribers.import_rows("research-news", rows, skip_invalid=False).committed
    return prepare(db, "2020-12-23", "research-news").record.id


def final(db: Storage, send_id: int) -> dict[str, int]:
    """The send log's count per state, states with none left out."""
    return {state: n for state, n in db.send_log.counts(send_id).items() if n}


def campaign(
    db: Storage,
    send_id: int,
    template: MessageTemplate,
    transport: Transport,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    **options: Any,
) -> Campaign:
    opts = replace(SendOptions(connections=2, flush_interval=0.01), **options)
    return Campaign(
        db.send_log,
        send_id,
        template,
        transport,
        opts,
        envelope_sender=SENDER,
        clock=clock,
        sleep=sleep,
    )


def in_state(db: Storage, send_id: int, state: str) -> list[str]:
    return [email for email, _ in db.send_log.in_state(send_id, state)]


# ------------------------------------------------------------ the error threshold


def test_deferrals_in_a_row_stop_the_run_with_the_reason(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 20)
    box = MemoryTransport(script=lambda e: Outcome("deferred", 451, "4.7.1 Try again later"))
    run = campaign(
        db, send_id, template, box, connections=1, max_consecutive_errors=5, rate=FAST_RATE
    )
    result = asyncio.run(run.run())
    assert result.stopped == (
        "5 errors in a row, the last: reader0004@example.org: 451 4.7.1 Try again later"
    )
    # The relay's "again" is not the reason saying when to go on: the same command resumes.
    assert not result.stop_says_when
    assert result.attempted == 5 and box.sent == []
    assert run.pacer.rate == FAST_RATE / 2**5  # and each deferral slowed the pace
    # The five are deferred (to be retried by a later run), the rest were never tried.
    assert final(db, send_id) == {"deferred": 5, "pending": 15}
    assert in_state(db, send_id, "deferred") == addresses(5)


def test_a_success_resets_the_count_of_errors_in_a_row(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 20)

    def every_fifth_goes(envelope: Envelope) -> Outcome | None:
        n = int(envelope.recipient[6:10])
        return None if n % 5 == 4 else Outcome("deferred", 451, "busy")  # None: sent

    box = MemoryTransport(script=every_fifth_goes)
    run = campaign(
        db,
        send_id,
        template,
        box,
        connections=1,
        max_consecutive_errors=5,
        retry_delays=(),
        rate=FAST_RATE,
    )
    result = asyncio.run(run.run())
    assert result.stopped is None  # never five in a row: four, then a success
    assert final(db, send_id) == {"sent": 4, "deferred": 16}
    assert sorted(e.recipient for e in box.sent) == in_state(db, send_id, "sent")


# ------------------------------------------------------------ a refused sender


def test_a_refused_sender_aborts_and_only_what_was_sent_is_marked_sent(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 30)

    def refuse_after_seven(envelope: Envelope) -> Outcome | None:
        if len(box.sent) >= 7:
            # What the wire raises on a 5xx to MAIL FROM.
            raise CampaignAborted(
                "the server refused the sender at MAIL FROM: 553 5.7.1 not allowed"
            )
        return None

    box = MemoryTransport(script=refuse_after_seven)
    run = campaign(db, send_id, template, box, connections=3)
    with pytest.raises(CampaignAborted, match="refused the sender at MAIL FROM: 553"):
        asyncio.run(run.run())
    # Exactly the seven the transport took are sent; the refused one and every
    # claimed one went back to pending (not unknown, not left in sending).
    assert final(db, send_id) == {"sent": 7, "pending": 23}
    assert sorted(e.recipient for e in box.sent) == in_state(db, send_id, "sent")
    # A later run picks up where this one stopped, and sends each of the rest once.
    box.script = None
    result = asyncio.run(campaign(db, send_id, template, box).run())
    assert result.stopped is None and result.attempted == 23
    assert final(db, send_id) == {"sent": 30}
    assert sorted(e.recipient for e in box.sent) == addresses(30)


# ------------------------------------------------------------ reconnecting


class FlakyTransport:
    """Memory delivery behind an ``open()`` that fails ``failures`` times first."""

    def __init__(self, failures: int) -> None:
        self.box = MemoryTransport()
        self.failures = failures
        self.opened_at: list[float] = []  # monotonic time of every open()
        self.description = "flaky memory"

    async def open(self) -> Session:
        self.opened_at.append(time.monotonic())
        if len(self.opened_at) <= self.failures:
            raise ConnectFailed("connection refused (test)")
        return await self.box.open()


def test_reconnect_backs_off_longer_each_time_and_the_run_carries_on(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 4)
    flaky = FlakyTransport(failures=2)
    t = FakeTime()
    run = campaign(db, send_id, template, flaky, clock=t.clock, sleep=t.sleep, connections=1)
    started = time.monotonic()
    result = asyncio.run(run.run())
    # The campaign's back-off starts at 0.5 s and doubles, through the injected sleep:
    # two failures wait 0.5 s and 1 s of the test's time, not of the wall's.
    assert t.slept == [0.5, 1.0]
    assert time.monotonic() - started < 1.0
    assert len(flaky.opened_at) == 3  # one session, then reused
    assert result.stopped is None and result.attempted == 4
    assert final(db, send_id) == {"sent": 4}


def test_a_stop_during_the_back_off_ends_the_run_promptly(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 6)
    flaky = FlakyTransport(failures=1000)

    async def scenario() -> tuple[RunResult, float]:
        run = campaign(db, send_id, template, flaky, connections=2)
        asyncio.get_running_loop().call_later(0.1, run.stop, "stopped by the test")
        started = time.monotonic()
        result = await run.run()
        return result, time.monotonic() - started

    result, took = asyncio.run(scenario())
    assert took < 0.4  # not the 0.5 s of the first back-off, let alone the next ones
    assert result.stopped == "stopped by the test" and result.attempted == 0
    assert final(db, send_id) == {"pending": 6}  # the claimed ones released, none lost
    assert flaky.box.sent == []


def test_connections_that_keep_failing_count_as_errors_in_a_row(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 3)
    flaky = FlakyTransport(failures=1000)
    result = asyncio.run(
        campaign(db, send_id, template, flaky, connections=1, max_consecutive_errors=2).run()
    )
    assert result.stopped == (
        "2 errors in a row, the last: cannot connect: connection refused (test)"
    )
    assert len(flaky.opened_at) == 2 and result.attempted == 0
    assert final(db, send_id) == {"pending": 3}


# ------------------------------------------------------------ the max-wait stop


def test_deferred_retries_due_later_than_max_wait_end_the_run(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 5)
    busy = "reader0002@example.org"
    box = MemoryTransport(
        script=lambda e: Outcome("deferred", 451, "greylisted") if e.recipient == busy else None
    )
    run = campaign(
        db, send_id, template, box, clock=lambda: NOON, retry_delays=(1200.0,), max_wait=900.0
    )
    result = asyncio.run(run.run())
    assert result.stopped == (
        "deferred recipients are due for another try in 1200 s, later than a run waits "
        "(NEWSLETTER_SEND_MAX_WAIT, 900 s)"
    )
    assert final(db, send_id) == {"sent": 4, "deferred": 1}
    assert in_state(db, send_id, "deferred") == [busy]
    assert db.send_log.next_retry(send_id) == NOON + 1200.0  # the retry time, from the clock


def test_deferred_retries_due_within_max_wait_are_waited_for(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 5)
    busy = "reader0002@example.org"
    tries: list[str] = []

    def greylist_once(envelope: Envelope) -> Outcome | None:
        tries.append(envelope.recipient)
        if envelope.recipient == busy and tries.count(busy) == 1:
            return Outcome("deferred", 451, "greylisted")
        return None

    box = MemoryTransport(script=greylist_once)
    run = campaign(db, send_id, template, box, retry_delays=(0.1,), max_wait=0.5)
    result = asyncio.run(run.run())
    assert result.stopped is None and result.attempted == 6
    assert tries.count(busy) == 2
    assert final(db, send_id) == {"sent": 5}


# ------------------------------------------------------------ a worker that raises


def test_a_worker_that_raises_ends_the_run_records_what_it_can_and_re_raises(
    db: Storage, template: MessageTemplate
) -> None:
    send_id = frozen_send(db, 20)
    doomed = "reader0005@example.org"

    def bug(envelope: Envelope) -> Outcome | None:
        if envelope.recipient == doomed:
            raise RuntimeError("a bug in the transport")
        if envelope.recipient == "reader0003@example.org":
            return Outcome("rejected", 550, "5.1.1 no such user")
        return None

    box = MemoryTransport(script=bug)
    run = campaign(db, send_id, template, box, connections=2)
    with pytest.raises(RuntimeError, match="a bug in the transport"):
        asyncio.run(run.run())
    counts = final(db, send_id)
    sent = sorted(e.recipient for e in box.sent)
    # Outcomes so far are recorded; the transaction that raised is left in
    # ``sending`` (its fate is unknown: the next run reports it); every other
    # claimed row went back to pending.
    assert in_state(db, send_id, "sent") == sent
    assert in_state(db, send_id, "rejected") == ["reader0003@example.org"]
    assert in_state(db, send_id, "sending") == [doomed]
    assert counts == {"sent": len(sent), "rejected": 1, "sending": 1, "pending": 18 - len(sent)}
    assert len(sent) >= 4  # the ones before the doomed one, at least
    prepare(db, "2020-12-23", "research-news")  # the next run: the doomed one is unknown
    assert in_state(db, send_id, "unknown") == [doomed]


# ------------------------------------------------------------ the pacer, on an injected clock


class FakeTime:
    """A clock and a sleep that moves it: the pacer's waits, without wall time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def paced(t: FakeTime, rate: float | None) -> Pacer:
    return Pacer(rate, clock=t.clock, sleep=t.sleep)


def acquire(pacer: Pacer, times: int) -> None:
    async def go() -> None:
        for _ in range(times):
            await pacer.acquire()

    asyncio.run(go())


def test_without_a_rate_or_cap_the_pacer_never_waits() -> None:
    t = FakeTime()
    pacer = paced(t, None)
    assert not pacer.active
    acquire(pacer, 100)
    assert t.slept == [] and t.now == 1000.0


def test_the_token_bucket_spaces_messages_at_the_rate() -> None:
    t = FakeTime()
    pacer = paced(t, 4.0)
    acquire(pacer, 5)
    # One token to start, then one every quarter of a second.
    assert t.slept == [0.25, 0.25, 0.25, 0.25]
    assert t.now == 1001.0


def test_an_idle_bucket_fills_up_to_one_second_of_messages_and_no_more() -> None:
    t = FakeTime()
    pacer = paced(t, 4.0)
    acquire(pacer, 1)
    t.now += 60  # a minute idle: the bucket holds at most max(1, rate) tokens
    acquire(pacer, 6)
    assert t.slept == [0.25, 0.25]  # four at once, then the rate again


def test_a_slow_rate_waits_whole_seconds() -> None:
    t = FakeTime()
    pacer = paced(t, 0.5)
    acquire(pacer, 3)
    assert t.slept == [2.0, 2.0]


def test_slow_down_halves_the_rate_down_to_the_floor() -> None:
    t = FakeTime()
    pacer = paced(t, 8.0)
    pacer.slow_down()
    assert pacer.rate == 4.0
    acquire(pacer, 3)
    assert t.slept == [0.25, 0.25]  # the new rate is what the bucket uses
    for _ in range(10):
        pacer.slow_down()
    assert pacer.rate == MIN_RATE


def test_went_well_creeps_back_to_the_configured_rate_and_no_further() -> None:
    t = FakeTime()
    pacer = paced(t, 10.0)
    pacer.went_well()
    assert pacer.rate == 10.0  # at the limit: nothing to recover
    pacer.slow_down()
    pacer.slow_down()
    assert pacer.rate == 2.5
    pacer.went_well()
    assert pacer.rate == pytest.approx(2.9)  # a tenth of the limit, over the current rate
    steps = 1
    while pacer.rate != 10.0:
        pacer.went_well()
        steps += 1
        assert pacer.rate is not None and pacer.rate <= 10.0
    assert 10 < steps < 500  # gradual (additive), not at once


def test_slowing_an_unlimited_pacer_limits_it_until_it_recovers() -> None:
    t = FakeTime()
    pacer = paced(t, None)
    pacer.slow_down()
    assert pacer.rate == 25.0 and pacer.active
    acquire(pacer, 3)
    assert t.slept == [pytest.approx(0.04), pytest.approx(0.04)]
    while pacer.rate is not None:
        pacer.went_well()
    assert not pacer.active  # back to no limit
