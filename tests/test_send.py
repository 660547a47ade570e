"""Sending over real SMTP (aiosmtpd on 127.0.0.1) with a real SQLite send log."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE, build_file, sender
from newsletter.audience.csv_import import ParsedRow
from newsletter.delivery.campaign import SendOptions
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.sending import SendReport, prepare, run_send
from newsletter.delivery.transports import SmtpConfig, SmtpTransport
from newsletter.errors import CampaignAborted
from newsletter.storage.base import SendRecord
from newsletter.storage.sqlite import SqliteStorage
from smtp_server import Server

FAST = SendOptions(connections=3, retry_delays=(0.05, 0.05), max_wait=5, flush_interval=0.01)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture
def template(project: Path) -> MessageTemplate:
    return MessageTemplate(
        build_file(project / "issues" / EXAMPLE.name, project).rendered, sender()
    )


@pytest.fixture
def db(tmp_path: Path) -> SqliteStorage:
    return SqliteStorage.open(tmp_path / "test.sqlite3", create=True)


def addresses(n: int) -> list[str]:
    return [f"reader{i:04d}@example.org" for i in range(n)]


def subscribe(db: SqliteStorage, emails: list[str], list_name: str = "research-news") -> None:
    rows = [ParsedRow(i + 2, e, f"Reader{i}", "Test") for i, e in enumerate(emails)]
    report = db.subscribers.import_rows(list_name, rows, skip_invalid=False)
    assert report.committed


def smtp(server: Server, **kw: object) -> SmtpTransport:
    config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=5, **kw)  # type: ignore[arg-type]
    return SmtpTransport(config)


def run(
    db: SqliteStorage,
    template: MessageTemplate,
    server: Server,
    options: SendOptions = FAST,
    **prep: bool,
) -> SendReport:
    prepared = prepare(db, "2020-12-23", "research-news", **prep)
    return asyncio.run(
        run_send(
            db, prepared, template, smtp(server), options, envelope_sender="bounces@example.org"
        )
    )


def test_every_recipient_gets_exactly_one_message(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    emails = addresses(40)
    subscribe(db, emails)
    report = run(db, template, server)
    assert report.result.counts["sent"] == 40 and report.exit_code == 0
    got = sorted(r.rcpt_tos[0] for r in server.handler.received)
    assert got == emails  # each once, nobody skipped
    first = server.handler.to(emails[0])[0]
    assert first.mail_from == "bounces@example.org"
    assert first.rcpt_tos == [emails[0]]
    msg = first.message
    assert msg["To"] == f"Reader0 Test <{emails[0]}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Bcc" not in msg and "Cc" not in msg
    html = msg.get_body(("html",))
    assert html is not None and f"This email was sent to {emails[0]} because" in html.get_content()
    # connections are reused: far fewer connections than messages
    assert server.handler.connections <= FAST.connections + 1
    # running again sends nothing more
    again = run(db, template, server)
    assert again.result.attempted == 0 and len(server.handler.received) == 40


def test_pipelined_transactions(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    server.handler.behaviour.pipelining = True
    server.handler.behaviour.reject = {"reader0003@example.org": (550, "no such user")}
    subscribe(db, addresses(10))
    report = run(db, template, server)
    assert report.result.counts["sent"] == 9 and report.result.counts["rejected"] == 1
    assert len(server.handler.received) == 9


def test_550_is_final_and_451_is_retried(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    emails = addresses(10)
    subscribe(db, emails)
    b = server.handler.behaviour
    b.reject = {emails[2]: (550, "5.1.1 no such user"), emails[5]: (451, "4.7.1 try later")}
    report = run(
        db, template, server, SendOptions(connections=2, retry_delays=(), flush_interval=0.01)
    )
    c = report.result.counts
    assert (c["sent"], c["rejected"], c["deferred"]) == (8, 1, 1)
    assert report.exit_code == 3
    log = db.send_log
    assert log.in_state(report.record.id, "rejected")[0][0] == emails[2]
    # the relay recovers: a new run retries only the deferred one
    b.reject = {emails[2]: (550, "5.1.1 no such user")}
    again = run(db, template, server)
    assert again.result.attempted == 1
    assert again.result.counts["sent"] == 9 and again.result.counts["rejected"] == 1
    assert len(server.handler.to(emails[5])) == 1
    # --retry-rejected puts the rejected one back (after a relay misconfiguration)
    b.reject = {}
    fixed = run(db, template, server, retry_rejected=True)
    assert fixed.result.counts["sent"] == 10 and fixed.exit_code == 0
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == emails


def test_deferred_recipient_is_retried_within_the_run(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    emails = addresses(5)
    subscribe(db, emails)
    server.handler.behaviour.reject_data = {emails[1]: (451, "busy")}

    async def relent() -> SendReport:
        async def clear_soon() -> None:
            await asyncio.sleep(0.3)
            server.handler.behaviour.reject_data = {}

        prepared = prepare(db, "2020-12-23", "research-news")
        task = asyncio.create_task(clear_soon())
        report = await run_send(
            db,
            prepared,
            template,
            smtp(server),
            SendOptions(connections=2, retry_delays=(0.2, 0.2, 0.2), flush_interval=0.01),
            envelope_sender="bounces@example.org",
        )
        await task
        return report

    report = asyncio.run(relent())
    assert report.result.counts["sent"] == 5
    assert len(server.handler.to(emails[1])) == 1


def test_421_closes_the_connection_and_the_send_carries_on(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    emails = addresses(12)
    subscribe(db, emails)
    server.handler.behaviour.close_421_after = 4
    report = run(
        db, template, server, SendOptions(connections=1, retry_delays=(0.05,), flush_interval=0.01)
    )
    # the 5th was answered 421: deferred, retried on a new connection
    assert report.result.counts["sent"] == 12
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == emails
    assert server.handler.connections >= 3  # the check connection, the first, the second


def test_connection_dropped_after_the_body_is_unknown_and_reported(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    emails = addresses(6)
    subscribe(db, emails)
    server.handler.behaviour.drop_in_data = {emails[3]}
    report = run(db, template, server)
    assert report.result.counts["unknown"] == 1
    assert report.unknown[0][0] == emails[3]
    assert "after the message was sent" in report.unknown[0][1]
    assert report.exit_code == 3
    # a plain resume leaves it alone; --resend-unknown sends it again
    server.handler.behaviour.drop_in_data = set()
    plain = run(db, template, server)
    assert plain.result.attempted == 0 and plain.unknown[0][0] == emails[3]
    again = run(db, template, server, resend_unknown=True)
    assert again.result.counts["sent"] == 6 and again.exit_code == 0
    assert len(server.handler.to(emails[3])) == 1


def test_slow_server_times_out_as_unknown(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    subscribe(db, addresses(1))
    server.handler.behaviour.delay = 2.0
    prepared = prepare(db, "2020-12-23", "research-news")
    transport = SmtpTransport(
        SmtpConfig(
            host="127.0.0.1", port=server.port, security="none", timeout=5, message_timeout=0.5
        )
    )
    report = asyncio.run(
        run_send(db, prepared, template, transport, FAST, envelope_sender="b@example.org")
    )
    assert report.result.counts["unknown"] == 1
    assert "no reply in time after the message was sent" in report.unknown[0][1]


def test_suppressed_addresses_are_never_mailed(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    emails = addresses(4)
    store = db.subscribers
    store.suppress(emails[0], "unsubscribed")
    subscribe(db, emails)  # re-imported after unsubscribing: still suppressed
    report = run(db, template, server, SendOptions(connections=1, flush_interval=0.01))
    assert report.record.suppressed == 1 and report.record.audience == 3
    assert server.handler.to(emails[0]) == []
    # unsubscribing while a send is under way takes effect for the rest of it
    store.suppress(emails[3], "complained")
    db.conn.execute("UPDATE deliveries SET state = 'pending' WHERE seq = 2")  # as if not yet sent
    server.handler.received.clear()
    again = run(db, template, server)
    assert again.result.counts["suppressed"] == 1
    assert server.handler.to(emails[3]) == []


def test_tls_and_auth(db: SqliteStorage, template: MessageTemplate) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl_server_context(cert)
    client_ctx = ssl_client_context(ca)
    s = Server(tls_context=server_ctx, auth=("mailer", "s3cret")).start()
    try:
        subscribe(db, addresses(3))
        prepared = prepare(db, "2020-12-23", "research-news")

        def transport(password: str, security: str = "starttls") -> SmtpTransport:
            return SmtpTransport(
                SmtpConfig(
                    host="127.0.0.1",
                    port=s.port,
                    security=security,
                    username="mailer",
                    password=password,
                    tls_context=client_ctx,
                    timeout=5,
                )
            )

        with pytest.raises(CampaignAborted) as info:
            asyncio.run(
                run_send(
                    db,
                    prepared,
                    template,
                    transport("wrong"),
                    FAST,
                    envelope_sender="b@example.org",
                )
            )
        assert "refused the login" in str(info.value)
        assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)
        assert db.send_log.counts(prepared.record.id)["pending"] == 3  # nothing lost
        report = asyncio.run(
            run_send(
                db,
                prepare(db, "2020-12-23", "research-news"),
                template,
                transport("s3cret"),
                FAST,
                envelope_sender="b@example.org",
            )
        )
        assert report.result.counts["sent"] == 3
    finally:
        s.stop()


def test_plain_server_without_starttls_is_refused(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    subscribe(db, addresses(2))
    prepared = prepare(db, "2020-12-23", "research-news")
    transport = SmtpTransport(
        SmtpConfig(host="127.0.0.1", port=server.port, security="starttls", timeout=5)
    )
    with pytest.raises(CampaignAborted) as info:
        asyncio.run(
            run_send(db, prepared, template, transport, FAST, envelope_sender="b@example.org")
        )
    assert "does not offer STARTTLS" in str(info.value)
    assert server.handler.received == []
    assert db.send_log.counts(prepared.record.id)["pending"] == 2


def ssl_server_context(cert: object) -> ssl.SSLContext:

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)  # type: ignore[attr-defined]
    return ctx


def ssl_client_context(ca: object) -> ssl.SSLContext:

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)  # type: ignore[attr-defined]
    return ctx


def test_day_cap_stops_the_run_and_counts_earlier_sends(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    subscribe(db, addresses(10))
    capped = SendOptions(connections=2, per_day=4, flush_interval=0.01)
    first = run(db, template, server, capped)
    assert first.result.counts["sent"] == 4 and first.result.counts["pending"] == 6
    stopped = first.result.stopped
    assert stopped is not None and "the cap of 4 messages a day" in stopped
    assert "the next message may go at " in stopped and "run the same command again" in stopped
    assert first.result.stop_says_when  # "again tomorrow": the CLI adds no "resume now"
    again = run(db, template, server, capped)  # the same day: nothing more goes out
    assert again.result.attempted == 0 and len(server.handler.received) == 4
    uncapped = run(db, template, server)
    assert uncapped.result.counts["sent"] == 10 and len(server.handler.received) == 10


def test_an_hour_cap_holds_the_run_until_the_hour_has_room(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    import time

    from newsletter.delivery.campaign import Campaign

    subscribe(db, addresses(5))
    notes: list[str] = []
    runs: list[Campaign] = []

    def noted(text: str) -> None:
        notes.append(text)
        runs[0].stop("the test has seen the wait")

    started = time.time()
    report = asyncio.run(
        run_send(
            db,
            prepare(db, "2020-12-23", "research-news"),
            template,
            smtp(server),
            SendOptions(connections=2, per_hour=3, flush_interval=0.01),
            envelope_sender="bounces@example.org",
            on_start=runs.append,
            on_note=noted,
        )
    )
    assert report.result.counts["sent"] == 3 and report.result.counts["pending"] == 2
    assert len(server.handler.received) == 3
    # It waited (rather than stopping) and said until when: an hour after the first went.
    assert len(notes) == 1, notes
    assert "the cap of 3 messages an hour (over every send in this database) is reached" in notes[0]
    import datetime as dt

    until = dt.datetime.strptime(
        notes[0].rsplit("until ", 1)[1].split(" UTC")[0], "%Y-%m-%d %H:%M:%S"
    )
    assert abs(until.replace(tzinfo=dt.UTC).timestamp() - (started + 3600)) < 5


def test_a_send_that_ends_exactly_at_a_cap_is_complete(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    subscribe(db, addresses(4))
    notes: list[str] = []
    for caps in ({"per_hour": 4}, {"per_day": 4}):
        db.conn.execute("DELETE FROM deliveries")
        db.conn.execute("DELETE FROM sends")
        report = asyncio.run(
            run_send(
                db,
                prepare(db, "2020-12-23", "research-news"),
                template,
                smtp(server),
                SendOptions(connections=2, flush_interval=0.01, **caps),  # type: ignore[arg-type]
                envelope_sender="bounces@example.org",
                on_note=notes.append,
            )
        )
        assert report.result.counts["sent"] == 4 and report.result.stopped is None, caps
    assert notes == []


def test_the_hour_cap_note_is_said_once_over_many_waits(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    """Two an hour, six to send: a wait of an hour, then one as each message leaves the
    window, said once. The clock is the test's (claims count the window at its time),
    moved on by each wait."""
    import time

    from newsletter.delivery.campaign import Campaign

    subscribe(db, addresses(6))
    record = prepare(db, "2020-12-23", "research-news").record
    clock = [time.time()]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds
        await asyncio.sleep(0)

    notes: list[str] = []
    run = Campaign(
        db.send_log,
        record.id,
        template,
        smtp(server),
        SendOptions(connections=2, per_hour=2, flush_interval=0.01, max_wait=5),
        envelope_sender="bounces@example.org",
        clock=lambda: clock[0],
        sleep=sleep,
        on_note=notes.append,
    )
    result = asyncio.run(run.run())
    assert result.counts["sent"] == 6 and result.stopped is None
    assert len(server.handler.received) == 6
    assert len(notes) == 1 and "the cap of 2 messages an hour" in notes[0], notes
    assert clock[0] - time.time() > 3500  # it waited for the hour to come round


def test_pacing_spaces_messages_out(
    db: SqliteStorage, template: MessageTemplate, server: Server
) -> None:
    import time

    subscribe(db, addresses(6))
    started = time.monotonic()
    report = run(db, template, server, SendOptions(connections=3, rate=10.0, flush_interval=0.01))
    assert report.result.counts["sent"] == 6
    assert time.monotonic() - started >= 0.45  # 6 messages at 10/s, one token to start


def test_claims_use_the_state_index_not_a_walk_over_the_send(db: SqliteStorage) -> None:
    """A claim must not pass every recipient already sent (it made 1M sends quadratic)."""
    from newsletter.storage.sqlite import send_log

    query = send_log._SELECT + "WHERE send_id = ? AND state = 'pending' ORDER BY seq LIMIT ?"
    plan = " ".join(str(tuple(r)) for r in db.conn.execute("EXPLAIN QUERY PLAN " + query, (1, 5)))
    assert "USING INDEX deliveries_by_state (send_id=? AND state=?)" in plan
    assert "TEMP B-TREE" not in plan  # and no sort


# ------------------------------------------------------------ one issue, several lists


def test_a_freeze_leaves_out_who_another_lists_send_has(db: SqliteStorage) -> None:
    from newsletter.delivery.sending import preview

    shared = addresses(6)
    subscribe(db, [*shared, "only-a@example.org"], "a")
    subscribe(db, [*shared, "only-b@example.org"], "b")
    a = prepare(db, "2020-12-23", "a").record
    log = db.send_log
    # a's send is under way: its rows are in every state a delivery passes through
    states = ["pending", "sending", "sent", "deferred", "unknown", "rejected"]
    for seq, state in enumerate(states):
        db.conn.execute(
            "UPDATE deliveries SET state = ? WHERE send_id = ? AND seq = ?", (state, a.id, seq)
        )
    # someone who left list a after it froze was never sent a's copy: b sends it
    db.conn.execute(
        "UPDATE deliveries SET state = 'suppressed' WHERE send_id = ? AND seq = 6", (a.id,)
    )
    db.conn.execute(
        "UPDATE deliveries SET email = ? WHERE send_id = ? AND seq = 6", (shared[0], a.id)
    )
    db.conn.execute(
        "UPDATE deliveries SET email = 'gone@example.org' WHERE send_id = ? AND seq = 0", (a.id,)
    )
    planned = preview(db, "2020-12-23", "b")
    b = prepare(db, "2020-12-23", "b").record
    assert b.duplicates == 5 and b.audience == 2
    kept = [e for e, _ in log.in_state(b.id, "pending")]
    assert kept == [shared[0], "only-b@example.org"]
    assert (planned.duplicates, planned.audience, planned.counts["pending"]) == (5, 2, 2)
    assert planned.first == kept
    assert log.find("2020-12-23", "b") == b  # and it is what status reads
    # the other issue is not affected
    other = prepare(db, "2020-12-30", "b").record
    assert other.duplicates == 0 and other.audience == 7
    # resuming does not count again
    assert prepare(db, "2020-12-23", "b").record == b


def test_two_sends_of_one_issue_at_once_never_share_an_address(
    db: SqliteStorage, template: MessageTemplate, server: Server, tmp_path: Path
) -> None:
    """Both lists' sends under way together (the second frozen while the first runs)."""
    shared = addresses(30)
    subscribe(db, shared, "a")
    subscribe(db, [*shared[10:], "extra@example.org"], "b")
    a = prepare(db, "2020-12-23", "a")
    other = db.reopen()  # another process's connection
    b = prepare(other, "2020-12-23", "b")
    assert b.record.duplicates == 20 and b.record.audience == 1

    async def both() -> None:
        await asyncio.gather(
            run_send(db, a, template, smtp(server), FAST, envelope_sender="b@example.org"),
            run_send(other, b, template, smtp(server), FAST, envelope_sender="b@example.org"),
        )

    asyncio.run(both())
    for e in [*shared, "extra@example.org"]:
        assert len(server.handler.to(e)) == 1


def test_dry_run_copy_counts_what_the_real_freeze_leaves_out(
    db: SqliteStorage, tmp_path: Path
) -> None:
    from newsletter.delivery.sending import preview

    shared = addresses(8)
    subscribe(db, shared, "a")
    subscribe(db, [*shared[:5], "b-only@example.org"], "b")
    db.subscribers.opt_out("b", "b-only@example.org")
    prepare(db, "2020-12-23", "a")
    with db.scratch_copy("2020-12-23", "b") as scratch:
        in_copy = preview(scratch, "2020-12-23", "b")
        assert in_copy == preview(db, "2020-12-23", "b")
        assert (in_copy.duplicates, in_copy.audience, in_copy.suppressed) == (5, 0, 1)
        frozen = prepare(scratch, "2020-12-23", "b").record
        assert (frozen.duplicates, frozen.audience) == (5, 0)
        copy = scratch.path
        assert copy.exists()
    assert not copy.exists()  # deleted on exit
    assert db.send_log.find("2020-12-23", "b") is None  # the real log is untouched


def test_the_dedupe_looks_up_keys_and_never_scans_per_member(db: SqliteStorage) -> None:
    """A 1,000,000-recipient freeze must not turn quadratic: every lookup uses a key."""
    from newsletter.storage.sqlite import send_log

    db.conn.execute("CREATE TEMP TABLE freeze_others (email TEXT PRIMARY KEY) WITHOUT ROWID")
    plan = " ".join(
        str(tuple(r))
        for r in db.conn.execute(
            "EXPLAIN QUERY PLAN SELECT email FROM temp.freeze_others "
            "WHERE email IN (SELECT value FROM json_each(?))",
            ("[]",),
        )
    )
    assert "SEARCH temp.freeze_others USING PRIMARY KEY (email=?)" in plan
    sql = "SELECT count(*) " + send_log._AUDIENCE + "AND u.email IN " + send_log._OTHERS_HAVE
    plan = " ".join(str(tuple(r)) for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql, ("x", "b")))
    assert "LIST SUBQUERY" in plan  # built once, then looked up
    assert "SCAN d" not in plan and "SCAN deliveries" not in plan


def test_two_freezes_of_one_issue_at_the_same_moment_take_turns(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "race.sqlite3"
    setup = SqliteStorage.open(path, create=True)
    shared = [f"r{i:05d}@example.org" for i in range(12000)]  # more than two freeze batches
    subscribe(setup, shared, "a")
    subscribe(setup, shared, "b")
    start = threading.Barrier(2)
    records: dict[str, SendRecord] = {}

    def freeze(list_name: str) -> None:
        conn = SqliteStorage.open(path)
        start.wait()
        records[list_name] = prepare(conn, "2020-12-23", list_name).record

    threads = [threading.Thread(target=freeze, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audiences = sorted((r.audience, r.duplicates) for r in records.values())
    assert audiences == [(0, 12000), (12000, 0)]  # one took everyone, the other nobody
    rows = setup.conn.execute("SELECT count(*), count(DISTINCT email) FROM deliveries").fetchone()
    assert tuple(rows) == (12000, 12000)
