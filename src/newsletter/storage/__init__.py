"""Storage: every database the tool uses sits behind the interfaces in storage.base.

Input: a database :class:`~newsletter.storage.location.Location` (an SQLite path
or a PostgreSQL URL; a bare :class:`~pathlib.Path` is an SQLite file). Output:
an open :class:`Storage` (:func:`open_storage`), or a migrated database
(:func:`migrate`). The SQLite implementation lives in storage/sqlite/, the
PostgreSQL one in storage/postgres/; nothing outside this package imports a
database driver or holds SQL (tests/test_layout.py checks it).
"""

from __future__ import annotations

from pathlib import Path

from newsletter.storage.base import LEASE_SECONDS, Lease, Storage
from newsletter.storage.location import Location, parse_location

__all__ = ["LEASE_SECONDS", "Lease", "Location", "Storage", "migrate", "open_storage"]


def open_storage(
    where: Location | Path | str, *, create: bool = False, busy_seconds: float = 30.0
) -> Storage:
    """Open the database at ``where``, migrated to the current schema under the write lock.

    A missing database (or, on PostgreSQL, one without newsletter's tables) is
    refused (ConfigError, saying what to do) unless ``create``; another writer is
    waited for up to ``busy_seconds``."""
    location = where if isinstance(where, Location) else parse_location(where)
    if location.kind == "postgresql":
        from newsletter.storage.postgres import PostgresStorage

        return PostgresStorage.open(location, create=create, busy_seconds=busy_seconds)
    from newsletter.storage.sqlite import SqliteStorage

    assert location.path is not None
    return SqliteStorage.open(location.path, create=create, busy_seconds=busy_seconds)


def migrate(where: Location | Path | str) -> tuple[int, int]:
    """Bring the database at ``where`` to the current schema; (version before, version now).

    Equal numbers: it was up to date. Never creates an SQLite file; creates
    newsletter's tables in an empty PostgreSQL database (``db migrate`` is how one
    is started). Two processes migrating at once take turns. On SQLite every page
    is read too: a damaged file is refused (StorageUnavailable), not called up to date."""
    location = where if isinstance(where, Location) else parse_location(where)
    if location.kind == "postgresql":
        from newsletter.storage.postgres.connection import migrate_database

        return migrate_database(location)
    from newsletter.storage.sqlite.connection import SCHEMA_VERSION, open_connection

    assert location.path is not None
    # Every page is read before the first write: a damaged file keeps its schema
    # version, and its backup is not told a migration half-happened.
    conn, before = open_connection(location.path, check_first=True)
    conn.close()
    return before, SCHEMA_VERSION
