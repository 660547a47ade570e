"""Storage: every database the tool uses sits behind the interfaces in storage.base.

Input: a database path. Output: an open :class:`Storage` (:func:`open_storage`),
or a migrated database (:func:`migrate`). The SQLite implementation lives in
storage/sqlite/; nothing outside this package imports a database driver or
holds SQL (tests/test_layout.py checks it).
"""

from __future__ import annotations

from pathlib import Path

from newsletter.storage.base import LEASE_SECONDS, Lease, Storage

__all__ = ["LEASE_SECONDS", "Lease", "Storage", "migrate", "open_storage"]


def open_storage(path: Path, *, create: bool = False, busy_seconds: float = 30.0) -> Storage:
    """Open the database at ``path``, migrated to the current schema under the write lock.

    A missing database is refused (ConfigError, saying what to do) unless
    ``create``; another writer is waited for up to ``busy_seconds``."""
    from newsletter.storage.sqlite import SqliteStorage

    return SqliteStorage.open(path, create=create, busy_seconds=busy_seconds)


def migrate(path: Path) -> tuple[int, int]:
    """Bring the database at ``path`` to the current schema; (version before, version now).

    Equal numbers: it was up to date. Never creates a database. Every page is read
    too: a damaged file is refused (StorageUnavailable), not called up to date."""
    from newsletter.storage.sqlite.connection import SCHEMA_VERSION, open_connection

    # Every page is read before the first write: a damaged file keeps its schema
    # version, and its backup is not told a migration half-happened.
    conn, before = open_connection(path, check_first=True)
    conn.close()
    return before, SCHEMA_VERSION
