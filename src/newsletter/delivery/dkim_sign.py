"""Signing stage: a finished message → the same message with a DKIM-Signature.

Input: the message bytes (CRLF, as sent) and a :class:`DkimKey`. Output: the
bytes with a ``DKIM-Signature`` header in front (RFC 6376, rsa-sha256,
relaxed/relaxed). The signature covers both ``List-Unsubscribe`` headers,
as RFC 8058 one-click requires, and also names headers the message does not
have (Reply-To, Cc, Auto-Submitted), so that nobody can add them later
without breaking it.

The canonicalisation (RFC 6376 3.4.2 and 3.4.4) and the hashes are done here;
the RSA signature (PKCS#1 v1.5, SHA-256) by OpenSSL through ``cryptography``,
with the key parsed once, when it is loaded. That costs about 0.3-0.4 ms a
message where dkimpy's pure-Python RSA took about 11 ms; dkimpy is only the
tests' independent verifier now. :func:`signature` gives the header alone;
:func:`prepare` all of it but the RSA operation, which :mod:`sign_process` does in
a second process during a send.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from newsletter.errors import ConfigError

MIN_BITS = 1024  # receivers fail shorter RSA keys (RFC 8301 3.2)
GOOD_BITS = 2048  # what RFC 8301 and the big mailbox providers recommend
_MAX_PEM = 64 * 1024  # an 8192-bit key in PEM is under 7 KB
# RFC 6376 3.1: selectors and domains are dot-separated DNS labels.
_LABELS = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")

SIGNED_HEADERS = (
    b"From", b"To", b"Subject", b"Date", b"Message-ID", b"MIME-Version", b"Content-Type",
    b"List-Id", b"List-Unsubscribe", b"List-Unsubscribe-Post", b"Reply-To", b"Cc",
    b"Auto-Submitted",
)  # fmt: skip
# Named once each in h=, present or not: a verifier hashes the bottom-most instance
# of each name, and nothing for an absent one, so adding one later breaks the
# signature (RFC 6376 5.4.2, 8.15).
_SIGNED = tuple(name.lower() for name in SIGNED_HEADERS)
_H_TOKENS = b" : ".join(_SIGNED).split(b" ")  # "from : to : ...", as dkimpy wrote it
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 2.2 ftext
_WSP = re.compile(rb"[ \t]+")
_SPACES = re.compile(rb"  +")
_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_PREFIX = b"DKIM-Signature:"


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A DKIM signing key, parsed (and checked by OpenSSL) once, when it is made."""

    selector: str
    domain: str
    private_key: bytes  # PEM
    bits: int = 0  # the RSA modulus' length; 0: read from the key
    rsa_key: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)
    public_key: rsa.RSAPublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = serialization.load_pem_private_key(self.private_key, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"the key is {type(key).__name__.lstrip('_')}, not RSA")
        object.__setattr__(self, "rsa_key", key)  # frozen: set once, here
        object.__setattr__(self, "public_key", key.public_key())
        if not self.bits:
            object.__setattr__(self, "bits", key.key_size)

    def __reduce__(self) -> tuple[type[DkimKey], tuple[str, str, bytes, int]]:
        # OpenSSL's key object cannot be pickled: a process pool gets the PEM and
        # parses it again.
        return DkimKey, (self.selector, self.domain, self.private_key, self.bits)

    @property
    def weak(self) -> bool:
        """Accepted, but shorter than receivers recommend: worth a warning."""
        return self.bits < GOOD_BITS


def load_key(path: Path, selector: str, domain: str) -> DkimKey:
    """Read and check the key once, at the start of a send (not per message)."""
    if len(selector) > 253 or not _LABELS.fullmatch(selector):
        raise ConfigError(
            f"the DKIM selector {selector!r} must be DNS labels (letters, digits, hyphens) "
            "separated by dots (RFC 6376 3.1); check NEWSLETTER_DKIM_SELECTOR"
        )
    if len(domain) > 253 or "." not in domain or not _LABELS.fullmatch(domain):
        raise ConfigError(
            f"the DKIM domain {domain!r} is not a domain name like 'example.org'; check "
            "NEWSLETTER_DKIM_DOMAIN (or the From address)"
        )
    try:
        with path.open("rb") as f:
            pem = f.read(_MAX_PEM + 1)  # not all of /dev/zero, if the setting is wrong
    except OSError as exc:
        raise ConfigError(
            f"cannot read the DKIM key {path}: {exc.strerror}; check NEWSLETTER_DKIM_KEY_FILE"
        ) from None
    if len(pem) > _MAX_PEM:
        raise ConfigError(
            f"{path} is larger than any RSA key in PEM form; check NEWSLETTER_DKIM_KEY_FILE"
        )
    try:
        key = DkimKey(selector, domain, pem)
        _verify_self(key)
    # ValueError: not PEM, not RSA, inconsistent; TypeError: encrypted (a password
    # would be needed); UnsupportedAlgorithm: a key type OpenSSL does not know.
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{path} is not a usable DKIM private key ({exc}); it must be an RSA key in PEM "
            "form; check NEWSLETTER_DKIM_KEY_FILE"
        ) from None
    if key.bits < MIN_BITS:
        raise ConfigError(
            f"the DKIM key {path} (NEWSLETTER_DKIM_KEY_FILE) is {key.bits}-bit RSA: receivers "
            f"fail signatures from keys under {MIN_BITS} bits (RFC 8301). Make a {GOOD_BITS}-bit "
            "one (openssl genrsa -out dkim.pem 2048) and publish its public key under the "
            "selector"
        )
    return key


def sign(message: bytes, key: DkimKey, *, timestamp: int | None = None) -> bytes:
    """``message`` with its DKIM-Signature in front; ``timestamp`` is t= (default: now)."""
    return signature(message, key, timestamp=timestamp) + message


def check_line_ends(message: bytes) -> None:
    """ValueError when ``message`` is not CRLF throughout (three scans of the message:
    a seventh of what signing it costs)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        raise ValueError("the message has a bare CR or LF: DKIM signs CRLF lines only")


def signature(
    message: bytes, key: DkimKey, *, timestamp: int | None = None, line_ends_checked: bool = False
) -> bytes:
    """The DKIM-Signature header field for ``message``, folded, ending in CRLF.

    Raises ValueError for a message that is not CRLF throughout or whose header
    section is not header fields: a relay that repairs line ends would break the
    signature, so such a message is a bug of its composer, not something to sign."""
    pending = prepare(message, key, timestamp=timestamp, line_ends_checked=line_ends_checked)
    return pending.finish(rsa_sign(key, pending.digest))


@dataclass(frozen=True, slots=True)
class Unsigned:
    """A DKIM-Signature ready but for its RSA signature: the header up to ``b=``, and
    the SHA-256 of what RFC 6376 3.7 has signed (another process may sign it)."""

    head: bytes
    digest: bytes

    def finish(self, signed: bytes) -> bytes:
        """The header field, folded, with the RSA signature ``signed`` in b=."""
        b64 = base64.b64encode(signed)
        first = _LINE - len(" b=")
        rest = [b64[i : i + _LINE - 1] for i in range(first, len(b64), _LINE - 1)]
        return b"\r\n ".join([_PREFIX + b" " + self.head + b64[:first], *rest]) + b"\r\n"


def rsa_sign(key: DkimKey, digest: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 over a SHA-256 ``digest`` (the same bytes as signing the data)."""
    return key.rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def verifies(key: DkimKey, digest: bytes, signed: bytes) -> bool:
    """Whether ``signed`` is the key's signature of ``digest`` (a check of a signature
    made in another process: about 0.02 ms, a tenth of making one)."""
    try:
        key.public_key.verify(signed, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def prepare(
    message: bytes, key: DkimKey, *, timestamp: int | None = None, line_ends_checked: bool = False
) -> Unsigned:
    """Everything of :func:`signature` but the RSA operation (ValueError as there;
    ``line_ends_checked``: the caller ran :func:`check_line_ends` already)."""
    if not line_ends_checked:
        check_line_ends(message)
    fields, body_at = _header_fields(message)
    when = int(time.time()) if timestamp is None else timestamp
    domain, selector = key.domain.encode("ascii"), key.selector.encode("ascii")
    tokens = [
        b"v=1;", b"a=rsa-sha256;", b"c=relaxed/relaxed;", b"d=" + domain + b";",
        b"i=@" + domain + b";", b"q=dns/txt;", b"s=" + selector + b";", b"t=%d;" % when,
        b"h=" + _H_TOKENS[0], *_H_TOKENS[1:-1], _H_TOKENS[-1] + b";",
        b"bh=" + _body_hash(message, body_at) + b";",
    ]  # fmt: skip
    # b= starts a line of its own: the tags before it never move when it is filled in.
    unsigned = _fold(tokens, len(_PREFIX) + 1) + b"\r\n b="
    # RFC 6376 3.7: the selected fields, then this one with b= empty and no final CRLF.
    hashed = [_relaxed(name, value) for name, value in _select(fields)]
    hashed.append(_relaxed(b"dkim-signature", b" " + unsigned)[:-2])
    return Unsigned(unsigned, hashlib.sha256(b"".join(hashed)).digest())


def _header_fields(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Each header field as (lower-case name, value unfolded), and where the body starts."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        head, body_at = b"", 2
    elif end == -1:  # all header, no body
        head, body_at = message.removesuffix(b"\r\n"), len(message)
    else:
        head, body_at = message[:end], end + 4
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n") if head else []:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ValueError("the message starts with a continuation line")
            # Unfolding removes the CRLF only (RFC 5322 2.2.3; RFC 6376 3.4.2).
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t")  # obsolete syntax allows WSP before the colon
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"not a header field: {line[:60]!r}")
        fields.append((name.lower(), value))
    return fields, body_at


def _select(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields h= names, each name's instances taken from the bottom up (RFC 6376
    5.4.2); an absent name contributes nothing."""
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        by_name.setdefault(name, []).append(value)
    chosen = []
    for name in _SIGNED:
        values = by_name.get(name)
        if values:
            chosen.append((name, values.pop()))
    return chosen


def _relaxed(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, no WSP around the colon, WSP runs as one SP,
    none at the end; the value is unfolded already (or folded: CRLF is removed)."""
    value = _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" \t")
    return name + b":" + value + b"\r\n"


def _body_hash(message: bytes, start: int) -> bytes:
    """bh=: SHA-256 of the body in relaxed form (RFC 6376 3.4.4), base64.

    The body is 60-100 KB of quoted-printable: each of a tab, two spaces in a row
    and a space at a line's end is looked for with a C search, and the body is
    copied and rewritten only when one is there (the text part's indented lines
    have runs of spaces; QP never leaves a space at a line's end)."""
    body = message
    if (
        message.find(b"\t", start) != -1
        or message.find(b"  ", start) != -1
        or message.find(b" \r\n", start) != -1
    ):
        body = message[start:]
        if b"\t" in body:
            body = body.replace(b"\t", b" ")
        # A pattern that starts with a literal: re finds each run with a fast search
        # (about 0.05 ms on a 50 KB body with 200 runs, [ \t]+ takes 0.7).
        body = _SPACES.sub(b" ", body).replace(b" \r\n", b"\r\n")
        start = 0
    # Empty lines at the end are ignored, and so are the last line's trailing
    # spaces (when it has no CRLF); then one CRLF ends a body that is not empty.
    # No bare CR or LF is left (signature() refused them): only CRLF pairs go.
    end = len(body)
    while end > start and body[end - 1] in b" \t\r\n":
        end -= 1
    digest = hashlib.sha256(memoryview(body)[start:end])
    if end > start:
        digest.update(b"\r\n")
    return base64.b64encode(digest.digest())


def _fold(tokens: list[bytes], used: int) -> bytes:
    """The tokens joined by spaces, each space that would pass 78 columns a fold."""
    lines: list[bytes] = []
    line = b""
    for token in tokens:
        if line and used + len(line) + 1 + len(token) > _LINE:
            lines.append(line)
            line, used = token, 1  # a continuation line starts with its space
        else:
            line = line + b" " + token if line else token
    return b"\r\n ".join([*lines, line])


def _verify_self(key: DkimKey) -> None:
    """Check a signature with the key's own public half (at load, not per message): a
    key OpenSSL accepted but that signs wrongly is refused before any mail goes."""
    data = b"from:a@example.org\r\nsubject:key check\r\n"
    signed = key.rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    try:
        key.rsa_key.public_key().verify(signed, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ValueError("a signature made with it does not verify") from None


def public_key_b64(key: DkimKey) -> str:
    """The p= value to publish at <selector>._domainkey.<domain> (RFC 6376 3.6.1: the
    SubjectPublicKeyInfo in DER, base64)."""
    der = key.rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def published_key_problem(key: DkimKey, p_value: str) -> str | None:
    """Why the p= of a published DKIM record is not ``key``'s public half, or None when
    it is (a SubjectPublicKeyInfo, or the bare RSAPublicKey some tools publish)."""
    try:
        der = base64.b64decode("".join(p_value.split()), validate=True)
    except ValueError:
        return "its p= is not base64"
    try:
        published = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        try:
            published = serialization.load_pem_public_key(
                b"-----BEGIN RSA PUBLIC KEY-----\n"
                + base64.encodebytes(der)
                + b"-----END RSA PUBLIC KEY-----\n"
            )
        except (ValueError, UnsupportedAlgorithm):
            return "its p= is not a public key"
    if not isinstance(published, rsa.RSAPublicKey):
        return f"its p= is a {type(published).__name__.lstrip('_')}, not an RSA key"
    if published.public_numbers() != key.rsa_key.public_key().public_numbers():
        return f"its p= is another key ({published.key_size}-bit) than the private key's"
    return None
