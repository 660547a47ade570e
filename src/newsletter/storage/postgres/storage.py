"""PostgreSQL storage: one database on a server behind the
:class:`newsletter.storage.base.Storage` interface.

Input: a :class:`~newsletter.storage.location.Location` of kind ``postgresql``.
Output: :class:`PostgresStorage`, whose stores (subscribers, send log, archive,
slots) share one autocommit connection, whose leases open their own, and whose
:meth:`PostgresStorage.scratch_copy` is the dry run's throw-away copy: an SQLite
file in a temporary folder, filled from the server (a dry run never writes to the
shared database). Sends are shared (:attr:`PostgresStorage.shared_sends`): every
process on every host that runs one holds a lease of its own, claims with
``FOR UPDATE SKIP LOCKED``, and takes over the rows of a process whose lease ran
out (:meth:`~newsletter.storage.base.SendLogStore.mark_interrupted`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from newsletter.storage.base import LEASE_SECONDS, send_lease_name
from newsletter.storage.location import Location
from newsletter.storage.postgres.archive import PgArchive
from newsletter.storage.postgres.connection import open_database, translated
from newsletter.storage.postgres.dry_run import copy_for_send
from newsletter.storage.postgres.feedback import PgFeedback
from newsletter.storage.postgres.leases import PostgresLease
from newsletter.storage.postgres.send_log import PgSendLog
from newsletter.storage.postgres.signups import PgSignups
from newsletter.storage.postgres.slots import PgSlots
from newsletter.storage.postgres.subscribers import PgSubscribers
from newsletter.storage.sqlite import SqliteStorage
from newsletter.storage.sqlite.connection import Connection as SqliteConnection
from newsletter.storage.sqlite.connection import open_connection


@translated
class PostgresStorage:
    """One open PostgreSQL database and its stores."""

    shared_sends = True

    def __init__(
        self, conn: psycopg.Connection[Any], location: Location, *, busy_seconds: float = 30.0
    ) -> None:
        self.conn = conn
        self.location = location
        self.busy_seconds = busy_seconds
        self.subscribers = PgSubscribers(conn, location)
        self.send_log = PgSendLog(conn, location)
        self.archive = PgArchive(conn, location)
        self.slots = PgSlots(conn, location)
        self.feedback = PgFeedback(conn, location, self.subscribers)
        self.signups = PgSignups(conn, location)

    @classmethod
    def open(
        cls, location: Location, *, create: bool = False, busy_seconds: float = 30.0
    ) -> PostgresStorage:
        """Connect to (and migrate) the database at ``location``; see :func:`open_database`."""
        conn, _ = open_database(location, create=create, busy_seconds=busy_seconds)
        return cls(conn, location, busy_seconds=busy_seconds)

    def lease(self, name: str, ttl: float = LEASE_SECONDS) -> PostgresLease:
        return PostgresLease(self.location, name, ttl, busy_seconds=self.busy_seconds)

    def send_lease(
        self, issue_id: str, list_name: str, ttl: float = LEASE_SECONDS
    ) -> PostgresLease:
        return PostgresLease(
            self.location,
            send_lease_name(issue_id, list_name),
            ttl,
            busy_seconds=self.busy_seconds,
            per_process=True,
        )

    @contextlib.contextmanager
    def scratch_copy(self, issue_id: str, list_name: str) -> Iterator[SqliteStorage]:
        with tempfile.TemporaryDirectory(prefix="newsletter-dry-") as folder:
            path = Path(folder) / "dry-run.sqlite3"
            scratch, _ = open_connection(path, create=True, busy_seconds=self.busy_seconds)
            try:
                copy_for_send(self.conn, scratch, issue_id, list_name)
                if isinstance(scratch, SqliteConnection):
                    scratch.db_path = None  # its errors are the scratch file's, not the user's
                yield SqliteStorage(scratch, path, busy_seconds=self.busy_seconds)
            finally:
                scratch.close()

    def reopen(self) -> PostgresStorage:
        return PostgresStorage.open(self.location, busy_seconds=self.busy_seconds)

    def current(self) -> PostgresStorage:
        # A connection the server closed (a restart, a failover) is replaced by a new one,
        # once: a long-lived holder (a web thread, `schedule run`) carries on after it.
        if not self.conn.closed and not self.conn.broken:
            return self
        self.close()
        return self.reopen()

    def schema_version(self) -> int:
        row = self.conn.execute("SELECT max(version) FROM newsletter_schema").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def close(self) -> None:
        self.conn.close()
