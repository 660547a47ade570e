"""PostgreSQL signup store: :mod:`newsletter.storage.signups`' SQL on the server.

Input: an autocommit psycopg connection. Output: :class:`~newsletter.storage.base.Signups`,
each write one transaction; processes on several hosts deciding about one signup,
address or rate-limit bucket take turns on an advisory lock named after it (and the
schema), so a link is confirmed once and a limit counted right.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import translated
from newsletter.storage.signups import SignupSql

__all__ = ["PgSignups"]


@translated
class PgSignups(SignupSql):
    """Signups on PostgreSQL (:class:`newsletter.storage.base.Signups`)."""

    PLACEHOLDER = "%s"

    def __init__(self, conn: psycopg.Connection[Any], location: Location) -> None:
        self.conn = conn
        self.location = location

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def _lock(self, name: str) -> None:
        self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended("
            "'newsletter signups:' || current_schema() || ':' || %s, 0))",
            (name,),
        )
