"""PostgreSQL slot store: what became of each schedule slot (the ``slots`` table).

Input: an autocommit psycopg connection and slots. Output: each slot's recorded
state (:class:`newsletter.storage.base.SlotStore`), as
:mod:`newsletter.storage.sqlite.slots` gives it. One row per slot, its latest
state; every change is one committed upsert, so schedulers on two hosts writing
one slot at once take turns on its row and neither write is half-applied.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast, get_args

import psycopg

from newsletter.storage.base import SlotKey, SlotState
from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import translated

__all__ = ["PgSlots"]


@translated
class PgSlots:
    """The schedule's slots on PostgreSQL."""

    def __init__(self, conn: psycopg.Connection[Any], location: Location) -> None:
        self.conn = conn
        self.location = location

    def state(self, slot: SlotKey) -> SlotState | None:
        row = self.conn.execute("SELECT state FROM slots WHERE key = %s", (slot.key,)).fetchone()
        return None if row is None else cast(SlotState, row[0])  # only set() writes it

    def set(
        self, slot: SlotKey, state: SlotState, issue_id: str | None = None, detail: str = ""
    ) -> None:
        if state not in get_args(SlotState):
            # Checked here, not left to the table's CHECK: the driver's CheckViolation is
            # no error of the interface.
            raise ValueError(f"unknown slot state {state!r}")
        self.conn.execute(
            "INSERT INTO slots AS s (key, local_day, issue_id, state, detail, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET "
            "issue_id = coalesce(excluded.issue_id, s.issue_id), state = excluded.state, "
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
            "SELECT key, local_day, issue_id, state, detail FROM slots "
            'ORDER BY key COLLATE "C" DESC LIMIT %s',
            (limit,),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
