"""The SMTP wire protocol against scripted servers that misbehave in exact ways."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable

import pytest
import trustme

from newsletter.delivery.transports import Envelope, SmtpConfig, SmtpTransport
from newsletter.delivery.transports.wire import MAX_REPLY, Wire
from newsletter.errors import CampaignAborted, ConnectFailed
from newsletter.models import Outcome
from smtp_server import Server

Script = Callable[[bytes], bytes | None]  # command line in, reply out (None: close)


async def talk(script: Script, *, pipelining: bool = False) -> tuple[Outcome, bool]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 test ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line != b".\r\n":
                    continue
                in_data = False
                line = b"<end of data>"
            if line.upper().startswith((b"EHLO", b"HELO")):
                extra = b"250-PIPELINING\r\n" if pipelining else b""
                writer.write(b"250-test\r\n" + extra + b"250 8BITMIME\r\n")
                continue
            if line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                break
            reply = script(line.strip())
            if reply is None:
                break
            writer.write(reply)
            if reply.startswith(b"354"):
                in_data = True
        writer.close()

    return await one_transaction(handle)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def one_transaction(handle: Handler) -> tuple[Outcome, bool]:
    """One message through the wire to a server on 127.0.0.1 that ``handle`` plays;
    the outcome, and whether the session is still usable after it."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        session = await SmtpTransport(
            SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=2)
        ).open()
        outcome = await session.send(
            Envelope("a@example.org", "b@example.org", b"Subject: x\r\n\r\nhi\r\n")
        )
        usable = session.usable
        await session.close()
    return outcome, usable


def ok_until(step: bytes, reply: bytes | None) -> Script:
    def script(line: bytes) -> bytes | None:
        if line.upper().startswith(step):
            return reply
        return {b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n"}.get(
            line[:4].upper(), b"250 queued\r\n"
        )

    return script


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(
    ("step", "reply", "state", "code", "usable"),
    [
        (b"<END OF DATA>", b"250 queued as 1\r\n", "sent", 250, True),
        (b"RCPT", b"550 5.1.1 no such user\r\n", "rejected", 550, True),
        (b"RCPT", b"451 4.3.0 try later\r\n", "deferred", 451, True),
        (b"<END OF DATA>", b"554 5.7.1 spam\r\n", "rejected", 554, True),
        (b"<END OF DATA>", b"421 4.3.2 closing\r\n", "deferred", 421, False),
        (b"MAIL", b"garbage\r\n", "deferred", None, False),
        (b"RCPT", b"250-first line\r\n250 second line\r\n", "sent", 250, True),
        (b"<END OF DATA>", b"hello?\r\n", "unknown", None, False),
        (b"<END OF DATA>", None, "unknown", None, False),
        (b"RCPT", None, "deferred", None, False),
    ],
)
def test_each_reply_is_classified(
    step: bytes, reply: bytes | None, state: str, code: int | None, usable: bool, pipelining: bool
) -> None:
    outcome, still_usable = asyncio.run(talk(ok_until(step, reply), pipelining=pipelining))
    assert (outcome.state, outcome.code) == (state, code), outcome
    assert still_usable is usable


# ------------------------------------------------------------ a server that never stops talking


async def flood(at: bytes, chunk: bytes) -> tuple[Outcome, int, float, bool]:
    """A server that answers normally until the command ``at``, then sends ``chunk`` for ever.

    Returns the outcome, the most the wire held between two reads, how long the
    transaction took, and whether the server saw its connection closed.
    """
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 test ESMTP\r\n")
        in_data = False
        try:
            while line := await reader.readline():
                if in_data:
                    if line != b".\r\n":
                        continue
                    in_data, line = False, b"<end of data>"
                command = line.strip().upper()
                if command.startswith(at):
                    while True:  # until the client hangs up
                        writer.write(chunk)
                        await writer.drain()
                if command.startswith(b"EHLO"):
                    writer.write(b"250-test\r\n250 8BITMIME\r\n")
                elif command.startswith(b"DATA"):
                    writer.write(b"354 go\r\n")
                    in_data = True
                else:
                    writer.write(b"250 ok\r\n")
        except (ConnectionError, OSError):
            pass
        finally:
            closed.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        session = await SmtpTransport(
            SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=5, message_timeout=5)
        ).open()
        assert isinstance(session, Wire)
        held = 0
        receive = session.data_received

        def watched(data: bytes) -> None:
            nonlocal held
            receive(data)
            held = max(held, len(session._buffer))

        session.data_received = watched  # type: ignore[method-assign]
        started = time.monotonic()
        outcome = await session.send(
            Envelope("a@example.org", "b@example.org", b"Subject: x\r\n\r\nhi\r\n")
        )
        took = time.monotonic() - started
        await session.close()
        await asyncio.wait_for(closed.wait(), 5)
        assert not session.usable
    return outcome, held, took, closed.is_set()


LONGER = "a reply longer than SMTP allows"
UNASKED = "more replies than commands"


@pytest.mark.parametrize(
    ("at", "chunk", "state", "why"),
    [
        (b"MAIL", b"x" * 1000, "deferred", LONGER),  # one line without end
        (b"RCPT", b"250-" + b"y" * 60 + b"\r\n", "deferred", LONGER),  # multi-line, no end
        (b"MAIL", b"250 ok\r\n" * 100, "deferred", UNASKED),  # whole replies, unasked
        (b"<END OF DATA>", b"z" * 1000, "unknown", LONGER),  # after the body: fate unknown
        (b"<END OF DATA>", b"250-" + b"q" * 60 + b"\r\n", "unknown", LONGER),
        (b"<END OF DATA>", b"x" * 5000 + b"\r\n", "unknown", LONGER),  # one whole long line
    ],
)
def test_a_server_that_streams_for_ever_is_dropped_with_bounded_memory(
    at: bytes, chunk: bytes, state: str, why: str
) -> None:
    outcome, held, took, closed = asyncio.run(flood(at, chunk))
    assert outcome.state == state and outcome.code is None, outcome
    assert why in outcome.detail, outcome
    assert held <= MAX_REPLY  # never more than one reply's worth kept between reads
    assert took < 2  # the cap ended it, not the 5 s timeouts
    assert closed  # and the connection was closed


def test_a_long_but_bounded_multi_line_reply_is_read() -> None:
    """Headroom: a 60-line reply of 200 octets a line (12 KB) is still a reply."""
    long = b"".join(b"250-" + b"w" * 196 + b"\r\n" for _ in range(59)) + b"250 ok\r\n"
    outcome, usable = asyncio.run(talk(ok_until(b"RCPT", long)))
    assert (outcome.state, outcome.code, usable) == ("sent", 250, True)


def test_a_reply_split_into_single_bytes_is_read() -> None:
    """Replies arrive in any pieces; the incremental scan must put them back together."""

    async def scenario() -> tuple[Outcome, bool]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def say(reply: bytes) -> None:
                for i in range(len(reply)):
                    writer.write(reply[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)

            await say(b"220 test ESMTP\r\n")
            in_data = False
            while line := await reader.readline():
                if in_data:
                    in_data = line != b".\r\n"
                    if not in_data:
                        await say(b"250-queued\r\n250 as 1\r\n")
                    continue
                command = line.upper()
                if command.startswith(b"EHLO"):
                    await say(b"250-test\r\n250 8BITMIME\r\n")
                elif command.startswith(b"DATA"):
                    await say(b"354 go\r\n")
                    in_data = True
                elif command.startswith(b"QUIT"):
                    await say(b"221 bye\r\n")
                    break
                else:
                    await say(b"250-fine\r\n250 ok\r\n")
            writer.close()

        return await one_transaction(handle)

    outcome, usable = asyncio.run(scenario())
    assert (outcome.state, outcome.code, outcome.detail, usable) == (
        "sent",
        250,
        "queued as 1",
        True,
    )


# ------------------------------------------------------------ STARTTLS, read from the EHLO reply

ONE = Envelope("a@example.org", "b@example.org", b"Subject: x\r\n\r\nhi\r\n")


def test_starttls_missing_from_the_extension_list_is_refused_before_any_mail() -> None:
    server = Server().start()  # aiosmtpd without a certificate: no STARTTLS in its EHLO
    try:
        transport = SmtpTransport(
            SmtpConfig(host="127.0.0.1", port=server.port, security="starttls", timeout=5)
        )
        with pytest.raises(CampaignAborted) as info:
            asyncio.run(transport.open())
        assert str(info.value) == (
            f"127.0.0.1:{server.port} (starttls) does not offer STARTTLS; set "
            "NEWSLETTER_SMTP_SECURITY to tls (port 465) or, on a trusted local relay only, none"
        )
        assert server.handler.received == []
    finally:
        server.stop()


def test_starttls_offered_is_used_and_the_session_runs_over_tls() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    # require_starttls: the server answers 530 to MAIL on a plain session
    server = Server(tls_context=server_ctx).start()
    server.handler.behaviour.pipelining = True

    async def scenario() -> tuple[Outcome, bool, bool]:
        session = await SmtpTransport(
            SmtpConfig(
                host="127.0.0.1",
                port=server.port,
                security="starttls",
                timeout=5,
                tls_context=client_ctx,
            )
        ).open()
        assert isinstance(session, Wire)
        encrypted = session.transport.get_extra_info("sslcontext") is not None
        outcome = await session.send(ONE)
        await session.close()
        return outcome, encrypted, session.pipelining

    try:
        outcome, encrypted, pipelining = asyncio.run(scenario())
        assert (outcome.state, outcome.code) == ("sent", 250), outcome
        assert encrypted
        assert pipelining  # read from the EHLO sent again after TLS (RFC 3207 4.2)
        assert [r.rcpt_tos for r in server.handler.received] == [["b@example.org"]]
    finally:
        server.stop()


def test_starttls_offered_then_refused_is_a_failed_connection_never_plain_text() -> None:
    commands: list[bytes] = []

    async def scenario() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 test ESMTP\r\n")
            while line := await reader.readline():
                commands.append(line.strip().upper())
                if line.upper().startswith(b"EHLO"):
                    writer.write(b"250-test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
                elif line.upper().startswith(b"STARTTLS"):
                    # 454: a temporary refusal (RFC 3207 4), its text naming STARTTLS
                    writer.write(b"454 4.7.0 STARTTLS not available right now\r\n")
                else:
                    writer.write(b"250 ok\r\n")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            transport = SmtpTransport(
                SmtpConfig(host="127.0.0.1", port=port, security="starttls", timeout=5)
            )
            with pytest.raises(ConnectFailed, match="454"):
                await transport.open()

    asyncio.run(scenario())
    assert [c.split(b" ")[0] for c in commands] == [b"EHLO", b"STARTTLS"]  # no MAIL, ever
