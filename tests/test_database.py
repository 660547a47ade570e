"""The database schema: new databases and databases made by an older version; the
suppression log and the weight of reasons, on both backends.

Migrating files of older versions is SQLite's alone (PostgreSQL starts at version 4);
what the stores promise runs on each backend (the ``database`` fixture).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from newsletter.storage import open_storage
from newsletter.storage.base import Storage
from newsletter.storage.sqlite import connection as database_file
from newsletter.storage.sqlite.connection import SCHEMA_VERSION, connect
from newsletter.storage.sqlite.subscribers import SubscriberStore


def test_new_database_has_the_current_schema(tmp_path: Path) -> None:
    conn = connect(tmp_path / "new.sqlite3", create=True)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"subscribers", "sends", "deliveries", "suppression_log", "archive"} <= tables


def test_version_1_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(database_file._SCHEMA)  # what version 1 created
    old.execute("PRAGMA user_version=1")
    old.execute(
        "INSERT INTO subscribers (email, first_name, created_at) VALUES ('ann@example.org', "
        "'Ann', '2026-01-01')"
    )
    old.execute(
        "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
        "VALUES ('2026-01-01', 'news', '2026-01-01', 1, 0)"
    )
    old.close()

    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT first_name FROM subscribers").fetchone()[0] == "Ann"
    row = conn.execute("SELECT issue_id, source_file, duplicates FROM sends").fetchone()
    assert tuple(row) == ("2026-01-01", None, 0)
    conn.close()
    # Opening it again changes nothing.
    assert connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_new_postgresql_database_has_the_current_schema(postgres_url: str) -> None:
    from newsletter.storage.postgres.connection import SCHEMA_VERSION as PG_VERSION

    with closing(open_storage(postgres_url, create=True)) as storage:
        assert storage.schema_version() == PG_VERSION == SCHEMA_VERSION
    with closing(open_storage(postgres_url)) as again:  # opening it again changes nothing
        assert again.schema_version() == SCHEMA_VERSION


def test_suppressing_and_lifting_are_logged_with_who_and_why(database: str) -> None:
    with closing(open_storage(database, create=True)) as storage:
        store = storage.subscribers
        assert store.suppress("ann@example.org", "complained", actor="web")
        assert store.unsuppress(
            "ann@example.org", reason="she wrote to ask", actor="cli:ed@host"
        ) == ("complained")
        assert store.unsuppress("ann@example.org", reason="again", actor="cli:ed@host") is None
        assert store.suppression("ann@example.org") is None
        log = store.suppression_history("ann@example.org")
        assert [(action, reason, actor) for _when, action, reason, _list, actor in log] == [
            ("suppress", "complained", "web"),
            ("unsuppress", "she wrote to ask", "cli:ed@host"),
        ]


def test_suppressions_from_version_1_start_the_log(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(database_file._SCHEMA)
    old.execute("PRAGMA user_version=1")
    old.execute(
        "INSERT INTO suppressions VALUES "
        "('ann@example.org', 'complained', 'news', '2026-02-03T04:05:06+00:00')"
    )
    old.close()
    store = SubscriberStore(connect(path))
    assert store.unsuppress("ann@example.org", reason="asked by phone", actor="cli:ed@host")
    history = store.suppression_history("ann@example.org")
    assert [(h[1], h[2], h[3], h[4]) for h in history] == [
        ("suppress", "complained", "news", "unrecorded (before the log)"),
        ("unsuppress", "asked by phone", None, "cli:ed@host"),
    ]
    assert history[0][0] == "2026-02-03T04:05:06+00:00"


def test_attributes_without_a_name_from_version_1_are_named_or_dropped(tmp_path: Path) -> None:
    # Version 1 stored a trailing comma's column as an attribute named "".
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(database_file._SCHEMA)
    old.execute("PRAGMA user_version=1")
    for n, attributes in enumerate(
        ('{"city": "Leeds", "": ""}', '{"city": "York", "": "junk"}', '{"city": "Bath"}'), 1
    ):
        old.execute(
            "INSERT INTO subscribers (email, attributes, created_at) VALUES (?, ?, '2026')",
            (f"s{n}@example.org", attributes),
        )
        old.execute("INSERT INTO list_members VALUES ('news', ?, '2026')", (n,))
    old.close()
    store = SubscriberStore(connect(path))
    assert [m.attributes for m in store.members("news")] == [
        {"city": "Leeds"},
        {"city": "York", "unnamed column": "junk"},
        {"city": "Bath"},
    ]
    assert store.attribute_names("news") == ["city", "unnamed column"]


def test_a_weightier_reason_replaces_a_lighter_one_and_never_the_reverse(database: str) -> None:
    with closing(open_storage(database, create=True)) as storage:
        store = storage.subscribers
        assert store.suppress("ann@example.org", "unsubscribed", actor="web")
        # A complaint entered later must not hide behind an unsubscribe the person can
        # lift by ticking a list on the preferences page.
        assert store.suppress("ann@example.org", "complained", actor="cli:ed@host")
        assert store.suppression("ann@example.org") == "complained"
        assert not store.suppress("ann@example.org", "bounced", actor="feedback")
        assert not store.suppress("ann@example.org", "unsubscribed", actor="web")
        assert store.suppression("ann@example.org") == "complained"
        log = store.suppression_history("ann@example.org")
        assert [(reason, actor) for _when, _action, reason, _list, actor in log] == [
            ("unsubscribed", "web"),
            ("complained", "cli:ed@host"),
        ]
        with pytest.raises(ValueError, match="unknown suppression reason"):
            store.suppress("ann@example.org", "annoyed")


def _until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_two_sessions_suppressing_at_once_keep_the_weightier_reason(postgres_url: str) -> None:
    """Two processes (the feedback reader, the web host) suppress one address at the same
    moment: whichever commits last, the complaint stays, and the log says exactly what
    each changed. A third session holds the row uncommitted until both are waiting on
    it, so the two really do meet at the row."""
    import psycopg

    with (
        closing(open_storage(postgres_url, create=True)) as first,
        closing(open_storage(postgres_url)) as second,
        closing(psycopg.connect(postgres_url)) as holder,
        closing(psycopg.connect(postgres_url, autocommit=True)) as monitor,
    ):
        results: dict[str, bool] = {}

        def suppress(storage: Storage, reason: str) -> None:
            results[reason] = storage.subscribers.suppress("ann@example.org", reason, actor=reason)

        # Not committed: both suppress calls below wait for this insert.
        holder.execute(
            "INSERT INTO suppressions VALUES ('ann@example.org', 'unsubscribed', NULL, '2026')"
        )
        threads = [
            threading.Thread(target=suppress, args=(first, "complained")),
            threading.Thread(target=suppress, args=(second, "bounced")),
        ]
        for thread in threads:
            thread.start()

        def both_wait() -> bool:
            row = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = 'newsletter' AND query LIKE '%suppressions%'"
            ).fetchone()
            return row is not None and row[0] == 2

        _until(both_wait, "both suppress calls wait for the row")
        holder.commit()
        for thread in threads:
            thread.join(timeout=30)
        assert results["complained"] is True  # it outweighs whatever it found
        assert first.subscribers.suppression("ann@example.org") == "complained"
        log = [entry[2] for entry in first.subscribers.suppression_history("ann@example.org")]
        # bounced changed the row only if it got there before the complaint did
        assert log == (["bounced", "complained"] if results["bounced"] else ["complained"])

        # And without a referee: new addresses, both sessions starting together.
        for n in range(20):
            email = f"r{n}@example.org"
            barrier = threading.Barrier(2)

            def race(
                storage: Storage, reason: str, email: str = email, barrier: Any = barrier
            ) -> None:
                barrier.wait()
                storage.subscribers.suppress(email, reason)

            pair = [
                threading.Thread(target=race, args=(first, "bounced")),
                threading.Thread(target=race, args=(second, "complained")),
            ]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join(timeout=30)
            assert first.subscribers.suppression(email) == "complained", email
            assert first.subscribers.suppression_history(email)[-1][2] == "complained"


def _schema2(path: Path, deliveries: int) -> None:
    """A database as version 2 left it, its one send with ``deliveries`` rows."""
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(database_file._SCHEMA)
    for statement in database_file._MIGRATIONS[0]:
        old.execute(statement)
    old.execute("PRAGMA user_version=2")
    old.execute(
        "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
        "VALUES ('2026-01-01', 'news', '2026-01-01', ?, 0)",
        (deliveries,),
    )
    old.executemany(
        "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
        "VALUES (1, ?, ?, '', '', 'sent')",
        [(i, f"r{i}@example.org") for i in range(deliveries)],
    )
    old.close()


def test_db_migrate_reads_every_page_before_it_writes_one(tmp_path: Path) -> None:
    """A schema-2 file whose send log is damaged: migration 3 would not read those pages,
    so it would succeed and only the check after it would fail, leaving a half-known
    file at schema 3. Checked first, the file keeps schema 2 and every byte."""
    from newsletter.errors import StorageUnavailable
    from newsletter.storage import migrate

    path = tmp_path / "old.sqlite3"
    _schema2(path, 2000)
    conn = sqlite3.connect(path)
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = 'deliveries'")]
    conn.close()
    assert len(pages) > 3
    with path.open("r+b") as file:
        for page in pages[1:]:  # the root page stays: the table opens
            file.seek((page - 1) * size)
            file.write(b"\xde\xad\xbe\xef" * (size // 4))
    before = path.read_bytes()
    with pytest.raises(StorageUnavailable, match="it is not an intact SQLite database"):
        migrate(path)
    assert path.read_bytes() == before
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 2
    check.close()


def test_a_database_from_a_newer_version_is_named_in_full_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from newsletter.errors import ConfigError

    (tmp_path / "db.sqlite3").touch()
    connect(tmp_path / "db.sqlite3", create=True).execute("PRAGMA user_version=99")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        connect(Path("db.sqlite3"))
    assert str(refused.value) == (
        f"the database {tmp_path / 'db.sqlite3'} (NEWSLETTER_DATABASE) was made by a newer "
        f"version of newsletter (schema 99; this one knows schema {SCHEMA_VERSION}): upgrade "
        "newsletter to use it, or point NEWSLETTER_DATABASE at the database this version made"
    )
