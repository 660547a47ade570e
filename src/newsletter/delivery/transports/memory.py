"""The in-memory transport: keeps every envelope, and may script outcomes (tests, previews)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from newsletter.delivery.transports.base import Envelope, Session
from newsletter.models import Outcome


@dataclass(slots=True)
class MemoryTransport:
    """Keeps every envelope; ``script`` may decide an outcome per recipient (tests);
    ``delay`` seconds per message make it wait as a relay does (other tasks run meanwhile)."""

    sent: list[Envelope] = field(default_factory=list)
    script: Callable[[Envelope], Outcome | None] | None = None
    description: str = "memory"
    delay: float = 0.0

    async def open(self) -> Session:
        return _MemorySession(self)


@dataclass(slots=True)
class _MemorySession:
    box: MemoryTransport
    usable: bool = True

    async def send(self, envelope: Envelope) -> Outcome:
        if self.box.delay:
            await asyncio.sleep(self.box.delay)
        if self.box.script is not None:
            scripted = self.box.script(envelope)
            if scripted is not None:
                return scripted
        self.box.sent.append(envelope)
        return Outcome("sent", 250, "kept in memory")

    async def close(self) -> None:
        return None
