"""`newsletter subscribers ...`, `send` and `status` as a user runs them, in a subprocess."""

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
from smtp_server import Server


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def env_for(server: Server | None, project: Path, **extra: str) -> dict[str, str]:
    env = {
        "NEWSLETTER_DATABASE": str(project / "newsletter.sqlite3"),
        "NEWSLETTER_SECRET_KEY": "test-secret-for-the-suite-0123456789",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port if server else 9),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SMTP_PASSWORD": "do-not-print-me",
        "NEWSLETTER_SMTP_USERNAME": "",
        "NEWSLETTER_SEND_CONNECTIONS": "4",
    }
    env.update(extra)
    return env


def wait_for(server: Server, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(server.handler.received) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def kill_9_after(
    args: list[str], project: Path, env: dict[str, str], server: Server, count: int
) -> None:
    """Run the CLI and kill -9 it once the server has received ``count`` messages."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", *args],
        cwd=project,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(server, count)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def write_csv(project: Path, n: int, name: str = "subs.csv") -> list[str]:
    emails = [f"reader{i:05d}@example.org" for i in range(n)]
    lines = ["email,first_name,last_name"] + [f"{e},Reader,{i}" for i, e in enumerate(emails)]
    (project / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return emails


def test_import_send_status(project: Path, server: Server) -> None:
    env = env_for(server, project)
    emails = write_csv(project, 25)
    imported = run_cli(
        "subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env
    )
    assert imported.returncode == 0, imported.stderr
    assert "25 added" in imported.stdout
    unsub = run_cli("subscribers", "unsubscribe", emails[0].upper(), cwd=project, env=env)
    assert unsub.returncode == 0 and f"{emails[0]} is suppressed" in unsub.stdout

    sent = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert sent.returncode == 0, sent.stderr
    assert "24 recipient(s), 1 suppressed" in sent.stdout
    assert re.search(r"sent 24, rejected 0, deferred 0, unknown 0", sent.stdout)
    assert "do-not-print-me" not in sent.stdout + sent.stderr
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == emails[1:]

    status = run_cli("status", "2020-12-23", "--list", "research-news", cwd=project, env=env)
    assert status.returncode == 0 and re.search(r"sent\s+24", status.stdout)
    again = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert (
        again.returncode == 0
        and "resuming" in again.stdout
        and "this run 0 message" in again.stdout
    )
    assert len(server.handler.received) == 24


def test_rejections_exit_3_and_are_reported(project: Path, server: Server) -> None:
    env = env_for(server, project)
    emails = write_csv(project, 5)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.reject = {emails[1]: (550, "5.1.1 unknown user")}
    result = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert result.returncode == 3
    assert "sent 4, rejected 1" in result.stdout
    status = run_cli("status", f"issues/{EXAMPLE.name}", cwd=project, env=env)
    assert f"rejected {emails[1]}: 550 RCPT TO: 5.1.1 unknown user" in status.stdout


def test_dry_run_opens_no_connection_and_writes_no_log(project: Path, server: Server) -> None:
    env = env_for(server, project)
    write_csv(project, 12)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    before = server.handler.connections
    result = run_cli("send", f"issues/{EXAMPLE.name}", "--dry-run", cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert server.handler.connections == before and server.handler.received == []
    assert "12 recipient(s), 0 suppressed" in result.stdout
    assert "first: reader00000@example.org" in result.stdout
    outbox = project / "build" / "2020-12-23" / "outbox"
    samples = sorted(outbox.iterdir())
    assert len(samples) == 5 and samples[0].name == "001-reader00000@example.org.eml"
    assert b"List-Unsubscribe: <https://news.example.org/unsubscribe/" in samples[0].read_bytes()
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert status.returncode == 1 and "has not been sent" in status.stdout


def test_test_copy_goes_only_to_the_given_address(project: Path, server: Server) -> None:
    env = env_for(server, project)
    write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    result = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--to", "editor@example.org", cwd=project, env=env
    )
    assert result.returncode == 0, result.stderr
    assert [r.rcpt_tos for r in server.handler.received] == [["editor@example.org"]]
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert "has not been sent" in status.stdout


def test_real_send_asks_first_and_needs_a_secret(project: Path, server: Server) -> None:
    env = env_for(server, project)
    write_csv(project, 2)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    declined = run_cli("send", f"issues/{EXAMPLE.name}", cwd=project, env=env, input="n\n")
    assert (
        declined.returncode == 1
        and "Send 2020-12-23 to the list 'research-news'" in declined.stdout
    )
    assert server.handler.received == []
    no_secret = {k: v for k, v in env.items() if k != "NEWSLETTER_SECRET_KEY"}
    result = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=no_secret)
    assert result.returncode == 1 and "NEWSLETTER_SECRET_KEY is not set" in result.stderr


def test_kill_9_mid_send_then_resume(project: Path, server: Server) -> None:
    """The crash test: kill -9 during a send, run it again, count what everyone got."""
    env = env_for(server, project, NEWSLETTER_SEND_CONNECTIONS="4")
    emails = write_csv(project, 400)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.delay = 0.004  # slow enough to be killed in the middle
    kill_9_after(["send", f"issues/{EXAMPLE.name}", "--yes"], project, env, server, 120)
    got_before = len(server.handler.received)
    assert 120 <= got_before < 400, "the kill must land in the middle of the send"

    server.handler.behaviour.delay = 0
    resumed = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    unknown = re.findall(r"^unknown: (\S+): ", resumed.stdout, re.M)
    assert resumed.returncode == (3 if unknown else 0), resumed.stderr
    assert len(unknown) <= 4 + 4 + 64  # connections + queue + one commit batch
    counts = {e: len(server.handler.to(e)) for e in emails}
    for e in emails:
        if e in unknown:
            assert counts[e] in (0, 1)
        else:
            assert counts[e] == 1, f"{e} got {counts[e]} messages"
    # the user decides: resend to those in doubt
    if unknown:
        final = run_cli(
            "send", f"issues/{EXAMPLE.name}", "--yes", "--resend-unknown", cwd=project, env=env
        )
        assert final.returncode == 0, final.stdout + final.stderr
        for e in unknown:
            assert len(server.handler.to(e)) in (1, 2)
            assert len(server.handler.to(e)) == counts[e] + 1


def test_subscribers_commands(project: Path) -> None:
    env = env_for(None, project)
    emails = write_csv(project, 3)
    bad = project / "bad.csv"
    bad.write_text("email\nok@example.org\nnope\n", encoding="utf-8")
    refused = run_cli("subscribers", "import", "bad.csv", "--list", "news", cwd=project, env=env)
    assert refused.returncode == 1 and "bad.csv:3: email" in refused.stderr
    assert "nothing was imported" in refused.stderr
    run_cli("subscribers", "import", "subs.csv", "--list", "news", cwd=project, env=env)
    run_cli("subscribers", "unsubscribe", emails[2], "--reason", "complained", cwd=project, env=env)
    count = run_cli("subscribers", "count", cwd=project, env=env)
    assert count.stdout.strip() == (
        "news: 3 member(s): 2 subscribed (will be mailed), 0 opted out of this list, "
        "1 suppressed (1 complained)"
    )
    listed = run_cli("subscribers", "list", "--list", "news", cwd=project, env=env)
    assert f"{emails[2]}  suppressed (complained) since 20" in listed.stdout
    assert listed.stdout.rstrip().endswith("  Reader 2")
    removed = run_cli("subscribers", "remove", emails[0], "--list", "news", cwd=project, env=env)
    assert "1 of 1 removed" in removed.stdout
    exported = run_cli("subscribers", "export", "--list", "news", cwd=project, env=env)
    lines = exported.stdout.splitlines()
    assert lines[:2] == [
        "email,first_name,last_name,newsletter_state,newsletter_reason,newsletter_since",
        f"{emails[1]},Reader,1,subscribed,,",
    ]
    assert lines[2].startswith(f"{emails[2]},Reader,2,suppressed,complained,20")
    assert len(lines) == 3


def test_dkim_signed_send(project: Path, server: Server, tmp_path: Path) -> None:
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "dkim.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    env = env_for(
        server, project, NEWSLETTER_DKIM_KEY_FILE=str(pem), NEWSLETTER_DKIM_SELECTOR="weekly"
    )
    write_csv(project, 2)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    result = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    for received in server.handler.received:
        assert dkim.verify(received.data, dnsfunc=lambda name, timeout=5: record)
    half = env_for(server, project, NEWSLETTER_DKIM_SELECTOR="weekly")
    refused = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=half)
    assert refused.returncode == 1 and "go together" in refused.stderr


def test_progress_bar_on_a_terminal(project: Path, server: Server) -> None:
    import pty

    env = env_for(server, project)
    write_csv(project, 60)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.delay = 0.02
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "send", f"issues/{EXAMPLE.name}", "--yes"],
        cwd=project,
        env={**os.environ, **env, "COLUMNS": "120", "TERM": "xterm"},
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    out, _ = proc.communicate(timeout=60)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    assert proc.returncode == 0
    screen = terminal.decode("utf-8", "replace")
    assert "sending" in screen and "/60" in screen and "/s" in screen
    assert "sent 60" in out  # the summary goes to standard output, the bar does not


def schedule_env(server: Server, project: Path, now: str) -> dict[str, str]:
    return env_for(
        server,
        project,
        NEWSLETTER_SCHEDULE="Wed 09:00",
        NEWSLETTER_TIMEZONE="America/New_York",
        NEWSLETTER_TEST_NOW=now,
    )


def test_send_due_sends_the_issue_once(project: Path, server: Server) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")  # the example's day
    emails = write_csv(project, 30)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    first = run_cli("send", "--due", cwd=project, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "schedule: 2020-12-23 for the slot Wed 2020-12-23 09:00 EST: sent" in first.stdout
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == emails
    second = run_cli("send", "--due", cwd=project, env=env)  # cron fires again
    assert second.returncode == 0 and "was handled" in second.stdout
    assert len(server.handler.received) == 30
    shown = run_cli("schedule", cwd=project, env=env)
    assert "2020-12-23T14:00Z  2020-12-23  2020-12-23  done" in shown.stdout


def test_scheduler_process_survives_a_failed_send_and_stops_on_sigterm(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    write_csv(project, 10)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    issue = project / "issues" / EXAMPLE.name
    good = issue.read_text(encoding="utf-8")
    issue.write_text(
        good.replace("url: https://www.example.org/news/2020/12/stem", "url: http://x/"),
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "schedule", "run", "--poll", "1"],
        cwd=project,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.5)
        assert proc.poll() is None, "a failed send must not stop the scheduler"
        assert server.handler.received == []
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "must be an https:// URL" in err
    assert "scheduler: stopped" in out


def test_kill_9_during_a_scheduled_send_then_the_next_run_resumes(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    emails = write_csv(project, 300)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.delay = 0.004
    kill_9_after(["send", "--due"], project, env, server, 80)
    server.handler.behaviour.delay = 0
    # The killed run's leases are taken over at once: its process is gone.
    resumed = run_cli("send", "--due", cwd=project, env=env)
    unknown = re.findall(r"^unknown: (\S+): ", resumed.stdout, re.M)
    assert resumed.returncode in (0, 3), resumed.stdout + resumed.stderr
    assert len(unknown) <= 4 + 4 + 64
    for e in emails:
        got = len(server.handler.to(e))
        assert got in (0, 1) if e in unknown else got == 1, f"{e} got {got} messages"


def test_sigterm_during_a_scheduled_send_leaves_nobody_in_doubt(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    write_csv(project, 300)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.delay = 0.01
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "schedule", "run", "--poll", "1"],
        cwd=project,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(server, 40)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped early: stopped by SIGTERM" in out and "scheduler: stopped" in out
    received = len(server.handler.received)
    assert 40 <= received < 300
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    counts = dict(re.findall(r"^\s+(\w+)\s+(\d+)$", status.stdout, re.M))
    # every message that went out is recorded as sent; nobody is left in doubt
    assert counts["unknown"] == "0" and counts["sending"] == "0"
    assert int(counts["sent"]) == received
    assert int(counts["pending"]) == 300 - received


def test_sending_to_an_empty_list_freezes_nothing(project: Path, server: Server) -> None:
    from newsletter.storage.sqlite.connection import connect

    env = env_for(server, project)
    connect(project / "newsletter.sqlite3", create=True).close()  # a database with no list
    empty = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert empty.returncode == 1 and "has nobody to send to" in empty.stderr
    write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    sent = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert (
        sent.returncode == 0
        and "starting 2020-12-23 to research-news: 3 recipient(s)" in sent.stdout
    )
    assert len(server.handler.received) == 3


def test_a_second_process_cannot_work_on_the_same_send(project: Path, server: Server) -> None:
    from newsletter.storage.sqlite.leases import SqliteLease as Lease

    env = env_for(server, project)
    write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    other = Lease(project / "newsletter.sqlite3", "send:2020-12-23:research-news")
    other.acquire(time.time())  # a live process, as far as the CLI can tell
    try:
        blocked = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    finally:
        other.release()
    assert blocked.returncode == 1 and "holds the 'send:2020-12-23:research-news' lock" in (
        blocked.stderr
    )
    assert server.handler.received == []
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert "has not been sent" in status.stdout  # not even frozen


def test_declining_the_prompt_changes_nothing(project: Path, server: Server) -> None:
    env = env_for(server, project)
    emails = write_csv(project, 4)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.drop_in_data = {emails[1]}
    run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    server.handler.behaviour.drop_in_data = set()
    declined = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--resend-unknown", cwd=project, env=env, input="n\n"
    )
    assert declined.returncode == 1
    # The plan shown before the question counts the one in doubt as going again.
    assert "to send now: 0 pending, 0 deferred, 1 unknown again (--resend-unknown)" in (
        declined.stdout
    )
    assert "--resend-unknown sends to them again now." in declined.stdout
    assert "add --resend-unknown" not in declined.stdout
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert re.search(r"unknown\s+1", status.stdout)  # still in doubt, not queued again
    plain = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert plain.returncode == 3 and server.handler.to(emails[1]) == []


# ------------------------------------------------------------ one issue, several lists


def two_lists(project: Path, env: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Lists a and b sharing three members: (only on a, on both, only on b)."""
    only_a = [f"a{i}@example.org" for i in range(2)]
    both = [f"both{i}@example.org" for i in range(3)]
    only_b = [f"b{i}@example.org" for i in range(4)]
    for name, emails in (("a", only_a + both), ("b", both + only_b)):
        lines = ["email,first_name"] + [f"{e},R" for e in emails]
        (project / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        done = run_cli("subscribers", "import", f"{name}.csv", "--list", name, cwd=project, env=env)
        assert done.returncode == 0, done.stderr
    return only_a, both, only_b


def list_of(received: object) -> tuple[str, str]:
    """(List-Id, the list the unsubscribe token names) of a received message."""
    from newsletter import tokens

    msg = received.message  # type: ignore[attr-defined]
    token = re.search(r"/unsubscribe/([^>]+)>", msg["List-Unsubscribe"])
    assert token is not None
    key = env_for(None, Path())["NEWSLETTER_SECRET_KEY"].encode()
    subject = tokens.read(key, token.group(1))
    assert subject is not None
    return msg["List-Id"], subject.list_name


def test_one_issue_to_two_lists_reaches_each_person_once(project: Path, server: Server) -> None:
    env = env_for(server, project)
    only_a, both, only_b = two_lists(project, env)
    first = run_cli("send", f"issues/{EXAMPLE.name}", "--list", "a", "--yes", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    assert "5 recipient(s)" in first.stdout and "another list" not in first.stdout
    # the dry run of the second list counts what the real send will leave out
    dry = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--list", "b", "--dry-run", cwd=project, env=env
    )
    assert dry.returncode == 0, dry.stderr
    assert "starting 2020-12-23 to b: 4 recipient(s)" in dry.stdout
    assert "3 left out: they have this issue from another list's send" in dry.stdout
    assert "first: b0@example.org, b1@example.org" in dry.stdout
    assert "4 message(s) would be sent now" in dry.stdout
    asked = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--list", "b", cwd=project, env=env, input="n\n"
    )
    assert asked.returncode == 1 and "3 left out" in asked.stdout
    second = run_cli("send", f"issues/{EXAMPLE.name}", "--list", "b", "--yes", cwd=project, env=env)
    assert second.returncode == 0, second.stderr
    assert "sent 4, rejected 0" in second.stdout
    assert "left out 3 who have this issue from another list's send" in second.stdout
    for e in only_a + both + only_b:
        assert len(server.handler.to(e)) == 1, f"{e} got {len(server.handler.to(e))} messages"
    for e in both + only_a:
        assert list_of(server.handler.to(e)[0]) == ("MS Research News <a.example.org>", "a")
    for e in only_b:
        assert list_of(server.handler.to(e)[0]) == ("MS Research News <b.example.org>", "b")
    status = run_cli("status", "2020-12-23", "--list", "b", cwd=project, env=env)
    assert "audience 4, 0 suppressed or had left the list at the start, 3 left out" in status.stdout
    again = run_cli("send", f"issues/{EXAMPLE.name}", "--list", "b", "--yes", cwd=project, env=env)
    assert again.returncode == 0 and "3 left out" in again.stdout
    assert len(server.handler.received) == 9


def test_scheduled_lists_reach_each_person_once(project: Path, server: Server) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    env["NEWSLETTER_SCHEDULE_LISTS"] = "a,b"
    only_a, both, only_b = two_lists(project, env)
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 0, due.stdout + due.stderr
    assert "left out 3 who have this issue from another list's send" in due.stdout
    for e in only_a + both + only_b:
        assert len(server.handler.to(e)) == 1, f"{e} got {len(server.handler.to(e))} messages"
    for e in both:
        assert list_of(server.handler.to(e)[0])[1] == "a"
    assert len(server.handler.received) == 9


def test_test_copy_has_its_own_message_id(project: Path, server: Server) -> None:
    env = env_for(server, project)
    (project / "subs.csv").write_text("email\neditor@example.org\nx@example.org\n")
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    tests = [
        run_cli(
            "send", f"issues/{EXAMPLE.name}", "--to", "editor@example.org", cwd=project, env=env
        )
        for _ in range(2)
    ]
    assert all(t.returncode == 0 for t in tests), tests[0].stderr
    real = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert real.returncode == 0, real.stderr
    ids = [r.message["Message-ID"] for r in server.handler.to("editor@example.org")]
    assert len(ids) == 3 and len(set(ids)) == 3  # two test copies and the real one
    assert all(re.fullmatch(r"<2020-12-23\.test\.[0-9a-f]{16}@example\.org>", i) for i in ids[:2])
    assert ".test." not in ids[2]


def test_test_copy_needs_the_secret_key_as_a_send_does(project: Path, server: Server) -> None:
    env = {k: v for k, v in env_for(server, project).items() if k != "NEWSLETTER_SECRET_KEY"}
    refused = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--to", "editor@example.org", cwd=project, env=env
    )
    assert refused.returncode == 1
    assert "NEWSLETTER_SECRET_KEY is not set: unsubscribe links would not be secure" in (
        refused.stderr
    )
    assert server.handler.received == []
    # a dry run of a test copy writes a file and mails nobody: no key needed
    dry = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--to", "e@example.org", "--dry-run", cwd=project, env=env
    )
    assert dry.returncode == 0, dry.stderr


def test_a_second_send_is_told_about_the_lock_before_anything_else(
    project: Path, server: Server
) -> None:
    import socket

    from newsletter.storage.sqlite.leases import SqliteLease as Lease

    env = env_for(server, project)
    emails = write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.drop_in_data = {emails[1]}
    run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)  # leaves 1 unknown
    server.handler.behaviour.drop_in_data = set()
    got = len(server.handler.received)
    other = Lease(project / "newsletter.sqlite3", "send:2020-12-23:research-news")
    other.acquire(time.time())
    try:
        blocked = run_cli(
            "send", f"issues/{EXAMPLE.name}", "--resend-unknown", cwd=project, env=env, input="y\n"
        )
    finally:
        other.release()
    assert blocked.returncode == 1
    assert f"process {os.getpid()} on {socket.gethostname()}" in blocked.stderr
    assert "holds the 'send:2020-12-23:research-news' lock since 20" in blocked.stderr
    assert "lease lasts until" in blocked.stderr
    # no preview, no question, no talk of unknown recipients first
    assert "Send 2020-12-23" not in blocked.stdout and "resuming" not in blocked.stdout
    assert "unknown" not in blocked.stdout
    assert len(server.handler.received) == got
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert re.search(r"unknown\s+1", status.stdout)


def test_non_ascii_reply_to_is_encoded(project: Path, server: Server) -> None:
    env = env_for(server, project, NEWSLETTER_REPLY_TO="Équipe Recherche <research@example.org>")
    built = run_cli("build", f"issues/{EXAMPLE.name}", cwd=project, env=env)
    assert built.returncode == 0, built.stderr
    raw = (project / "build" / "2020-12-23" / "preview.eml").read_bytes()
    assert b"Reply-To: =?utf-8?" in raw
    write_csv(project, 1)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    sent = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert sent.returncode == 0, sent.stderr
    reply_to = server.handler.received[0].message["Reply-To"]
    assert reply_to.addresses[0].display_name == "Équipe Recherche"
    assert reply_to.addresses[0].addr_spec == "research@example.org"
    bad = env_for(server, project, NEWSLETTER_REPLY_TO="Team <team@example.org>, x@example.org")
    refused = run_cli("build", f"issues/{EXAMPLE.name}", cwd=project, env=bad)
    assert refused.returncode == 1 and "NEWSLETTER_REPLY_TO: " in refused.stderr


@pytest.mark.parametrize(
    "name", ["Actualités", "my list", "Research-News", "-x", "a" * 65, "news.", "a..b"]
)
def test_list_names_follow_one_rule_everywhere(project: Path, name: str) -> None:
    env = env_for(None, project)
    write_csv(project, 2)
    rule = "is not a valid list name: it must be 1-64 lower-case letters, digits"
    for args in (
        ["send", f"issues/{EXAMPLE.name}", "--list", name, "--yes"],
        ["send", f"issues/{EXAMPLE.name}", "--list", name, "--dry-run"],
        ["status", "2020-12-23", "--list", name],
        ["subscribers", "import", "subs.csv", "--list", name],
        ["subscribers", "count", "--list", name],
        ["subscribers", "list", "--list", name],
    ):
        result = run_cli(*args, cwd=project, env=env)
        assert result.returncode != 0, args
        assert "--list" in result.stderr and rule in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    scheduled = env_for(
        None,
        project,
        NEWSLETTER_SCHEDULE="Wed 09:00",
        NEWSLETTER_SCHEDULE_LISTS=f"research-news,{name}",
        NEWSLETTER_TEST_NOW="2020-12-23T09:30:00-05:00",
    )
    due = run_cli("send", "--due", cwd=project, env=scheduled)
    assert due.returncode == 1 and f"NEWSLETTER_SCHEDULE_LISTS: {name!r} {rule}" in due.stderr
    counted = run_cli("subscribers", "count", cwd=project, env=env)
    # nothing was imported under the bad name: not even a database was made
    assert counted.returncode == 1 and "there is no database at" in counted.stderr


def test_options_that_do_not_go_together_are_refused(project: Path) -> None:
    env = env_for(None, project)
    due = run_cli("send", "--due", "--list", "a", cwd=project, env=env)
    assert due.returncode == 2 and "give no ISSUE_FILE, --list" in due.stderr
    to = run_cli(
        "send", f"issues/{EXAMPLE.name}", "--to", "e@example.org", "--resend-unknown",
        cwd=project, env=env,
    )  # fmt: skip
    assert to.returncode == 2 and "--resend-unknown and --retry-rejected belong" in to.stderr


def test_only_a_stopped_campaign_is_told_to_resume(project: Path, server: Server) -> None:
    from newsletter.storage.sqlite.connection import connect
    from newsletter.storage.sqlite.leases import SqliteLease as Lease

    resume = "Run the same command again to resume"
    env = env_for(server, project)
    connect(project / "newsletter.sqlite3", create=True).close()  # a database with no list
    send = ["send", f"issues/{EXAMPLE.name}", "--yes"]
    # Errors before anything was frozen or sent: there is nothing to resume.
    empty = run_cli(*send, cwd=project, env=env)
    assert empty.returncode == 1 and "has nobody to send to" in empty.stderr
    no_key = {k: v for k, v in env.items() if k != "NEWSLETTER_SECRET_KEY"}
    unkeyed = run_cli(*send, cwd=project, env=no_key)
    assert unkeyed.returncode == 1 and "NEWSLETTER_SECRET_KEY is not set" in unkeyed.stderr
    write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    other = Lease(project / "newsletter.sqlite3", "send:2020-12-23:research-news")
    other.acquire(time.time())
    try:
        locked = run_cli(*send, cwd=project, env=env)
    finally:
        other.release()
    assert locked.returncode == 1 and "wait for that one to finish" in locked.stderr
    for refused in (empty, unkeyed, locked):
        assert resume not in refused.stderr, refused.stderr
    assert server.handler.received == []
    # The relay refuses the campaign once it is frozen: resuming is the way on.
    no_tls = run_cli(*send, cwd=project, env={**env, "NEWSLETTER_SMTP_SECURITY": "starttls"})
    assert no_tls.returncode == 1 and "does not offer STARTTLS" in no_tls.stderr
    assert resume in no_tls.stderr
    resumed = run_cli(*send, cwd=project, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert len(server.handler.received) == 3


def test_a_scheduled_list_that_cannot_be_sent_holds_back_no_other(
    project: Path, server: Server
) -> None:
    from newsletter.storage.sqlite.leases import SqliteLease as Lease

    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    env["NEWSLETTER_SCHEDULE_LISTS"] = "a,b"
    only_a, both, only_b = two_lists(project, env)
    # a's send is being worked on by hand: the scheduled run cannot take it
    by_hand = Lease(project / "newsletter.sqlite3", "send:2020-12-23:a")
    by_hand.acquire(time.time())
    try:
        due = run_cli("send", "--due", cwd=project, env=env)
    finally:
        by_hand.release()
    assert due.returncode == 1
    assert "2020-12-23 for the slot Wed 2020-12-23 09:00 EST: sent to b; not sent to" in (
        due.stderr
    )
    assert "list a: another run (process" in due.stderr
    assert "Nothing was sent" not in due.stderr  # b was
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == sorted(both + only_b)
    shown = run_cli("schedule", cwd=project, env=env)
    assert "2020-12-23  incomplete  list a: another run" in shown.stdout
    # the next look sends a, leaving out whoever b's send already reached
    again = run_cli("send", "--due", cwd=project, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "left out 3 who have this issue from another list's send" in again.stdout
    for e in only_a + both + only_b:
        assert len(server.handler.to(e)) == 1, f"{e} got {len(server.handler.to(e))} messages"
    assert "2020-12-23  done" in run_cli("schedule", cwd=project, env=env).stdout


def test_a_slot_the_relay_stops_part_way_is_incomplete_not_unsent(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    env["NEWSLETTER_SEND_CONNECTIONS"] = "1"
    emails = write_csv(project, 8)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.refuse_sender_after = 3
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 1
    assert len(server.handler.received) == 3
    assert "refused the sender" in due.stderr
    assert "Nothing was sent" not in due.stderr  # three were
    assert "not sent to every list" in due.stderr
    assert "2020-12-23  incomplete" in run_cli("schedule", cwd=project, env=env).stdout
    server.handler.behaviour.refuse_sender_after = None
    again = run_cli("send", "--due", cwd=project, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == emails


def test_a_disguised_society_file_fails_the_slot_once_and_shows_ahead(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    env["NEWSLETTER_SCHEDULE_LISTS"] = "a,b"
    two_lists(project, env)
    society = project / "society.yaml"
    text = society.read_text(encoding="utf-8")
    society.write_text(text.replace('name: "The MS', 'name: "The \u202eMS', 1), encoding="utf-8")
    problem = "society.yaml:4: name: contains U+202E RIGHT-TO-LEFT OVERRIDE"
    shown = run_cli("schedule", cwd=project, env={**env, "NEWSLETTER_TEST_NOW": "2020-12-22"})
    assert f"cannot be sent: {problem}" in shown.stdout, shown.stdout
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 1
    assert due.stderr.count(problem) == 1 and "list a:" not in due.stderr, due.stderr
    assert "Nothing was sent for this slot." in due.stderr
    assert server.handler.received == []
    assert (
        "2020-12-23  -  failed  society.yaml:4" in run_cli("schedule", cwd=project, env=env).stdout
    )


def test_kill_9_on_the_first_list_then_the_second_then_the_first_resumed(
    project: Path, server: Server
) -> None:
    """Nobody twice, nobody skipped, and every one left out is counted."""
    env = env_for(server, project, NEWSLETTER_SEND_CONNECTIONS="4")
    only_a = [f"a{i:03d}@example.org" for i in range(150)]
    both = [f"both{i:03d}@example.org" for i in range(150)]
    only_b = [f"b{i:03d}@example.org" for i in range(100)]
    for name, emails in (("a", only_a + both), ("b", both + only_b)):
        lines = ["email", *emails]
        (project / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        run_cli("subscribers", "import", f"{name}.csv", "--list", name, cwd=project, env=env)
    send = ["send", f"issues/{EXAMPLE.name}", "--yes", "--list"]
    server.handler.behaviour.delay = 0.004
    kill_9_after([*send, "a"], project, env, server, 60)
    assert 60 <= len(server.handler.received) < 300
    server.handler.behaviour.delay = 0
    second = run_cli(*send, "b", cwd=project, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    # a's send holds every one of `both` (sent, in flight or still pending)
    assert "left out 150 who have this issue from another list's send" in second.stdout
    resumed = run_cli(*send, "a", cwd=project, env=env)
    unknown = re.findall(r"^unknown: (\S+): ", resumed.stdout, re.M)
    assert resumed.returncode == (3 if unknown else 0), resumed.stderr
    for e in only_a + both + only_b:
        got = len(server.handler.to(e))
        assert got == 1 or (got == 0 and e in unknown), f"{e} got {got} messages"
    for e in both:
        if server.handler.to(e):
            assert list_of(server.handler.to(e)[0])[1] == "a"
    status = run_cli("status", "2020-12-23", "--list", "b", cwd=project, env=env)
    assert (
        "audience 100, 0 suppressed or had left the list at the start, 150 left out"
        in status.stdout
    )


@pytest.mark.parametrize("extra", [["--resend-unknown"], ["--retry-rejected"], ["--outbox", "box"]])
def test_send_due_refuses_options_it_would_ignore(project: Path, extra: list[str]) -> None:
    env = {
        **env_for(None, project),
        "NEWSLETTER_SCHEDULE": "Wed 09:00",
        "NEWSLETTER_TEST_NOW": "2020-12-23T09:30:00-05:00",
    }
    due = run_cli("send", "--due", *extra, cwd=project, env=env)
    assert due.returncode == 2, due.stdout + due.stderr
    assert extra[0] in due.stderr and "schedule:" not in due.stdout


# ------------------------------------------------- lists whose members have all left


def everyone_leaves(project: Path, list_name: str, emails: list[str]) -> None:
    """The first three leave the list (its unsubscribe link), the rest are suppressed."""
    from newsletter.storage.sqlite.connection import connect
    from newsletter.storage.sqlite.subscribers import SubscriberStore

    store = SubscriberStore(connect(project / "newsletter.sqlite3"))
    for e in emails[:3]:
        assert store.opt_out(list_name, e)
    store.suppress(emails[3], "bounced")
    for e in emails[4:]:
        store.suppress(e, "unsubscribed")


ALL_LEFT = (
    "the list 'members' has nobody to send to: 5 members, none of them mailable: "
    "3 opted out of this list and 2 suppressed (1 bounced, 1 unsubscribed)"
)


def test_a_list_everyone_left_says_so_not_import_and_freezes_nothing(
    project: Path, server: Server
) -> None:
    env = env_for(server, project)
    emails = write_csv(project, 5)
    run_cli("subscribers", "import", "subs.csv", "--list", "members", cwd=project, env=env)
    everyone_leaves(project, "members", emails)
    issue = f"issues/{EXAMPLE.name}"
    for extra in (["--yes"], ["--dry-run"]):
        result = run_cli("send", issue, "--list", "members", *extra, cwd=project, env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert ALL_LEFT in result.stderr and "import" not in result.stderr
    assert server.handler.received == []
    # nothing was frozen: someone who joins later still gets this issue
    (project / "new.csv").write_text("email\nnew@example.org\n", encoding="utf-8")
    run_cli("subscribers", "import", "new.csv", "--list", "members", cwd=project, env=env)
    sent = run_cli("send", issue, "--list", "members", "--yes", cwd=project, env=env)
    assert sent.returncode == 0, sent.stderr
    assert [r.rcpt_tos[0] for r in server.handler.received] == ["new@example.org"]
    # a list nobody was ever imported into is a different matter, and says so
    empty = run_cli("send", issue, "--list", "nobody-here", "--dry-run", cwd=project, env=env)
    assert empty.returncode == 1
    assert "the list 'nobody-here' has nobody to send to: no members; import" in empty.stderr


def test_a_scheduled_list_everyone_left_does_not_fail_the_slot(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    env["NEWSLETTER_SCHEDULE_LISTS"] = "members,research-news"
    emails = write_csv(project, 5)
    run_cli("subscribers", "import", "subs.csv", "--list", "members", cwd=project, env=env)
    others = [f"other{i}@example.org" for i in range(3)]
    (project / "others.csv").write_text("email\n" + "\n".join(others) + "\n", encoding="utf-8")
    run_cli("subscribers", "import", "others.csv", "--list", "research-news", cwd=project, env=env)
    everyone_leaves(project, "members", emails)
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 0, due.stdout + due.stderr
    assert (
        "schedule: 2020-12-23 for the slot Wed 2020-12-23 09:00 EST: sent; "
        "nobody to send to on members: all 5 have left" in due.stdout
    )
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == others
    again = run_cli("send", "--due", cwd=project, env=env)  # the next look: done, not retried
    assert again.returncode == 0 and "was handled" in again.stdout
    shown = run_cli("schedule", cwd=project, env=env)
    assert "2020-12-23  done  nobody to send to on members: all 5 have left" in shown.stdout


def test_a_scheduled_list_never_imported_still_fails_the_slot(
    project: Path, server: Server
) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    env["NEWSLETTER_SCHEDULE_LISTS"] = "members,research-news,typo"
    emails = write_csv(project, 5)
    run_cli("subscribers", "import", "subs.csv", "--list", "members", cwd=project, env=env)
    (project / "rn.csv").write_text("email\nrn@example.org\n", encoding="utf-8")
    run_cli("subscribers", "import", "rn.csv", "--list", "research-news", cwd=project, env=env)
    everyone_leaves(project, "members", emails)
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 1
    assert "sent to research-news; not sent to every list" in due.stderr
    assert "list typo: the list 'typo' has nobody to send to: no members; import" in (due.stderr)
    assert "nobody to send to on members: all 5 have left" in due.stderr
    shown = run_cli("schedule", cwd=project, env=env)
    assert (
        "2020-12-23  incomplete  list typo: the list 'typo' has nobody to send to: no members"
        in shown.stdout
    )


# ------------------------------------------------------------------- CLI wording


def test_schedule_shows_why_a_slot_is_incomplete(project: Path, server: Server) -> None:
    env = schedule_env(server, project, "2020-12-23T09:30:00-05:00")
    emails = write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.reject = {emails[1]: (550, "5.1.1 unknown user")}
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 3 and "incomplete; research-news not finished: 1 rejected" in (
        due.stdout
    )
    shown = run_cli("schedule", cwd=project, env=env)
    assert "2020-12-23  incomplete  research-news not finished: 1 rejected" in shown.stdout


def test_the_send_summary_tells_leaving_a_list_from_suppression(
    project: Path, server: Server
) -> None:
    env = env_for(server, project)
    emails = write_csv(project, 6)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    from newsletter.storage.sqlite.connection import connect
    from newsletter.storage.sqlite.subscribers import SubscriberStore

    store = SubscriberStore(connect(project / "newsletter.sqlite3"))
    for e in emails[:3]:
        store.opt_out("research-news", e)
    sent = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert sent.returncode == 0, sent.stderr
    assert "3 recipient(s), 0 suppressed and 3 who left the list (left out)" in sent.stdout
    assert "left the list or suppressed since the start 0" in sent.stdout
    again = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert "3 recipient(s), 3 suppressed or had left the list (left out)" in again.stdout
    status = run_cli("status", "2020-12-23", cwd=project, env=env)
    assert "3 suppressed or had left the list at the start" in status.stdout


def test_status_of_a_list_not_sent_to_names_those_that_were(project: Path, server: Server) -> None:
    env = env_for(server, project)
    two_lists(project, env)
    run_cli("send", f"issues/{EXAMPLE.name}", "--list", "b", "--yes", cwd=project, env=env)
    status = run_cli("status", "2020-12-23", "--list", "a", cwd=project, env=env)
    assert status.returncode == 1
    assert (
        "2020-12-23 has not been sent to a; it has a send to b "
        "(`newsletter status 2020-12-23 --list b`)" in status.stdout
    )
    never = run_cli("status", "2031-01-01", "--list", "a", cwd=project, env=env)
    assert never.returncode == 1
    assert "has not been sent to a; it has not been sent to any list" in never.stdout


MAILTO_NOTE = "note: List-Unsubscribe offers mailto:unsubscribe@"


def test_send_reminds_that_the_unsubscribe_address_must_be_delivered(
    project: Path, server: Server
) -> None:
    env = env_for(server, project)
    write_csv(project, 2)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    issue = f"issues/{EXAMPLE.name}"
    declined = run_cli("send", issue, cwd=project, env=env, input="n\n")
    assert declined.returncode == 1 and declined.stdout.count(MAILTO_NOTE) == 1
    assert declined.stdout.index(MAILTO_NOTE) < declined.stdout.index("starting 2020-12-23")
    assert "reaches `newsletter bounces process`" in declined.stdout
    dry = run_cli("send", issue, "--dry-run", cwd=project, env=env)
    assert dry.returncode == 0 and "mailto:" not in dry.stdout
    sent = run_cli("send", issue, "--yes", cwd=project, env=env)
    assert sent.returncode == 0 and sent.stdout.count(MAILTO_NOTE) == 1
    chosen = {**env, "NEWSLETTER_UNSUBSCRIBE_MAILTO": "leave@example.org"}
    resumed = run_cli("send", issue, "--yes", cwd=project, env=chosen)
    assert resumed.returncode == 0 and "note: List-Unsubscribe" not in resumed.stdout


def test_a_resume_after_the_issue_changed_is_refused_unless_accepted(
    project: Path, server: Server
) -> None:
    """What a send froze is kept with it: a resume after an edit that changes the email
    is refused (half the list would get another version), one that changes nothing sent
    (a comment) goes on, and --accept-changes sends the rest the new version."""
    env = env_for(server, project, NEWSLETTER_SEND_CONNECTIONS="1")
    emails = write_csv(project, 6)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    issue = project / "issues" / EXAMPLE.name
    send = ("send", f"issues/{EXAMPLE.name}", "--yes")
    server.handler.behaviour.refuse_sender_after = 2  # the relay stops the send after two
    assert run_cli(*send, cwd=project, env=env).returncode != 0
    assert len(server.handler.received) == 2

    # A comment changes nothing that is sent: the resume goes on (and stops after one).
    issue.write_text("# checked by the editor\n" + issue.read_text(encoding="utf-8"), "utf-8")
    server.handler.behaviour.refuse_sender_after = 3
    assert run_cli(*send, cwd=project, env=env).returncode != 0
    assert len(server.handler.received) == 3

    # A new subject, and a template edited: refused, naming both; nothing is sent.
    text = issue.read_text(encoding="utf-8")
    issue.write_text(re.sub(r"(?m)^subject: .*$", 'subject: "Corrected subject"', text), "utf-8")
    template = project / "templates" / "email.mjml.j2"
    template.write_text(template.read_text(encoding="utf-8").replace(
        "</mj-body>", '<mj-section><mj-column><mj-text>P.S.</mj-text></mj-column></mj-section>'
        "</mj-body>"), encoding="utf-8")  # fmt: skip
    server.handler.behaviour.refuse_sender_after = None
    refused = run_cli(*send, cwd=project, env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    assert f"issues/{EXAMPLE.name}" in said and "templates/" in said and "changed since" in said
    assert "(3 sent)" in said and "the other 3 a different email" in said
    assert "--accept-changes" in said and "Nothing was sent." in said
    assert len(server.handler.received) == 3
    dry = run_cli("send", f"issues/{EXAMPLE.name}", "--dry-run", cwd=project, env=env)
    assert dry.returncode == 1 and "changed since" in dry.stderr  # the dry run says so too

    accepted = run_cli(*send, "--accept-changes", cwd=project, env=env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "the rest get the email as it is now" in accepted.stdout + accepted.stderr
    subjects = {r.rcpt_tos[0]: str(r.message["Subject"]) for r in server.handler.received}
    assert sorted(subjects) == sorted(emails)  # each one message, nobody skipped
    assert len(server.handler.received) == 6
    assert sum(s == "Corrected subject" for s in subjects.values()) == 3
    # Accepted once: the next resume compares with the accepted version.
    again = run_cli(*send, cwd=project, env=env)
    assert again.returncode == 0 and "changed since" not in again.stderr


def test_a_canary_goes_first_and_the_rest_waits_for_go_or_the_wait(
    project: Path, server: Server
) -> None:
    canary = "editor@example.org,Second.Reader@Example.org"
    env = env_for(server, project, NEWSLETTER_CANARY_TO=canary)
    emails = write_csv(project, 4)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    send = ("send", f"issues/{EXAMPLE.name}", "--yes")
    first = run_cli(*send, cwd=project, env=env)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "the canary went out" in first.stdout and "--go" in first.stdout
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == [
        "editor@example.org", "second.reader@example.org"]  # fmt: skip
    # The canary is what the list gets, but a copy of its own (outside the send log).
    copy = server.handler.received[0].message
    assert copy["Subject"] == "MS Research News: stem cell therapy shows promise"
    status = run_cli("status", f"issues/{EXAMPLE.name}", cwd=project, env=env)
    assert "editor@example.org" not in status.stdout
    # Running it again is not a go: nothing more is sent until a person says so.
    again = run_cli(*send, cwd=project, env=env)
    assert again.returncode == 3 and "waiting after its canary" in again.stdout
    assert len(server.handler.received) == 2
    went = run_cli(*send, "--go", cwd=project, env=env)
    assert went.returncode == 0, went.stdout + went.stderr
    reached = sorted(r.rcpt_tos[0] for r in server.handler.received[2:])
    assert reached == sorted(emails)  # each once, the canary not again

    # With a wait, the same command sends the rest after it.
    server.handler.received.clear()
    waited = {**env, "NEWSLETTER_CANARY_WAIT": "1s"}
    next_week = project / "issues" / "2020-12-30.yaml"  # last week's file, copied
    last_week = (project / "issues" / EXAMPLE.name).read_text(encoding="utf-8")
    next_week.write_text(last_week.replace("date: 2020-12-23", "date: 2020-12-30"), "utf-8")
    done = run_cli("send", "issues/2020-12-30.yaml", "--yes", cwd=project, env=waited)
    assert done.returncode == 0, done.stdout + done.stderr
    order = [r.rcpt_tos[0] for r in server.handler.received]
    assert sorted(order[:2]) == ["editor@example.org", "second.reader@example.org"]
    assert sorted(order[2:]) == sorted(emails)


def test_a_canary_that_may_not_be_mailed_stops_the_send_before_anything_goes(
    project: Path, server: Server
) -> None:
    env = env_for(server, project, NEWSLETTER_CANARY_TO="editor@example.org")
    write_csv(project, 2)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    run_cli("subscribers", "unsubscribe", "editor@example.org", cwd=project, env=env)
    refused = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert refused.returncode == 1
    assert "NEWSLETTER_CANARY_TO editor@example.org is suppressed" in refused.stderr
    assert server.handler.received == []
    bad = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project,
                  env={**env, "NEWSLETTER_CANARY_WAIT": "soon"})  # fmt: skip
    assert bad.returncode == 1 and "NEWSLETTER_CANARY_WAIT" in bad.stderr
    assert "is not a wait like 900s, 30m or 2h" in bad.stderr


def test_a_canary_stopped_or_unsent_never_lets_the_list_go_without_it(
    project: Path, server: Server
) -> None:
    """The canary's state is in the send log before its copies go: a run killed during
    the wait, or one whose relay was down, leaves the list waiting, never sent."""
    env = env_for(server, project, NEWSLETTER_CANARY_TO="editor@example.org",
                  NEWSLETTER_CANARY_WAIT="60s")  # fmt: skip
    emails = write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    send = ("send", f"issues/{EXAMPLE.name}", "--yes")
    # Killed (SIGTERM, as systemd stops it) during the canary's wait.
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", *send], cwd=project,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    wait_for(server, 1)
    time.sleep(0.3)  # into the wait
    proc.terminate()
    proc.wait(timeout=15)
    assert [r.rcpt_tos[0] for r in server.handler.received] == ["editor@example.org"]
    again = run_cli(*send, cwd=project, env=env)
    assert again.returncode == 3 and "waiting after its canary" in again.stdout
    assert len(server.handler.received) == 1  # not the list, and not the canary again
    went = run_cli(*send, "--go", cwd=project, env=env)
    assert went.returncode == 0, went.stdout + went.stderr
    assert sorted(r.rcpt_tos[0] for r in server.handler.received[1:]) == sorted(emails)

    # The relay down when the canary should go: a clean stop; the canary goes next time.
    server.handler.received.clear()
    next_week = project / "issues" / "2020-12-30.yaml"
    text = (project / "issues" / EXAMPLE.name).read_text(encoding="utf-8")
    next_week.write_text(text.replace("date: 2020-12-23", "date: 2020-12-30"), "utf-8")
    down = {**env, "NEWSLETTER_SMTP_PORT": "9", "NEWSLETTER_CANARY_WAIT": ""}
    refused = run_cli("send", "issues/2020-12-30.yaml", "--yes", cwd=project, env=down)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert "the canary could not be sent" in refused.stdout
    up = {**env, "NEWSLETTER_CANARY_WAIT": ""}
    canary = run_cli("send", "issues/2020-12-30.yaml", "--yes", cwd=project, env=up)
    assert canary.returncode == 3 and "the canary went out" in canary.stdout
    assert [r.rcpt_tos[0] for r in server.handler.received] == ["editor@example.org"]

    # The editor fixes a typo the canary showed: the new version gets a canary of its own.
    typo = next_week.read_text(encoding="utf-8")
    next_week.write_text(typo.replace("shows promise", ": early promise"), "utf-8")
    fixed = run_cli("send", "issues/2020-12-30.yaml", "--yes", cwd=project, env=up)
    assert fixed.returncode == 3 and "a new one goes" in fixed.stdout + fixed.stderr
    subjects = [str(r.message["Subject"]) for r in server.handler.received]
    assert len(subjects) == 2 and "early promise" in subjects[1]
    final = run_cli("send", "issues/2020-12-30.yaml", "--yes", "--go", cwd=project, env=up)
    assert final.returncode == 0, final.stdout + final.stderr
    late = [str(r.message["Subject"]) for r in server.handler.received[2:]]
    assert len(late) == 3 and all("early promise" in s for s in late)


def test_a_changed_merge_field_is_a_change_to_the_email(project: Path, server: Server) -> None:
    env = env_for(server, project, NEWSLETTER_SEND_CONNECTIONS="1")
    write_csv(project, 3)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    server.handler.behaviour.refuse_sender_after = 1
    send = ("send", f"issues/{EXAMPLE.name}", "--yes")
    assert run_cli(*send, cwd=project, env=env).returncode != 0
    issue = project / "issues" / EXAMPLE.name
    issue.write_text(issue.read_text(encoding="utf-8").replace(
        "[[first_name|friend]]", "[[last_name|colleague]]"), encoding="utf-8")  # fmt: skip
    server.handler.behaviour.refuse_sender_after = None
    refused = run_cli(*send, cwd=project, env=env)
    assert refused.returncode == 1 and "changed since" in refused.stderr
    assert len(server.handler.received) == 1
