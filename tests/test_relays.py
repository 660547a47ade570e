"""Several relays (NEWSLETTER_SMTP_RELAYS): two real SMTP servers, one failing part-way.

Every test counts what each server received: the union is the list, nobody twice,
and the send log agrees.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE, build_file, run_cli, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.delivery.campaign import SendOptions
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.sending import SendReport, prepare, run_send
from newsletter.delivery.transports import Relay, RelayPool, SmtpConfig, SmtpTransport
from newsletter.errors import CampaignAborted, ConfigError
from newsletter.settings import load_settings
from newsletter.storage.sqlite import SqliteStorage
from smtp_server import Server

FAST = SendOptions(connections=4, retry_delays=(0.05, 0.05, 0.05), max_wait=5, flush_interval=0.01)


@pytest.fixture
def a() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture
def b() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture
def template(project: Path) -> MessageTemplate:
    return MessageTemplate(
        build_file(project / "issues" / EXAMPLE.name, project).rendered, sender()
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteStorage]:
    storage = SqliteStorage.open(tmp_path / "test.sqlite3", create=True)
    yield storage
    storage.close()


def subscribe(db: SqliteStorage, n: int) -> list[str]:
    emails = [f"reader{i:04d}@example.org" for i in range(n)]
    rows = [ParsedRow(i + 2, e, f"Reader{i}", "Test") for i, e in enumerate(emails)]
    assert db.subscribers.import_rows("research-news", rows, skip_invalid=False).committed
    return emails


def relay(server: Server, **kw: object) -> Relay:
    smtp = SmtpTransport(SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=5))
    return Relay(smtp, **kw)  # type: ignore[arg-type]


def send(db: SqliteStorage, template: MessageTemplate, pool: RelayPool) -> SendReport:
    prepared = prepare(db, "2020-12-23", "research-news")
    options = SendOptions(
        connections=pool.connections,
        retry_delays=FAST.retry_delays,
        max_wait=FAST.max_wait,
        flush_interval=FAST.flush_interval,
    )
    return asyncio.run(
        run_send(db, prepared, template, pool, options, envelope_sender="bounces@example.org")
    )


def got(server: Server) -> list[str]:
    return [r.rcpt_tos[0] for r in server.handler.received]


def each_once(emails: list[str], *servers: Server) -> None:
    """Every recipient got exactly one message, from one of the servers."""
    everything = [e for s in servers for e in got(s)]
    assert sorted(everything) == emails


def test_a_relay_that_goes_down_part_way_hands_its_share_to_the_other(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 60)
    a.handler.behaviour.down_after = 10  # then: new connections refused, 421 on the others
    pool = RelayPool([relay(a, connections=2), relay(b, connections=2)])
    report = send(db, template, pool)
    c = report.result.counts
    assert (c["sent"], c["deferred"], c["unknown"], c["pending"]) == (60, 0, 0, 0)
    each_once(emails, a, b)
    # A message under way on its other connection as it went down may still finish there.
    down_at = len(got(a))
    assert 10 <= down_at <= 11 and len(got(b)) == 60 - down_at  # its share moved
    assert sorted(e for e, _ in db.send_log.in_state(report.record.id, "sent")) == emails
    first, second = pool.report()
    assert (first.sent, second.sent) == (down_at, 60 - down_at)
    assert not first.in_use and first.events[0].kind == "out" and second.events == ()
    # Its 421s were handed to the other relay at once: nobody waited for a retry.
    assert first.handed_on >= 1 and first.deferred == 0


def test_a_relay_that_keeps_answering_451_is_left_and_its_deferred_go_elsewhere(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 40)
    a.handler.behaviour.defer_after = 5
    pool = RelayPool([relay(a, connections=2), relay(b, connections=2)])
    report = send(db, template, pool)
    c = report.result.counts
    assert (c["sent"], c["deferred"], c["unknown"]) == (40, 0, 0)
    each_once(emails, a, b)
    assert len(got(a)) == 5 and len(got(b)) == 35
    first, second = pool.report()
    # A few were deferred before it was left; the campaign retried them (through b).
    assert 3 <= first.deferred <= 3 + 2 and first.events[0].kind == "out"
    assert "451 4.3.0" in first.events[0].detail and second.sent == 35
    retried = [e for e, _ in db.send_log.in_state(report.record.id, "sent") if got(b).count(e)]
    assert len(retried) == 35


def test_a_relay_that_comes_back_is_used_again(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 120)
    a.handler.behaviour.down_after = 5
    back: list[float] = []

    def bring_it_back() -> None:
        deadline = time.monotonic() + 20
        while not a.handler.behaviour.down and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        a.come_back()
        back.append(time.monotonic())

    helper = threading.Thread(target=bring_it_back)
    helper.start()
    # b's rate keeps the send going long enough to see a come back (about 2 s).
    pool = RelayPool(
        [relay(a, connections=2), relay(b, connections=2, rate=50)], backoff=(0.2, 0.4)
    )
    report = send(db, template, pool)
    helper.join()
    assert report.result.counts["sent"] == 120
    each_once(emails, a, b)
    after = [r for r in a.handler.received if r.at > back[0]]
    assert len(after) > 5, "the relay that came back took messages again"
    kinds = [e.kind for e in pool.report()[0].events]
    assert kinds[0] == "out" and kinds[-1] == "back" and pool.report()[0].in_use


def test_weights_split_the_load_as_set(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 80)
    pool = RelayPool([relay(a, weight=3, connections=3), relay(b, weight=1, connections=1)])
    report = send(db, template, pool)
    assert report.result.counts["sent"] == 80
    each_once(emails, a, b)
    assert 54 <= len(got(a)) <= 66 and 14 <= len(got(b)) <= 26
    # Connections are kept from one message to the next, not opened for each.
    assert a.handler.connections <= 3 + 1 and b.handler.connections <= 1 + 1


def test_a_standby_relay_is_used_only_while_the_others_are_out(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 30)
    a.handler.behaviour.down_after = 10
    pool = RelayPool([relay(a, connections=2), relay(b, weight=0, connections=2)])
    report = send(db, template, pool)
    assert report.result.counts["sent"] == 30
    each_once(emails, a, b)
    assert 10 <= len(got(a)) <= 11 and len(got(b)) == 30 - len(got(a))
    tenth = sorted(r.at for r in a.handler.received)[9]
    assert min(r.at for r in b.handler.received) > tenth  # not before a went down


def test_a_relays_own_rate_is_kept(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 40)
    pool = RelayPool([relay(a, rate=10, connections=2), relay(b, connections=2)])
    report = send(db, template, pool)
    assert report.result.counts["sent"] == 40
    each_once(emails, a, b)
    times = sorted(r.at for r in a.handler.received)
    assert len(times) == 20
    # 20 messages at 10 a second: about 1.9 s from the first to the last (generous bounds).
    span = times[-1] - times[0]
    assert span >= 1.2, f"20 messages in {span:.2f} s is faster than 10/s"
    assert (len(times) - 1) / span <= 10 * 1.5


def test_no_relay_reachable_is_a_connection_failure_and_nothing_is_lost(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 10)
    a.go_down()
    b.go_down()
    pool = RelayPool([relay(a, connections=1), relay(b, connections=1)])
    prepared = prepare(db, "2020-12-23", "research-news")
    options = SendOptions(connections=2, max_consecutive_errors=4, flush_interval=0.01)
    report = asyncio.run(
        run_send(db, prepared, template, pool, options, envelope_sender="bounces@example.org")
    )
    assert report.result.stopped is not None and "cannot connect" in report.result.stopped
    assert report.result.counts["pending"] == 10 and report.result.attempted == 0
    # Later, with a relay back, the same send goes on and everyone gets it once.
    b.come_back()
    again = send(db, template, RelayPool([relay(a, connections=1), relay(b, connections=1)]))
    assert again.result.counts["sent"] == 10
    each_once(emails, a, b)


def test_a_relay_that_refuses_the_sender_is_left_and_the_others_carry_the_send(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 20)
    b.handler.behaviour.refuse_sender_after = 0
    pool = RelayPool([relay(a, connections=1), relay(b, connections=1)])
    report = send(db, template, pool)
    assert report.result.counts["sent"] == 20 and got(b) == []
    each_once(emails, a, b)
    (_, refused) = pool.report()
    assert [e.kind for e in refused.events] == ["refused"]
    assert "the server refused the sender" in refused.events[0].detail


def test_when_every_relay_refuses_the_sender_the_send_stops_naming_the_last(
    db: SqliteStorage, template: MessageTemplate, a: Server, b: Server
) -> None:
    emails = subscribe(db, 20)
    a.handler.behaviour.refuse_sender_after = 3
    b.handler.behaviour.refuse_sender_after = 0
    pool = RelayPool([relay(a, connections=1), relay(b, connections=1)])
    with pytest.raises(CampaignAborted) as caught:
        send(db, template, pool)
    assert "the server refused the sender" in str(caught.value)
    record = db.send_log.find("2020-12-23", "research-news")
    assert record is not None
    counts = db.send_log.counts(record.id)
    assert counts["sent"] == len(got(a)) == 3 and counts["unknown"] == 0 and got(b) == []
    assert counts["sent"] + counts["pending"] == len(emails)


# -- the command line ---------------------------------------------------------------------


def relays_env(project: Path, *relays: dict[str, object]) -> dict[str, str]:
    return {
        "NEWSLETTER_DATABASE": str(project / "newsletter.sqlite3"),
        "NEWSLETTER_SECRET_KEY": "test-secret-for-the-suite-0123456789",
        "NEWSLETTER_SMTP_RELAYS": json.dumps(list(relays)),
    }


def test_send_through_two_relays_one_going_down(project: Path, a: Server, b: Server) -> None:
    emails = [f"reader{i:05d}@example.org" for i in range(30)]
    (project / "subs.csv").write_text("email\n" + "\n".join(emails) + "\n", encoding="utf-8")
    env = relays_env(
        project,
        {"host": "127.0.0.1", "port": a.port, "security": "none", "connections": 2,
         "password": "do-not-print-me"},
        {"host": "127.0.0.1", "port": b.port, "security": "none", "connections": 2, "weight": 2},
    )  # fmt: skip
    imported = run_cli("subscribers", "import", "subs.csv", "--list", "research-news",
                       cwd=project, env=env)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    a.handler.behaviour.down_after = 4
    sent = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"via 2 relays: 127.0.0.1:{a.port} (none) (weight 1)" in sent.stdout
    assert re.search(r"sent 30, rejected 0, deferred 0, unknown 0", sent.stdout)
    each_once(emails, a, b)
    down_at = len(got(a))
    assert 4 <= down_at <= 5 and len(got(b)) == 30 - down_at
    line = next(x for x in sent.stdout.splitlines() if x.startswith("relay [0]"))
    assert f"relay [0] 127.0.0.1:{a.port} (weight 1): {down_at} sent" in line
    assert re.search(r"out of use at \d{4}-\d\d-\d\d [\d:]+ UTC \(3 failures in a row", line)
    assert f"relay [1] 127.0.0.1:{b.port} (weight 2): {30 - down_at} sent" in sent.stdout
    assert "do-not-print-me" not in sent.stdout + sent.stderr
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert re.search(r"sent\s+30", status.stdout)


def test_a_test_copy_goes_through_a_relay_that_answers(project: Path, a: Server, b: Server) -> None:
    a.go_down()
    env = relays_env(
        project,
        {"host": "127.0.0.1", "port": a.port, "security": "none", "weight": 5},
        {"host": "127.0.0.1", "port": b.port, "security": "none"},
    )
    copy = run_cli("send", f"issues/{EXAMPLE.name}", "--to", "editor@example.org",
                   cwd=project, env=env)  # fmt: skip
    assert copy.returncode == 0, copy.stdout + copy.stderr
    assert "test copy to editor@example.org: sent 250" in copy.stdout
    assert got(a) == [] and got(b) == ["editor@example.org"]


def test_relay_settings_errors_name_the_relay_and_field_all_at_once(project: Path) -> None:
    env = relays_env(
        project,
        {"host": "smtp.example.org", "port": "x", "rat": 3, "password": "do-not-print-me"},
        {"port": 25, "security": "ssl"},
        {"host": "ok.example.org", "weight": -1, "connections": 0},
    )
    result = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    said = result.stderr
    for expected in (
        "NEWSLETTER_SMTP_RELAYS[0].port: Input should be a valid integer",
        "NEWSLETTER_SMTP_RELAYS[0].rat: is not a known field; did you mean rate?",
        "NEWSLETTER_SMTP_RELAYS[1].host: is required",
        "NEWSLETTER_SMTP_RELAYS[1].security: Input should be 'starttls', 'tls' or 'none'",
        "NEWSLETTER_SMTP_RELAYS[2].weight: Input should be greater than or equal to 0",
        "NEWSLETTER_SMTP_RELAYS[2].connections: Input should be greater than or equal to 1",
    ):
        assert expected in said, said
    assert "do-not-print-me" not in said + result.stdout


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[{host: 1}]", "NEWSLETTER_SMTP_RELAYS: is not valid JSON (Expecting property name"),
        ("[]", "NEWSLETTER_SMTP_RELAYS: must be a JSON list of relays"),
        ('{"host": "a"}', "NEWSLETTER_SMTP_RELAYS: must be a JSON list of relays"),
        ('[{"host": "a", "weight": 0}]', "every relay has weight 0 (a standby)"),
        ('[{"host": "a"}, {"host": "A.", "port": 587}]', "[1]: is relay [0] again"),
        ('[{"host": "a", "connections": 40}, {"host": "b", "connections": 30}]', "add up to 70"),
        ("[" * 100_000, "NEWSLETTER_SMTP_RELAYS: is not valid JSON (or nested too deeply)"),
        ('[{"host": "a", "weight": Infinity}]', "is not valid JSON (or nested too deeply)"),
        ('[{"host": "a", "weight": 1e400}]', "[0].weight: Input should be a finite number"),
        ('[{"host": "a", "rate": NaN}]', "is not valid JSON"),
        ("[" + '{"host": "a"},' * 20_000 + "]", "characters long, more than 200,000"),
    ],
)
def test_relay_settings_problems(
    monkeypatch: pytest.MonkeyPatch, project: Path, value: str, expected: str
) -> None:
    monkeypatch.chdir(project)
    monkeypatch.setenv("NEWSLETTER_SMTP_RELAYS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert expected in str(caught.value)


def test_relays_and_the_one_relay_settings_are_not_mixed(
    monkeypatch: pytest.MonkeyPatch, project: Path
) -> None:
    monkeypatch.chdir(project)
    monkeypatch.setenv(
        "NEWSLETTER_SMTP_RELAYS", '[{"host": "a.example.org", "password": "pw-in-the-list"}]'
    )
    monkeypatch.setenv("NEWSLETTER_SMTP_HOST", "b.example.org")
    monkeypatch.setenv("NEWSLETTER_SMTP_PASSWORD", "secret-one")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    said = str(caught.value)
    assert "NEWSLETTER_SMTP_HOST, NEWSLETTER_SMTP_PASSWORD, which NEWSLETTER_SMTP_RELAYS" in said
    assert "secret-one" not in said
    monkeypatch.delenv("NEWSLETTER_SMTP_HOST")
    monkeypatch.delenv("NEWSLETTER_SMTP_PASSWORD")
    settings = load_settings()
    (only,) = settings.relays
    assert (only.host, only.port_or_default, only.security, only.weight) == (
        "a.example.org",
        587,
        "starttls",
        1.0,
    )
    assert "pw-in-the-list" not in repr(settings) + repr(settings.relays)
    assert only.password is not None and only.password.get_secret_value() == "pw-in-the-list"
