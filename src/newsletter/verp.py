"""VERP: an envelope sender for each message that says, signed, which delivery it was.

Input: the bounce address (``NEWSLETTER_BOUNCE_ADDRESS``, e.g.
``bounces@bounce.example.org``), the secret key, and a delivery's send id and
position (seq) in the send log. Output: the message's MAIL FROM,
``bounces+<token>@bounce.example.org``, and back from such an address (the
recipient of a bounce) the delivery it names, or None for anything forged,
altered or not ours.

Why: a bounce is mail to the envelope sender. With one address for every
message, a bounce says whom it is about only in its body, in a format each
mail system writes its own way; with the delivery in the address itself, the
mail system that bounces tells us exactly which recipient of which send
failed, whatever it writes in the body.

The token is ``a`` (the format's version) and, in lower-case base32 without
padding, 4 bytes of send id, 4 of seq and the first 8 of an HMAC-SHA256 over
them keyed by the secret key: 27 characters, so the local part stays well
under the 64 octets SMTP allows. Lower case, and read whatever the case, since
some mail systems change the case of a local part. It names no address: the
send log says who it was, and an erased person's row says nobody.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass, field

__all__ = ["Delivered", "Verp"]

_VERSION = "a"
_MAC_BYTES = 8
_PAYLOAD = struct.Struct(">II")  # send id, seq
_TOKEN_CHARS = 1 + 26  # the version, then base32 of 16 bytes without its padding
_SEPARATOR = "+"


@dataclass(frozen=True, slots=True)
class Delivered:
    """The delivery a bounce's recipient address names: a send and a row of its log."""

    send_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class Verp:
    """Envelope senders under one bounce address (``local@domain``)."""

    address: str
    key: bytes = field(repr=False)

    @property
    def local(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    def sender(self, send_id: int, seq: int) -> str:
        """The MAIL FROM of the message of row ``seq`` of send ``send_id``."""
        if not (0 <= send_id < 2**32 and 0 <= seq < 2**32):
            raise ValueError(f"a VERP token holds a send id and seq from 0 to 2**32 - 1, "
                             f"not {send_id} and {seq}")  # fmt: skip
        payload = _PAYLOAD.pack(send_id, seq)
        body = base64.b32encode(payload + self._mac(payload)).decode("ascii").rstrip("=")
        return f"{self.local}{_SEPARATOR}{_VERSION}{body.lower()}@{self.domain}"

    def read(self, address: str) -> Delivered | None:
        """The delivery ``address`` names, when it is one of ours and intact; else None."""
        if not address.isascii():
            return None  # look-alikes (a Kelvin sign lower-cases to k) are not ours
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower() != self.domain.lower():
            return None
        base, separator, token = local.rpartition(_SEPARATOR)
        if not separator or base.lower() != self.local.lower():
            return None
        token = token.lower()
        if len(token) != _TOKEN_CHARS or not token.startswith(_VERSION):
            return None
        try:
            raw = base64.b32decode(token[1:].upper() + "======")
        except (binascii.Error, ValueError):
            return None
        if base64.b32encode(raw).decode("ascii").rstrip("=").lower() != token[1:]:
            return None  # the same bytes spelt another way (the last character's spare bits)
        payload, mac = raw[: _PAYLOAD.size], raw[_PAYLOAD.size :]
        if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        send_id, seq = _PAYLOAD.unpack(payload)
        return Delivered(send_id, seq)

    def _mac(self, payload: bytes) -> bytes:
        # Its own label: a MAC made here is never one the link tokens would accept.
        signed = b"newsletter-verp\0" + payload
        return hmac.new(self.key, signed, hashlib.sha256).digest()[:_MAC_BYTES]
