"""Every command fails cleanly on bad settings or a bad database: one error, exit 1.

The commands are found by walking the click group, so a new command without
arguments here fails the first test rather than going unchecked. Each command
runs as a user runs it (the real CLI in a subprocess), in its own copy of the
project, several at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

from conftest import EXAMPLE, REPO, run_cli
from newsletter.audience.csv_import import read_csv
from newsletter.cli import main
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.subscribers import SubscriberStore
from smtp_server import Server

SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key
ISSUE = f"issues/{EXAMPLE.name}"
LIST = "research-news"

# Arguments for each leaf command: every one that reads settings, and the
# database if it uses one. A send runs in each of its ways.
ARGS: dict[tuple[str, ...], list[tuple[str, ...]]] = {
    ("build",): [("build", ISSUE)],
    ("new",): [("new",)],  # the next slot of base_env's schedule
    ("send",): [
        ("send", ISSUE, "--yes"),
        ("send", ISSUE, "--dry-run"),
        ("send", ISSUE, "--to", "ed@example.org"),
        ("send", ISSUE, "--to", "ed@example.org", "--dry-run"),
        ("send", "--due"),
    ],
    ("status",): [("status", "2020-12-23")],
    ("db", "migrate"): [("db", "migrate")],
    # The database is its argument here (port 9: no server is reached when it is refused).
    ("db", "copy"): [("db", "copy", "db.sqlite3", "postgresql://postgres@127.0.0.1:9/test")],
    ("schedule",): [("schedule",)],
    ("schedule", "run"): [("schedule", "run", "--poll", "1")],
    ("serve",): [("serve", "--port", "0")],
    ("subscribers", "import"): [("subscribers", "import", "m.csv", "--list", LIST)],
    ("subscribers", "count"): [("subscribers", "count")],
    ("subscribers", "list"): [("subscribers", "list", "--list", LIST)],
    ("subscribers", "export"): [
        ("subscribers", "export", "--list", LIST),
        ("subscribers", "export", "--list", LIST, "out.csv"),
    ],
    ("subscribers", "show"): [("subscribers", "show", "ann@example.org")],
    ("subscribers", "export-person"): [
        ("subscribers", "export-person", "ann@example.org"),
        ("subscribers", "export-person", "ann@example.org", "-o", "ann.json"),
    ],
    ("subscribers", "erase"): [("subscribers", "erase", "ann@example.org", "--yes")],
    ("subscribers", "remove"): [("subscribers", "remove", "--list", LIST, "ann@example.org")],
    ("subscribers", "unsubscribe"): [("subscribers", "unsubscribe", "ann@example.org")],
    ("subscribers", "unsuppress"): [
        ("subscribers", "unsuppress", "ann@example.org", "--reason", "asked again")
    ],
    ("bounces", "process"): [("bounces", "process", "dsn.eml")],
    ("bounces", "fetch"): [("bounces", "fetch")],
    ("bounces", "review"): [("bounces", "review")],
    ("bounces", "report"): [("bounces", "report", "2020-12-23")],
    ("bounces", "reprocess"): [("bounces", "reprocess", "1")],
    ("bounces", "show"): [("bounces", "show", "1")],
    ("doctor",): [("doctor",)],
}
VARIANTS = [args for variants in ARGS.values() for args in variants]
# Commands that are given the database as an argument: they say so where the rest
# name the setting.
NAMED_BY = {("db", "copy"): "SQLITE_PATH"}
READS_NO_DATABASE = {("build",), ("new",), ("doctor",)}
# Its exit status is its verdict: 1 in these projects, where much fails (no DKIM key,
# no DNS answers), with findings and no error line, whatever the database is.
VERDICT = {("doctor",): 1}
# An import (and a suppression before the first import) is how a database comes
# to exist: an empty file holds nothing, and they make it one.
CREATES = {("subscribers", "import"), ("subscribers", "unsubscribe")}
# A pipe from the MTA fails with "try again later" (EX_TEMPFAIL), so that the MTA
# keeps the message until the settings or the database are mended.
EXIT_STATUS = {("bounces", "process"): 75}


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        path = (*prefix, name)
        if isinstance(command, click.Group):
            if command.invoke_without_command:  # `newsletter schedule` runs on its own
                yield path
            yield from leaf_commands(command, path)
        else:
            yield path


def command_of(args: tuple[str, ...]) -> tuple[str, ...]:
    """The leaf command ``args`` runs: its longest prefix that is one."""
    return max((c for c in ARGS if args[: len(c)] == c), key=len)


def test_every_command_has_arguments_here() -> None:
    commands = set(leaf_commands(main))
    assert ("subscribers", "import") in commands and ("schedule",) in commands  # the walk works
    missing = sorted(" ".join(c) for c in commands - set(ARGS))
    assert not missing, f"add arguments for {missing} to ARGS"
    assert not set(ARGS) - commands, "ARGS names a command that no longer exists"


def new_project(root: Path) -> Path:
    """A project folder like the repository's, with a CSV to import."""
    root.mkdir()
    shutil.copytree(REPO / "templates", root / "templates")
    shutil.copytree(REPO / "issues", root / "issues")
    shutil.copy(REPO / "society.yaml", root / "society.yaml")
    (root / "m.csv").write_text("email\nann@example.org\n", encoding="utf-8")
    shutil.copy(REPO / "tests" / "data" / "feedback" / "postfix-unknown-user.eml", root / "dsn.eml")
    return root


def base_env(project: Path) -> dict[str, str]:
    """Settings that work: a command fails only because of what a test breaks."""
    return {
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": "9",  # nothing listens: no command gets that far
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_UNSUBSCRIBE_MAILTO": "unsubscribe@example.org",
        "NEWSLETTER_SCHEDULE": "Thu 09:00",
        "NEWSLETTER_BOUNCE_IMAP_HOST": "127.0.0.1",
        "NEWSLETTER_BOUNCE_IMAP_PORT": "9",
        "NEWSLETTER_BOUNCE_IMAP_SECURITY": "none",
        "NEWSLETTER_BOUNCE_IMAP_USERNAME": "bounces",
        "NEWSLETTER_BOUNCE_IMAP_PASSWORD": "s3cret",
        # Nothing answers there: `doctor` asks no resolver beyond this machine.
        "NEWSLETTER_DNS_RESOLVER": "127.0.0.1:9",
    }


Prepare = Callable[[Path, dict[str, str]], None]


def run_all(
    tmp_path: Path, prepare: Prepare, variants: list[tuple[str, ...]] = VARIANTS
) -> dict[tuple[str, ...], tuple[Path, subprocess.CompletedProcess[str]]]:
    """Run each variant in a project of its own, made ready by ``prepare``, four at a time."""

    def one(n: int, args: tuple[str, ...]) -> tuple[Path, subprocess.CompletedProcess[str]]:
        project = new_project(tmp_path / f"p{n}")
        env = base_env(project)
        prepare(project, env)
        return project, run_cli(*args, cwd=project, env=env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        done = pool.map(one, range(len(variants)), variants)
        return dict(zip(variants, done, strict=True))


def one_clean_error(result: subprocess.CompletedProcess[str], *expected: str) -> str | None:
    """Why ``result`` is not one clean error naming ``expected``, or None if it is."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    problems = []
    args = tuple(str(a) for a in result.args[3:])  # after python -m newsletter
    status = EXIT_STATUS.get(command_of(args), 1) if any(args[: len(c)] == c for c in ARGS) else 1
    if result.returncode != status:
        problems.append(f"exit status {result.returncode}")
    if "Traceback" in result.stderr:
        problems.append("a traceback")
    if len(errors) != 1:
        problems.append(f"{len(errors)} lines starting with 'error:'")
    problems += [f"no {text!r}" for text in expected if text not in result.stderr]
    if not problems:
        return None
    return f"{', '.join(problems)}:\n{result.stdout}{result.stderr}"


def unharmed(command: tuple[str, ...], result: subprocess.CompletedProcess[str]) -> str | None:
    """Why a command that reads no database did not run as usual, or None if it did."""
    status = VERDICT.get(command, 0)
    if result.returncode != status or "Traceback" in result.stderr or "error:" in result.stderr:
        return f"exit status {result.returncode} (not {status}):\n{result.stdout}{result.stderr}"
    return None


def report(failures: dict[tuple[str, ...], str]) -> str:
    return "\n\n".join(f"newsletter {' '.join(args)}: {why}" for args, why in failures.items())


# --------------------------------------------------------------------- settings


def bad_settings(project: Path, env: dict[str, str]) -> None:
    """An invalid value (in .env, which names its line), an unknown name, a database URL
    and a schedule that never fires (30 February): each once broke some command, and
    all of them are reported at once."""
    env.pop("NEWSLETTER_SMTP_PORT")  # the environment would win over .env
    (project / ".env").write_text("NEWSLETTER_SMTP_PORT=abc\n", encoding="utf-8")
    env["NEWSLETTER_SMTP_HOTS"] = "relay.example.org"
    env["NEWSLETTER_DATABASE"] = "postgresql://news:pa55word@db.example.org/news"
    env["NEWSLETTER_SCHEDULE"] = "0 9 30 2 *"


def test_bad_settings_are_one_clean_error_for_every_command(tmp_path: Path) -> None:
    results = run_all(tmp_path, bad_settings)
    expected = [
        "error: the settings are not valid",
        ".env:1: NEWSLETTER_SMTP_PORT: Input should be a valid integer",
        "NEWSLETTER_SMTP_HOTS: not a known setting; did you mean NEWSLETTER_SMTP_HOST?",
        "NEWSLETTER_DATABASE: holds a password (user:password@): the URL is shown in messages",
        "NEWSLETTER_SCHEDULE: '0 9 30 2 *' never runs",
    ]
    failures = {
        args: why
        for args, (_, result) in results.items()
        if (why := one_clean_error(result, *expected))
    }
    assert not failures, report(failures)
    for project, result in results.values():
        assert "pa55word" not in result.stderr  # a URL's password is not repeated
        assert not (project / "postgresql:").exists()  # it was once taken for a folder
        assert not (project / "db.sqlite3").exists()  # nothing was started
        assert not (project / "build").exists()


# --------------------------------------------------------------------- database


def garbage(db: Path) -> None:
    db.write_bytes(bytes(range(256)) * 64)


def empty(db: Path) -> None:
    db.write_bytes(b"")


def folder(db: Path) -> None:
    db.mkdir()
    (db / "notes.txt").write_text("not a database\n", encoding="utf-8")


def damaged(db: Path) -> None:
    """A newsletter database whose list of tables is intact and every other page is
    not: it opens, and the first query of a table fails."""
    csv = db.with_name("many.csv")
    csv.write_text("email\n" + "".join(f"r{i}@example.org\n" for i in range(300)), "utf-8")
    with contextlib.closing(connect(db, create=True)) as conn:
        SubscriberStore(conn).import_rows(LIST, read_csv(csv), skip_invalid=False)
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        schema = {
            row[0] for row in conn.execute("SELECT pageno FROM dbstat WHERE name = 'sqlite_schema'")
        }
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert not Path(f"{db}-wal").exists()  # every page is in the file now
    with db.open("r+b") as file:
        for page in set(range(2, pages + 1)) - schema:
            file.seek((page - 1) * size)
            file.write(b"\xde\xad\xbe\xef" * (size // 4))
    connect(db).close()  # it opens: what fails is each command's first query


def table_dropped(db: Path) -> None:
    with contextlib.closing(connect(db, create=True)) as conn:
        conn.execute("DROP TABLE suppressions")


DATABASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "garbage": (garbage, "is not an intact SQLite database (file is not a database)"),
    "empty file": (empty, "is an empty file, not a newsletter database"),
    "folder": (folder, "(NEWSLETTER_DATABASE) is a folder"),
    "table dropped": (table_dropped, "it lacks the table(s) suppressions"),
}


@pytest.mark.parametrize("kind", DATABASES)
def test_a_database_that_is_not_one_is_one_clean_error_for_every_command(
    tmp_path: Path, kind: str
) -> None:
    make, expected = DATABASES[kind]
    results = run_all(tmp_path, lambda project, env: make(project / "db.sqlite3"))
    failures: dict[tuple[str, ...], str] = {}
    for args, (project, result) in results.items():
        db = project / "db.sqlite3"
        command = command_of(args)
        if command in READS_NO_DATABASE:
            if why := unharmed(command, result):
                failures[args] = why
            continue
        if kind == "empty file" and command in CREATES:
            if result.returncode != 0:
                failures[args] = f"exit status {result.returncode}:\n{result.stderr}"
            continue
        said = expected.replace("NEWSLETTER_DATABASE", NAMED_BY.get(command, "NEWSLETTER_DATABASE"))
        why = one_clean_error(result, str(db), said)
        if why:
            failures[args] = why
        elif kind == "empty file" and db.stat().st_size != 0:
            failures[args] = "wrote to the empty file it refused"
        elif kind == "garbage" and db.read_bytes() != bytes(range(256)) * 64:
            failures[args] = "changed the file it refused"
    assert not failures, report(failures)
    if kind == "empty file":
        # made a database by those that may make one; only theirs is one now
        lists = {("subscribers", "import"): [(LIST, 1)], ("subscribers", "unsubscribe"): []}
        for command in CREATES:
            project, _ = results[ARGS[command][0]]
            with contextlib.closing(connect(project / "db.sqlite3")) as conn:
                assert SubscriberStore(conn).lists() == lists[command]


def test_a_damaged_database_is_one_clean_error_for_every_command(tmp_path: Path) -> None:
    # `schedule run` keeps running through it: below
    variants = [a for a in VARIANTS if command_of(a) != ("schedule", "run")]
    results = run_all(tmp_path, lambda project, env: damaged(project / "db.sqlite3"), variants)
    failures: dict[tuple[str, ...], str] = {}
    for args, (project, result) in results.items():
        expected = (
            f"error: cannot use the database {project / 'db.sqlite3'} (NEWSLETTER_DATABASE): "
            "it is not an intact SQLite database (database disk image is malformed); point "
            "NEWSLETTER_DATABASE at the newsletter database, or restore it from a backup"
        )
        named = NAMED_BY.get(command_of(args), "NEWSLETTER_DATABASE")
        if command_of(args) in READS_NO_DATABASE:
            if why := unharmed(command_of(args), result):
                failures[args] = why
        elif why := one_clean_error(result, expected.replace("NEWSLETTER_DATABASE", named)):
            failures[args] = why
    assert not failures, report(failures)


def test_the_scheduler_says_once_that_its_database_fails_and_goes_on(tmp_path: Path) -> None:
    project = new_project(tmp_path / "p")
    env = base_env(project)
    damaged(project / "db.sqlite3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "schedule", "run", "--poll", "1"],
        cwd=project,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)  # three looks or more
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "unexpected error" not in err
    errors = [line for line in err.splitlines() if " error: " in line]
    assert len(errors) == 1, err  # said once, not at every look
    db = project / "db.sqlite3"
    assert f"error: cannot use the database {db} (NEWSLETTER_DATABASE): it is not an" in errors[0]
    assert out.splitlines()[-1] == "scheduler: stopped"


def test_a_database_of_another_program_is_refused_and_left_alone(tmp_path: Path) -> None:
    project = new_project(tmp_path / "p")
    env = base_env(project)
    db = project / "db.sqlite3"
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    other.commit()
    other.close()
    before = db.read_bytes()
    for args in (ARGS[("subscribers", "import")][0], ARGS[("subscribers", "count")][0]):
        result = run_cli(*args, cwd=project, env=env)
        why = one_clean_error(
            result, "is an SQLite database of another program (its tables: invoices)"
        )
        assert why is None, why
    assert db.read_bytes() == before


def test_an_import_into_an_empty_file_makes_it_a_database(tmp_path: Path) -> None:
    project = new_project(tmp_path / "p")
    env = base_env(project)
    (project / "db.sqlite3").touch()  # as a deployment may, to mount it
    imported = run_cli(*ARGS[("subscribers", "import")][0], cwd=project, env=env)
    assert imported.returncode == 0, imported.stderr
    counted = run_cli("subscribers", "count", cwd=project, env=env)
    assert counted.returncode == 0 and f"{LIST}: 1 member(s)" in counted.stdout


# ------------------------------------------------- what a failed send says to do


RESUME = "Run the same command again to resume once that is fixed; nobody is sent twice."


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A relay that wants STARTTLS and a login (mailer, s3cret), and its CA's certificate."""
    import ssl

    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = Server(tls_context=context, auth=("mailer", "s3cret")).start()
    yield server, ca_file
    server.stop()


def test_only_a_send_the_relay_stopped_is_told_to_run_again(
    tmp_path: Path, relay: tuple[Server, Path]
) -> None:
    server, ca_file = relay
    project = new_project(tmp_path / "p")
    env = {
        **base_env(project),
        "NEWSLETTER_SMTP_PORT": str(server.port),
        "NEWSLETTER_SMTP_SECURITY": "starttls",
        "NEWSLETTER_SMTP_CA_FILE": str(ca_file),
        "NEWSLETTER_SMTP_USERNAME": "mailer",
        "NEWSLETTER_SMTP_PASSWORD": "wrong",
        "NEWSLETTER_SCHEDULE": "Wed 09:00",
        "NEWSLETTER_TEST_NOW": "2020-12-23T09:30:00+00:00",
    }
    (project / "m.csv").write_text("email\na@example.org\nb@example.org\n", encoding="utf-8")
    imported = run_cli(*ARGS[("subscribers", "import")][0], cwd=project, env=env)
    assert imported.returncode == 0, imported.stderr
    send = ("send", ISSUE, "--yes")

    # Before anything is sent, running again changes nothing: no word of it.
    no_key = {k: v for k, v in env.items() if k != "NEWSLETTER_SECRET_KEY"}
    bad_setting = {**env, "NEWSLETTER_SEND_CONNECTIONS": "0"}
    refusals = {
        "no key": (run_cli(*send, cwd=project, env=no_key), "NEWSLETTER_SECRET_KEY is not set"),
        "bad setting": (
            run_cli(*send, cwd=project, env=bad_setting),
            "NEWSLETTER_SEND_CONNECTIONS: Input should be greater than or equal to 1",
        ),
        # a test copy is outside the send log: there is nothing to resume
        "test copy": (
            run_cli("send", ISSUE, "--to", "ed@example.org", cwd=project, env=env),
            f"the SMTP server 127.0.0.1:{server.port} (starttls) refused the login (535",
        ),
    }
    for name, (result, expected) in refusals.items():
        assert one_clean_error(result, expected) is None, (name, result.stderr)
        assert "resume" not in result.stderr + result.stdout, (name, result.stderr)
    # A scheduled run's next look tries again by itself; nothing went out.
    due = run_cli("send", "--due", cwd=project, env=env)
    assert one_clean_error(due, "list research-news: the SMTP server") is None, due.stderr
    assert due.stderr.rstrip().endswith("\nNothing was sent for this slot.")
    assert "resume" not in due.stderr
    assert server.handler.received == []

    # A send the relay refused is in the log: once the login is put right, the
    # same command resumes it. Running it again as it is would be refused again.
    refused = run_cli(*send, cwd=project, env=env)
    assert one_clean_error(refused, "refused the login (535") is None, refused.stderr
    assert refused.stderr.rstrip().endswith(f"NEWSLETTER_SMTP_PASSWORD\n{RESUME}")
    assert "wrong" not in refused.stderr  # the password is not repeated
    fixed = run_cli(*send, cwd=project, env={**env, "NEWSLETTER_SMTP_PASSWORD": "s3cret"})
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "resuming 2020-12-23 to research-news: 2 recipient(s)" in fixed.stdout
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == [
        "a@example.org",
        "b@example.org",
    ]


def test_a_relay_that_cannot_be_reached_stops_the_send_to_be_run_again(tmp_path: Path) -> None:
    project = new_project(tmp_path / "p")
    env = {**base_env(project), "NEWSLETTER_SEND_MAX_ERRORS": "2"}  # port 9: nobody answers
    imported = run_cli(*ARGS[("subscribers", "import")][0], cwd=project, env=env)
    assert imported.returncode == 0, imported.stderr
    stopped = run_cli("send", ISSUE, "--yes", cwd=project, env=env)
    # Not an error: the run stopped, and running it again later is the way on.
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "error:" not in stopped.stderr and "Traceback" not in stopped.stderr
    assert "stopped early: 2 errors in a row, the last: cannot connect: " in stopped.stdout
    assert "Run the same command to resume." in stopped.stdout


# ------------------------------------------------------------- long-running ones


def test_serve_refuses_an_address_it_cannot_listen_on_in_one_line(tmp_path: Path) -> None:
    import socket

    project = new_project(tmp_path / "p")
    env = base_env(project)
    assert run_cli(*ARGS[("subscribers", "import")][0], cwd=project, env=env).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = run_cli("serve", "--port", str(port), cwd=project, env=env)
    why = one_clean_error(
        in_use,
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; give another "
        "--host or --port (or NEWSLETTER_SERVE_HOST, NEWSLETTER_SERVE_PORT)",
    )
    assert why is None, why
    # an address of no interface here (TEST-NET-1: no name to look up, no network)
    elsewhere = run_cli("serve", "--host", "192.0.2.1", "--port", "0", cwd=project, env=env)
    why = one_clean_error(
        elsewhere, "error: cannot listen on 192.0.2.1:0: Cannot assign requested address"
    )
    assert why is None, why
    too_high = run_cli("serve", "--port", "70000", cwd=project, env=env)
    assert too_high.returncode == 2 and "Traceback" not in too_high.stderr
    assert "'--port': 70000 is not in the range 0<=x<=65535" in too_high.stderr


def test_a_wrong_query_is_a_bug_and_keeps_its_traceback(tmp_path: Path) -> None:
    from newsletter.storage.sqlite.connection import environment_problem

    conn = connect(tmp_path / "db.sqlite3", create=True)
    with contextlib.closing(conn), pytest.raises(sqlite3.OperationalError) as wrong:
        conn.execute("SELECT no_such_column FROM subscribers")
    assert environment_problem(wrong.value) is None  # the handler lets it through
