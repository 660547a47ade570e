"""Transports: one prepared message to one recipient, over SMTP, into files, or into memory.

Input: an :class:`Envelope` (sender, one recipient, the message bytes, ready
for the wire). Output: an :class:`Outcome` per recipient, or an exception
for what ends the campaign (authentication refused, sender refused).

Transports behind one interface:

- :class:`SmtpTransport` — a real relay. aiosmtplib opens the connection and
  does TLS (implicit or STARTTLS, never silently plain) and AUTH. Then the
  connection is handed to :class:`_Wire`, a small protocol that pipelines
  MAIL, RCPT and DATA in one write when the server offers PIPELINING
  (RFC 2920), waits for 354 before the body, and sends the body as it is:
  messages from :mod:`newsletter.delivery.message` are CRLF-only with no line starting
  with ``.``, so the per-message normalising and dot-stuffing that aiosmtplib
  would do over 60 KB are already paid once per issue. It also knows at which
  step a failure happened, which is what separates "not sent, retry"
  (before the body) from "fate unknown" (the body went out, no reply came).
- :class:`RelayPool` — several relays as one, each with its own connections, rate
  and weight, with failover (:mod:`~newsletter.delivery.transports.relays`).
- :class:`OutboxTransport` — writes ``.eml`` files (the dry run).
- :class:`MemoryTransport` — keeps messages in a list (tests, previews).
"""

from newsletter.delivery.transports.base import SLOW_DOWN, Envelope, Session, Transport
from newsletter.delivery.transports.memory import MemoryTransport
from newsletter.delivery.transports.outbox import OutboxTransport
from newsletter.delivery.transports.relays import Relay, RelayPool, RelayReport
from newsletter.delivery.transports.smtp import SmtpConfig, SmtpTransport

__all__ = [
    "SLOW_DOWN",
    "Envelope",
    "MemoryTransport",
    "OutboxTransport",
    "Relay",
    "RelayPool",
    "RelayReport",
    "Session",
    "SmtpConfig",
    "SmtpTransport",
    "Transport",
]
