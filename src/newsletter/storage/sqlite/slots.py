"""SQLite slot store: what became of each schedule slot (the ``slots`` table).

Input: an open database connection and slots. Output: each slot's recorded
state (:class:`newsletter.storage.base.SlotStore`). One row per slot, its
latest state; every change is its own committed transaction.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import cast, get_args

from newsletter.storage.base import SlotKey, SlotState
from newsletter.storage.sqlite.connection import translated


@translated
class SlotLog:
    """The schedule's slots on SQLite."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def state(self, slot: SlotKey) -> SlotState | None:
        row = self.conn.execute("SELECT state FROM slots WHERE key = ?", (slot.key,)).fetchone()
        return None if row is None else cast(SlotState, row[0])  # only set() writes it

    def set(
        self, slot: SlotKey, state: SlotState, issue_id: str | None = None, detail: str = ""
    ) -> None:
        if state not in get_args(SlotState):
            # Checked here, not left to the table's CHECK: the driver's IntegrityError is
            # no error of the interface.
            raise ValueError(f"unknown slot state {state!r}")
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "INSERT INTO slots (key, local_day, issue_id, state, detail, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "issue_id = coalesce(excluded.issue_id, slots.issue_id), state = excluded.state, "
                "detail = excluded.detail, updated_at = excluded.updated_at",
                (
                    slot.key,
                    slot.local_day.isoformat(),
                    issue_id,
                    state,
                    detail[:2000],
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                ),
            )

    def recent(self, limit: int = 10) -> list[tuple[str, str, str | None, str, str]]:
        rows = self.conn.execute(
            "SELECT key, local_day, issue_id, state, detail FROM slots ORDER BY key DESC LIMIT ?",
            (limit,),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
