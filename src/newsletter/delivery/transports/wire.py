"""The SMTP wire: the rest of a session once connect, TLS and AUTH are done.

Input: an open asyncio transport and :class:`Envelope` values. Output: an
:class:`Outcome` per transaction. MAIL, RCPT and DATA go in one write when the
server offers PIPELINING (RFC 2920); the body goes as it is (the message
stage wrote it CRLF-only and dot-safe once per issue); and each failure knows
its step, which separates "not sent, retry" from "fate unknown".
"""

from __future__ import annotations

import asyncio
from collections import deque

from newsletter.delivery.transports.base import SLOW_DOWN, Envelope
from newsletter.errors import CampaignAborted
from newsletter.models import Outcome


class _Disconnected(Exception):
    pass


class _ProtocolError(_Disconnected):
    """The server answered something that is not an SMTP reply: treated as a lost connection."""


class Wire(asyncio.Protocol):
    """The rest of an SMTP session after connect/TLS/AUTH: transactions, then QUIT."""

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        pipelining: bool,
        timeout: float,
        message_timeout: float,
    ) -> None:
        self.transport = transport
        self.pipelining = pipelining
        self.timeout = timeout
        self.message_timeout = message_timeout
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost = False
        self._body_sent = False

    # -- asyncio.Protocol -----------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        while True:
            reply = self._parse_one()
            if reply is None:
                break
            self._replies.append(reply)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()

    def eof_received(self) -> bool:
        self._lost = True
        self._wake()
        return False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse_one(self) -> tuple[int, str] | None:
        offset, lines = 0, []
        while True:
            end = self._buffer.find(b"\n", offset)
            if end < 0:
                return None
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            lines.append(line[4:].strip().decode("utf-8", "replace"))
            if line[3:4] != b"-":
                try:
                    code = int(line[:3])
                except ValueError:
                    code = 0  # garbage from the server: treated as a failure below
                del self._buffer[:offset]
                return code, " ".join(lines)

    async def _reply(self) -> tuple[int, str]:
        while not self._replies:
            if self._lost:
                raise _Disconnected
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.timeout):  # lighter than wait_for
                    await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def _write(self, data: bytes) -> None:
        if self._lost or self.transport.is_closing():
            raise _Disconnected
        self.transport.write(data)

    # -- Session --------------------------------------------------------------
    async def send(self, envelope: Envelope) -> Outcome:
        """One transaction. After a lost connection or timeout the session is unusable."""
        self._body_sent = False
        try:
            async with asyncio.timeout(self.message_timeout):
                return await self._transaction(envelope)
        except (_Disconnected, TimeoutError, OSError) as exc:
            self.transport.abort()
            self._lost = True
            what = {
                TimeoutError: "no reply in time",
                _ProtocolError: "a reply that is not SMTP",
            }.get(type(exc), "connection lost")
            if self._body_sent:
                # The server may have queued it before the reply was lost (RFC 5321 4.1.1.4).
                return Outcome("unknown", None, f"{what} after the message was sent")
            return Outcome("deferred", None, f"{what} before the message was sent")

    async def _transaction(self, envelope: Envelope) -> Outcome:
        mail = f"MAIL FROM:<{envelope.sender}>\r\n".encode("ascii")
        rcpt = f"RCPT TO:<{envelope.recipient}>\r\n".encode("ascii")
        if self.pipelining:
            self._write(mail + rcpt + b"DATA\r\n")
            replies = [await self._reply(), await self._reply(), await self._reply()]
        else:
            replies = []
            for command, ok in ((mail, 250), (rcpt, 250), (b"DATA\r\n", 354)):
                self._write(command)
                replies.append(await self._reply())
                if replies[-1][0] // 100 != ok // 100:
                    break
        if any(not 200 <= code < 600 for code, _ in replies):
            raise _ProtocolError  # garbage from the server: out of step, drop the session
        if replies[0][0] != 250:
            return await self._refused("MAIL FROM", replies[0], replies, sender=True)
        if len(replies) < 2 or replies[1][0] not in (250, 251):
            return await self._refused("RCPT TO", replies[1], replies)
        if replies[2][0] != 354:
            return await self._refused("DATA", replies[2], replies)
        self._write(envelope.data + b".\r\n")
        self._body_sent = True  # only once it was handed to the connection
        code, text = await self._reply()
        if not 200 <= code < 600:
            raise _ProtocolError
        if code == 250:
            return Outcome("sent", code, text)
        if code == 421:
            self.transport.abort()
            self._lost = True
        if code // 100 == 4 or code in SLOW_DOWN:
            return Outcome("deferred", code, text)
        return Outcome("rejected", code, text)

    async def _refused(
        self,
        step: str,
        reply: tuple[int, str],
        replies: list[tuple[int, str]],
        *,
        sender: bool = False,
    ) -> Outcome:
        code, text = reply  # the reply to the step that failed
        if len(replies) == 3 and replies[2][0] == 354:
            # A pipelined DATA was accepted though an earlier step failed: end
            # the (empty) message so the session stays in step; it has no
            # valid recipient, so nothing is delivered.
            self._write(b".\r\n")
            await self._reply()
        if code == 421:
            self.transport.abort()
            self._lost = True
        else:
            self._write(b"RSET\r\n")
            await self._reply()
        if sender and code // 100 == 5:
            raise CampaignAborted(f"the server refused the sender at {step}: {code} {text}")
        if code // 100 == 4 or code in SLOW_DOWN:
            return Outcome("deferred", code, f"{step}: {text}")
        return Outcome("rejected", code, f"{step}: {text}")

    @property
    def usable(self) -> bool:
        return not self._lost

    async def close(self) -> None:
        if self._lost or self.transport.is_closing():
            return
        try:
            self._write(b"QUIT\r\n")
            await asyncio.wait_for(self._reply(), 5)
        except (_Disconnected, TimeoutError, OSError):
            pass
        finally:
            self.transport.close()
