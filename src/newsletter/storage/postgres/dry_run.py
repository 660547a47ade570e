"""PostgreSQL scratch copy: what a send of one issue to one list reads, copied into an SQLite file.

Input: the shared database's connection, a new (empty, schema-4) SQLite scratch
database, an issue id and a list name. Output: the scratch database filled with
the same rows storage/sqlite/dry_run.py copies: the list's members and columns,
the suppressions, the list's opt-outs and every list's send of the issue with
its deliveries (or, once this list's send is frozen, only the subscribers its
rows without attributes read). The dry run then takes a real send's path on
the copy and never writes to the shared database.

The rows are read in one read-only REPEATABLE READ transaction (one snapshot,
as SQLite's ATTACH gives), through server-side cursors a batch at a time, and
written with executemany into one SQLite transaction: memory stays flat for a
list of any size. jsonb values arrive as their JSON text, which is how SQLite
keeps attributes.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from newsletter.storage.postgres.connection import storage_error
from newsletter.storage.sqlite.connection import Connection, errors_named

__all__ = ["copy_for_send"]

BATCH = 2000


def copy_for_send(
    real: psycopg.Connection[Any], scratch: Connection, issue_id: str, list_name: str
) -> None:
    """Fill ``scratch`` with what a send of ``issue_id`` to ``list_name`` reads from ``real``.

    The server's failures (and the scratch file's: a full temporary disk) leave as
    StorageError; a query's bug keeps the driver's exception."""
    try:
        with errors_named(None):
            _fill(real, scratch, issue_id, list_name)
    except psycopg.Error as exc:
        ours = storage_error(exc, None)
        if ours is None:
            raise
        raise ours from exc


def _fill(
    real: psycopg.Connection[Any], scratch: Connection, issue_id: str, list_name: str
) -> None:
    # Inside a caller's transaction ours is a savepoint, whose isolation is the caller's.
    ours = real.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with real.transaction():
        if ours:
            # One snapshot for every table, as the SQLite copy reads them; set before
            # the transaction's first query.
            real.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        with scratch:
            scratch.execute("BEGIN")
            _copy(real, scratch, "suppressions", sql.SQL(""), ())
            _copy(real, scratch, "list_optouts", sql.SQL("WHERE u.list_name = %s"), (list_name,))
            # Every list's send of this issue: a new send leaves out whoever another
            # list's send already has, and the dry run must count them.
            _copy(real, scratch, "sends", sql.SQL("WHERE u.issue_id = %s"), (issue_id,))
            _copy(
                real,
                scratch,
                "deliveries",
                sql.SQL("JOIN sends s ON s.id = u.send_id WHERE s.issue_id = %s"),
                (issue_id,),
            )
            send = scratch.execute(
                "SELECT id FROM sends WHERE issue_id = ? AND list_name = ?",
                (issue_id, list_name),
            ).fetchone()
            if send is None:
                _copy(
                    real,
                    scratch,
                    "subscribers",
                    sql.SQL("JOIN list_members m ON m.subscriber_id = u.id WHERE m.list_name = %s"),
                    (list_name,),
                )
                _copy(
                    real,
                    scratch,
                    "list_members",
                    sql.SQL("WHERE u.list_name = %s"),
                    (list_name,),
                )
            else:
                # Rows frozen before attributes were kept read them from the subscriber.
                _copy(
                    real,
                    scratch,
                    "subscribers",
                    sql.SQL(
                        "WHERE u.email IN (SELECT email FROM deliveries "
                        "WHERE send_id = %s AND attributes IS NULL)"
                    ),
                    (int(send[0]),),
                )
            _copy(real, scratch, "list_columns", sql.SQL("WHERE u.list_name = %s"), (list_name,))


def _copy(
    real: psycopg.Connection[Any],
    scratch: Connection,
    table: str,
    where: sql.Composable,
    params: tuple[Any, ...],
) -> None:
    """Stream ``table``'s rows chosen by ``where`` (in which the table is named ``u``)
    into the scratch table of the same name, a batch at a time."""
    columns = _columns(real, table)
    selected = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier("u", name))
        if kind == "jsonb"
        else sql.Identifier("u", name)
        for name, kind in columns
    )
    query = sql.SQL("SELECT {} FROM {} {} {}").format(
        selected, sql.Identifier(table), sql.Identifier("u"), where
    )
    # SQLite's statement: names quoted (they are the schema's), values as parameters.
    names = ", ".join('"' + name + '"' for name, _ in columns)
    marks = ", ".join("?" for _ in columns)
    insert = f'INSERT INTO "{table}" ({names}) VALUES ({marks})'
    # A named cursor is a server-side one: the server keeps the result and hands
    # it over BATCH rows at a time.
    with real.cursor(name=f"newsletter_dry_run_{table}") as cursor:
        cursor.itersize = BATCH
        cursor.execute(query, params)
        while batch := cursor.fetchmany(BATCH):
            scratch.executemany(insert, batch)


def _columns(real: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    """(name, type) of each of the table's columns, in order."""
    rows = real.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    return [(str(name), str(kind)) for name, kind in rows]
