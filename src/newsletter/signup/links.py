"""Confirmation links: a signup's id and nonce → a signed token, and back.

Input: the deployment's secret key, a signup's id and its random nonce (kept in the
database). Output: a URL-safe token, ``base64url(id | nonce | mac)``, where the mac is
HMAC-SHA256 (first 16 bytes) over id and nonce with a key derived for this use only;
:func:`read` gives (id, nonce) back, or None for anything forged, altered, truncated
or malformed. Whether the signup is still waiting, unexpired and unconfirmed (the
token is single-use) is the store's to say.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["confirm_token", "read"]

_MAC = 16
_NONCE = 16
_LENGTH = 8 + _NONCE + _MAC


@functools.lru_cache(maxsize=4)
def _key(secret: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"newsletter confirm v1"
    ).derive(secret)


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(_key(secret), body, hashlib.sha256).digest()[:_MAC]


def _raw_nonce(nonce: str) -> bytes:
    raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
    if len(raw) != _NONCE:
        raise ValueError("a signup nonce is 16 bytes")
    return raw


def confirm_token(secret: bytes, signup_id: int, nonce: str) -> str:
    body = struct.pack(">Q", signup_id) + _raw_nonce(nonce)
    return base64.urlsafe_b64encode(body + _mac(secret, body)).rstrip(b"=").decode("ascii")


def read(secret: bytes, token: str) -> tuple[int, str] | None:
    """(signup id, nonce) from a token of ours, or None."""
    if len(token) > 64 or not token.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _LENGTH:
        return None
    body, mac = raw[:-_MAC], raw[-_MAC:]
    if not hmac.compare_digest(mac, _mac(secret, body)):
        return None
    # Only the canonical spelling: exactly one token is valid for each signup.
    if confirm_token(secret, struct.unpack(">Q", body[:8])[0], _nonce_text(body[8:])) != token:
        return None
    return struct.unpack(">Q", body[:8])[0], _nonce_text(body[8:])


def _nonce_text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
