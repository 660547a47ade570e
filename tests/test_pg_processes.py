"""Several sender processes on one PostgreSQL send, as users run them: the real CLI in
subprocesses, the test SMTP server, a real PostgreSQL server, kill -9."""

from __future__ import annotations

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
    emails = imported(project, pg_env)
    server.handler.behaviour.delay = 0.002  # long enough to kill one in the middle
    procs = [start([*SEND, "--yes"], project, pg_env) for _ in range(3)]
    wait_for(server, N // 4)
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
    assert counts["unknown"] == len(unknown) and counts["sent"] + len(unknown) == N, after.stdout
    assert counts["pending"] == counts["sending"] == 0
    got = received(server)
    # Nobody skipped, nobody twice: every recipient has one message, but the unknowns,
    # whose message may or may not have gone (kill -9 during their transaction).
    assert max(got.values()) == 1
    assert {e for e in emails if got[e] == 0} <= unknown
    assert len(unknown) <= 4 * 8  # at most what one process had claimed (bounded window)


def test_send_workers_starts_processes_and_sums_them_up(
    project: Path, server: Server, pg_env: dict[str, str]
) -> None:
    emails = imported(project, pg_env, 1500)
    done = run_cli(*SEND, "--yes", "--workers", "3", cwd=project, env=pg_env)
    assert done.returncode == 0, done.stderr
    got = received(server)
    assert set(got) == set(emails) and set(got.values()) == {1}
    assert "sent 1500," in done.stdout


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


def test_two_schedulers_on_one_slot_send_it_once(
    project: Path,
    server: Server,
    pg_env: dict[str, str],
    write_issue: Callable[..., Path],
) -> None:
    data = example_data()
    data["date"] = "2026-12-03"
    write_issue(data, name="2026-12-03.yaml")
    emails = imported(project, pg_env, 1000)
    env = {
        **pg_env,
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
        "NEWSLETTER_TIMEZONE": "America/New_York",
        "NEWSLETTER_TEST_NOW": "2026-12-03T09:15:00-05:00",
    }
    procs = [start(["send", "--due"], project, env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = received(server)
    assert set(got) == set(emails) and set(got.values()) == {1}
    again = run_cli("send", "--due", cwd=project, env=env)
    assert again.returncode == 0 and len(server.handler.received) == 1000, again.stdout
