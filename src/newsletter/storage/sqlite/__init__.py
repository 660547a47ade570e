"""The SQLite backend: one file, WAL mode, synchronous=FULL.

:class:`SqliteStorage` (storage.py) implements :class:`newsletter.storage.base.Storage`
with the stores in subscribers.py, send_log.py, archive.py and slots.py, the
leases in leases.py and the dry run's copy in dry_run.py; connection.py opens
and migrates the file and turns SQLite's errors into ours. This is the one
package that imports ``sqlite3``.
"""

from newsletter.storage.sqlite.storage import SqliteStorage

__all__ = ["SqliteStorage"]
