"""The SMTP wire: the rest of a session once connect, TLS and AUTH are done.

Input: an open asyncio transport and :class:`Envelope` values. Output: an
:class:`Outcome` per transaction. MAIL, RCPT and DATA go in one write when the
server offers PIPELINING (RFC 2920); the body goes as it is (the message
stage wrote it CRLF-only and dot-safe once per issue); and each failure knows
its step, which separates "not sent, retry" from "fate unknown".

What the server may make it hold is bounded: a reply line longer than
:data:`MAX_LINE`, a reply longer than :data:`MAX_REPLY` or more than
:data:`MAX_QUEUED` replies nobody asked for end the session as a protocol error.
"""

from __future__ import annotations

import asyncio
from collections import deque

from newsletter.delivery.transports.base import SLOW_DOWN, Envelope
from newsletter.errors import CampaignAborted
from newsletter.models import Outcome

# RFC 5321 4.5.3.1.5 allows 512 octets a reply line; real servers stay far
# below. Generous headroom, yet a server that streams without end (no CRLF, or
# "250-" lines for ever) costs at most this much memory before it is dropped.
MAX_LINE = 4 * 1024
MAX_REPLY = 64 * 1024
# A pipelined transaction waits for at most three replies; a few more may come
# unasked (a 421 before closing). Many more is a server out of step.
MAX_QUEUED = 32


class _Disconnected(Exception):
    pass


class _ProtocolError(_Disconnected):
    """The server answered something that is not an SMTP reply: treated as a lost connection."""


class _Overflow(_ProtocolError):
    """The server sent a reply longer than any SMTP reply needs: treated as a lost connection."""


class _Unasked(_ProtocolError):
    """The server sent many more replies than there were commands: treated as a lost connection."""


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
        self._scanned = 0  # where the unread part of a multi-line reply starts
        self._dropped: type[_ProtocolError] | None = None  # why the wire dropped the session
        self._body_sent = False

    # -- asyncio.Protocol -----------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._dropped is not None:
            return  # already dropped: whatever was still in flight is ignored
        self._buffer.extend(data)
        while True:
            reply = self._parse_one()
            if reply is None:
                break
            self._replies.append(reply)
        # What is left is the start of a reply; on the usual path (one whole
        # reply a read) nothing is left and the checks cost one test.
        if self._buffer and self._too_long():
            self._drop(_Overflow)
        elif len(self._replies) > MAX_QUEUED:
            self._drop(_Unasked)
        self._wake()

    def _too_long(self) -> bool:
        size = len(self._buffer)
        last_line = size - (self._buffer.rfind(b"\n") + 1)
        return size > MAX_REPLY or last_line > MAX_LINE

    def _drop(self, why: type[_ProtocolError]) -> None:
        """End the session: the waiting step sees ``why``, a protocol error (see :meth:`send`)."""
        self._dropped = why
        self._lost = True
        self._buffer.clear()
        self._scanned = 0
        self._replies.clear()
        self.transport.abort()

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
        # Lines already seen to be continuations ("250-...") are not read
        # again when more data comes: a reply sent a line a packet costs
        # linear time, not quadratic.
        offset = self._scanned
        while True:
            end = self._buffer.find(b"\n", offset)
            if end < 0:
                self._scanned = offset
                return None
            if end + 1 - offset > MAX_LINE:
                self._drop(_Overflow)
                return None
            last = end - offset < 3 or self._buffer[offset + 3] != 0x2D  # "-": more lines
            code_at, offset = offset, end + 1
            if last:
                try:
                    code = int(self._buffer[code_at : code_at + 3])
                except ValueError:
                    code = 0  # garbage from the server: treated as a failure below
                if code_at == 0:  # one line: the usual reply
                    text = self._buffer[4:offset].strip().decode("utf-8", "replace")
                else:
                    lines = bytes(self._buffer[:offset]).split(b"\n")[:-1]
                    text = " ".join(line[4:].strip().decode("utf-8", "replace") for line in lines)
                del self._buffer[:offset]
                self._scanned = 0
                return code, text

    async def _reply(self) -> tuple[int, str]:
        while not self._replies:
            if self._dropped is not None:
                raise self._dropped
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
        if self._dropped is not None:
            raise self._dropped
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
                _Overflow: "a reply longer than SMTP allows",
                _Unasked: "more replies than commands",
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
