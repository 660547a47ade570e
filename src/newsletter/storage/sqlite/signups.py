"""SQLite signup store: :mod:`newsletter.storage.signups`' SQL in SQLite's transactions.

Input: the database connection. Output: :class:`~newsletter.storage.base.Signups`,
each write in ``BEGIN IMMEDIATE`` (one writer at a time on the file, so a
confirmation, a rate limit or a single-use key is decided by one process at once).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from newsletter.storage.signups import SignupSql
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
