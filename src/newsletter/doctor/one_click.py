"""One-click stage: does NEWSLETTER_PUBLIC_URL answer an RFC 8058 unsubscribe → a finding.

Input: the public URL, the token key (NEWSLETTER_SECRET_KEY; None without it), the
list's name, a :class:`~newsletter.doctor.dns_client.Resolver` for the URL's host,
a TLS context, a timeout and the time. Output: ``one_click``.

It POSTs ``List-Unsubscribe=One-Click`` (as Gmail and Yahoo do: no cookies, no
redirects followed) to the unsubscribe link of a test token, made for
:data:`~newsletter.tokens.CHECK_ADDRESS`: an address under ``.invalid`` that no
subscriber can have, which ``newsletter serve`` answers without opening any store.
A pass needs a 2xx answer that carries serve's check header: then the POST reached
serve, with the key the mail's links are made with.
"""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from newsletter import tokens
from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding

BODY = b"List-Unsubscribe=One-Click"


@dataclass(frozen=True, slots=True)
class OneClickSetup:
    public_url: str
    token_key: bytes | None
    list_name: str
    tls_context: ssl.SSLContext
    timeout: float = 10.0


class _Pinned(http.client.HTTPSConnection):
    """HTTPS to the address the doctor's resolver gave, with the URL's host name for
    SNI, the certificate and the Host header."""

    def __init__(
        self, host: str, port: int, address: str, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port or 443), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def check_one_click(setup: OneClickSetup, resolver: Resolver, now: dt.datetime) -> Finding:
    title = "One-click unsubscribe (RFC 8058) at NEWSLETTER_PUBLIC_URL"
    if setup.token_key is None:
        return Finding(
            "one_click", title, "fail",
            "not checked: without NEWSLETTER_SECRET_KEY no link that serve accepts can be made",
            "set NEWSLETTER_SECRET_KEY, the same as `newsletter serve` has",
        )  # fmt: skip
    token = tokens.make(
        setup.token_key, tokens.Kind.UNSUBSCRIBE, setup.list_name, tokens.CHECK_ADDRESS, now
    )
    url = f"{setup.public_url.rstrip('/')}/unsubscribe/{token}"
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    shown = f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}/<test token>"
    answer = resolver.addresses(host)
    if not answer.records:
        return Finding(
            "one_click", title, "fail",
            f"{host} has no address: {answer.error or 'no A or AAAA record'}",
            f"publish an address for {host}, or correct NEWSLETTER_PUBLIC_URL",
        )  # fmt: skip
    try:
        status, headers, location = _post(host, port, answer.records[0], parts.path, setup)
    except (OSError, http.client.HTTPException) as exc:
        return Finding(
            "one_click", title, "fail", f"POST {shown}: {_reason(exc)}",
            "run `newsletter serve` behind HTTPS at NEWSLETTER_PUBLIC_URL (a certificate "
            f"valid for {host})",
        )  # fmt: skip
    said = f"POST {shown} answered {status}"
    if 200 <= status < 300 and headers.get(tokens.CHECK_HEADER) == "one-click":
        return Finding("one_click", title, "pass", f"{said}; the test link changed nothing")
    if 200 <= status < 300:
        return Finding(
            "one_click", title, "warn",
            f"{said}, but not as `newsletter serve` answers its test link: another server (or "
            "an older version) answered, and may have recorded an opt-out for the test address",
            "make sure NEWSLETTER_PUBLIC_URL reaches `newsletter serve`, of this version",
        )  # fmt: skip
    if 300 <= status < 400:
        return Finding(
            "one_click", title, "fail",
            f"{said} (a redirect to {location or 'nowhere'}): mailbox providers do not follow "
            "it, so one-click unsubscribing fails",
            "point NEWSLETTER_PUBLIC_URL at the address serve answers on itself (https, the "
            "final host and path)",
        )  # fmt: skip
    if status == 404:
        return Finding(
            "one_click", title, "fail",
            f"{said}: the link was not recognised, so unsubscribe links in mail fail too",
            "give `newsletter serve` the same NEWSLETTER_SECRET_KEY, and check that "
            "NEWSLETTER_PUBLIC_URL (with its path) reaches it",
        )  # fmt: skip
    return Finding(
        "one_click", title, "fail", f"{said}: one-click unsubscribing fails",
        "look at `newsletter serve`'s log and the proxy in front of it",
    )  # fmt: skip


def _post(
    host: str, port: int, address: str, path: str, setup: OneClickSetup
) -> tuple[int, dict[str, str], str | None]:
    connection = _Pinned(host, port, address, setup.tls_context, setup.timeout)
    try:
        connection.request(
            "POST",
            path,
            body=BODY,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "User-Agent": "newsletter-doctor",
                "Connection": "close",
            },
        )
        response = connection.getresponse()
        response.read(64 * 1024)  # a short body; the status and headers are the answer
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, headers.get("location")
    finally:
        connection.close()


def _reason(exc: Exception) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted ({exc.verify_message})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"not an HTTP answer ({exc!r})"
