"""Relay stage: does the SMTP relay offer TLS, and do the settings insist on it → findings.

Input: a :class:`RelaySetup` (host, port, NEWSLETTER_SMTP_SECURITY, EHLO name, the TLS
context a send uses, a timeout) and a :class:`~newsletter.doctor.dns_client.Resolver`
for the host's addresses. Output: ``relay.tls`` (it was reached, and offers STARTTLS,
or speaks implicit TLS, with a certificate the send would accept) and
``relay.security`` (the settings refuse to send in clear).

It speaks just enough SMTP itself (banner, EHLO, STARTTLS, EHLO, QUIT; RFC 5321 and
3207) over a socket with a timeout on every read: no mail and no login is sent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import BinaryIO, Literal

from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding

_MAX_LINES = 100  # of one reply: a peer that never ends one is not an SMTP server


@dataclass(frozen=True, slots=True)
class RelaySetup:
    host: str
    port: int
    security: Literal["starttls", "tls", "none"]
    helo_name: str
    tls_context: ssl.SSLContext  # what a send verifies the relay with (NEWSLETTER_SMTP_CA_FILE)
    timeout: float = 10.0
    # Which settings name it: the single relay's NEWSLETTER_SMTP_*, or one of
    # NEWSLETTER_SMTP_RELAYS (its index), for the fixes to name the right one.
    index: int | None = None

    def setting(self, field: str) -> str:
        """The setting of ``field`` (host, port, security, ca_file) of this relay."""
        if self.index is None:
            return f"NEWSLETTER_SMTP_{field.upper()}"
        return f"NEWSLETTER_SMTP_RELAYS[{self.index}].{field}"


@dataclass(frozen=True, slots=True)
class _Seen:
    address: str
    starttls_offered: bool
    tls_version: str | None  # the TLS spoken, when it was


class _Refused(Exception):
    """The relay could not be talked to: the message says why; ``tls``: in the handshake."""

    def __init__(self, message: str, *, tls: bool = False) -> None:
        super().__init__(message)
        self.tls = tls


def check_relay(setup: RelaySetup, resolver: Resolver) -> list[Finding]:
    return [_tls(setup, resolver), _security(setup)]


def _tls(setup: RelaySetup, resolver: Resolver) -> Finding:
    where = f"{setup.host}:{setup.port}"
    title = f"TLS on the relay {where}"
    answer = resolver.addresses(setup.host)
    if not answer.records:
        return Finding(
            "relay.tls", title, "fail",
            f"the relay's address is not known: {answer.error or f'{setup.host} has none'}",
            f"check {setup.setting('host')}",
        )  # fmt: skip
    seen: _Seen | None = None
    refused = _Refused("")
    for address in answer.records[:3]:
        try:
            seen = _probe(setup, address)
            break
        except _Refused as exc:
            refused = exc
    if seen is None:
        tls_problem = refused.tls
        return Finding(
            "relay.tls", title, "fail", str(refused),
            f"give {setup.setting('ca_file')} the CA that signed the relay's certificate, or "
            f"have the relay's certificate name {setup.host}" if tls_problem else
            f"check {setup.setting('host')} and {setup.setting('port')}, and that the relay "
            "is up",
        )  # fmt: skip
    at = f"{setup.host} ({seen.address})" if seen.address != setup.host else setup.host
    if seen.tls_version is not None:
        how = "implicit TLS" if setup.security == "tls" else "STARTTLS"
        return Finding(
            "relay.tls",
            title,
            "pass",
            f"{at} speaks {how} ({seen.tls_version}) with a certificate valid for {setup.host}",
        )
    if seen.starttls_offered:
        return Finding(
            "relay.tls", title, "pass", f"{at} offers STARTTLS (not used: see the next line)"
        )
    return Finding(
        "relay.tls", title, "warn" if _local(seen.address) else "fail",
        f"{at} does not offer STARTTLS: mail and passwords to it cross the network in clear",
        "use the relay's submission port that offers STARTTLS (587), or implicit TLS (465, "
        f"{setup.setting('security')}=tls)",
    )  # fmt: skip


def _security(setup: RelaySetup) -> Finding:
    named = setup.setting("security")
    title = f"Settings insist on TLS ({named})"
    if setup.security != "none":
        return Finding(
            "relay.security", title, "pass",
            f"{named}={setup.security}: a send never goes in clear",
        )  # fmt: skip
    if _local(setup.host):
        return Finding(
            "relay.security", title, "warn",
            f"{named}=none, to a relay on this machine: fine if it delivers onward with TLS",
            f"set {named}=starttls if the relay offers it",
        )  # fmt: skip
    return Finding(
        "relay.security", title, "fail",
        f"{named}=none: mail, and the relay password, cross the network in clear",
        f"set {named}=starttls (port 587), or tls (port 465)",
    )  # fmt: skip


def _local(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(setup: RelaySetup, address: str) -> _Seen:
    """Greeting, EHLO and, as the settings say, STARTTLS or implicit TLS; then QUIT."""
    where = f"{setup.host}:{setup.port}" + (f" ({address})" if address != setup.host else "")
    try:
        raw = socket.create_connection((address, setup.port), timeout=setup.timeout)
    except OSError as exc:
        raise _Refused(f"cannot connect to {where}: {_reason(exc)}") from None
    sock: socket.socket = raw
    try:
        version = None
        if setup.security == "tls":
            sock = _wrap(setup, raw, where)
            version = _version(sock)
        reader = sock.makefile("rb")
        _expect(reader, 220, "its greeting", where)
        offered = "STARTTLS" in _ehlo(sock, reader, setup.helo_name, where)
        if setup.security == "starttls" and offered:
            _send(sock, "STARTTLS")
            _expect(reader, 220, "STARTTLS", where)
            reader.close()
            sock = _wrap(setup, raw, where)
            version = _version(sock)
            reader = sock.makefile("rb")
            _ehlo(sock, reader, setup.helo_name, where)
        if setup.security == "starttls" and not offered:
            raise _Refused(
                f"{where} does not offer STARTTLS, which NEWSLETTER_SMTP_SECURITY=starttls "
                "requires: every send is refused"
            )
        with contextlib.suppress(OSError):  # all was answered; a rude goodbye is no finding
            _send(sock, "QUIT")
        return _Seen(address, offered, version)
    except OSError as exc:
        raise _Refused(f"{where}: {_reason(exc)}") from None
    finally:
        sock.close()


def _wrap(setup: RelaySetup, raw: socket.socket, where: str) -> ssl.SSLSocket:
    try:
        return setup.tls_context.wrap_socket(raw, server_hostname=setup.host)
    except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
        raise _Refused(f"TLS with {where} failed: {_reason(exc)}", tls=True) from None


def _version(sock: socket.socket) -> str | None:
    return sock.version() if isinstance(sock, ssl.SSLSocket) else None


def _ehlo(sock: socket.socket, reader: BinaryIO, name: str, where: str) -> set[str]:
    _send(sock, f"EHLO {name}")
    lines = _expect(reader, 250, "EHLO", where)
    return {line.split()[0].upper() for line in lines[1:] if line.split()}


def _send(sock: socket.socket, command: str) -> None:
    sock.sendall(command.encode("ascii") + b"\r\n")


def _expect(reader: BinaryIO, code: int, after: str, where: str) -> list[str]:
    """The reply's lines (texts after the code); _Refused unless its code is ``code``."""
    lines: list[str] = []
    for _ in range(_MAX_LINES):
        line = reader.readline(2048).decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            raise _Refused(f"{where} closed the connection after {after}")
        lines.append(line[4:])
        if len(line) < 4 or line[3] != "-":
            if line[:3] != str(code):
                raise _Refused(f"{where} answered {line[:120]!r} to {after}")
            return lines
    raise _Refused(f"{where} sent a reply of more than {_MAX_LINES} lines to {after}")


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted ({exc.verify_message})"
    return exc.strerror or str(exc) or type(exc).__name__
