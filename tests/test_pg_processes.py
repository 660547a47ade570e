"""Several sender processes on one PostgreSQL send, as users run them: the real CLI in
subprocesses, the test SMTP server, a real PostgreSQL server, kill -9."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLE, example_data, run_cli
from smtp_server import Server
from test_send_cli import env_for, wait_for, write_csv

N = 5000


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture
def pg_env(postgres_url: str, project: Path, server: Server) -> dict[str, str]:
    env = env_for(server, project, NEWSLETTER_DATABASE=postgres_url)
    env["NEWSLETTER_LEASE_SECONDS"] = "4"
    return env


def start(args: list[str], project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "newsletter", *args],
        cwd=project,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def received(server: Server) -> Counter[str]:
    return Counter(rcpt for r in server.handler.received for rcpt in r.rcpt_tos)


def imported(project: Path, env: dict[str, str], n: int = N) -> list[str]:
    emails = write_csv(project, n)
    done = run_cli("subscribers", "import", "subs.csv", "--list", "research-news",
                   cwd=project, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return emails


SEND = ["send", str(EXAMPLE.relative_to(EXAMPLE.parent.parent)), "--list", "research-news"]


def test_three_processes_on_one_send_mail_each_recipient_once(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    emails = imported(project, pg_env)
    procs = [start([*SEND, "--yes"], project, pg_env) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    got = received(server)
    assert set(got) == set(emails) and set(got.values()) == {1}
    # Each process did part of it, and each says what the whole send came to.
    runs = [int(m) for out, _ in outs for m in _this_run(out)]
    assert sum(runs) == N and all(runs), outs
    assert all(f"sent {N}," in out for out, _ in outs)


def _this_run(out: str) -> list[str]:
    import re

    return re.findall(r"this run (\d+) message", out)


def test_a_process_killed_mid_send_leaves_only_reported_unknowns(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    emails = imported(project, pg_env, 2000)
    server.handler.behaviour.delay = 0.002  # long enough to kill one in the middle
    procs = [start([*SEND, "--yes"], project, pg_env) for _ in range(3)]
    wait_for(server, 500)
    os.kill(procs[1].pid, signal.SIGKILL)
    outs = {i: p.communicate(timeout=300) for i, p in enumerate(procs)}
    assert procs[1].returncode == -signal.SIGKILL
    # The others finished the send; the dead one's rows in flight are unknown (at once:
    # it ran on this machine and its process is gone), reported by the last to end.
    assert {procs[0].returncode, procs[2].returncode} <= {0, 3}, outs
    after = run_cli(*SEND, "--yes", cwd=project, env=pg_env)  # the next run looks too
    status = run_cli("status", "2020-12-23", "--json", cwd=project, env=pg_env)
    counts = json.loads(status.stdout)["counts"]
    unknown = {line.split(": ")[1] for line in after.stdout.splitlines()
               if line.startswith("unknown: ")}  # fmt: skip
    assert counts["unknown"] == len(unknown) and counts["sent"] + len(unknown) == 2000, after.stdout
    assert counts["pending"] == counts["sending"] == 0
    got = received(server)
    # Nobody skipped, nobody twice: every recipient has one message, but the unknowns,
    # whose message may or may not have gone (kill -9 during their transaction).
    assert max(got.values()) == 1
    assert {e for e in emails if got[e] == 0} <= unknown
    # At most what one process had claimed: its window, 2 * connections + flush_every
    # (the campaign's module docstring), not the size of the send.
    assert len(unknown) <= 2 * 4 + 64


def test_a_day_cap_holds_over_three_processes(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    imported(project, pg_env, 900)
    env = {**pg_env, "NEWSLETTER_SEND_PER_DAY": "250"}
    procs = [start([*SEND, "--yes"], project, env) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    got = received(server)
    # Together exactly the cap, each once; every process stopped on it and says when
    # to run again (no "resume now").
    assert sum(got.values()) == len(got) == 250, outs
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 3, (out, err)
        assert (
            "the cap of 250 messages a day" in out + err
            and "run the same command again then" in out + err
        )


def test_send_workers_starts_processes_and_sums_them_up(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    emails = imported(project, pg_env, 800)
    done = run_cli(*SEND, "--yes", "--workers", "3", cwd=project, env=pg_env)
    assert done.returncode == 0, done.stderr
    got = received(server)
    assert set(got) == set(emails) and set(got.values()) == {1}
    assert "sent 800," in done.stdout


def test_workers_need_postgresql(project: Path, server: Server) -> None:
    env = env_for(server, project)
    done = run_cli(*SEND, "--yes", "--workers", "2", cwd=project, env=env)
    assert done.returncode == 2 and "--workers needs a database" in done.stderr


def test_status_json_shows_each_live_process(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    imported(project, pg_env, 400)
    server.handler.behaviour.delay = 0.05
    procs = [start([*SEND, "--yes"], project, pg_env) for _ in range(2)]
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = run_cli("status", "2020-12-23", "--json", cwd=project, env=pg_env)
        if status.returncode == 0:
            seen = json.loads(status.stdout)
            if len(seen["processes"]) == 2:
                break
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.communicate(timeout=120)
    assert {w["pid"] for w in seen["processes"]} == {p.pid for p in procs}, seen
    for w in seen["processes"]:
        assert w["host"] and w["last_heartbeat"] and w["in_flight"] >= 0
    shown = run_cli("status", "2020-12-23", cwd=project, env=pg_env)
    assert shown.returncode == 0 and "sent" in shown.stdout


def slot_due(
    project: Path, pg_env: dict[str, str], write_issue: Callable[..., Path], n: int
) -> tuple[list[str], dict[str, str]]:
    """An issue for Thursday 2026-12-03, n subscribers, and the settings of a scheduler
    whose Thursday 09:00 slot is due now."""
    data = example_data()
    data["date"] = "2026-12-03"
    write_issue(data, name="2026-12-03.yaml")
    emails = imported(project, pg_env, n)
    env = {
        **pg_env,
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
        "NEWSLETTER_TIMEZONE": "America/New_York",
        "NEWSLETTER_TEST_NOW": "2026-12-03T09:15:00-05:00",
    }
    return emails, env


def test_two_schedulers_on_one_slot_send_it_once(
    project: Path,
    server: Server,
    pg_env: dict[str, str],
    write_issue: Callable[..., Path],
) -> None:
    emails, env = slot_due(project, pg_env, write_issue, 1000)
    procs = [start(["send", "--due"], project, env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = received(server)
    assert set(got) == set(emails) and set(got.values()) == {1}
    again = run_cli("send", "--due", cwd=project, env=env)
    assert again.returncode == 0 and len(server.handler.received) == 1000, again.stdout


def _child_of(pid: int) -> int:
    """The one child process of ``pid`` (unshare's, which runs the command)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"process {pid} started no child")


def test_a_scheduler_host_that_dies_mid_slot_is_taken_over_after_its_lease(
    project: Path,
    server: Server,
    pg_env: dict[str, str],
    write_issue: Callable[..., Path],
) -> None:
    """The first scheduler runs in its own PID namespace, as on another host: its death
    cannot be seen from here (its pid means nothing on this machine), only its lease
    running out can. The second scheduler waits for that, then resumes the slot."""
    emails, env = slot_due(project, pg_env, write_issue, 400)
    server.handler.behaviour.delay = 0.01
    other_host = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "newsletter",
         "send", "--due"],
        cwd=project, env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(server, 60)
    os.kill(_child_of(other_host.pid), signal.SIGKILL)  # the power cut
    other_host.wait(timeout=10)
    died_at = time.monotonic()
    before = len(server.handler.received)
    assert before < 400, "the host must die in the middle of the slot"
    server.handler.behaviour.delay = 0
    # At once: the slot is another host's, whose lease still runs.
    held = run_cli("send", "--due", cwd=project, env=env)
    assert held.returncode == 0 and len(server.handler.received) == before, held.stdout
    assert "holds the 'schedule' lock" in held.stdout, held.stdout + held.stderr
    # After the lease (4 s here): taken over, resumed, the dead host's rows in flight
    # reported unknown; nobody skipped, nobody twice.
    time.sleep(max(0.0, died_at + 4.5 - time.monotonic()))
    resumed = run_cli("send", "--due", cwd=project, env=env)
    assert resumed.returncode in (0, 3), resumed.stdout + resumed.stderr
    assert "sent" in resumed.stdout
    unknown = {line.split(": ")[1] for line in resumed.stdout.splitlines()
               if line.startswith("unknown: ")}  # fmt: skip
    got = received(server)
    assert max(got.values()) == 1
    assert {e for e in emails if got[e] == 0} <= unknown and len(unknown) <= 2 * 4 + 64
    status = json.loads(run_cli("status", "2026-12-03", "--json", cwd=project, env=env).stdout)
    assert status["counts"]["pending"] == status["counts"]["sending"] == 0


def test_an_opt_out_on_the_web_host_is_honoured_by_a_send_under_way(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    """`newsletter serve` and a send, two processes on one PostgreSQL database: a one-click
    unsubscribe posted during the send keeps the message from that person."""
    import re
    import urllib.request

    from newsletter import tokens

    emails = imported(project, pg_env, 600)
    web = start(["serve", "--port", "0"], project, pg_env)
    try:
        assert web.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", web.stderr.readline())
            port = int(found.group(1)) if found else None
        assert port, "serve did not say where it listens"
        server.handler.behaviour.delay = 0.01
        send = start([*SEND, "--yes"], project, pg_env)
        wait_for(server, 40)
        last = emails[-1]  # far past what the send has claimed so far
        key = pg_env["NEWSLETTER_SECRET_KEY"].encode()
        token = tokens.make(key, tokens.Kind.UNSUBSCRIBE, "research-news", last,
                            dt.datetime.now(dt.UTC))  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/unsubscribe/{token}",
            data=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        assert len(server.handler.received) < 500, "the opt-out must come mid-send"
        out, err = send.communicate(timeout=120)
        assert send.returncode == 0, out + err
    finally:
        web.terminate()
        web.communicate(timeout=10)
    got = received(server)
    assert last not in got and set(got) == set(emails[:-1]) and set(got.values()) == {1}
    status = json.loads(run_cli("status", "2020-12-23", "--json", cwd=project, env=pg_env).stdout)
    assert status["counts"]["suppressed"] == 1 and status["counts"]["sent"] == 599


def test_the_send_rate_is_for_the_whole_send_not_each_process(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    """NEWSLETTER_SEND_RATE=60 with two processes: together about 60 a second (each takes
    its share once it sees the other, within two seconds), not 120."""
    imported(project, pg_env, 240)
    env = {**pg_env, "NEWSLETTER_SEND_RATE": "60"}
    procs = [start([*SEND, "--yes"], project, env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    arrivals = sorted(r.at for r in server.handler.received)
    assert len(arrivals) == 240 and all(_this_run(out)[-1] != "0" for out, _ in outs), outs
    # 240 at 60/s is 4 s; at most 1.5 times the rate while one has not seen the other
    # (2 s) makes it 3 s; two processes at 60/s each would take 2 s.
    assert arrivals[-1] - arrivals[0] > 2.6


def test_ctrl_c_on_send_workers_stops_every_process_cleanly(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    emails = imported(project, pg_env, 800)
    server.handler.behaviour.delay = 0.005
    parent = start([*SEND, "--yes", "--workers", "3"], project, pg_env)
    wait_for(server, 150)
    os.kill(parent.pid, signal.SIGINT)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 3, out + err
    status = json.loads(run_cli("status", "2020-12-23", "--json", cwd=project, env=pg_env).stdout)
    counts = status["counts"]
    # Every process let its messages in flight finish and handed back the rest.
    assert counts["sending"] == counts["unknown"] == 0 and counts["pending"] > 0, counts
    assert status["processes"] == [], status
    assert counts["sent"] == len(server.handler.received)
    server.handler.behaviour.delay = 0
    again = run_cli(*SEND, "--yes", "--workers", "3", cwd=project, env=pg_env)
    assert again.returncode == 0, again.stdout + again.stderr
    got = received(server)
    assert set(got) == set(emails) and set(got.values()) == {1}
