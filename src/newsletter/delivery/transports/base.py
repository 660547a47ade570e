"""The transport interface: an :class:`Envelope` in, an :class:`Outcome` out, per session.

Every transport (SMTP, the dry run's outbox, memory) implements :class:`Transport`;
the campaign knows nothing else about where messages go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from newsletter.models import Outcome

# Replies that mean "not now": slow down and try again later (RFC 5321 4.2).
SLOW_DOWN = {421, 450, 451, 452, 454}


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str
    recipient: str
    data: bytes  # CRLF line ends, no line starting with '.', ends with CRLF


class Session(Protocol):
    @property
    def usable(self) -> bool: ...

    async def send(self, envelope: Envelope) -> Outcome: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    description: str  # for confirmation prompts and logs; never holds secrets

    async def open(self) -> Session: ...
