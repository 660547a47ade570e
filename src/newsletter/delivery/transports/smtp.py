"""The SMTP transport: a real relay, reached through aiosmtplib, then the wire.

aiosmtplib opens the connection and does TLS (implicit or STARTTLS, never
silently plain) and AUTH; whether STARTTLS is there is read from the server's
EHLO extension list, not from an error's text. The connection is then handed to
:class:`~newsletter.delivery.transports.wire.Wire` for the transactions.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from newsletter.delivery.transports.base import Session
from newsletter.delivery.transports.wire import Wire
from newsletter.errors import CampaignAborted, ConnectFailed


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
    # Where the settings of this relay are, for messages: one of NEWSLETTER_SMTP_RELAYS
    # ("NEWSLETTER_SMTP_RELAYS[1]"); None: the NEWSLETTER_SMTP_* settings.
    where: str | None = None


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
            # Never aiosmtplib's own STARTTLS: its default (None) would fall back
            # to plain text when a server does not offer it. We ask for it below,
            # from the server's extension list, and refuse when it is missing.
            start_tls=False,
            tls_context=c.tls_context,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if c.security == "starttls":
                if not client.supports_extension("starttls"):
                    client.close()
                    setting = (
                        f"the security of {c.where}" if c.where else "NEWSLETTER_SMTP_SECURITY"
                    )
                    raise CampaignAborted(
                        f"{self.description} does not offer STARTTLS; set {setting} to tls "
                        "(port 465) or, on a trusted local relay only, none"
                    )
                await client.starttls()
                # RFC 3207 4.2: what the server said before TLS is forgotten; ask again.
                await client.ehlo()
            if c.username:
                await client.login(c.username, c.password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            login = (
                f"the username and password of {c.where}"
                if c.where
                else "NEWSLETTER_SMTP_USERNAME and NEWSLETTER_SMTP_PASSWORD"
            )
            raise CampaignAborted(
                f"the SMTP server {self.description} refused the login ({exc.code} "
                f"{exc.message}); check {login}"
            ) from None
        except aiosmtplib.SMTPException as exc:
            # Includes a STARTTLS the server offered and then refused (454): a
            # connection failure, retried later, and never a plain-text session.
            client.close()
            raise ConnectFailed(f"{self.description}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            client.close()
            raise ConnectFailed(f"{self.description}: {exc}") from None
        transport = client.transport
        assert isinstance(transport, asyncio.Transport)
        pipelining = client.supports_extension("pipelining")
        wire = Wire(
            transport, pipelining=pipelining, timeout=c.timeout, message_timeout=c.message_timeout
        )
        transport.set_protocol(wire)
        return wire
