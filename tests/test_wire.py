"""The SMTP wire protocol against scripted servers that misbehave in exact ways."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from newsletter.delivery.transports import Envelope, SmtpConfig, SmtpTransport
from newsletter.storage.sqlite.send_log import Outcome

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
