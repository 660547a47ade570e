"""Signed tokens that identify a subscriber on a list in unsubscribe links.

Input: a list name, an address and a secret key. Output: a short URL-safe
token ``<payload>.<mac>`` where the payload is the list and address and the
MAC is HMAC-SHA256 over it, truncated to 128 bits (enough against forgery,
short enough to keep the ``List-Unsubscribe`` header on one line). Nobody
without the key can make a token for an address, and any change to a token
makes it invalid. :func:`verify` gives the list and address back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

_VERSION = b"1"
_MAC_BYTES = 16


@dataclass(frozen=True, slots=True)
class TokenSubject:
    list_name: str
    email: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, b"newsletter-unsubscribe\0" + payload, hashlib.sha256).digest()[
        :_MAC_BYTES
    ]


def sign(key: bytes, list_name: str, email: str) -> str:
    """A token for ``email`` on ``list_name``; addresses compare case-insensitively."""
    payload = _VERSION + list_name.encode("utf-8") + b"\0" + email.lower().encode("utf-8")
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(key: bytes, token: str) -> TokenSubject | None:
    """The subject of a valid token, or None for anything forged, altered or malformed."""
    try:
        body, mac = token.split(".")
        payload = _unb64(body)
        given = _unb64(mac)
    except (ValueError, UnicodeEncodeError):
        return None
    # base64's last character has spare bits: accept only the canonical
    # spelling, so that exactly one string is valid for each subject.
    if _b64(payload) != body or _b64(given) != mac:
        return None
    if not hmac.compare_digest(given, _mac(key, payload)):
        return None
    if not payload.startswith(_VERSION) or payload.count(b"\0") != 1:
        return None
    list_name, email = payload[1:].split(b"\0")
    try:
        return TokenSubject(list_name.decode("utf-8"), email.decode("utf-8"))
    except UnicodeDecodeError:
        return None
