"""SQLite side of ``newsletter db copy``: the database being moved, read-only, one snapshot.

Input: the path of the SQLite database a deployment uses. Output: an open
:class:`CopySource` whose tables, columns, row counts and rows (streamed in
batches, memory flat) all come from one read transaction, so what is copied and
what is counted are the same snapshot, even if a web page records an opt-out
meanwhile. The file is opened read-only (``mode=ro``) and never migrated: the
old deployment stays exactly as it was whatever happens to the copy, and a
backup or a read-only snapshot can be copied from. A file that is missing, not
an SQLite database, not newsletter's, at another schema version, or in use by a
live run (a lease not run out) is refused with what to do.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from newsletter.errors import ConfigError, StorageUnavailable
from newsletter.storage.copy import COPIED, NOT_COPIED
from newsletter.storage.renewal import dead_here, holder_of
from newsletter.storage.sqlite.connection import SCHEMA_VERSION, storage_error

__all__ = ["CopySource"]

BATCH = 5000
# How messages name the file: the command's argument, as others name NEWSLETTER_DATABASE.
ARGUMENT = "(SQLITE_PATH)"


class CopySource:
    """One SQLite database opened read-only, inside one read transaction until closed."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path) -> CopySource:
        """Open ``path`` read-only and check it is newsletter's, at the current schema."""
        where = path.absolute()
        if path.is_dir():
            raise ConfigError(
                f"the database {where} {ARGUMENT} is a folder; give the SQLite file itself "
                "(the one NEWSLETTER_DATABASE names on the old machine)"
            )
        if not path.exists():
            raise ConfigError(
                f"there is no database at {where} {ARGUMENT}; give the path of the SQLite "
                "file NEWSLETTER_DATABASE names on the old machine"
            )
        try:
            # mode=ro: nothing, not even WAL mode's header, is written to the old file.
            conn = sqlite3.connect(f"{where.as_uri()}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise _problem(exc, where) from None
        source = cls(conn, where)
        try:
            # One read transaction from here to close(): a single snapshot.
            source._run("BEGIN")
            source._check()
        except BaseException:
            conn.close()
            raise
        return source

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> CopySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ what it holds

    def columns(self, table: str) -> list[str]:
        """The table's column names, in the file's order."""
        return [str(r[1]) for r in self._run(f"PRAGMA table_info({_quoted(table)})")]

    def count(self, table: str) -> int:
        # Names cannot be parameters; they are quoted (and come from the schema).
        statement = f"SELECT count(*) FROM {_quoted(table)}"  # noqa: S608
        return int(self._run(statement).fetchone()[0])

    def rows(self, table: str, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        """The table's rows (``columns`` in that order), a batch at a time: SQLite's cursor
        steps through the file, so memory stays flat for any table size."""
        names = ", ".join(_quoted(c) for c in columns)
        cursor = self._run(f"SELECT {names} FROM {_quoted(table)}")  # noqa: S608
        while True:
            try:
                batch = cursor.fetchmany(BATCH)
            except sqlite3.Error as exc:
                raise _problem(exc, self.path) from None
            if not batch:
                return
            yield batch

    def sending(self) -> int:
        """How many deliveries are still ``sending`` (claimed by a run that died)."""
        found = self._run("SELECT count(*) FROM deliveries WHERE state = 'sending'").fetchone()
        return int(found[0])

    def leases(self) -> int:
        """How many lock rows (leases of the old machine's runs) the file holds."""
        return self.count("locks")

    # ----------------------------------------------------------------- checks

    def _run(self, statement: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(statement, params)
        except sqlite3.Error as exc:
            raise _problem(exc, self.path) from None

    def _check(self) -> None:
        version = int(self._run("PRAGMA user_version").fetchone()[0])
        tables = {
            str(r[0])
            for r in self._run(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if version == 0 and "subscribers" not in tables:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            if tables:
                what = f"an SQLite database of another program (its tables: {shown})"
            elif self.path.stat().st_size == 0:
                what = "an empty file"
            else:
                what = "an SQLite database with no tables"
            raise ConfigError(
                f"{self.path} {ARGUMENT} is {what}, not a newsletter database; give the path "
                "of the SQLite file NEWSLETTER_DATABASE names on the old machine"
            )
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path} {ARGUMENT} was made by a newer version of newsletter (schema "
                f"{version}; this one knows schema {SCHEMA_VERSION}): run `db copy` with that "
                "version"
            )
        if version < SCHEMA_VERSION:
            # Not migrated here: the copy never writes to the old deployment's file, and
            # `db migrate` checks every page before its first write (a damaged file
            # keeps its schema); migrating is a step the user takes on purpose.
            raise ConfigError(
                f"{self.path} {ARGUMENT} is at schema {version}, and `db copy` copies schema "
                f"{SCHEMA_VERSION} only: upgrade it first with "
                f"`NEWSLETTER_DATABASE={self.path} newsletter db migrate` (with the old "
                "deployment's services stopped), then run `db copy` again"
            )
        missing = set(COPIED + NOT_COPIED) - tables
        if missing:
            raise ConfigError(
                f"cannot use the database {self.path} {ARGUMENT}: it lacks the table(s) "
                f"{', '.join(sorted(missing))}; it was damaged or edited by hand: restore it "
                "from a backup"
            )
        live = [
            (str(name), str(owner), float(expires))
            for name, owner, expires in self._run("SELECT name, owner, expires FROM locks")
            if float(expires) > time.time() and not dead_here(str(owner))
        ]
        if live:
            name, owner, expires = live[0]
            more = f" (and {len(live) - 1} more)" if len(live) > 1 else ""
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
            raise ConfigError(
                f"{self.path} {ARGUMENT} is in use: {holder_of(owner)} holds the {name!r} "
                f"lock{more}, its lease lasting until {until}. A send or the scheduler "
                "running while it is copied would go on after the copy was taken, and the new "
                "server would send those recipients again: stop the old deployment's "
                "senders and scheduler, then run `db copy` again"
            )


def _quoted(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def _problem(exc: sqlite3.Error, where: Path) -> Exception:
    """Our error for an SQLite failure reading the source; the driver's own for a bug."""
    kind = (getattr(exc, "sqlite_errorname", None) or "").removeprefix("SQLITE_").split("_")[0]
    if kind in ("NOTADB", "CORRUPT"):
        # As every command says it of NEWSLETTER_DATABASE, of the argument here.
        return StorageUnavailable(
            f"cannot use the database {where} {ARGUMENT}: it is not an intact SQLite "
            f"database ({exc}); point SQLITE_PATH at the newsletter database, or restore it "
            "from a backup"
        )
    if kind in ("CANTOPEN", "PERM", "READONLY"):
        return StorageUnavailable(
            f"cannot read the database {where} {ARGUMENT}: {exc}; the file must be "
            "readable by this user, and its folder writable or its -shm file present "
            "(SQLite reads a WAL database through it)"
        )
    ours = storage_error(exc, where)
    return ours if ours is not None else exc
