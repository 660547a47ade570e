"""Confirmation links: a signup's id and nonce → a signed token, and back.

Input: the deployment's secret key, a signup's id and its random nonce (kept in the
database). Output: a URL-safe token, ``base64url(nonce | id masked | mac)``: the id
masked with a pad derived from the nonce (a link says nothing of how many signups there
were), the mac HMAC-SHA256 (first 16 bytes) over id and nonce, with keys derived for
this use only;
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


def _pad(secret: bytes, raw_nonce: bytes) -> int:
    mask = hmac.new(_key(secret), b"pad " + raw_nonce, hashlib.sha256).digest()[:8]
    return int(struct.unpack(">Q", mask)[0])


def confirm_token(secret: bytes, signup_id: int, nonce: str) -> str:
    raw = _raw_nonce(nonce)
    masked = struct.pack(">Q", signup_id ^ _pad(secret, raw))
    mac = _mac(secret, struct.pack(">Q", signup_id) + raw)
    return base64.urlsafe_b64encode(raw + masked + mac).rstrip(b"=").decode("ascii")


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
    nonce_raw, masked, mac = raw[:_NONCE], raw[_NONCE : _NONCE + 8], raw[-_MAC:]
    signup_id = int(struct.unpack(">Q", masked)[0]) ^ _pad(secret, nonce_raw)
    if not hmac.compare_digest(mac, _mac(secret, struct.pack(">Q", signup_id) + nonce_raw)):
        return None
    nonce = _nonce_text(nonce_raw)
    # Only the canonical spelling: exactly one token is valid for each signup.
    if confirm_token(secret, signup_id, nonce) != token:
        return None
    return signup_id, nonce


def _nonce_text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
