"""`newsletter bounces process | review | show` as the MTA and a person run them, in a
subprocess, on both backends: a send whose bounces and complaints come back, and the
next send that leaves exactly those addresses out; exit codes a Postfix pipe takes."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_cli
from newsletter.verp import Verp
from smtp_server import Server

SAMPLES = Path(__file__).parent / "data" / "feedback"
SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key
BOUNCES = "bounces@bounce.example.org"
_ADDRESSES = rb"reader000[0-9]@example\.(?:org|net)|someone@example\.com"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def env_for(server: Server | None, database: str, **extra: str) -> dict[str, str]:
    return {
        "NEWSLETTER_DATABASE": database,
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_BOUNCE_ADDRESS": BOUNCES,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port if server else 9),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SMTP_USERNAME": "",
        "NEWSLETTER_SEND_CONNECTIONS": "2",
        **extra,
    }


def returned(name: str, verp: str, address: str, *, tag: str = "") -> bytes:
    """A sample from tests/data/feedback as it would come back for ``address``'s message,
    sent from ``verp``."""
    raw = (SAMPLES / name).read_bytes().replace(b"{verp}", verp.encode())
    raw = re.sub(_ADDRESSES, address.encode(), raw)
    return raw.replace(b"Message-Id: <", f"Message-Id: <{tag}".encode(), 1)


def week_after(project: Path) -> str:
    """Last week's file copied for this week (its date changed): the next issue."""
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        "\ndate: 2020-12-23\n", "\ndate: 2020-12-30\n"
    )
    (project / "issues" / "2020-12-30.yaml").write_text(text, encoding="utf-8")
    return "issues/2020-12-30.yaml"


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bounces_and_complaints_leave_exactly_those_out_of_the_next_send(
    project: Path, server: Server, database: str
) -> None:
    env = env_for(server, database)
    readers = [f"reader{i:05d}@example.org" for i in range(8)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env, ))  # fmt: skip
    ok(run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env))
    sender = {r.rcpt_tos[0]: r.mail_from for r in server.handler.received}
    assert set(sender) == set(readers)
    assert all(
        v.startswith("bounces+a") and v.endswith("@bounce.example.org") for v in sender.values()
    )

    forged = (
        sender[readers[5]][:-20]
        + ("b" if sender[readers[5]][-20] != "b" else "c")
        + sender[readers[5]][-19:]
    )
    mail = {
        "hard": returned("postfix-unknown-user.eml", sender[readers[1]], readers[1]),
        "complaint": returned("yahoo-arf.eml", sender[readers[2]], readers[2]),
        "soft": returned("postfix-delayed.eml", sender[readers[3]], readers[3]).replace(
            b"Action: delayed", b"Action: failed"
        ),
        "auto-reply": returned("out-of-office.eml", sender[readers[4]], readers[4]),
        "forged": returned("postfix-unknown-user.eml", forged, readers[5], tag="f."),
        # Someone else's address reported with reader 6's VERP address: not reader 6.
        "other": returned(
            "postfix-unknown-user.eml", sender[readers[6]], "x@example.net", tag="o."
        ),
    }
    said = {}
    for name, raw in mail.items():
        done = run_cli("bounces", "process", cwd=project, env=env, input=raw.decode("ascii"))
        said[name] = ok(done)
    assert re.fullmatch(
        rf"standard input: a permanent bounce for {readers[1]}: suppressed \(bounced\) "
        r"\[evidence #\d+\]\n",
        said["hard"],
    )
    assert f"a spam complaint for {readers[2]}: suppressed (complained)" in said["complaint"]
    assert f"a temporary bounce for {readers[3]}: soft bounce: 1 of 3 sends" in said["soft"]
    assert f"an automatic reply for {readers[4]}: noted" in said["auto-reply"]
    assert "kept for review" in said["forged"] and "kept for review" in said["other"]

    # The same bounce piped again (the MTA retried after a timeout): nothing changes.
    again = ok(run_cli("bounces", "process", cwd=project, env=env,
                       input=mail["hard"].decode("ascii")))  # fmt: skip
    assert "(seen before)" in again and "recorded before" in again

    server.handler.received.clear()
    ok(run_cli("send", week_after(project), "--yes", cwd=project, env=env))
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received)
    assert reached == sorted(set(readers) - {readers[1], readers[2]})

    shown = ok(run_cli("subscribers", "show", readers[1], cwd=project, env=env))
    assert "suppressed (bounced)" in shown and "by feedback #" in shown
    assert re.search(
        r"a permanent bounce 5\.1\.1 from send 1 \(piped from the MTA\): suppressed \(bounced\) "
        r"\[evidence #1\]",
        shown,
    )
    review = ok(run_cli("bounces", "review", cwd=project, env=env))
    assert review.startswith("2 message(s) kept for review:")
    assert "signature does not match" in review and "not reader00006@example.org" in review
    details = ok(run_cli("bounces", "show", "1", cwd=project, env=env))
    assert "kind: hard; outcome: suppressed (bounced)" in details
    assert f"about: {readers[1]} (send 1, recipient 1)" in details
    raw = run_cli("bounces", "show", "1", "--raw", cwd=project, env=env)
    assert raw.returncode == 0 and raw.stdout.encode() == mail["hard"]

    # The report of the first send: rates among the 8 attempted, by recipient.
    report = ok(run_cli("bounces", "report", f"issues/{EXAMPLE.name}", cwd=project, env=env))
    lines = report.splitlines()
    assert lines[0] == "2020-12-23 to research-news (send 1): 8 of 8 attempted"
    assert lines[1:6] == [
        "  hard bounces       1  12.50%",
        "  soft bounces       1  12.50%",
        "  complaints         1  12.50%",
        "  unsubscribes       0   0.00%",
        "  refused            0   0.00%",
    ]
    assert "  1 message(s) about it kept for review (`bounces review`)" in lines  # the forged: none
    assert "  top domains: example.org 3 (complaint 1, hard 1, soft 1)" in lines
    assert "  top reasons: 4.2.2 1, 5.1.1 1, complaint 1" in lines
    assert f"a permanent bounce 5.1.1 for {readers[1]}: suppressed (bounced) [evidence #1]" \
        in report  # fmt: skip
    import json

    (as_json,) = json.loads(ok(run_cli("bounces", "report", "--json", cwd=project, env=env)))
    assert as_json["issue_id"] == "2020-12-30"  # without ISSUE: the latest sent
    first = json.loads(ok(run_cli("bounces", "report", "2020-12-23", "--json", cwd=project,
                                  env=env)))[0]  # fmt: skip
    assert first["counts"] == {
        "hard": 1, "soft": 1, "complaint": 1, "unsubscribe": 0, "refused": 0,
    }  # fmt: skip
    assert first["rates"]["hard"] == 0.125 and first["attempted"] == 8


def test_files_each_recorded_and_an_unreadable_one_named(project: Path, database: str) -> None:
    env = env_for(None, database)
    (project / "one.csv").write_text("email\nreader@example.org\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "one.csv", "--list", "news", cwd=project, env=env))
    (project / "a.eml").write_bytes(b"Subject: one\r\n\r\nhello\r\n")
    (project / "b.eml").write_bytes(b"Subject: two\r\n\r\nhello\r\n")
    done = run_cli("bounces", "process", "a.eml", "missing.eml", "b.eml", cwd=project, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "a.eml: not understood: kept for review [evidence #1]" in done.stdout
    assert "b.eml: not understood: kept for review [evidence #2]" in done.stdout
    assert "error: cannot read missing.eml: No such file or directory" in done.stderr


def test_a_database_that_cannot_take_it_now_asks_the_mta_to_try_later(
    project: Path, tmp_path: Path
) -> None:
    for where in (str(tmp_path / "none.sqlite3"), "postgresql://nobody@127.0.0.1:1/x"):
        env = env_for(None, where)
        done = run_cli("bounces", "process", cwd=project, env=env, input="Subject: x\n\nhi\n")
        assert done.returncode == 75, done.stdout + done.stderr
        assert "the MTA offers it again later" in done.stderr
    # Settings that do not load are the same: the message stays with the MTA.
    env = env_for(None, str(tmp_path / "x.sqlite3"), NEWSLETTER_SECRET_KEY="short")  # noqa: S106
    done = run_cli("bounces", "process", cwd=project, env=env, input="Subject: x\n\nhi\n")
    assert done.returncode == 75 and "NEWSLETTER_SECRET_KEY" in done.stderr


def test_without_verp_every_bounce_waits_for_review_with_a_warning(
    project: Path, database: str
) -> None:
    env = env_for(None, database)
    env.pop("NEWSLETTER_BOUNCE_ADDRESS")
    (project / "one.csv").write_text("email\nreader00001@example.org\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "one.csv", "--list", "news", cwd=project, env=env))
    verp = Verp(BOUNCES, SECRET.encode()).sender(1, 0)
    raw = returned("postfix-unknown-user.eml", verp, "reader00001@example.org")
    done = run_cli("bounces", "process", cwd=project, env=env, input=raw.decode("ascii"))
    assert done.returncode == 0, done.stderr
    assert "no message can be matched to its delivery" in done.stderr
    assert "kept for review" in done.stdout


def mailed(to: str, sender: str, subject: str, tag: str) -> str:
    """A message a reader's mail program sends to unsubscribe (RFC 2369 mailto:)."""
    return (
        f"From: Reader <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{tag}@mail.example.org>\r\nDate: Wed, 23 Dec 2020 10:00:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nPlease take me off.\r\n"
    )


def test_mailed_unsubscribes_take_exactly_those_off_their_lists(
    project: Path, server: Server, database: str
) -> None:
    """The mailto: of List-Unsubscribe, as a mail program uses it (its Subject with our
    token), a bare "unsubscribe" from a member's own address, and the hostile ones: a
    forged token, a stranger, no From at all."""
    env = env_for(server, database, NEWSLETTER_UNSUBSCRIBE_MAILTO="leave@example.org")
    readers = [f"reader{i:05d}@example.org" for i in range(6)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    for name in ("research-news", "events"):
        ok(run_cli("subscribers", "import", "subs.csv", "--list", name, cwd=project, env=env))
    ok(run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env))
    mailto = {}
    for r in server.handler.received:
        header = r.message["List-Unsubscribe"]
        mailto[r.rcpt_tos[0]] = re.search(r"<mailto:([^>]+)>", header).group(1)  # type: ignore[union-attr]
    address, _, query = mailto[readers[1]].partition("?subject=")
    assert address == "leave@example.org"
    from urllib.parse import unquote

    subject = unquote(query)
    assert subject.startswith("unsubscribe ") and len(subject) > 40
    token = subject.split()[1]
    changed = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    import base64

    own = unquote(mailto[readers[5]].partition("?subject=")[2])
    encoded = "=?utf-8?b?" + base64.b64encode(own.encode()).decode() + "?="
    requests = {
        # as a mail program sends it, from another address of theirs: the token says who
        "token": mailed(address, "ann.other@example.net", subject, "t1"),
        # "unsubscribe" from a member's own address, to the mailto: address
        "bare": mailed(address, readers[2], "unsubscribe", "t2"),
        # any message to the mailto: address is a request, whatever it says
        "words": mailed(address, readers[3], "Stop sending me this", "t3"),
        # a reply to the From address whose Subject asks, with a forged token: a From is
        # easy to forge, and it did not come to the unsubscribe address: a person looks
        "forged": mailed("news@example.org", readers[4], f"Re: unsubscribe {changed}", "t4"),
        # our token, marked auto-generated (some mail programs do) and RFC 2047-encoded
        "generated": mailed(address, readers[5], encoded, "t7").replace(
            "Content-Type", "Auto-Submitted: auto-generated\r\nContent-Type"
        ),
        "stranger": mailed(address, "stranger@example.com", "unsubscribe", "t5"),
        "nobody": mailed(address, "", "unsubscribe", "t6").replace("From: Reader <>\r\n", ""),
    }
    said = {
        name: ok(run_cli("bounces", "process", cwd=project, env=env, input=raw))
        for name, raw in requests.items()
    }
    assert f"a request to unsubscribe for {readers[1]}: left research-news [" in said["token"]
    assert f"for {readers[2]}: left events, research-news" in said["bare"]
    assert f"for {readers[3]}: left events, research-news" in said["words"]
    assert "kept for review" in said["forged"]
    assert f"for {readers[5]}: left research-news" in said["generated"]
    assert "kept for review" in said["stranger"] and "kept for review" in said["nobody"]
    review = ok(run_cli("bounces", "review", cwd=project, env=env))
    assert "stranger@example.com, which is on no list" in review
    assert f"in words, by {readers[4]}, not sent to the unsubscribe address" in review
    assert "from no usable From address" in review
    # The same request mailed twice: nothing more.
    again = ok(run_cli("bounces", "process", cwd=project, env=env, input=requests["token"]))
    assert "(seen before)" in again

    server.handler.received.clear()
    ok(run_cli("send", week_after(project), "--yes", cwd=project, env=env))
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received)
    assert reached == [readers[0], readers[4]]
    # Each person gets an issue once, whichever list: the events list gets one of its own.
    events = (project / "issues" / "2020-12-30.yaml").read_text(encoding="utf-8")
    (project / "issues" / "2021-01-06.yaml").write_text(
        events.replace("\ndate: 2020-12-30\n", "\ndate: 2021-01-06\n"), encoding="utf-8"
    )
    server.handler.received.clear()
    ok(run_cli("send", "issues/2021-01-06.yaml", "--list", "events", "--yes", cwd=project,
               env=env))  # fmt: skip
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received)
    # readers 1 and 5 left research-news only, by their tokens
    assert reached == [readers[0], readers[1], readers[4], readers[5]]


def test_refusals_in_our_own_smtp_session_count_by_their_status_code(
    project: Path, server: Server, database: str
) -> None:
    """A 5xx at RCPT about the address suppresses it as a bounce would; a full mailbox
    counts as a soft bounce; a policy block (5.7.1) or a reply without an enhanced code
    suppresses nobody: a provider blocking us for a day must not empty the list."""
    env = env_for(server, database)
    readers = [f"reader{i:05d}@example.org" for i in range(6)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env))  # fmt: skip
    server.handler.behaviour.reject = {
        readers[1]: (550, "5.1.1 <reader00001@example.org>: Recipient address rejected"),
        readers[2]: (552, "5.2.2 Mailbox full"),
        readers[3]: (550, "5.7.1 Service unavailable; client host blocked using Spamhaus"),
        readers[4]: (550, "No such user here"),
        # a stranger's server writing to our terminal: an escape sequence in its reply
        readers[5]: (550, "5.1.1 \x1b]0;PWNED\x07 gone"),
    }
    sent = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert sent.returncode == 3, sent.stdout + sent.stderr  # finished, with rejections
    shown = {r: ok(run_cli("subscribers", "show", r, cwd=project, env=env)) for r in readers}
    assert "suppressed (bounced)" in shown[readers[1]]
    assert re.search(
        r"a permanent bounce 5\.1\.1 from send 1 \(refused in our own SMTP session\): "
        r"suppressed \(bounced\) \[evidence #(\d+)\]",
        shown[readers[1]],
    )
    evidence = re.search(r"#(\d+)\]", shown[readers[1]]).group(1)  # type: ignore[union-attr]
    details = ok(run_cli("bounces", "show", evidence, cwd=project, env=env))
    assert "refused by the receiving server (550 RCPT TO: 5.1.1 <reader00001@" in details
    # every send to the address, with its outcome
    assert re.search(r"  \S+ send 1 of 2020-12-23 to research-news: sent\n", shown[readers[0]])
    assert re.search(
        r"  \S+ send 1 of 2020-12-23 to research-news: rejected: RCPT TO: 5\.1\.1 <reader0",
        shown[readers[1]],
    )
    assert "a temporary bounce 5.2.2 from send 1" in shown[readers[2]]
    assert "soft bounce: 1 of 3 sends" in shown[readers[2]]
    for quiet in (readers[3], readers[4]):
        assert "suppressed" not in shown[quiet] and "a refusal" in shown[quiet]
        assert ": noted [evidence #" in shown[quiet]

    assert "\x1b" not in shown[readers[5]] and "\ufffd]0;PWNED\ufffd gone" in shown[readers[5]]
    evidence = re.findall(r"#(\d+)\]", shown[readers[5]])[-1]
    details = ok(run_cli("bounces", "show", evidence, cwd=project, env=env))
    assert "\x1b" not in details and "\x07" not in details and "PWNED" in details

    server.handler.behaviour.reject = {}
    server.handler.received.clear()
    ok(run_cli("send", week_after(project), "--yes", cwd=project, env=env))
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received)
    assert reached == sorted(set(readers) - {readers[1], readers[5]})


def test_a_send_with_too_many_hard_bounces_pauses_itself_until_a_person_resumes_it(
    project: Path, server: Server, database: str
) -> None:
    """Hard bounces over the limit in a run pause the send with the reason; the schedule
    does not resume it (that would undo the pause at once); `send` by hand does, and
    counts afresh."""
    env = env_for(
        server,
        database,
        NEWSLETTER_SEND_PAUSE_SAMPLE="8",
        NEWSLETTER_SEND_PAUSE_HARD_BOUNCES="0.2",  # more than 1 of 8
        NEWSLETTER_SEND_CONNECTIONS="1",
        NEWSLETTER_SCHEDULE="Wed 09:00",
        NEWSLETTER_TEST_NOW="2020-12-23T09:30:00+00:00",
    )
    readers = [f"reader{i:05d}@example.org" for i in range(40)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env))  # fmt: skip
    unknown = (550, "5.1.1 Recipient address rejected: User unknown")
    server.handler.behaviour.reject = {readers[i]: unknown for i in (0, 1, 2)}
    server.handler.behaviour.delay = 0.05  # the run looks at its health as it goes
    issue = f"issues/{EXAMPLE.name}"
    paused = run_cli("send", issue, "--yes", cwd=project, env=env)
    assert paused.returncode == 3, paused.stdout + paused.stderr
    said = re.search(
        r"stopped early: paused: 3 hard bounces and refusals among the (\d+) messages "
        r"attempted since this run began \(over 20\.0% of (\d+), "
        r"NEWSLETTER_SEND_PAUSE_HARD_BOUNCES\)",
        paused.stdout,
    )
    assert said, paused.stdout
    assert int(said.group(2)) == max(8, int(said.group(1)))
    assert "Run the same command to resume." not in paused.stdout  # it says what to do
    went = len(server.handler.received)
    assert 0 < went < 37, went  # stopped part-way

    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 1, due.stdout + due.stderr  # a person must act
    assert "paused itself (3 hard bounces and refusals" in due.stderr
    assert "a scheduled run does not resume it" in due.stderr
    assert len(server.handler.received) == went  # nothing more went out

    resumed = run_cli("send", issue, "--yes", cwd=project, env=env)
    assert resumed.returncode == 3, resumed.stdout + resumed.stderr  # 3 rejected
    assert "this send paused itself (3 hard bounces and refusals" in resumed.stdout
    assert "stopped early" not in resumed.stdout
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received)
    assert reached == sorted(readers[3:])
    for bounced in readers[:3]:
        shown = ok(run_cli("subscribers", "show", bounced, cwd=project, env=env))
        assert "suppressed (bounced)" in shown


@pytest.mark.parametrize("refusal", ["5.7.1 blocked using Spamhaus", "5.1.1 User unknown"])
def test_a_block_pauses_a_send_too_and_a_finished_one_is_never_paused(
    project: Path, server: Server, refusal: str
) -> None:
    """A provider refusing our mail for policy (5.7.1) suppresses nobody, and is as good a
    reason to stop; refusals of the last messages of a send that is done pause nothing."""
    env = env_for(
        server,
        str(project / "db.sqlite3"),
        NEWSLETTER_SEND_PAUSE_SAMPLE="8",
        NEWSLETTER_SEND_PAUSE_HARD_BOUNCES="0.2",
        NEWSLETTER_SEND_CONNECTIONS="1",
    )
    readers = [f"reader{i:05d}@example.org" for i in range(30)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env))  # fmt: skip
    code, text = 550, refusal
    server.handler.behaviour.reject = {readers[i]: (code, text) for i in (0, 1, 2)}
    server.handler.behaviour.delay = 0.05
    paused = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert paused.returncode == 3, paused.stdout + paused.stderr
    assert "stopped early: paused: 3 hard bounces and refusals among" in paused.stdout
    shown = ok(run_cli("subscribers", "show", readers[0], cwd=project, env=env))
    assert ("suppressed (bounced)" in shown) == refusal.startswith("5.1.1")

    # The week after: the last two refused, nothing left to send: done, not paused.
    server.handler.behaviour.reject = {readers[i]: (code, text) for i in (28, 29)}
    server.handler.received.clear()
    done = run_cli("send", week_after(project), "--yes", cwd=project, env=env)
    assert done.returncode == 3, done.stdout + done.stderr  # rejected ones, not a stop
    assert "stopped early" not in done.stdout and "pending 0" in done.stdout
    due = run_cli("send", "--due", cwd=project, env={**env, "NEWSLETTER_SCHEDULE": "Wed 09:00",
                  "NEWSLETTER_TEST_NOW": "2020-12-30T09:30:00+00:00"})  # fmt: skip
    assert "paused itself" not in due.stdout + due.stderr, due.stdout + due.stderr


def test_what_was_kept_for_review_is_reprocessed_or_dismissed_by_a_person(
    project: Path, server: Server, database: str
) -> None:
    """A bounce that came while the deployment could not read its VERP address (here: no
    NEWSLETTER_BOUNCE_ADDRESS in the pipe's settings) waits for review; once that is
    fixed, `bounces reprocess` records it as understood; junk is dismissed with a reason."""
    env = env_for(server, database)
    readers = [f"reader{i:05d}@example.org" for i in range(3)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env))  # fmt: skip
    ok(run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env))
    sender = {r.rcpt_tos[0]: r.mail_from for r in server.handler.received}
    hard = returned("postfix-unknown-user.eml", sender[readers[1]], readers[1])
    misconfigured = {k: v for k, v in env.items() if k != "NEWSLETTER_BOUNCE_ADDRESS"}
    first = ok(run_cli("bounces", "process", cwd=project, env=misconfigured,
                       input=hard.decode("ascii")))  # fmt: skip
    assert "kept for review [evidence #1]" in first
    junk = "From: x@spam.example\r\nSubject: pills\r\n\r\nbuy\r\n"
    assert "kept for review [evidence #2]" in ok(run_cli("bounces", "process", cwd=project,
                                                          env=env, input=junk))  # fmt: skip
    still = ok(run_cli("bounces", "reprocess", "2", cwd=project, env=env))
    assert still.startswith("#2: still not understood: not a delivery status notification")
    again = ok(run_cli("bounces", "reprocess", "1", cwd=project, env=env))
    assert again == f"#1 for {readers[1]}: suppressed (bounced) [evidence #3]\n"
    refused = run_cli("bounces", "reprocess", "1", "3", "99", cwd=project, env=env)
    assert refused.returncode == 1
    assert "evidence #1: it is not kept for review" in refused.stderr
    assert "evidence #99: there is no such evidence" in refused.stderr
    no_reason = run_cli("bounces", "review", "--dismiss", "2", cwd=project, env=env)
    assert no_reason.returncode == 2 and "--dismiss needs --reason" in no_reason.stderr
    review = ok(run_cli("bounces", "review", "--dismiss", "2", "--reason", "spam", cwd=project,
                        env=env))  # fmt: skip
    assert review == "#2: dismissed\nnothing is kept for review\n"
    details = ok(run_cli("bounces", "show", "1", cwd=project, env=env))
    assert "outcome: reprocessed as evidence #3" in details
    server.handler.received.clear()
    ok(run_cli("send", week_after(project), "--yes", cwd=project, env=env))
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == [readers[0], readers[2]]


def test_a_token_for_a_list_the_address_is_not_on_goes_to_review(
    project: Path, server: Server
) -> None:
    """Mail sent before a list was renamed carries the old name in its token: taking the
    address "off" a list that is not there would leave it on the one that is."""
    env = env_for(server, str(project / "db.sqlite3"))
    (project / "subs.csv").write_text("email\nann@example.org\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env))  # fmt: skip
    from newsletter import tokens

    key = SECRET.encode()
    import datetime as dt

    old = tokens.make(key, tokens.Kind.UNSUBSCRIBE, "ms-news", "ann@example.org",
                      dt.datetime(2020, 12, 23, tzinfo=dt.UTC))  # fmt: skip
    said = ok(run_cli("bounces", "process", cwd=project, env=env,
                      input=mailed("unsubscribe@example.org", "ann@example.org",
                                   f"unsubscribe {old}", "r1")))  # fmt: skip
    assert "kept for review" in said
    review = ok(run_cli("bounces", "review", cwd=project, env=env))
    assert "from ms-news, by our token, but the address is not on that list (renamed?)" in review
    shown = ok(run_cli("subscribers", "show", "ann@example.org", cwd=project, env=env))
    assert "research-news: member" in shown
