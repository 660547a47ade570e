"""SQLite storage: one database file behind the :class:`newsletter.storage.base.Storage`
interface.

Input: a path (or an open connection). Output: :class:`SqliteStorage`, whose
stores (subscribers, send log, archive, slots, feedback) share one connection, whose
leases open their own, and whose :meth:`SqliteStorage.scratch_copy` is the dry
run's throw-away copy. One thread at a time uses it, though not always the
one that opened it (the connection is opened with ``check_same_thread=False``:
a send hands its log to a database thread); a second thread takes
:meth:`SqliteStorage.reopen`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from newsletter.errors import StorageUnavailable
from newsletter.storage.base import LEASE_SECONDS, send_lease_name
from newsletter.storage.sqlite.archive import ArchiveStore
from newsletter.storage.sqlite.connection import (
    Connection,
    errors_named,
    identity,
    open_connection,
    translated,
)
from newsletter.storage.sqlite.dry_run import copy_for_send
from newsletter.storage.sqlite.feedback import FeedbackLog
from newsletter.storage.sqlite.leases import SqliteLease
from newsletter.storage.sqlite.send_log import SendLog
from newsletter.storage.sqlite.signups import SqliteSignups
from newsletter.storage.sqlite.slots import SlotLog
from newsletter.storage.sqlite.subscribers import SubscriberStore


@translated
class SqliteStorage:
    """One open SQLite database and its stores."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, busy_seconds: float = 30.0) -> None:
        self.conn = conn
        self.path = path
        self.busy_seconds = busy_seconds
        self.subscribers = SubscriberStore(conn)
        self.send_log = SendLog(conn)
        self.archive = ArchiveStore(conn)
        self.slots = SlotLog(conn)
        self.feedback = FeedbackLog(conn, self.subscribers)
        self.signups = SqliteSignups(conn)

    @classmethod
    def open(cls, path: Path, *, create: bool = False, busy_seconds: float = 30.0) -> SqliteStorage:
        """Open (and migrate) the database at ``path``; see :func:`open_connection`."""
        conn, _ = open_connection(path, create=create, busy_seconds=busy_seconds)
        return cls(conn, path, busy_seconds=busy_seconds)

    # One process per send: SQLite has one writer at a time anyway, and a second
    # process would only wait for it.
    shared_sends = False

    def lease(self, name: str, ttl: float = LEASE_SECONDS) -> SqliteLease:
        return SqliteLease(self.path, name, ttl, busy_seconds=self.busy_seconds)

    def send_lease(self, issue_id: str, list_name: str, ttl: float = LEASE_SECONDS) -> SqliteLease:
        return self.lease(send_lease_name(issue_id, list_name), ttl)

    @contextlib.contextmanager
    def scratch_copy(self, issue_id: str, list_name: str) -> Iterator[SqliteStorage]:
        with tempfile.TemporaryDirectory(prefix="newsletter-dry-") as folder:
            path = Path(folder) / "dry-run.sqlite3"
            conn, _ = open_connection(path, create=True, busy_seconds=self.busy_seconds)
            try:
                # Its errors name the real database: the scratch file is ours, not the user's.
                named = getattr(self.conn, "db_path", None)
                if isinstance(conn, Connection):
                    conn.db_path = named
                with errors_named(named):
                    copy_for_send(self.conn, conn, issue_id, list_name)
                yield SqliteStorage(conn, path, busy_seconds=self.busy_seconds)
            finally:
                conn.close()

    def reopen(self) -> SqliteStorage:
        return SqliteStorage.open(self.path, busy_seconds=self.busy_seconds)

    def current(self) -> SqliteStorage:
        # One stat: an open SQLite connection keeps writing into a file unlinked or
        # renamed over, where nobody will ever read what it wrote.
        now = identity(self.path)
        if now is None:
            raise StorageUnavailable(
                f"cannot use the database {self.path.absolute()} (NEWSLETTER_DATABASE): it "
                "was removed while in use, and nothing is written until it is back; restore "
                "it from a backup, or point NEWSLETTER_DATABASE at the database you use"
            )
        if now == getattr(self.conn, "db_identity", now):
            return self
        # Closed first: while it is open, its -wal and -shm (named after the path, not
        # the file) would be read as the new file's.
        self.close()
        return self.reopen()

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
