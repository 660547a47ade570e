"""A real SMTP server for the tests: aiosmtpd on 127.0.0.1, port chosen by the OS.

The handler keeps every message it accepts and can misbehave on purpose:
refuse chosen recipients (550, 451), answer 421 and close, drop the
connection in the middle of DATA, answer slowly, require STARTTLS and AUTH.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float = field(default_factory=time.monotonic)  # when the message was accepted

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Behaviour:
    reject: dict[str, tuple[int, str]] = field(default_factory=dict)  # at RCPT, by address
    reject_data: dict[str, tuple[int, str]] = field(default_factory=dict)  # after the body
    close_421_after: int | None = None  # after N accepted messages, answer 421 and close
    drop_in_data: set[str] = field(default_factory=set)  # close after the body, no reply
    delay: float = 0.0  # seconds before answering DATA
    pipelining: bool = False  # advertise PIPELINING (RFC 2920)
    refuse_sender_after: int | None = None  # after N accepted messages, 553 at MAIL FROM
    # After N accepted messages the relay goes down: it refuses new connections and answers
    # 421 at MAIL FROM (then closes) on those it has, until Server.come_back().
    down_after: int | None = None
    down: bool = False
    defer_after: int | None = None  # after N accepted messages, 451 to every message


class Handler:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.behaviour = Behaviour()
        self.connections = 0
        self.lock = threading.Lock()
        self.go_down: Any = None  # set by Server.start: stops listening (in the server's loop)

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.behaviour.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.behaviour.down:
            # RFC 5321 3.8: 421, then the server closes the channel.
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return "421 4.3.2 service not available, closing the channel"
        after = self.behaviour.refuse_sender_after
        if after is not None and len(self.received) >= after:
            return "553 5.7.1 sender address rejected: not allowed for this account"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.behaviour.reject:
            code, text = self.behaviour.reject[address]
            return f"{code} {text}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        b = self.behaviour
        if b.delay:
            await asyncio.sleep(b.delay)
        rcpt = envelope.rcpt_tos[0]
        if rcpt in b.drop_in_data:
            server.transport.close()
            return "250 never seen"
        if rcpt in b.reject_data:
            code, text = b.reject_data[rcpt]
            return f"{code} {text}"
        if b.close_421_after is not None and len(self.received) >= b.close_421_after:
            # RFC 5321 4.2.2: 421 means the message was not accepted; the server
            # replies, then closes.
            b.close_421_after = None
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return "421 4.3.2 service shutting down"
        if b.defer_after is not None and len(self.received) >= b.defer_after:
            return "451 4.3.0 temporary failure, try again later"
        with self.lock:
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
            )
        if b.down_after is not None and len(self.received) >= b.down_after:
            b.down_after, b.down = None, True
            self.go_down()
        return "250 OK queued"

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]


class CountingSMTP(SMTP):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.event_handler.connections += 1
        super().connection_made(transport)


class Server:
    """Start with ``Server().start()``; ``port`` is known once started."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        implicit_tls: ssl.SSLContext | None = None,  # TLS from the first byte (port 465)
    ) -> None:
        self.handler = Handler()
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.controller: Controller | None = None
        self.port = 0

    def _authenticator(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.auth is not None
            and (data.login.decode(), data.password.decode()) == self.auth
        )
        return AuthResult(success=ok, handled=False)

    def start(self) -> Server:
        kwargs: dict[str, Any] = {}
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context, require_starttls=True)
        if self.auth is not None:
            kwargs.update(authenticator=self._authenticator, auth_required=True)

        server = self

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return CountingSMTP(self.handler, hostname="test.example", **kwargs)

            def _trigger_server(self) -> None:
                # The base class connects to self.port to check the server is up;
                # with port 0 we learn the real port first.
                self.port = self.server.sockets[0].getsockname()[1]
                server.port = self.port
                super()._trigger_server()

        self.controller = _Controller(
            self.handler, hostname="127.0.0.1", port=0, ssl_context=self.implicit_tls
        )
        self.controller.start()
        self.handler.go_down = self._stop_listening
        return self

    def _stop_listening(self) -> None:
        # In the server's loop: new connections are refused (the port is closed), those
        # open stay, for the 421s of a relay that is down.
        assert self.controller is not None and self.controller.server is not None
        self.controller.server.close()

    def go_down(self) -> None:
        """Refuse connections from now on (421 on those open), until come_back()."""
        controller = self.controller
        assert controller is not None
        self.handler.behaviour.down = True
        controller.loop.call_soon_threadsafe(self._stop_listening)
        time.sleep(0.05)  # closed by the time the test goes on

    def come_back(self) -> None:
        """Listen again on the same port and take messages again (after down_after)."""
        controller = self.controller
        assert controller is not None

        async def listen() -> None:
            controller.server = await controller._create_server()

        asyncio.run_coroutine_threadsafe(listen(), controller.loop).result(10)
        self.handler.behaviour.down = False

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
