"""`newsletter bounces fetch [--watch]` against a real IMAP server (Dovecot, started by
the test): a send whose bounces, complaint and mailed unsubscribe land in the bounce
mailbox, the next send that leaves exactly those out, and a mailbox that keeps what
was not understood as it was (nothing deleted, nothing marked read)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_cli
from imap_server import TLS, Dovecot
from imap_server import imap_server as imap_server  # noqa: PLC0414 - the fixture
from smtp_server import Server
from test_bounces_cli import env_for, mailed, ok, returned, week_after

SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key


@pytest.fixture
def server() -> Server:
    s = Server().start()
    yield s  # type: ignore[misc]
    s.stop()


def imap_env(imap: Dovecot, security: str = "tls", **extra: str) -> dict[str, str]:
    assert imap.tls is not None
    port = imap.tls_port if security == "tls" else imap.port
    return {
        "NEWSLETTER_BOUNCE_IMAP_HOST": imap.host,
        "NEWSLETTER_BOUNCE_IMAP_PORT": str(port),
        "NEWSLETTER_BOUNCE_IMAP_SECURITY": security,
        "NEWSLETTER_BOUNCE_IMAP_USERNAME": imap.user,
        "NEWSLETTER_BOUNCE_IMAP_PASSWORD": imap.password,
        "NEWSLETTER_BOUNCE_IMAP_CA_FILE": str(imap.tls.ca_file),
        **extra,
    }


def sent_to_list(project: Path, server: Server, env: dict[str, str], n: int) -> dict[str, str]:
    """Import n readers, send them the example issue; their VERP envelope senders."""
    readers = [f"reader{i:05d}@example.org" for i in range(n)]
    (project / "subs.csv").write_text("email\n" + "\n".join(readers) + "\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project,
               env=env))  # fmt: skip
    ok(run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env))
    return {r.rcpt_tos[0]: r.mail_from for r in server.handler.received}


def test_fetched_bounces_leave_exactly_those_out_and_the_rest_stays_as_it_was(
    project: Path, server: Server, imap_server: Dovecot, database: str
) -> None:
    env = {**env_for(server, database), **imap_env(imap_server)}
    sender = sent_to_list(project, server, env, 7)
    readers = sorted(sender)
    mail = {
        "hard": returned("postfix-unknown-user.eml", sender[readers[1]], readers[1]),
        "complaint": returned("yahoo-arf.eml", sender[readers[2]], readers[2]),
        "out-of-office": returned("out-of-office.eml", sender[readers[3]], readers[3]),
        "unsubscribe": mailed("unsubscribe@example.org", readers[4], "unsubscribe", "u1").encode(),
        # what is not understood, or names nobody of ours: left where it is
        "forged": returned(
            "postfix-unknown-user.eml", sender[readers[5]][:-6] + "aaaaaa", readers[5], tag="f."
        ),
        "spam": b"From: x@spam.example\r\nSubject: Cheap pills\r\n\r\nBuy now\r\n",
        "nested": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 40,
    }
    uids = {name: imap_server.deliver("INBOX", raw) for name, raw in mail.items()}
    left_alone = {uids[n] for n in ("forged", "spam", "nested")}
    before = {m.uid: m for m in imap_server.messages("INBOX") if m.uid in left_alone}

    fetched = ok(run_cli("bounces", "fetch", cwd=project, env=env))
    name = f"imap://bounces@127.0.0.1:{imap_server.tls_port}/INBOX"
    assert f"{name}: a permanent bounce for {readers[1]}: suppressed (bounced)" in fetched
    assert f"a spam complaint for {readers[2]}: suppressed (complained)" in fetched
    assert f"an automatic reply for {readers[3]}: noted" in fetched
    assert f"a request to unsubscribe for {readers[4]}: left research-news" in fetched
    assert fetched.count("kept for review") == 3
    assert fetched.rstrip().endswith(
        f"{name}: 7 new message(s): 4 moved to 'Processed', 3 left for review"
    )
    # What was not understood is exactly as it was: same UIDs, bytes and flags (no \Seen).
    after = imap_server.messages("INBOX")
    assert {m.uid: m for m in after} == before
    moved = imap_server.messages("Processed")
    assert sorted(m.data for m in moved) == sorted(
        imap_server_bytes(mail[n]) for n in ("hard", "complaint", "out-of-office", "unsubscribe")
    )
    assert not any(m.seen for m in moved)  # moved, not read

    # The week after: fetching again reads nothing again; the send leaves them out.
    again = ok(run_cli("bounces", "fetch", cwd=project, env=env))
    assert again.strip() == f"{name}: 0 new message(s): 0 moved to 'Processed', 0 left for review"
    assert {m.uid: m for m in imap_server.messages("INBOX")} == before
    server.handler.received.clear()
    ok(run_cli("send", week_after(project), "--yes", cwd=project, env=env))
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received)
    assert reached == sorted(set(readers) - {readers[1], readers[2], readers[4]})


def imap_server_bytes(raw: bytes) -> bytes:
    """A message as the server gives it back: lines end in CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", raw)


def test_a_message_recorded_before_its_move_is_moved_at_the_next_fetch(
    project: Path, server: Server, imap_server: Dovecot
) -> None:
    """A crash between recording and moving (here: the same message piped first) leaves
    the message in the folder; the next fetch knows it, changes nothing, and moves it."""
    env = {**env_for(server, str(project / "db.sqlite3")), **imap_env(imap_server, "starttls")}
    sender = sent_to_list(project, server, env, 2)
    reader = sorted(sender)[1]
    raw = returned("postfix-unknown-user.eml", sender[reader], reader)
    ok(run_cli("bounces", "process", cwd=project, env=env, input=raw.decode("ascii")))
    imap_server.deliver("INBOX", raw)
    fetched = ok(run_cli("bounces", "fetch", cwd=project, env=env))
    assert "recorded before (suppressed (bounced)); nothing changed [evidence #1] (seen before)" \
        in fetched  # fmt: skip
    assert imap_server.messages("INBOX") == [] and len(imap_server.messages("Processed")) == 1


@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
def test_each_security_reads_the_mailbox_and_a_wrong_password_changes_nothing(
    project: Path, imap_server: Dovecot, security: str
) -> None:
    env = {**env_for(None, str(project / "db.sqlite3")), **imap_env(imap_server, security)}
    ok(run_cli("subscribers", "unsubscribe", "nobody@example.org", cwd=project, env=env))
    imap_server.deliver("INBOX", b"From: x@example.net\r\nSubject: hello\r\n\r\nhi\r\n")
    wrong = run_cli("bounces", "fetch", cwd=project,
                    env={**env, "NEWSLETTER_BOUNCE_IMAP_PASSWORD": "n0t-it"})  # fmt: skip
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert re.fullmatch(
        rf"error: the IMAP server 127\.0\.0\.1:\d+ \({security}\) refused the login: .+\n",
        wrong.stderr,
    ), wrong.stderr
    assert "n0t-it" not in wrong.stdout + wrong.stderr and "Traceback" not in wrong.stderr
    (before,) = imap_server.messages("INBOX")
    assert not before.seen
    done = ok(run_cli("bounces", "fetch", cwd=project, env=env))
    assert "1 new message(s): 0 moved to 'Processed', 1 left for review" in done
    assert imap_server.messages("INBOX") == [before]


def test_starttls_without_the_ca_is_refused_before_the_password_is_sent(
    project: Path, imap_server: Dovecot
) -> None:
    env = {**env_for(None, str(project / "db.sqlite3")), **imap_env(imap_server, "starttls")}
    env.pop("NEWSLETTER_BOUNCE_IMAP_CA_FILE")
    ok(run_cli("subscribers", "unsubscribe", "nobody@example.org", cwd=project, env=env))
    done = run_cli("bounces", "fetch", cwd=project, env=env)
    assert done.returncode == 1
    assert "refused STARTTLS: TLS failed (CERTIFICATE_VERIFY_FAILED)" in done.stderr, done.stderr
    log = imap_server.log()
    assert "user=<bounces>" not in log and "auth failed" not in log.lower(), log


def moved(imap: Dovecot) -> int:
    """How many messages the processed folder holds (0 before the watcher makes it)."""
    if "Processed" not in imap.folders():
        return 0
    return len(imap.messages("Processed"))


def start_watcher(project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`bounces fetch --watch` in a process of its own, its output piped."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "newsletter", "bounces", "fetch", "--watch"],
        cwd=project,
        env={**full_env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_processes_new_mail_as_it_comes_and_stops_at_once_on_sigterm(
    project: Path, server: Server, imap_server: Dovecot
) -> None:
    env = {**env_for(server, str(project / "db.sqlite3")), **imap_env(imap_server)}
    sender = sent_to_list(project, server, env, 3)
    readers = sorted(sender)
    watcher = start_watcher(project, env)
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # said as it starts (click flushes each line)
        for reader in readers[1:]:
            time.sleep(0.5)  # the watcher is waiting (IDLE) when each comes
            imap_server.deliver(
                "INBOX", returned("postfix-unknown-user.eml", sender[reader], reader)
            )
        deadline = time.monotonic() + 30
        while moved(imap_server) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert moved(imap_server) == 2
        time.sleep(0.5)  # back in IDLE
        asked = time.monotonic()
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=15)
        took = time.monotonic() - asked
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    assert took < 5, took  # the wait for mail ends at once, not at its next timeout
    assert "Traceback" not in err
    for reader in readers[1:]:
        assert f"a permanent bounce for {reader}: suppressed (bounced)" in out
    assert first.rstrip().endswith("watching for mail; Ctrl-C or SIGTERM to stop")
    assert out.splitlines()[-1].endswith("/INBOX: stopped")


def test_mail_announced_during_a_command_is_not_missed_by_the_next_idle(
    imap_server: Dovecot,
) -> None:
    """The server announces new mail in its answer to whatever command is under way; the
    wait that follows must not sleep through it (seen once: a watcher that missed mail
    for ten minutes)."""
    from newsletter.bounces.mailbox import ImapAccount, Mailbox

    account = ImapAccount(imap_server.host, imap_server.port, "none", imap_server.user,
                          imap_server.password)  # fmt: skip
    with Mailbox(account) as box:
        assert box.idle(0.2) is True  # what SELECT announced: look once more
        assert box.idle(0.2) is False  # nothing new: the wait ran out (and the line is shut)
    with Mailbox(account) as box:
        box.idle(0.2)
        imap_server.deliver("INBOX", b"From: x@example.net\r\nSubject: hi\r\n\r\nhi\r\n")
        assert box.uids_after(0) == [1]  # a command, answered with "* 1 EXISTS" too
        started = time.monotonic()
        assert box.idle(5) is True
        assert time.monotonic() - started < 1


def test_unsubscribe_mail_in_a_folder_of_its_own_is_read_with_the_bounces(
    project: Path, server: Server, imap_server: Dovecot
) -> None:
    """NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER alone: the same login, another folder (the
    server sorts the unsubscribe address's mail there); one fetch reads both."""
    env = {
        **env_for(
            server, str(project / "db.sqlite3"), NEWSLETTER_UNSUBSCRIBE_MAILTO="leave@example.org"
        ),
        **imap_env(imap_server),
        "NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "Unsubscribe",
        "NEWSLETTER_UNSUBSCRIBE_IMAP_PROCESSED_FOLDER": "Unsubscribe/Done",
    }
    sender = sent_to_list(project, server, env, 3)
    readers = sorted(sender)
    imap_server.create_folder("Unsubscribe")
    imap_server.deliver(
        "INBOX", returned("postfix-unknown-user.eml", sender[readers[1]], readers[1])
    )
    imap_server.deliver(
        "Unsubscribe", mailed("leave@example.org", readers[2], "unsubscribe", "u2").encode()
    )
    # mail that is not a request waits in its folder, as in the bounce mailbox
    imap_server.deliver("Unsubscribe", b"From: x@example.net\r\nSubject: hello\r\n\r\nhi\r\n")

    fetched = ok(run_cli("bounces", "fetch", cwd=project, env=env))
    base = f"imap://bounces@127.0.0.1:{imap_server.tls_port}"
    assert f"{base}/INBOX: 1 new message(s): 1 moved to 'Processed', 0 left" in fetched
    assert f"{base}/Unsubscribe: a request to unsubscribe for {readers[2]}: left research-news" \
        in fetched  # fmt: skip
    assert f"{base}/Unsubscribe: 2 new message(s): 1 moved to 'Unsubscribe/Done', 1 left" \
        in fetched  # fmt: skip
    assert len(imap_server.messages("Unsubscribe")) == 1
    assert len(imap_server.messages("Unsubscribe/Done")) == 1
    assert len(imap_server.messages("Processed")) == 1
    again = ok(run_cli("bounces", "fetch", cwd=project, env=env))
    assert again.count("0 new message(s)") == 2, again
    server.handler.received.clear()
    ok(run_cli("send", week_after(project), "--yes", cwd=project, env=env))
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == [readers[0]]


@pytest.fixture
def two_logins(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(
        users={"bounces": "s3cret", "leave": "an0ther"}, tls=TLS.by_trustme(tmp_path)
    ) as imap:
        yield imap


def test_watch_reads_an_unsubscribe_mailbox_on_its_own_login_beside_the_bounces(
    project: Path, server: Server, two_logins: Dovecot
) -> None:
    imap = two_logins
    env = {
        **env_for(
            server, str(project / "db.sqlite3"), NEWSLETTER_UNSUBSCRIBE_MAILTO="leave@example.org"
        ),
        **imap_env(imap),
        "NEWSLETTER_UNSUBSCRIBE_IMAP_USERNAME": "leave",
        "NEWSLETTER_UNSUBSCRIBE_IMAP_PASSWORD": "an0ther",
    }
    sender = sent_to_list(project, server, env, 3)
    readers = sorted(sender)
    watcher = start_watcher(project, env)
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        time.sleep(1.0)  # both waiting (IDLE)
        imap.deliver("INBOX", mailed("leave@example.org", readers[1], "unsubscribe", "u1").encode(),
                     user="leave")  # fmt: skip
        imap.deliver("INBOX", returned("postfix-unknown-user.eml", sender[readers[2]], readers[2]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            "Processed" in imap.folders() and "Processed" in imap.folders(user="leave")
            and imap.messages("Processed") and imap.messages("Processed", user="leave")
        ):  # fmt: skip
            time.sleep(0.2)
        time.sleep(0.5)  # both back in IDLE
        asked = time.monotonic()
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=15)
        took = time.monotonic() - asked
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    assert took < 5, took  # both waits end at once
    assert "Traceback" not in err and "error" not in err, err
    port = imap.tls_port
    assert first.startswith(
        f"imap://bounces@127.0.0.1:{port}/INBOX, imap://leave@127.0.0.1:{port}/INBOX: watching"
    )
    leave, bounces = (f"imap://{u}@127.0.0.1:{port}/INBOX" for u in ("leave", "bounces"))
    assert f"{leave}: a request to unsubscribe for {readers[1]}: left research-news" in out
    assert f"{bounces}: a permanent bounce for {readers[2]}: suppressed (bounced)" in out
    assert out.splitlines()[-1].endswith("/INBOX: stopped")
    assert imap.messages("INBOX") == [] and imap.messages("INBOX", user="leave") == []


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {"NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "inbox"},
            "reads 'inbox', as the bounce mailbox does",
        ),
        (
            {
                "NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "Processed",
                "NEWSLETTER_UNSUBSCRIBE_IMAP_PROCESSED_FOLDER": "Done",
            },
            "where the bounce mailbox moves",
        ),
        (
            {
                "NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "U",
                "NEWSLETTER_UNSUBSCRIBE_IMAP_PROCESSED_FOLDER": "INBOX",
            },
            "which the bounce mailbox reads",
        ),
        (
            {
                "NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "U",
                "NEWSLETTER_UNSUBSCRIBE_IMAP_PROCESSED_FOLDER": "U",
            },
            "NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER and NEWSLETTER_UNSUBSCRIBE_IMAP_PROCESSED_FOLDER "
            "are both 'U'",
        ),
        ({"NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "a*"}, "wildcards"),
        # the same login written another way: the default port given, the host's case
        (
            {
                "NEWSLETTER_UNSUBSCRIBE_IMAP_PORT": "993",
                "NEWSLETTER_UNSUBSCRIBE_IMAP_HOST": "127.0.0.1.",
            },
            "reads 'INBOX', as the bounce mailbox does",
        ),
    ],
)
def test_an_unsubscribe_mailbox_that_clashes_with_the_bounce_mailbox_is_refused(
    project: Path, extra: dict[str, str], said: str
) -> None:
    env = {
        **env_for(None, str(project / "db.sqlite3")),
        "NEWSLETTER_BOUNCE_IMAP_HOST": "127.0.0.1",
        "NEWSLETTER_BOUNCE_IMAP_USERNAME": "bounces",
        "NEWSLETTER_BOUNCE_IMAP_PASSWORD": "x",
        **extra,
    }
    result = run_cli("bounces", "fetch", cwd=project, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert said in result.stderr, result.stderr


def test_an_unsubscribe_mailbox_alone_needs_its_own_login(project: Path) -> None:
    """Bounces piped from the MTA, the unsubscribe address's mail in a mailbox: only that
    one is read, and it names its own settings when they are missing."""
    env = {
        **env_for(None, str(project / "db.sqlite3")),
        "NEWSLETTER_UNSUBSCRIBE_IMAP_HOST": "127.0.0.1",
    }
    result = run_cli("bounces", "fetch", cwd=project, env=env)
    assert result.returncode != 0
    missing = "NEWSLETTER_UNSUBSCRIBE_IMAP_USERNAME and NEWSLETTER_UNSUBSCRIBE_IMAP_PASSWORD"
    assert f"{missing} are not set" in result.stderr, result.stderr
    assert "NEWSLETTER_BOUNCE_IMAP" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        ({"NEWSLETTER_UNSUBSCRIBE_IMAP_HOST": "imap.other.example"},
         "NEWSLETTER_UNSUBSCRIBE_IMAP_USERNAME and NEWSLETTER_UNSUBSCRIBE_IMAP_PASSWORD are"),
        ({"NEWSLETTER_UNSUBSCRIBE_IMAP_USERNAME": "leave"},
         "NEWSLETTER_UNSUBSCRIBE_IMAP_PASSWORD is"),
    ],
)  # fmt: skip
def test_the_bounce_mailboxs_password_goes_nowhere_else(
    project: Path, extra: dict[str, str], missing: str
) -> None:
    """Another server, or a login of its own: the bounce mailbox's password is not taken."""
    env = {
        **env_for(None, str(project / "db.sqlite3")),
        "NEWSLETTER_BOUNCE_IMAP_HOST": "127.0.0.1",
        "NEWSLETTER_BOUNCE_IMAP_USERNAME": "bounces",
        "NEWSLETTER_BOUNCE_IMAP_PASSWORD": "x",
        "NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER": "Unsubscribe",
        **extra,
    }
    result = run_cli("bounces", "fetch", cwd=project, env=env)
    assert result.returncode != 0
    assert f"{missing} not set" in result.stderr, result.stderr
