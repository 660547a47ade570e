"""The storage interface on SQLite: migrations keep every row, errors are ours, leases.

The migration tests start from tests/data/schema3.sqlite3, a database written by
the code as it was at schema 3 (tests/data/make_schema3.py made it), and from a
schema 1 database built from the base schema. They compare table by table, so a
later schema that adds tables or columns still has to keep every row of these.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from conftest import run_cli
from newsletter.errors import LeaseLost, LockHeld, StorageBusy, StorageUnavailable
from newsletter.storage import migrate, open_storage
from newsletter.storage.sqlite import SqliteStorage
from newsletter.storage.sqlite import connection as database
from newsletter.storage.sqlite.connection import SCHEMA_VERSION
from newsletter.storage.sqlite.leases import SqliteLease

FIXTURE = Path(__file__).parent / "data" / "schema3.sqlite3"
TABLES = (
    "subscribers",
    "list_members",
    "suppressions",
    "list_optouts",
    "sends",
    "deliveries",
    "slots",
    "locks",
    "suppression_log",
    "archive",
    "list_columns",
)


def rows_of(path: Path) -> dict[str, list[dict[str, object]]]:
    """Every row of every table the fixture has, as dicts, in a stable order."""
    # Read only: a missing fixture is an error here, not a new empty file.
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        out = {}
        for table in TABLES:
            found = conn.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 - our names
            out[table] = sorted((dict(r) for r in found), key=repr)
        return out


@pytest.fixture
def schema3(tmp_path: Path) -> Path:
    copy = tmp_path / "old.sqlite3"
    shutil.copyfile(FIXTURE, copy)
    return copy


def test_the_fixture_is_a_schema_3_database_with_rows_in_every_table() -> None:
    with contextlib.closing(sqlite3.connect(f"{FIXTURE.as_uri()}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    before = rows_of(FIXTURE)
    assert all(before[t] for t in TABLES), {t: len(r) for t, r in before.items()}
    states = {r["state"] for r in before["deliveries"]}
    assert {"pending", "sending", "sent", "rejected", "deferred"} <= states
    assert {r["list_name"] for r in before["list_members"]} == {"news", "events"}


def test_migrating_the_schema_3_fixture_keeps_every_row(schema3: Path) -> None:
    before = rows_of(schema3)
    assert migrate(schema3) == (3, SCHEMA_VERSION)
    after = rows_of(schema3)
    for table in TABLES:
        # A later schema may add columns: every old column keeps its value.
        kept = sorted(({k: r[k] for k in before[table][0]} for r in after[table]), key=repr)
        assert kept == before[table], table
    assert migrate(schema3) == (SCHEMA_VERSION, SCHEMA_VERSION)  # nothing more to do


def test_the_migrated_fixture_reads_through_the_stores(schema3: Path) -> None:
    storage = open_storage(schema3)
    try:
        assert storage.schema_version() == SCHEMA_VERSION
        ann = storage.subscribers.recipient("ann@example.org")
        assert ann is not None and (ann.first_name, ann.last_name) == ("Ann", "Archer")
        assert dict(ann.attributes) == {"city": "Leeds", "member_no": "17", "venue": "Hall"}
        assert storage.subscribers.lists() == [("events", 2), ("news", 5)]
        assert storage.subscribers.columns("news") == ["city", "member_no"]
        assert storage.subscribers.lists_of("ann@example.org") == [
            ("events", True),
            ("news", False),
        ]
        assert storage.subscribers.suppression("dan@example.org") == "bounced"
        history = storage.subscribers.suppression_history("gus@example.org")
        assert [(h[1], h[2], h[4]) for h in history] == [
            ("suppress", "unsubscribed", "web"),
            ("unsuppress", "asked to come back", "cli:ed@host"),
        ]
        record = storage.send_log.find("2026-12-03", "news")
        assert record is not None and (record.audience, record.suppressed) == (4, 1)
        counts = storage.send_log.counts(record.id)
        assert {k: v for k, v in counts.items() if v} == {
            "sent": 1,
            "rejected": 1,
            "deferred": 1,
            "sending": 1,
        }
        assert storage.send_log.next_retry(record.id) == 1_800_000_000.0
        assert storage.send_log.lists_sent("2026-12-03") == ["events", "news"]
        kept = storage.archive.get("2026-12-03")
        assert kept is not None and kept.subject == "December news"
        assert kept.source.file == "issues/2026-12-03.yaml"
        assert [p.issue_id for p in storage.archive.published()] == ["2026-12-03"]
        assert [s[3] for s in storage.slots.recent()] == ["incomplete", "missed"]
        # the run that died left one row in flight: unknown, never pending again
        assert storage.send_log.mark_interrupted(record.id) == 1
        assert storage.send_log.counts(record.id)["unknown"] == 1
    finally:
        storage.close()


def test_db_migrate_says_what_it_did(schema3: Path, tmp_path: Path) -> None:
    old = tmp_path / "v1.sqlite3"
    with contextlib.closing(sqlite3.connect(old, isolation_level=None)) as conn:
        conn.executescript(database._SCHEMA)  # what version 1 created
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "INSERT INTO subscribers (email, created_at) VALUES ('ann@example.org', '2026-01-01')"
        )
    env = {"NEWSLETTER_DATABASE": str(old)}
    done = run_cli("db", "migrate", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"migrated the database {old} from schema 1 to schema {SCHEMA_VERSION}\n"
    )
    again = run_cli("db", "migrate", cwd=tmp_path, env=env)
    assert again.stdout == (f"the database {old} is already up to date (schema {SCHEMA_VERSION})\n")
    fixture = run_cli("db", "migrate", cwd=tmp_path, env={"NEWSLETTER_DATABASE": str(schema3)})
    said = (
        f"migrated the database {schema3} from schema 3 to schema {SCHEMA_VERSION}"
        if SCHEMA_VERSION > 3
        else f"the database {schema3} is already up to date (schema 3)"
    )
    assert fixture.returncode == 0 and fixture.stdout == said + "\n", fixture.stderr
    missing = run_cli("db", "migrate", cwd=tmp_path, env={"NEWSLETTER_DATABASE": "none.sqlite3"})
    assert missing.returncode == 1 and "there is no database at" in missing.stderr
    assert not (tmp_path / "none.sqlite3").exists()


# -- errors are ours ---------------------------------------------------------------


def test_a_store_waiting_too_long_for_a_writer_raises_storage_busy(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True, busy_seconds=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageBusy) as busy:
            storage.subscribers.suppress("ann@example.org", "bounced")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert str(busy.value).startswith(f"cannot use the database {path} (NEWSLETTER_DATABASE): ")
    assert "another program holds it; try again when it is done" in str(busy.value)
    assert isinstance(busy.value.__cause__, sqlite3.OperationalError)
    assert storage.subscribers.suppress("ann@example.org", "bounced")  # free again: it works


def test_a_damaged_table_raises_storage_unavailable_from_a_stream_too(tmp_path: Path) -> None:
    from test_command_errors import LIST, damaged

    path = tmp_path / "db.sqlite3"
    damaged(path)  # it opens; every page but the schema's is garbage
    storage = SqliteStorage.open(path)
    members = storage.subscribers.members(LIST)  # a generator: translated as it is read
    with pytest.raises(StorageUnavailable, match="it is not an intact SQLite database"):
        list(members)
    storage.close()


def test_a_wrong_query_stays_a_bug_with_the_drivers_exception(tmp_path: Path) -> None:
    storage = SqliteStorage.open(tmp_path / "db.sqlite3", create=True)
    storage.conn.execute("ALTER TABLE list_columns RENAME TO gone")  # code and schema disagree
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        storage.subscribers.columns("news")


def test_reopen_is_a_second_connection_that_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True)
    other = storage.reopen()
    assert other.conn is not storage.conn
    storage.subscribers.suppress("ann@example.org", "bounced")
    assert other.subscribers.suppression("ann@example.org") == "bounced"  # the same file
    other.close()
    storage.close()
    path.unlink()
    with pytest.raises(Exception, match="there is no database at"):
        storage.reopen()
    assert not path.exists()


# -- leases ------------------------------------------------------------------------


def test_a_lease_is_held_renewed_and_released(tmp_path: Path) -> None:
    storage = SqliteStorage.open(tmp_path / "db.sqlite3", create=True)
    lease = storage.lease("send:x:news", ttl=0.4)
    lease.acquire(time.time())
    try:
        with pytest.raises(LockHeld, match="holds the 'send:x:news' lock"):
            storage.lease("send:x:news").acquire(time.time())
        first = storage.conn.execute("SELECT expires FROM locks").fetchone()[0]
        time.sleep(0.3)  # renewed every ttl / 4
        assert storage.conn.execute("SELECT expires FROM locks").fetchone()[0] > first
        assert lease.lost is None
        lease.check()
    finally:
        lease.release()
    assert storage.conn.execute("SELECT count(*) FROM locks").fetchone()[0] == 0


def test_a_holder_whose_lease_was_taken_learns_it_and_frees_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True)
    lease = SqliteLease(path, "schedule", ttl=0.2)
    lease.acquire(time.time())
    # Its renewals stalled past the expiry, and another run took it meanwhile.
    storage.conn.execute(
        "UPDATE locks SET owner = 'elsewhere:4242:1', expires = ? WHERE name = 'schedule'",
        (time.time() + 60,),
    )
    deadline = time.monotonic() + 5
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lease.lost == "process 4242 on elsewhere"
    with pytest.raises(LeaseLost) as lost:
        lease.check()
    assert "this run lost the 'schedule' lock by process 4242 on elsewhere" in str(lost.value)
    assert not any(
        t.name == "lease" and t.is_alive() for t in threading.enumerate() if t is lease._thread
    )
    lease.release()
    owner = storage.conn.execute("SELECT owner FROM locks WHERE name = 'schedule'").fetchone()
    assert owner[0] == "elsewhere:4242:1"  # the other run's lease stays


# -- constraint violations are errors of the interface -------------------------------


def test_a_second_freeze_of_one_send_is_send_exists_and_writes_nothing(tmp_path: Path) -> None:
    from newsletter.errors import SendExists
    from newsletter.models import Recipient

    storage = SqliteStorage.open(tmp_path / "db.sqlite3", create=True)
    first = storage.send_log.freeze("2026-12-03", "news", [Recipient("ann@example.org")], 0)
    with pytest.raises(SendExists) as again:
        storage.send_log.freeze("2026-12-03", "news", [Recipient("bob@example.org")], 0)
    assert isinstance(again.value.__cause__, sqlite3.IntegrityError)  # the cause, kept
    assert "the send of 2026-12-03 to the list 'news' is recorded already" in str(again.value)
    assert storage.send_log.find("2026-12-03", "news") == first
    rows = storage.conn.execute("SELECT email FROM deliveries").fetchall()
    assert [r[0] for r in rows] == ["ann@example.org"]
    assert not storage.conn.in_transaction
    storage.close()


def test_a_slot_state_that_is_none_is_a_value_error_and_writes_nothing(tmp_path: Path) -> None:
    import datetime as dt
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Slot:
        key: str
        local_day: dt.date

    storage = SqliteStorage.open(tmp_path / "db.sqlite3", create=True)
    slot = Slot("2026-12-03T14:00Z", dt.date(2026, 12, 3))
    with pytest.raises(ValueError, match="unknown slot state 'bogus'"):
        storage.slots.set(slot, "bogus")  # type: ignore[arg-type]
    assert storage.slots.state(slot) is None
    storage.slots.set(slot, "done")
    assert storage.slots.state(slot) == "done"
    with pytest.raises(ValueError, match="only unknown or rejected"):
        storage.send_log.requeue(1, "sent")  # type: ignore[arg-type]
    storage.close()


def test_a_holder_whose_renewals_keep_failing_counts_its_lease_lost(tmp_path: Path) -> None:
    """Another program holds the write lock past the lease's ttl: no renewal succeeds, so
    the lease may have run out and been taken; the holder must not go on as if it held it."""
    path = tmp_path / "db.sqlite3"
    SqliteStorage.open(path, create=True).close()
    lease = SqliteLease(path, "send:x:news", ttl=0.4, busy_seconds=0.01)
    lease.acquire(time.time())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert lease.lost is not None and "could not renew it for" in lease.lost
    assert "database is locked" in lease.lost
    with pytest.raises(LeaseLost, match="this run lost the 'send:x:news' lock by whichever run"):
        lease.check()
    time.sleep(0.3)  # the database is free again: lost stays lost
    assert lease.lost is not None
    lease.release()


def test_a_renewal_stuck_waiting_past_the_ttl_counts_the_lease_lost(tmp_path: Path) -> None:
    """A renewal waiting for the write lock (busy_seconds longer than ttl) has not failed
    yet, but the lease may have run out meanwhile: ``lost`` says so when ttl is over."""
    path = tmp_path / "db.sqlite3"
    SqliteStorage.open(path, create=True).close()
    lease = SqliteLease(path, "schedule", ttl=0.4, busy_seconds=30)
    lease.acquire(time.time())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    try:
        while lease.lost is None and time.monotonic() < started + 5:
            time.sleep(0.02)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert lease.lost is not None and "could not renew it for" in lease.lost
    assert waited < 3  # judged when ttl ran out, not when the 30 s wait ended
    lease.release()


def test_a_lease_never_creates_the_database(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True)
    storage.close()
    path.unlink()
    with pytest.raises(StorageUnavailable, match="cannot use the database"):
        storage.lease("schedule").acquire(time.time())
    assert not path.exists()


def test_a_dead_pid_frees_a_lease_only_on_this_host_boot_and_pid_namespace(
    tmp_path: Path,
) -> None:
    """Containers may share a host name but not a PID namespace: a pid gone here says
    nothing of a holder in another one, whose lease must run its course."""
    import socket
    import subprocess
    import sys

    from newsletter.storage import renewal

    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, here = socket.gethostname(), renewal.MACHINE
    assert here != "unknown"  # Linux: boot id and PID namespace are readable
    boot, _, namespace = here.partition("/")
    other_namespace = f"{host}:{gone.pid}:1:{boot}/{int(namespace) + 1}"
    other_boot = f"{host}:{gone.pid}:1:00000000-0000-0000-0000-000000000000/{namespace}"
    older_version = f"{host}:{gone.pid}:1"
    for owner in (other_namespace, other_boot, older_version):
        storage.conn.execute(
            "INSERT OR REPLACE INTO locks (name, owner, expires, since) VALUES ('s', ?, ?, ?)",
            (owner, time.time() + 60, time.time()),
        )
        with pytest.raises(LockHeld, match=f"process {gone.pid} on {host}"):
            storage.lease("s").acquire(time.time())
    storage.conn.execute(
        "UPDATE locks SET owner = ? WHERE name = 's'", (f"{host}:{gone.pid}:1:{here}",)
    )
    lease = storage.lease("s")
    lease.acquire(time.time())  # dead, here: free at once
    assert lease.owner.endswith(f":{here}")
    lease.release()
    storage.close()


def test_current_is_the_same_storage_until_the_file_is_removed_or_replaced(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    storage = SqliteStorage.open(path, create=True)
    assert storage.current() is storage
    moved = tmp_path / "moved.sqlite3"
    path.rename(moved)
    with pytest.raises(StorageUnavailable, match="was removed while in use"):
        storage.current()
    assert not path.exists()  # not made again
    backup = tmp_path / "backup.sqlite3"
    other = SqliteStorage.open(backup, create=True)
    other.subscribers.suppress("ann@example.org", "bounced")
    other.close()  # the last connection: its WAL is folded into the file
    shutil.copyfile(backup, path)  # another file at the path now
    for stale in ("-wal", "-shm"):  # the moved file's, named after the path: not the copy's
        Path(f"{path}{stale}").unlink(missing_ok=True)
    fresh = storage.current()
    assert fresh is not storage and fresh.subscribers.suppression("ann@example.org") == "bounced"
    assert fresh.current() is fresh
    with pytest.raises(sqlite3.ProgrammingError):
        storage.conn.execute("SELECT 1")  # the old one is closed
    fresh.close()
