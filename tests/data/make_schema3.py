"""Write tests/data/schema3.sqlite3: a database as newsletter wrote it at schema 3.

Run once, with the code of commit edef579 (schema 3), from the repository root:
``PYTHONPATH=src python tests/data/make_schema3.py``. The file it writes is committed;
tests/test_migrate.py copies it and checks that opening and migrating it keeps every
row. It fills every table: subscribers with attributes on two lists, opt-outs,
suppressions with their log, a frozen send with deliveries in several states, an
archive row, slots, a lock and the lists' columns. Times are fixed so that the file
is the same each time it is made.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from newsletter.audience.csv_import import ParsedRow
from newsletter.models import Recipient
from newsletter.storage.sqlite.archive import ArchivedIssue, ArchiveStore, Source
from newsletter.storage.sqlite.connection import SCHEMA_VERSION, connect
from newsletter.storage.sqlite.send_log import Outcome, SendLog
from newsletter.storage.sqlite.subscribers import SubscriberStore

OUT = Path(__file__).with_name("schema3.sqlite3")


def main() -> None:
    assert SCHEMA_VERSION == 3, "run this with the code as it was at schema 3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{OUT}{suffix}").unlink(missing_ok=True)
    conn = connect(OUT, create=True)
    store = SubscriberStore(conn)
    news = [
        ParsedRow(2, "ann@example.org", "Ann", "Archer", {"city": "Leeds", "member_no": "17"}),
        ParsedRow(3, "bob@example.org", "Bob", "Baker", {"city": "York", "member_no": ""}),
        ParsedRow(4, "cat@example.org", "Cat", "", {"city": "", "member_no": "9"}),
        ParsedRow(5, "dan@example.org", "Dan", "Dyer", {"city": "Hull", "member_no": "4"}),
        ParsedRow(6, "eve@example.org", "Eve", "Evans", {"city": "Bath", "member_no": "5"}),
    ]
    assert store.import_rows("news", news, skip_invalid=False).committed
    events = [
        ParsedRow(2, "ann@example.org", "Ann", "Archer", {"venue": "Hall"}),
        ParsedRow(3, "fay@example.org", "Fay", "Fox", {"venue": "Park"}),
    ]
    assert store.import_rows("events", events, skip_invalid=False).committed
    store.opt_out("events", "ann@example.org")
    store.suppress("dan@example.org", "bounced", list_name="news", actor="cli:ed@host")
    store.suppress("zed@example.org", "complained", actor="web")
    store.suppress("gus@example.org", "unsubscribed", actor="web")
    store.unsuppress("gus@example.org", reason="asked to come back", actor="cli:ed@host")

    log = SendLog(conn)
    audience = list(store.audience("news", ["city"]))
    record = log.freeze("2026-12-03", "news", audience, suppressed=1)
    claimed = log.claim(record.id, 10, now=0.0).deliveries
    outcomes = [
        Outcome("sent", 250, "2.0.0 ok"),
        Outcome("rejected", 550, "5.1.1 no such user"),
        Outcome("deferred", 451, "4.3.0 try later", retry_at=1_800_000_000.0),
    ]
    log.record(record.id, [(d.seq, o) for d, o in zip(claimed, outcomes, strict=False)])
    # The fourth claimed stays 'sending': the run that claimed it died.
    ArchiveStore(conn).record_source(record.id, Source("issues/2026-12-03.yaml", "ab" * 32))
    ArchiveStore(conn).freeze(
        ArchivedIssue(
            "2026-12-03",
            "December news",
            "2026-12-03",
            "What happened",
            "<html><body><h1>December news</h1></body></html>",
            Source("issues/2026-12-03.yaml", "ab" * 32),
            frozen_at="2026-12-03T14:00:05.000+00:00",
        )
    )
    events_audience = [Recipient("fay@example.org", "Fay", "Fox")]
    log.freeze("2026-12-03", "events", events_audience, suppressed=1)

    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO slots (key, local_day, issue_id, state, detail, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("2026-11-26T14:00Z", "2026-11-26", None, "missed", "no run", "2026-11-27T00:00Z"),
                (
                    "2026-12-03T14:00Z",
                    "2026-12-03",
                    "2026-12-03",
                    "incomplete",
                    "news not finished",
                    "2026-12-03T14:05Z",
                ),
            ],
        )
        conn.execute(
            "INSERT INTO locks (name, owner, expires, since) VALUES "
            "('send:2026-12-03:news', 'elsewhere:4242:1', 1.0, 0.5)"
        )
        # Fixed times, so that the file is the same each time it is made.
        for table in (
            "subscribers",
            "list_optouts",
            "suppressions",
            "suppression_log",
            "list_columns",
            "sends",
        ):
            column = "added_at" if table == "list_columns" else "created_at"
            conn.execute(f"UPDATE {table} SET {column} = '2026-11-01T09:00:00+00:00'")  # noqa: S608
        conn.execute("UPDATE list_members SET added_at = '2026-11-01T09:00:00+00:00'")
        conn.execute(
            "UPDATE deliveries SET updated_at = '2026-12-03T14:01:00.000+00:00' "
            "WHERE updated_at IS NOT NULL"
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")  # one file to commit, no -wal beside it
    conn.execute("VACUUM")
    conn.close()
    check = sqlite3.connect(OUT)
    for (table,) in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        print(table, check.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
    check.close()


if __name__ == "__main__":
    main()
