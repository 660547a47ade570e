"""Send status: a send's log → what ``newsletter status`` shows, on screen or as JSON.

Input: a :class:`~newsletter.storage.base.SendLogStore` and a send's record. Output: a
:class:`SendStatus`: counts by state, the live processes working on it (host, pid,
since, last heartbeat, rows in flight), how many rows ``sending`` no live process
holds (a process that died: the next run counts them unknown), and the latest
failures. Read only: looking never changes a send.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from newsletter.storage.base import SendLogStore, SendRecord, Worker

__all__ = ["SendStatus", "send_status", "stamp"]


@dataclass(frozen=True, slots=True)
class SendStatus:
    record: SendRecord
    counts: dict[str, int]
    workers: list[Worker]
    orphaned: int  # sending, held by no live process
    errors: list[tuple[str, str, str, str]]  # (time, address, state, detail), newest first

    def as_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "issue_id": r.issue_id,
            "list": r.list_name,
            "started": r.created_at,
            "audience": r.audience,
            "suppressed_at_start": r.suppressed,
            "left_out_as_duplicates": r.duplicates,
            "counts": self.counts,
            "in_flight_of_dead_processes": self.orphaned,
            "processes": [
                {
                    "host": w.host,
                    "pid": int(w.pid) if w.pid.isdigit() else w.pid,
                    "since": stamp(w.since),
                    "last_heartbeat": stamp(w.heartbeat),
                    "lease_expires": stamp(w.expires),
                    "in_flight": w.claimed,
                }
                for w in self.workers
            ],
            "last_errors": [
                {"at": at, "address": address, "state": state, "detail": detail}
                for at, address, state, detail in self.errors
            ],
        }


def send_status(log: SendLogStore, record: SendRecord) -> SendStatus:
    counts = log.counts(record.id)
    workers = log.workers(record.id)
    held = sum(w.claimed for w in workers)
    return SendStatus(
        record,
        counts,
        workers,
        max(0, counts["sending"] - held),
        log.last_errors(record.id),
    )


def stamp(when: float | None) -> str | None:
    """A unix time as ISO 8601 UTC to the second, or None."""
    if when is None:
        return None
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")
