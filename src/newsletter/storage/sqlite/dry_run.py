"""SQLite scratch copy: what a send of one issue to one list reads, in a throw-away file.

Input: the real database's connection, a new (empty) scratch database, an issue
id and a list name. Output: the scratch database filled with that list's
members and columns, the suppressions, the list's opt-outs and every list's
send of the issue with its deliveries. The dry run then takes the same path as
a real send, on the copy: the real send log gets no rows, and a send already
under way is previewed as its resume would go. SQLite copies on disk
(``ATTACH``), so memory stays flat for any list size.
"""

from __future__ import annotations

import sqlite3


def copy_for_send(
    real: sqlite3.Connection, scratch: sqlite3.Connection, issue_id: str, list_name: str
) -> None:
    """Fill ``scratch`` with what a send of ``issue_id`` to ``list_name`` reads from ``real``."""
    path = real.execute("PRAGMA database_list").fetchone()[2]
    scratch.execute("ATTACH DATABASE ? AS src", (path,))
    try:
        with scratch:
            scratch.execute("BEGIN")
            scratch.execute("INSERT INTO suppressions SELECT * FROM src.suppressions")
            scratch.execute(
                "INSERT INTO list_optouts SELECT * FROM src.list_optouts WHERE list_name = ?",
                (list_name,),
            )
            # Every list's send of this issue: a new send leaves out whoever
            # another list's send already has, and the dry run must count them.
            scratch.execute(
                "INSERT INTO sends SELECT * FROM src.sends WHERE issue_id = ?", (issue_id,)
            )
            scratch.execute(
                "INSERT INTO deliveries SELECT d.* FROM src.sends s "
                "JOIN src.deliveries d ON d.send_id = s.id WHERE s.issue_id = ?",
                (issue_id,),
            )
            send = scratch.execute(
                "SELECT id FROM sends WHERE issue_id = ? AND list_name = ?",
                (issue_id, list_name),
            ).fetchone()
            if send is None:
                scratch.execute(
                    "INSERT INTO subscribers SELECT u.* FROM src.subscribers u "
                    "JOIN src.list_members m ON m.subscriber_id = u.id WHERE m.list_name = ?",
                    (list_name,),
                )
                scratch.execute(
                    "INSERT INTO list_members SELECT * FROM src.list_members WHERE list_name = ?",
                    (list_name,),
                )
            else:
                # Rows frozen before attributes were kept read them from the subscriber.
                scratch.execute(
                    "INSERT INTO subscribers SELECT u.* FROM src.subscribers u WHERE u.email IN "
                    "(SELECT email FROM deliveries WHERE send_id = ? AND attributes IS NULL)",
                    (send[0],),
                )
            scratch.execute(
                "INSERT INTO list_columns SELECT * FROM src.list_columns WHERE list_name = ?",
                (list_name,),
            )
    finally:
        scratch.execute("DETACH DATABASE src")
