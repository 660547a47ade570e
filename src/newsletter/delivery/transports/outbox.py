"""The dry run's transport: writes the first messages as .eml files, sends nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from newsletter.delivery.transports.base import Envelope, Session
from newsletter.models import Outcome


class OutboxTransport:
    """Writes the first ``keep`` messages as .eml files and counts the rest; sends nothing."""

    def __init__(self, folder: Path, keep: int = 5) -> None:
        self.folder = folder
        self.keep = keep
        self.count = 0
        self.total_bytes = 0
        self.description = f"outbox {folder} (dry run: nothing is sent)"

    async def open(self) -> Session:
        return _OutboxSession(self)


@dataclass(slots=True)
class _OutboxSession:
    outbox: OutboxTransport
    usable: bool = True

    async def send(self, envelope: Envelope) -> Outcome:
        box = self.outbox
        box.count += 1
        box.total_bytes += len(envelope.data)
        if box.count <= box.keep:
            box.folder.mkdir(parents=True, exist_ok=True)
            name = f"{box.count:03d}-{envelope.recipient.replace('/', '_')}.eml"
            (box.folder / name).write_bytes(envelope.data)
        return Outcome("sent", 250, "written to the outbox (dry run)")

    async def close(self) -> None:
        return None
