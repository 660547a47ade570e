"""Which database the commands use: only an import creates one; every other command
refuses a missing one; test copies respect suppressions. (Bad settings and
databases that are not one, for every command: test_command_errors.py.) The
real CLI in a subprocess, a real uvicorn, real SQLite."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_cli
from newsletter import tokens
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.subscribers import SubscriberStore
from smtp_server import Server

SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key
ISSUE = f"issues/{EXAMPLE.name}"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def env_for(db: Path, server: Server | None = None, **extra: str) -> dict[str, str]:
    env = {
        "NEWSLETTER_DATABASE": str(db),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port if server else 9),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
    }
    env.update(extra)
    return env


def import_list(project: Path, env: dict[str, str], *emails: str) -> None:
    (project / "m.csv").write_text("email\n" + "".join(f"{e}\n" for e in emails), "utf-8")
    done = run_cli(
        "subscribers", "import", "m.csv", "--list", "research-news", cwd=project, env=env
    )
    assert done.returncode == 0, done.stderr


# Every command that reads or changes the lists, the send log or the schedule.
COMMANDS = [
    ("serve", "--port", "0"),
    ("send", ISSUE, "--yes"),
    ("send", ISSUE, "--dry-run"),
    ("send", "--due"),
    ("status", "2020-12-23"),
    ("schedule",),
    ("schedule", "run"),
    ("subscribers", "count"),
    ("subscribers", "list", "--list", "research-news"),
    ("subscribers", "export", "--list", "research-news"),
    ("subscribers", "show", "ann@example.org"),
    ("subscribers", "remove", "--list", "research-news", "ann@example.org"),
    ("subscribers", "unsuppress", "ann@example.org", "--reason", "asked again"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_command_but_an_import_refuses_a_missing_database(
    project: Path, args: tuple[str, ...]
) -> None:
    db = project / "wrong" / "db.sqlite3"
    result = run_cli(*args, cwd=project, env=env_for(db))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: there is no database at {db} (NEWSLETTER_DATABASE)" in result.stderr
    assert "import subscribers first" in result.stderr
    assert "point NEWSLETTER_DATABASE at the database" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "wrong").exists()  # neither the file nor its folder


def test_the_default_relative_path_run_from_another_folder_is_refused(
    project: Path, tmp_path: Path
) -> None:
    env = env_for(project / "newsletter.sqlite3")
    import_list(project, env, "ann@example.org")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.pop("NEWSLETTER_DATABASE")
    env["NEWSLETTER_SOCIETY_FILE"] = str(project / "society.yaml")
    result = run_cli("serve", "--port", "0", cwd=elsewhere, env=env)
    assert result.returncode == 1
    assert f"there is no database at {elsewhere / 'newsletter.sqlite3'} " in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_an_import_creates_the_database_and_its_folder(project: Path) -> None:
    db = project / "data" / "lists" / "db.sqlite3"
    import_list(project, env_for(db), "ann@example.org")
    assert SubscriberStore(connect(db)).lists() == [("research-news", 1)]


def test_connect_creates_only_when_asked(tmp_path: Path) -> None:
    from newsletter.errors import ConfigError

    with pytest.raises(ConfigError, match="there is no database at"):
        connect(tmp_path / "new.sqlite3")
    assert not (tmp_path / "new.sqlite3").exists()
    connect(tmp_path / "new.sqlite3", create=True).close()
    connect(tmp_path / "new.sqlite3").close()


def test_an_empty_file_is_made_a_database_only_by_a_caller_that_may_create_one(
    tmp_path: Path,
) -> None:
    import contextlib
    import sqlite3

    from newsletter.errors import ConfigError

    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    with pytest.raises(ConfigError, match="is an empty file, not a newsletter database"):
        connect(empty)
    assert empty.stat().st_size == 0  # refused before anything was written
    # a first import stopped between making the file and its tables leaves this
    bare = tmp_path / "bare.sqlite3"
    with contextlib.closing(sqlite3.connect(bare)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    with pytest.raises(ConfigError, match="is an SQLite database with no tables"):
        connect(bare)
    for path in (empty, bare):
        connect(path, create=True).close()
        assert SubscriberStore(connect(path)).lists() == []


def test_a_mailed_request_before_the_first_import_is_kept(project: Path) -> None:
    db = project / "db.sqlite3"
    env = env_for(db)
    first = run_cli("subscribers", "unsubscribe", "ann@example.org", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    assert f"there was no database at {db} (NEWSLETTER_DATABASE); a new one" in first.stderr
    import_list(project, env, "ann@example.org", "bob@example.org")
    assert [r.email for r in SubscriberStore(connect(db)).audience("research-news")] == [
        "bob@example.org"
    ]
    again = run_cli("subscribers", "unsubscribe", "bob@example.org", cwd=project, env=env)
    assert again.returncode == 0 and "no database" not in again.stderr


def serve(project: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str, list[str]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "serve", "--port", "0"],
        cwd=project,
        env={**full, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines.append(proc.stdout.readline())
        found = re.search(r"http://127\.0\.0\.1:(\d+)", lines[-1])
        if found:
            return proc, f"http://127.0.0.1:{found.group(1)}", lines
    proc.kill()
    raise AssertionError("the server did not start: " + "".join(lines))


def one_click(base: str, email: str) -> urllib.request.Request:
    """The RFC 8058 one-click POST a mail client makes for ``email`` on research-news."""
    token = tokens.make(SECRET.encode(), tokens.Kind.UNSUBSCRIBE, "research-news", email, NOW)
    return urllib.request.Request(
        f"{base}/unsubscribe/{token}",
        data=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


def test_serve_says_which_database_it_uses_and_opts_out_there(project: Path) -> None:
    db = project / "db.sqlite3"
    env = env_for(db, NEWSLETTER_PUBLIC_URL="https://news.example.org")
    import_list(project, env, "ann@example.org", "bob@example.org")
    proc, base, lines = serve(project, env)
    try:
        request = one_click(base, "ann@example.org")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    log = "".join(lines) + out
    assert f"database {db}: 1 list(s), 2 member(s) in all" in log
    assert "ann@example.org" not in log and "bob@example.org" not in log
    audience = SubscriberStore(connect(db)).audience("research-news")
    assert [r.email for r in audience] == ["bob@example.org"]


def test_serve_answers_503_when_its_database_is_gone(project: Path) -> None:
    db = project / "db.sqlite3"
    env = env_for(db)
    import_list(project, env, "ann@example.org")
    proc, base, _ = serve(project, env)
    try:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        request = one_click(base, "ann@example.org")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert not db.exists()


# ---------------------------------------------------------------------- test copies


def test_a_test_copy_to_a_suppressed_address_is_refused(project: Path, server: Server) -> None:
    db = project / "db.sqlite3"
    env = env_for(db, server)
    import_list(project, env, "ann@example.org", "bob@example.org")
    run_cli(
        "subscribers",
        "unsubscribe",
        "ann@example.org",
        "--reason",
        "complained",
        cwd=project,
        env=env,
    )
    result = run_cli(
        "send", ISSUE, "--to", "ed@example.org", "--to", "ANN@example.org", cwd=project, env=env
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no test copy was sent" in result.stderr
    assert "--to ann@example.org is suppressed (complained since " in result.stderr
    assert "newsletter subscribers unsuppress ann@example.org --reason" in result.stderr
    time.sleep(0.2)
    assert server.handler.received == []  # not even the good one: nothing half-done


def test_a_test_copy_to_someone_who_left_the_list_is_sent_with_a_warning(
    project: Path, server: Server
) -> None:
    db = project / "db.sqlite3"
    env = env_for(db, server)
    import_list(project, env, "ann@example.org")
    SubscriberStore(connect(db)).opt_out("research-news", "ann@example.org")
    result = run_cli("send", ISSUE, "--to", "ann@example.org", cwd=project, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: ann@example.org opted out of research-news" in result.stderr
    assert "test copy to ann@example.org: sent" in result.stdout
    other = run_cli(
        "send", ISSUE, "--to", "ann@example.org", "--list", "events", cwd=project, env=env
    )
    assert other.returncode == 0 and "warning" not in other.stderr


def test_a_test_copy_without_a_database_is_sent(project: Path, server: Server) -> None:
    db = project / "never" / "db.sqlite3"
    result = run_cli("send", ISSUE, "--to", "ed@example.org", cwd=project, env=env_for(db, server))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test copy to ed@example.org: sent" in result.stdout
    assert not (project / "never").exists()


def test_every_bad_test_copy_address_is_reported(project: Path) -> None:
    result = run_cli(
        "send",
        ISSUE,
        "--to",
        "ed@example.org",
        "--to",
        "bad@",
        "--to",
        "worse",
        "--dry-run",
        cwd=project,
        env=env_for(project / "db.sqlite3"),
    )
    assert result.returncode == 1
    assert "'bad@' is not a valid address" in result.stderr
    assert "'worse' is not a valid address" in result.stderr
    assert not (project / "build").exists() or not list(project.glob("build/*/test-copies/*"))
