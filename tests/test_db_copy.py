"""`newsletter db copy SQLITE_PATH POSTGRESQL_URL`, run as a user runs it, on real databases.

The source is a deployment made by the real CLI (imports, an unsubscription, a
lifted suppression, a finished send to the test SMTP server, a second send
interrupted, a slot, an old lease); the target is a fresh schema on the
PostgreSQL server. What the copy wrote is read back with SQL and compared with
the source, table by table and row by row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import EXAMPLE, REPO, run_cli
from newsletter.storage import open_storage
from newsletter.storage.copy import COPIED, NOT_COPIED
from newsletter.storage.postgres.connection import SCHEMA_VERSION
from newsletter.storage.signups import NewSignup
from smtp_server import Server

ISSUE = "2020-12-23"
JSON_COLUMNS = {"attributes"}
FEEDBACK = REPO / "tests" / "data" / "feedback"


# ---------------------------------------------------------------- helpers (shared)


def make_project(folder: Path) -> Path:
    """A project folder like the repository's (the conftest `project` fixture, for any
    folder: the source is built once per module)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "templates", folder / "templates")
    shutil.copytree(REPO / "issues", folder / "issues")
    shutil.copy(REPO / "society.yaml", folder / "society.yaml")
    return folder


def env_for(server: Server | None, database: Path | str) -> dict[str, str]:
    return {
        "NEWSLETTER_DATABASE": str(database),
        "NEWSLETTER_SECRET_KEY": "test-secret-for-the-suite-0123456789",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port if server else 9),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SMTP_USERNAME": "",
        "NEWSLETTER_SEND_CONNECTIONS": "2",
        "NEWSLETTER_BOUNCE_ADDRESS": "bounces@bounce.example.org",
    }


def cli(project: Path, env: dict[str, str], *args: str) -> str:
    done = run_cli(*args, cwd=project, env=env)
    assert done.returncode in (0, 3), f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def write_list(project: Path, name: str, emails: list[str], cities: bool = False) -> None:
    head = "email,first_name,last_name" + (",city" if cities else "")
    lines = [head] + [
        f"{e},Reader,{i}" + (f",{'Lyon' if i % 2 else ''}" if cities else "")
        for i, e in enumerate(emails)
    ]
    (project / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def sqlite_rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table`` in the SQLite file, normalised (JSON parsed), sorted."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        cursor = conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    finally:
        conn.close()
    return _normalised(names, rows)


def pg_rows(url: str, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    """Every row of ``table`` on the server, ``columns`` in that order, normalised, sorted."""
    with psycopg.connect(url) as conn:
        names = ", ".join(f'"{c}"' for c in columns)
        rows = conn.execute(f'SELECT {names} FROM "{table}"').fetchall()  # noqa: S608
    return _normalised(columns, rows)


def _normalised(names: list[str], rows: list[Any]) -> list[tuple[Any, ...]]:
    def value(name: str, v: Any) -> Any:
        if name in JSON_COLUMNS and isinstance(v, str):
            return json.dumps(json.loads(v), sort_keys=True)
        if name in JSON_COLUMNS and v is not None:
            return json.dumps(v, sort_keys=True)  # jsonb, parsed by psycopg
        return v

    return sorted(
        (tuple(value(n, v) for n, v in zip(names, r, strict=True)) for r in rows), key=repr
    )


def sqlite_columns(path: Path, table: str) -> list[str]:
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return [str(r[1]) for r in conn.execute(f'PRAGMA table_info("{table}")')]
    finally:
        conn.close()


def pg_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])  # type: ignore[index]  # noqa: S608
            for t in (*COPIED, *NOT_COPIED)
        }


def pg_has_tables(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass('subscribers') IS NOT NULL").fetchone()
    return bool(row and row[0])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class SlotKey:
    key: str
    local_day: dt.date


def build_deployment(folder: Path, server: Server) -> Path:
    """An SQLite deployment made by the real CLI: two lists, a finished send to one, an
    interrupted send to the other; returns the database's path."""
    project = make_project(folder)
    path = project / "newsletter.sqlite3"
    env = env_for(server, path)
    news = [f"reader{i:03d}@example.org" for i in range(30)]
    other = news[:3] + [f"other{i}@example.org" for i in range(12)]
    write_list(project, "news", news, cities=True)
    write_list(project, "other", other)
    cli(project, env, "subscribers", "import", "news.csv", "--list", "research-news")
    cli(project, env, "subscribers", "import", "other.csv", "--list", "other")
    cli(project, env, "subscribers", "unsubscribe", news[5])
    cli(project, env, "subscribers", "unsubscribe", news[6], "--reason", "bounced")
    cli(project, env, "subscribers", "unsuppress", news[6], "--reason", "asked by phone")
    storage = open_storage(path)
    try:
        storage.subscribers.opt_out("research-news", news[7])
        storage.subscribers.opt_out("other", other[4])
        storage.slots.set(SlotKey("2020-12-23T14:00Z", dt.date(2020, 12, 23)), "done", ISSUE)
        # Joining the list: one signup confirmed (its consent record, its mail sent), one
        # still waiting; a rate-limit hit, a used key, an erased address's hash.
        for n, who in enumerate(("joined@example.org", "waiting@example.org")):
            form = NewSignup(who, "Ada", ("research-news",), "web:/subscribe", "Yes, email me.",
                             f"2020-12-2{n}T10:00:00+00:00", "203.0.113.7",
                             "2020-12-30T10:00:00+00:00", f"nonce{n}")  # fmt: skip
            made = storage.signups.begin(form)
            if n == 0:
                storage.signups.confirm(made, "nonce0", confirmed_ip="198.51.100.2",
                                        now="2020-12-20T10:05:00+00:00", email_hash="h0",
                                        welcome=False)  # fmt: skip
                mail = storage.signups.claim_mail(now=time.time())
                assert mail is not None
                storage.signups.mail_done(mail.id, "sent", "250 2.0.0 queued")
        storage.signups.allow("ip:0123abcd", 5, 3600, now=time.time())
        storage.signups.use_once("altcha", "a-signature", expires=time.time() + 3600, now=0)
        storage.signups.erase("erased@example.org", "h1", now="2020-12-21T00:00:00+00:00")
    finally:
        storage.close()
    # The finished send, and one refused at RCPT (a rejected row with its reply).
    server.handler.behaviour.reject = {news[9]: (550, "5.1.1 unknown user")}
    cli(project, env, "send", f"issues/{EXAMPLE.name}", "--yes")
    server.handler.behaviour.reject = {}
    # A bounce of the finished send, kept with its evidence (a compressed blob).
    verp = next(r.mail_from for r in server.handler.received if r.rcpt_tos == [news[1]])
    dsn = (FEEDBACK / "postfix-unknown-user.eml").read_text(encoding="ascii")
    dsn = dsn.replace("{verp}", verp).replace("reader0001@example.org", news[1])
    done = run_cli("bounces", "process", cwd=project, env=env, input=dsn)
    assert "suppressed (bounced)" in done.stdout, done.stdout + done.stderr
    # The interrupted send: sent in full, then put back as a run killed mid-way leaves
    # it (the test writes SQL: killing at a chosen row is not reproducible).
    cli(project, env, "send", f"issues/{EXAMPLE.name}", "--list", "other", "--yes")
    conn = sqlite3.connect(path)
    try:
        with conn:
            (send_id,) = conn.execute("SELECT id FROM sends WHERE list_name = 'other'").fetchone()
            conn.execute(
                "UPDATE deliveries SET state = 'sending', claimed_by = 'oldhost:4242:run:boot' "
                "WHERE send_id = ? AND seq BETWEEN 5 AND 7",
                (send_id,),
            )
            conn.execute(
                "UPDATE deliveries SET state = 'pending', code = NULL, detail = NULL, "
                "attempts = 0 WHERE send_id = ? AND seq > 7",
                (send_id,),
            )
            conn.execute(
                "UPDATE deliveries SET state = 'deferred', retry_at = 1767225600.25, code = 451 "
                "WHERE send_id = ? AND seq = 4",
                (send_id,),
            )
            # How far `bounces fetch` read the bounce mailbox (the IMAP tests fetch for
            # real; here it is only a row to carry across).
            conn.execute(
                "INSERT INTO mailbox_marks (mailbox, uidvalidity, last_uid, updated_at) "
                "VALUES ('imap://bounces@mail.example.org:993/INBOX', 1733220000, 41, "
                "'2020-12-24T08:00:00+00:00')"
            )
            # The dead run's lease, run out long ago: not copied.
            conn.execute(
                "INSERT INTO locks (name, owner, expires, since, renewed) VALUES (?, ?, ?, ?, ?)",
                (f"send:{ISSUE}:other", "oldhost:4242:run:boot", 1000.0, 900.0, 950.0),
            )
    finally:
        conn.close()
    return path


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smtp() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, smtp: Server) -> Path:
    return build_deployment(tmp_path_factory.mktemp("deployment") / "project", smtp)


@pytest.fixture
def source(deployment: Path, tmp_path: Path) -> Path:
    """This test's own copy of the deployment's file (tests may spoil it)."""
    copied = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(deployment)
    try:
        # The backup API: the -wal's pages are in the copy too.
        out = sqlite3.connect(copied)
        conn.backup(out)
        out.close()
    finally:
        conn.close()
    return copied


def copy(source: Path | str, url: str, cwd: Path, **extra: str) -> Any:
    return run_cli("db", "copy", str(source), url, cwd=cwd, env=extra)


# ---------------------------------------------------------------- tests


def test_every_table_is_copied_or_said_not_to_be() -> None:
    from newsletter.storage.postgres.connection import TABLES
    from newsletter.storage.sqlite.connection import _TABLES

    assert set(COPIED) | set(NOT_COPIED) == set(TABLES) == set(_TABLES)
    assert not set(COPIED) & set(NOT_COPIED)


def test_a_deployment_is_copied_row_for_row_with_its_ids(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    before = digest(source)
    done = copy(source, postgres_url, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert digest(source) == before, "the source must only be read"

    # The counts table printed, each table's source and target equal.
    printed = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)$", done.stdout, re.M)
    }
    assert set(printed) == set(COPIED)
    assert all(s == t for s, t in printed.values()), printed
    assert printed["subscribers"][0] == 43  # 42 imported, one joined by a signup
    assert "the counts match" in done.stdout
    assert "not copied: locks (1 row(s))" in done.stdout
    assert "3 delivery(ies) left 'sending'" in done.stdout

    for table in COPIED:
        columns = sqlite_columns(source, table)
        expected = sqlite_rows(source, table)
        assert expected, f"the deployment has no {table} to copy"
        assert pg_rows(postgres_url, table, columns) == expected, table
    assert pg_counts(postgres_url)["locks"] == 0

    with psycopg.connect(postgres_url) as conn:
        states = dict(
            conn.execute(
                "SELECT d.state, count(*) FROM deliveries d JOIN sends s ON s.id = d.send_id "
                "WHERE s.list_name = 'other' GROUP BY d.state"
            ).fetchall()
        )
        assert states["sending"] == 3 and states["deferred"] == 1 and states["pending"] > 0
        # The next id each identity hands out is past the copied ones.
        for table in ("subscribers", "sends", "suppression_log"):
            top = conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()  # noqa: S608
            following = conn.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, 'id'))", (table,)
            ).fetchone()
            assert top is not None and following is not None and following[0] == top[0] + 1
        version = conn.execute("SELECT version FROM newsletter_schema").fetchall()
        assert version == [(SCHEMA_VERSION,)]


def test_the_copy_is_a_working_database(source: Path, postgres_url: str, tmp_path: Path) -> None:
    """What the stores read from the copy: the SQLite store's view of a subscriber, and
    the new server accepts a new subscriber without an id collision."""
    assert copy(source, postgres_url, tmp_path).returncode == 0
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "INSERT INTO subscribers (email, created_at) VALUES ('new@example.org', 'now') "
            "RETURNING id"
        ).fetchone()
        assert row is not None and row[0] == 44
        city = conn.execute(
            "SELECT attributes->>'city' FROM subscribers WHERE email = 'reader001@example.org'"
        ).fetchone()
        assert city == ("Lyon",)


def test_a_target_with_rows_is_refused_and_left_as_it_was(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    assert copy(source, postgres_url, tmp_path).returncode == 0
    counts = pg_counts(postgres_url)
    rows = {t: pg_rows(postgres_url, t, sqlite_columns(source, t)) for t in COPIED}
    again = copy(source, postgres_url, tmp_path)
    assert again.returncode == 1
    assert "is not empty" in again.stderr and "43 row(s) in subscribers" in again.stderr
    assert "left this one as it was" in again.stderr
    assert pg_counts(postgres_url) == counts
    assert {t: pg_rows(postgres_url, t, sqlite_columns(source, t)) for t in COPIED} == rows


def test_a_target_holding_only_a_lease_is_refused(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    migrated = run_cli("db", "migrate", cwd=tmp_path, env={"NEWSLETTER_DATABASE": postgres_url})
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO locks (name, owner, expires) VALUES ('schedule', 'web1:7:x:y', 1e10)"
        )
    refused = copy(source, postgres_url, tmp_path)
    assert refused.returncode == 1 and "1 row(s) in locks" in refused.stderr
    assert pg_counts(postgres_url) == dict.fromkeys(COPIED, 0) | {"locks": 1}


def test_a_missing_source_is_refused(postgres_url: str, tmp_path: Path) -> None:
    refused = copy(tmp_path / "nowhere.sqlite3", postgres_url, tmp_path)
    assert refused.returncode == 1
    assert "there is no database at" in refused.stderr and "nowhere.sqlite3" in refused.stderr
    assert not (tmp_path / "nowhere.sqlite3").exists()
    assert not pg_has_tables(postgres_url), "a refused source leaves the target untouched"


def test_a_folder_or_a_file_that_is_no_database_is_refused(
    postgres_url: str, tmp_path: Path
) -> None:
    refused = copy(tmp_path, postgres_url, tmp_path)
    assert refused.returncode == 1 and "is a folder" in refused.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to be read as one\n" * 50)
    refused = copy(text, postgres_url, tmp_path)
    assert refused.returncode == 1 and "is not an intact SQLite database" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not pg_has_tables(postgres_url)


def test_another_programs_database_is_refused(postgres_url: str, tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()
    before = digest(other)
    refused = copy(other, postgres_url, tmp_path)
    assert refused.returncode == 1
    assert "another program (its tables: invoices)" in refused.stderr
    assert digest(other) == before
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    refused = copy(empty, postgres_url, tmp_path)
    assert refused.returncode == 1 and "is an empty file, not a newsletter" in refused.stderr
    assert empty.read_bytes() == b""
    assert not pg_has_tables(postgres_url)


def test_a_source_missing_a_table_is_refused(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    conn = sqlite3.connect(source)
    conn.execute("DROP TABLE list_optouts")
    conn.close()
    refused = copy(source, postgres_url, tmp_path)
    assert refused.returncode == 1 and "it lacks the table(s) list_optouts" in refused.stderr
    assert not pg_has_tables(postgres_url)


def test_an_older_schema_is_refused_with_the_migrate_step(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    conn = sqlite3.connect(source)
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    before = digest(source)
    refused = copy(source, postgres_url, tmp_path)
    assert refused.returncode == 1
    assert "is at schema 3" in refused.stderr and "newsletter db migrate" in refused.stderr
    assert digest(source) == before, "the source is not migrated by the copy"
    assert not pg_has_tables(postgres_url)


def test_a_source_in_use_by_a_live_run_is_refused(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    conn = sqlite3.connect(source)
    with conn:
        conn.execute(
            "INSERT INTO locks (name, owner, expires, since) VALUES (?, ?, ?, ?)",
            ("schedule", "senderhost:77:run:boot", time.time() + 600, time.time()),
        )
    conn.close()
    refused = copy(source, postgres_url, tmp_path)
    assert refused.returncode == 1
    assert "is in use: process 77 on senderhost holds the 'schedule' lock" in refused.stderr
    assert not pg_has_tables(postgres_url)


def test_a_row_the_server_refuses_rolls_the_whole_copy_back(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    conn = sqlite3.connect(source)  # foreign keys are off on a plain connection
    with conn:
        conn.execute(
            "INSERT INTO list_members (list_name, subscriber_id, added_at) VALUES ('x', 999, 'y')"
        )
    conn.close()
    refused = copy(source, postgres_url, tmp_path)
    assert refused.returncode == 1, refused.stdout
    assert "the server refused a row of list_members" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The tables were made, and hold nothing: the subscribers copied first went too.
    assert pg_counts(postgres_url) == dict.fromkeys((*COPIED, *NOT_COPIED), 0)


def test_a_target_that_is_no_postgresql_url_is_refused(source: Path, tmp_path: Path) -> None:
    refused = copy(source, str(tmp_path / "new.sqlite3"), tmp_path)
    assert refused.returncode == 1 and "must be a postgresql:// URL" in refused.stderr
    refused = copy(source, "postgresql://me:hunter2@127.0.0.1/test", tmp_path)
    assert refused.returncode == 1 and "holds a password" in refused.stderr
    assert "hunter2" not in refused.stdout + refused.stderr


def test_an_unreachable_server_is_an_error_not_a_traceback(source: Path, tmp_path: Path) -> None:
    refused = copy(source, "postgresql://postgres@127.0.0.1:9/test", tmp_path)
    assert refused.returncode == 1 and "cannot connect to" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The URL named is the command's argument, not the setting it did not come from.
    assert "(POSTGRESQL_URL)" in refused.stderr and "NEWSLETTER_DATABASE)" not in refused.stderr


def test_an_interrupted_send_copied_to_postgresql_resumes_there(
    source: Path, postgres_url: str, tmp_path: Path
) -> None:
    """The move as a user makes it: `db copy`, then the same `send` command on the new
    database, from another project folder, to another relay: the interrupted send goes
    on where it stopped, its rows in flight at the crash are the reported unknowns, and
    the finished send stays finished."""
    assert copy(source, postgres_url, tmp_path).returncode == 0
    conn = sqlite3.connect(source)
    try:
        states: dict[str, list[str]] = {}
        for email, state in conn.execute(
            "SELECT d.email, d.state FROM deliveries d JOIN sends s ON s.id = d.send_id "
            "WHERE s.list_name = 'other' ORDER BY d.seq"
        ):
            states.setdefault(state, []).append(email)
    finally:
        conn.close()
    assert len(states["sending"]) == 3 and states["pending"] and states["deferred"]
    server = Server().start()
    try:
        project = make_project(tmp_path / "moved")
        env = env_for(server, postgres_url)
        send = ["send", f"issues/{EXAMPLE.name}", "--yes"]
        resumed = run_cli(*send, "--list", "other", cwd=project, env=env)
        assert resumed.returncode == 3, resumed.stdout + resumed.stderr
        unknown = re.findall(r"^unknown: (\S+): ", resumed.stdout, re.M)
        assert sorted(unknown) == sorted(states["sending"])
        got = sorted(r for m in server.handler.received for r in m.rcpt_tos)
        assert got == sorted(states["pending"] + states["deferred"])
        again = run_cli(*send, "--list", "other", "--resend-unknown", cwd=project, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        got = sorted(r for m in server.handler.received for r in m.rcpt_tos)
        assert got == sorted(states["pending"] + states["deferred"] + states["sending"])
        finished = run_cli(*send, "--list", "research-news", cwd=project, env=env)
        # Exit 3 for the one the relay refused back then; nobody is mailed again.
        assert finished.returncode == 3, finished.stdout + finished.stderr
        assert "this run 0 message(s)" in finished.stdout and "rejected 1" in finished.stdout
        assert len(server.handler.received) == len(got)
    finally:
        server.stop()
