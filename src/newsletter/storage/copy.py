"""The move between backends: ``newsletter db copy`` from an SQLite file to PostgreSQL.

Input: the path of a deployment's SQLite database and the
:class:`~newsletter.storage.location.Location` of an empty PostgreSQL database.
Output: every row of every newsletter table on the server, ids kept, and a
:class:`CopyReport` with each table's count in the source and in the target
(compared before anything is committed), or an error with nothing changed.

The steps: the source is opened read-only in one read transaction
(:class:`~newsletter.storage.sqlite.copy_source.CopySource`: it must be at the
current schema and no live run may hold a lease on it); then the target is
created or migrated, locked and found empty, and filled table by table with
COPY in one transaction
(:class:`~newsletter.storage.postgres.copy_target.CopyTarget`); the counts are
compared and a difference rolls it all back. Parents come before their
children (subscribers before list members, sends before deliveries), so the
server checks every reference as the rows arrive. Deliveries still ``sending``
(a run that died) are copied as they are: the first send on PostgreSQL turns
them ``unknown``, as the next run on SQLite would have. The locks table is not
copied: its rows are leases of runs on the old machine, which mean nothing to
the new server (and a live one refuses the copy, see CopySource).

The backends' halves live in their own folders because each driver is imported
only there (tests/test_layout.py); this module holds no driver and no SQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from newsletter.errors import StorageError
from newsletter.storage.location import Location

__all__ = ["COPIED", "NOT_COPIED", "CopyFailed", "CopyReport", "TableCount", "copy_database"]

# Every table of the schema, parents first; a table added by a later schema must be
# put in one of these two (tests/test_db_copy.py checks both backends' tables).
COPIED = (
    "subscribers",
    "list_members",
    "suppressions",
    "list_optouts",
    "sends",
    "deliveries",
    "slots",
    "suppression_log",
    "archive",
    "list_columns",
    "feedback",
    "mailbox_marks",
    "consent_texts",
    "signups",
    "consents",
    "outbox",
    "rate_hits",
    "used_once",
    "erasures",
)
NOT_COPIED = ("locks",)


class CopyFailed(StorageError):
    """The copy was made but is not right (a count differs, the server refused a row):
    it was rolled back, and the target holds nothing of it."""


@dataclass(frozen=True, slots=True)
class TableCount:
    table: str
    source: int
    target: int


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What ``db copy`` did: each copied table's rows in the source and the target (equal,
    or the copy would have failed), how many lease rows stayed behind, how many
    deliveries were copied still ``sending``, and how long it took."""

    counts: tuple[TableCount, ...]
    leases_left: int
    sending: int
    seconds: float

    @property
    def rows(self) -> int:
        return sum(c.target for c in self.counts)


def copy_database(
    source: Path, target: Location, *, on_table: Callable[[str, int], None] | None = None
) -> CopyReport:
    """Copy the SQLite database at ``source`` into the empty PostgreSQL database at
    ``target`` (created or migrated first). ``on_table(name, rows)`` is told before each
    table is copied. ConfigError for a source or target refused before anything was
    written, CopyFailed for a copy rolled back, StorageError for a database failing."""
    # Imported here, as open_storage does: each half imports its own driver.
    from newsletter.storage.postgres.copy_target import CopyTarget
    from newsletter.storage.sqlite.copy_source import CopySource

    started = time.monotonic()
    # The source first: a refused source leaves the target not even connected to.
    with CopySource.open(source) as reading:
        target_db = CopyTarget.open(target)
        try:
            counts: list[TableCount] = []
            with target_db.transaction():
                for table in COPIED:
                    columns = target_db.columns(table)
                    found = reading.columns(table)
                    if sorted(found) != sorted(columns):
                        raise CopyFailed(
                            f"the table {table} has the columns {', '.join(found)} in "
                            f"{source.absolute()} but {', '.join(columns)} on the server: "
                            "the file was edited by hand; nothing was copied"
                        )
                    expected = reading.count(table)
                    if on_table is not None:
                        on_table(table, expected)
                    target_db.load(table, columns, reading.rows(table, columns))
                    counts.append(TableCount(table, expected, target_db.count(table)))
                target_db.restart_identities()
                wrong = [c for c in counts if c.source != c.target]
                if wrong:
                    shown = ", ".join(f"{c.table} {c.source} -> {c.target}" for c in wrong)
                    raise CopyFailed(
                        f"the counts differ after the copy ({shown}); it was rolled back "
                        "and the server holds nothing of it"
                    )
            leases, sending = reading.leases(), reading.sending()
        finally:
            target_db.close()
    return CopyReport(tuple(counts), leases, sending, time.monotonic() - started)
