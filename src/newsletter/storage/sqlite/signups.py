"""SQLite signup store: :mod:`newsletter.storage.signups`' SQL in SQLite's transactions.

Input: the database connection. Output: :class:`~newsletter.storage.base.Signups`,
each write in ``BEGIN IMMEDIATE`` (one writer at a time on the file, so a
confirmation, a rate limit or a single-use key is decided by one process at once).
An erasure overwrites what it deletes and empties the write-ahead log after it, so
the person's rows do not stay in the file's free pages or its WAL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from newsletter.storage.signups import Erased, SignupSql
from newsletter.storage.sqlite.connection import translated

__all__ = ["SqliteSignups"]


@translated
class SqliteSignups(SignupSql):
    """Signups on SQLite (:class:`newsletter.storage.base.Signups`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            yield

    def erase(self, email: str, email_hash: str, *, now: str, key_check: str = "") -> Erased:
        # Deleted rows stay in free pages unless secure_delete is on (Debian's SQLite has
        # it on; python.org's builds do not), and old page images stay in the WAL until
        # a checkpoint writes them back and truncates it.
        self.conn.execute("PRAGMA secure_delete = ON")
        done = super().erase(email, email_hash, now=now, key_check=key_check)
        # Readers still open keep the WAL from being truncated: it is then emptied by
        # the next checkpoint after them (SQLite's own), and reused from its start.
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return done
