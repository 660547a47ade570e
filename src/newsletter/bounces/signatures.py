"""Checking that a webhook request comes from the provider: request → accepted or refused.

Input: a webhook request's body and headers, the deployment's keys (Mailgun's signing
key, SendGrid's verification key, Postmark's login, the SNS topics allowed) and the
clock. Output: nothing when it is genuine; :class:`Refused` (an HTTP status and a
short reason, logged by the caller) when it is not. Nothing here reads the events.

- Amazon SNS (SES): the signature (``SignatureVersion`` 1: SHA1withRSA, 2:
  SHA256withRSA) over the canonical string of the message's fields, each name and
  value followed by a newline, the last one too. The certificate comes from
  ``SigningCertURL``, which must be https on ``sns.<region>.amazonaws.com`` (or
  ``.amazonaws.com.cn``) and end in ``.pem``; it is fetched through a
  :class:`SnsFetcher` (:class:`HttpsSnsFetcher`: a timeout, a size cap, no
  redirects) and kept in memory by URL. ``SubscribeURL`` follows the same host rule.
- Mailgun: HMAC-SHA256 of timestamp + token with the signing key; a timestamp more
  than :data:`MAX_AGE` seconds old or :data:`TOLERANCE` seconds ahead is refused, and
  so is a token seen before with another body (a :class:`TokenLedger`: the server's is
  in the database, :class:`SeenTokens` in memory): the signature does not cover the
  body, so a captured one must not carry a forged event.
- SendGrid (Signed Event Webhook): ECDSA P-256 with SHA-256 over the timestamp header
  followed by the raw body, with the verification key; the same window.

Why three days and not the usual five minutes: neither provider says that a retry is
signed anew, and Mailgun retries for eight hours, SendGrid for three days; a retry
refused as stale would be a bounce lost. A replay inside the window changes nothing, since the
same event is recognised by its evidence digest and recorded once.
- Postmark signs nothing: HTTP basic auth, compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import ssl
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

__all__ = [
    "MAX_AGE",
    "MAX_CERTIFICATE",
    "TOLERANCE",
    "HttpsSnsFetcher",
    "Refused",
    "SeenTokens",
    "SnsFetcher",
    "SnsVerifier",
    "TokenLedger",
    "check_basic_auth",
    "check_mailgun",
    "check_sendgrid",
    "load_sendgrid_key",
    "sns_canonical",
    "sns_url_problem",
]

TOLERANCE = 300  # seconds a signed timestamp may be ahead of our clock (a clock that is off)
MAX_AGE = 3 * 86400  # seconds it may be behind: a retry days later may carry the first signature
MAX_CERTIFICATE = 64 * 1024  # an SNS signing certificate is about 2 kB
FETCH_TIMEOUT = 10.0
_SNS_HOST = re.compile(r"sns\.[a-z0-9-]{1,30}\.amazonaws\.com(?:\.cn)?", re.ASCII)
# The fields signed, in their order (AWS: "Verifying the signatures of Amazon SNS
# messages"); Subject only when the notification has one.
_NOTIFICATION = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


class Refused(Exception):
    """A request that is not genuine, with the HTTP status to answer and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ------------------------------------------------------------------ Amazon SNS


def sns_url_problem(url: str, *, certificate: bool) -> str | None:
    """Why ``url`` is not an SNS URL we may fetch (a signing certificate's, or with
    ``certificate`` False a SubscribeURL), or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme != "https":
        return "not https"
    if parts.username is not None or parts.password is not None or port not in (None, 443):
        return "a login or another port in it"
    if not _SNS_HOST.fullmatch(parts.hostname or ""):
        return f"the host {parts.hostname!r} is not sns.<region>.amazonaws.com"
    if certificate and (not _SNS_CERT_PATH.fullmatch(parts.path) or parts.query or parts.fragment):
        # Before any signature is checked, this URL is fetched: only SNS's own
        # certificate names, so an unsigned request cannot send us anywhere else.
        return "the path is not /SimpleNotificationService-<hex>.pem"
    return None


_SNS_CERT_PATH = re.compile(r"/SimpleNotificationService-[0-9a-f]{1,64}\.pem", re.ASCII)


def sns_canonical(message: Mapping[str, object]) -> bytes:
    """The string an SNS message's signature covers: each signed field's name and value,
    each followed by a newline (the last one too: missing it fails every message)."""
    kind = message.get("Type")
    names = _NOTIFICATION if kind == "Notification" else _CONFIRMATION
    lines = []
    for name in names:
        value = message.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise Refused(400, f"an SNS message without its {name}")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode("utf-8")


class SnsFetcher(Protocol):
    """What the SNS check fetches: certificates, and the confirmation of a subscription.
    The caller has checked each URL (:func:`sns_url_problem`) before it asks."""

    def certificate(self, url: str) -> bytes:
        """The PEM at ``url``; :class:`Refused` (502) if it cannot be had."""
        ...

    def confirm(self, url: str) -> None:
        """Visit ``url`` (a SubscribeURL) to confirm a subscription; :class:`Refused`
        (502) if it fails."""
        ...


class HttpsSnsFetcher:
    """:class:`SnsFetcher` over https with the system's CAs: each URL checked again here,
    a timeout, a size cap, and no redirect followed (one could lead off the SNS host)."""

    def __init__(self, timeout: float = FETCH_TIMEOUT) -> None:
        self.timeout = timeout
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context()), _NoRedirect()
        )

    def certificate(self, url: str) -> bytes:
        return self._get(url, certificate=True)

    def confirm(self, url: str) -> None:
        self._get(url, certificate=False)

    def _get(self, url: str, *, certificate: bool) -> bytes:
        problem = sns_url_problem(url, certificate=certificate)
        if problem:
            raise Refused(403, f"refused to fetch {url[:200]!r}: {problem}")
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                body: bytes = response.read(MAX_CERTIFICATE + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise Refused(502, f"could not fetch {url[:200]}: {exc}") from None
        if len(body) > MAX_CERTIFICATE:
            raise Refused(502, f"{url[:200]} gave more than {MAX_CERTIFICATE} bytes")
        return body


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises HTTPError for the 3xx itself


class SnsVerifier:
    """Checks SNS messages' signatures, keeping each certificate's key by URL (for the
    life of the process: SNS signs with one certificate for months)."""

    def __init__(self, fetcher: SnsFetcher) -> None:
        self.fetcher = fetcher
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._lock = threading.Lock()

    def verify(self, message: Mapping[str, object]) -> None:
        """Nothing if ``message`` (an SNS message, parsed) is signed by SNS; else Refused."""
        version = message.get("SignatureVersion")
        algorithm: hashes.HashAlgorithm
        if version == "1":
            algorithm = hashes.SHA1()  # noqa: S303 - SNS's SignatureVersion 1 is SHA1withRSA
        elif version == "2":
            algorithm = hashes.SHA256()
        else:
            raise Refused(400, f"SNS SignatureVersion {str(version)[:10]!r} is not 1 or 2")
        url = message.get("SigningCertURL")
        if not isinstance(url, str):
            raise Refused(400, "an SNS message without its SigningCertURL")
        problem = sns_url_problem(url, certificate=True)
        if problem:
            raise Refused(403, f"SigningCertURL refused: {problem}")
        signed = sns_canonical(message)
        try:
            signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise Refused(400, "the SNS Signature is not base64") from None
        try:
            self._key(url).verify(signature, signed, padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            raise Refused(403, "the SNS signature does not match") from None

    def _key(self, url: str) -> rsa.RSAPublicKey:
        with self._lock:
            found = self._keys.get(url)
        if found is not None:
            return found
        pem = self.fetcher.certificate(url)
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Refused(502, f"{url[:200]} is not a PEM certificate") from None
        now = dt.datetime.now(dt.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise Refused(403, f"the certificate at {url[:200]} is not valid now")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Refused(403, f"the certificate at {url[:200]} has no RSA key")
        with self._lock:
            self._keys[url] = key
        return key


# --------------------------------------------------------------------- Mailgun


class SeenTokens:
    """The Mailgun tokens accepted lately, in memory, with the digest of the body each
    came with: the same request again (Mailgun retrying) is let through, to be
    recognised as recorded before; the token with another body is a replay.

    At most ``most`` are kept (about 200 bytes each); past that the oldest is forgotten,
    and a token signed before the last one forgotten is refused, as nobody can say any
    more whether it came with another body. Under a load that heavy the window shrinks
    from ``MAX_AGE`` to however long ``most`` tokens take to arrive. One process's
    memory: see the README for several processes."""

    def __init__(self, keep: float = MAX_AGE + TOLERANCE, most: int = 100_000) -> None:
        self.keep = keep
        self.most = most
        # In arrival order, so the first is the oldest.
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._forgotten = float("-inf")  # when the last token forgotten for room arrived
        self._lock = threading.Lock()

    def check(self, token: str, signed: float, body: bytes, now: float) -> None:
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            while self._seen and next(iter(self._seen.values()))[0] <= now - self.keep:
                self._seen.popitem(last=False)
            before = self._seen.get(token)
            if before is not None:
                if before[1] != digest:
                    raise Refused(409, "a Mailgun token seen before, with another body "
                                  "(a replay)")  # fmt: skip
                return
            if signed <= self._forgotten:
                raise Refused(403, "a Mailgun token older than the oldest one remembered "
                              "(too many webhooks lately to tell a replay)")  # fmt: skip
            while len(self._seen) >= self.most:
                self._forgotten = self._seen.popitem(last=False)[1][0]
            self._seen[token] = (now, digest)


class TokenLedger(Protocol):
    """Where Mailgun tokens are remembered: :class:`SeenTokens` (one process's memory),
    or the database (``newsletter.web.webhooks.StoredTokens``, every process's)."""

    def check(self, token: str, signed: float, body: bytes, now: float) -> None:
        """Nothing for a token new, or seen with this body (a retry); Refused for a token
        seen with another body (a replay with a forged event)."""
        ...


def check_mailgun(
    key: bytes, signature: Mapping[str, object], body: bytes, seen: TokenLedger, now: float
) -> None:
    """Nothing if ``signature`` (the payload's ``signature`` object) is Mailgun's, fresh
    and not replayed; else Refused."""
    timestamp, token, mac = (signature.get(k) for k in ("timestamp", "token", "signature"))
    if not all(isinstance(v, str) and v for v in (timestamp, token, mac)):
        raise Refused(400, "a Mailgun webhook without its signature's timestamp, token "
                      "and signature")  # fmt: skip
    assert isinstance(timestamp, str) and isinstance(token, str) and isinstance(mac, str)
    expected = hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), mac.encode("utf-8", "replace")):
        raise Refused(403, "the Mailgun signature does not match")
    _fresh(timestamp, now, "Mailgun")
    seen.check(token, int(timestamp), body, now)


def _fresh(timestamp: str, now: float, who: str) -> None:
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise Refused(400, f"the {who} timestamp is not a number of seconds")
    age = now - int(timestamp)
    if age > MAX_AGE:
        raise Refused(403, f"the {who} timestamp is more than {MAX_AGE // 3600} hours old "
                      "(a replay, or a clock that is off)")  # fmt: skip
    if age < -TOLERANCE:
        raise Refused(403, f"the {who} timestamp is more than {TOLERANCE // 60} minutes "
                      "ahead of our clock (a clock that is off)")  # fmt: skip


# -------------------------------------------------------------------- SendGrid


def load_sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key (base64 of a DER public key, as its settings page
    shows it), or ValueError saying what is wrong with it."""
    try:
        der = base64.b64decode("".join(text.split()), validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError):
        raise ValueError("is not a base64 public key (copy the verification key from "
                         "SendGrid's Signed Event Webhook settings)") from None  # fmt: skip
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("is not an ECDSA P-256 public key, as SendGrid's is")
    return key


def check_sendgrid(
    key: ec.EllipticCurvePublicKey, headers: Mapping[str, str], body: bytes, now: float
) -> None:
    """Nothing if the request's signature header signs its timestamp header + body."""
    signature = headers.get("x-twilio-email-event-webhook-signature", "")
    timestamp = headers.get("x-twilio-email-event-webhook-timestamp", "")
    if not signature or not timestamp:
        raise Refused(401, "no SendGrid signature or timestamp header")
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, UnicodeEncodeError, InvalidSignature):
        raise Refused(403, "the SendGrid signature does not match") from None
    _fresh(timestamp, now, "SendGrid")


# -------------------------------------------------------------------- Postmark


def check_basic_auth(authorization: str, user: str, password: str) -> None:
    """Nothing if the Authorization header gives ``user`` and ``password``; each compared
    in constant time, both always, so timing tells neither."""
    scheme, _, encoded = authorization.partition(" ")
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        given = b""
    name, _, secret = given.partition(b":")
    good_name = hmac.compare_digest(name, user.encode())
    good_secret = hmac.compare_digest(secret, password.encode())
    if scheme.lower() != "basic" or not (good_name & good_secret):
        raise Refused(401, "wrong or missing login")
