"""Tokens in the links of every email: who is asking, about which list, since when.

Input: a secret key, a kind (unsubscribe, preferences, undo), a time, a list
name and an address. Output: a short URL-safe token that says nothing to
anyone without the key; :func:`read` gives the subject back, or None for
anything forged, altered or malformed.

Version 2 (what we make): AES-SIV (RFC 5297) over ``version | kind | issued
| list NUL address NUL | zero padding to 16 bytes``, base64url without
padding. AES-SIV is authenticated and deterministic: the same link is made
for the same inputs (builds stay byte-reproducible), nobody without the key
can read the address or the list, and any change to a token is rejected.
The padding hides an address's exact length. ``issued`` is the message's
Date for links in mail and "now" for an undo button; the web pages decide
how long each kind stays valid (:data:`PREFERENCES_VALID`,
:data:`UNDO_VALID`; unsubscribe links never expire, as the law requires).

Version 1 (mail already sent): ``<base64 list and address>.<HMAC>``, which
carries the address readably and never expires. :func:`read` still accepts
it, as kind :attr:`Kind.LEGACY`; the pages accept that for unsubscribing
only. :func:`sign` makes one, for tests of that promise.

A token for an address under ``.invalid`` (RFC 2606: a name that never exists,
and that every import and signup refuses) is a check, not a person:
``newsletter doctor`` posts one (:data:`CHECK_ADDRESS`) to the public
unsubscribe URL to see that one-click unsubscribing answers, and the pages
answer it without touching any list (:func:`is_check`).
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_V1 = b"1"
_V1_MAC_BYTES = 16
_V2 = 2
_PAD = 16
# An address is at most 254 octets and a list name is short: anything much
# longer than the longest real token is refused before any decoding.
MAX_TOKEN_CHARS = 1000

PREFERENCES_VALID = dt.timedelta(days=90)  # from the message's Date
# The address of `newsletter doctor`'s one-click check: under .invalid, which no
# subscriber can have (email-validator refuses special-use domains).
CHECK_ADDRESS = "one-click-check@newsletter.invalid"
# The header the pages answer a check with, so the doctor knows the POST reached them.
CHECK_HEADER = "x-newsletter-check"
UNDO_VALID = dt.timedelta(hours=1)  # from the unsubscribe


class Kind(enum.Enum):
    UNSUBSCRIBE = b"u"
    PREFERENCES = b"p"
    UNDO = b"d"
    LEGACY = b"1"  # a version 1 token: unsubscribe only, no time


@dataclass(frozen=True, slots=True)
class TokenSubject:
    list_name: str
    email: str
    kind: Kind = Kind.LEGACY
    issued: dt.datetime | None = None  # None for version 1 tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # base64's last character has spare bits: accept only the canonical
    # spelling, so that exactly one string is valid for each subject.
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


@functools.lru_cache(maxsize=4)
def _siv(key: bytes) -> AESSIV:
    # A key of its own for this use, so the secret can sign other things later
    # without one use ever helping to attack another.
    derived = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=None, info=b"newsletter token v2 aes-siv"
    ).derive(key)
    return AESSIV(derived)


def make(key: bytes, kind: Kind, list_name: str, email: str, issued: dt.datetime) -> str:
    """A version 2 token; addresses compare case-insensitively."""
    if kind is Kind.LEGACY:
        raise ValueError("version 1 tokens are made by sign()")
    if "\0" in list_name or "\0" in email:
        raise ValueError("a list name or address cannot contain NUL")
    if issued.tzinfo is None:
        raise ValueError("the issue time must carry its time zone")
    seconds = int(issued.timestamp())
    if not 0 <= seconds < 2**32:
        raise ValueError(f"issue time {issued.isoformat()} is out of range")
    body = list_name.encode("utf-8") + b"\0" + email.lower().encode("utf-8") + b"\0"
    header = bytes([_V2]) + kind.value + struct.pack(">I", seconds)
    plain = header + body
    plain += b"\0" * (-len(plain) % _PAD)
    return _b64(_siv(key).encrypt(plain, None))


def read(key: bytes, token: str) -> TokenSubject | None:
    """The subject of a valid token of either version, or None."""
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        return None
    if "." in token:
        return verify(key, token)
    try:
        plain = _siv(key).decrypt(_unb64(token), None)
    except (ValueError, InvalidTag):
        return None
    if len(plain) < 6 or plain[0] != _V2:
        return None
    try:
        kind = Kind(plain[1:2])
    except ValueError:
        return None
    if kind is Kind.LEGACY:
        return None
    (seconds,) = struct.unpack(">I", plain[2:6])
    parts = plain[6:].split(b"\0")
    if len(parts) < 3 or any(parts[2:]):
        return None
    try:
        list_name, email = parts[0].decode("utf-8"), parts[1].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return TokenSubject(list_name, email, kind, dt.datetime.fromtimestamp(seconds, dt.UTC))


def is_check(subject: TokenSubject) -> bool:
    """Whether a token is a check (its address is under ``.invalid``), not a person's."""
    domain = subject.email.rpartition("@")[2].rstrip(".").lower()
    return domain == "invalid" or domain.endswith(".invalid")


# -- version 1 -----------------------------------------------------------------


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, b"newsletter-unsubscribe\0" + payload, hashlib.sha256).digest()[
        :_V1_MAC_BYTES
    ]


def sign(key: bytes, list_name: str, email: str) -> str:
    """A version 1 token, as mail sent before version 2 carries (tests use it)."""
    payload = _V1 + list_name.encode("utf-8") + b"\0" + email.lower().encode("utf-8")
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(key: bytes, token: str) -> TokenSubject | None:
    """The subject of a valid version 1 token, or None."""
    try:
        body, mac = token.split(".")
        payload = _unb64(body)
        given = _unb64(mac)
    except (ValueError, UnicodeEncodeError):
        return None
    if not hmac.compare_digest(given, _mac(key, payload)):
        return None
    if not payload.startswith(_V1) or payload.count(b"\0") != 1:
        return None
    list_name, email = payload[1:].split(b"\0")
    try:
        return TokenSubject(list_name.decode("utf-8"), email.decode("utf-8"))
    except UnicodeDecodeError:
        return None
