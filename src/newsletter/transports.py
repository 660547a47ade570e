"""Delivery stage: one prepared message to one recipient, over a transport.

Input: an :class:`Envelope` (sender, one recipient, the message bytes, ready
for the wire). Output: an :class:`Outcome` per recipient, or an exception
for what ends the campaign (authentication refused, sender refused).

Transports behind one interface:

- :class:`SmtpTransport` — a real relay. aiosmtplib opens the connection and
  does TLS (implicit or STARTTLS, never silently plain) and AUTH. Then the
  connection is handed to :class:`_Wire`, a small protocol that pipelines
  MAIL, RCPT and DATA in one write when the server offers PIPELINING
  (RFC 2920), waits for 354 before the body, and sends the body as it is:
  messages from :mod:`newsletter.compose` are CRLF-only with no line starting
  with ``.``, so the per-message normalising and dot-stuffing that aiosmtplib
  would do over 60 KB are already paid once per issue. It also knows at which
  step a failure happened, which is what separates "not sent, retry"
  (before the body) from "fate unknown" (the body went out, no reply came).
- :class:`OutboxTransport` — writes ``.eml`` files (the dry run).
- :class:`MemoryTransport` — keeps messages in a list (tests, previews).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from newsletter.errors import CampaignAborted, ConnectFailed
from newsletter.send_log import Outcome

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


# ---------------------------------------------------------------------------- SMTP


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    security: str  # "starttls" | "tls" | "none"
    username: str | None = None
    password: str | None = None
    helo_name: str = "localhost"
    timeout: float = 30.0  # per reply
    message_timeout: float = 120.0  # per whole transaction
    tls_context: ssl.SSLContext | None = None


class SmtpTransport:
    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.description = f"{config.host}:{config.port} ({config.security})"

    async def open(self) -> Session:
        import aiosmtplib

        c = self.config
        client = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            local_hostname=c.helo_name,
            timeout=c.timeout,
            use_tls=c.security == "tls",
            # Explicit: aiosmtplib's default (None) would fall back to plain text
            # when a server does not offer STARTTLS.
            start_tls=c.security == "starttls",
            tls_context=c.tls_context,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if c.username:
                await client.login(c.username, c.password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise CampaignAborted(
                f"the SMTP server {self.description} refused the login ({exc.code} "
                f"{exc.message}); check NEWSLETTER_SMTP_USERNAME and NEWSLETTER_SMTP_PASSWORD"
            ) from None
        except aiosmtplib.SMTPException as exc:
            client.close()
            if c.security == "starttls" and "STARTTLS" in str(exc).upper():
                raise CampaignAborted(
                    f"{self.description} does not offer STARTTLS; set NEWSLETTER_SMTP_SECURITY "
                    "to tls (port 465) or, on a trusted local relay only, none"
                ) from None
            raise ConnectFailed(f"{self.description}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            client.close()
            raise ConnectFailed(f"{self.description}: {exc}") from None
        transport = client.transport
        assert isinstance(transport, asyncio.Transport)
        pipelining = client.supports_extension("pipelining")
        wire = _Wire(
            transport, pipelining=pipelining, timeout=c.timeout, message_timeout=c.message_timeout
        )
        transport.set_protocol(wire)
        return wire


class _Disconnected(Exception):
    pass


class _ProtocolError(_Disconnected):
    """The server answered something that is not an SMTP reply: treated as a lost connection."""


class _Wire(asyncio.Protocol):
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


# ---------------------------------------------------------------- file and memory


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


@dataclass(slots=True)
class MemoryTransport:
    """Keeps every envelope; ``script`` may decide an outcome per recipient (tests)."""

    sent: list[Envelope] = field(default_factory=list)
    script: Callable[[Envelope], Outcome | None] | None = None
    description: str = "memory"

    async def open(self) -> Session:
        return _MemorySession(self)


@dataclass(slots=True)
class _MemorySession:
    box: MemoryTransport
    usable: bool = True

    async def send(self, envelope: Envelope) -> Outcome:
        if self.box.script is not None:
            scripted = self.box.script(envelope)
            if scripted is not None:
                return scripted
        self.box.sent.append(envelope)
        return Outcome("sent", 250, "kept in memory")

    async def close(self) -> None:
        return None
