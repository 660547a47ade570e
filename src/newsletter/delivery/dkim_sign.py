"""Signing stage: a finished message → the same message with a DKIM-Signature.

Input: the message bytes (CRLF, as sent) and a :class:`DkimKey`. Output: the
bytes with a ``DKIM-Signature`` header in front (RFC 6376, rsa-sha256,
relaxed/relaxed). The signature covers both ``List-Unsubscribe`` headers,
as RFC 8058 one-click requires, and also names headers the message does not
have (Reply-To, Cc), so that nobody can add them later without breaking it.
dkimpy is imported only here.

Signing costs about 10 ms per message with dkimpy's pure-Python RSA, which
caps one process near 100 messages a second: where the relay can sign
(Postfix with OpenDKIM, most sending services), let it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from newsletter.errors import ConfigError

MIN_BITS = 1024  # receivers fail shorter RSA keys (RFC 8301 3.2)
GOOD_BITS = 2048  # what RFC 8301 and the big mailbox providers recommend
_MAX_PEM = 64 * 1024  # an 8192-bit key in PEM is under 7 KB
# RFC 6376 3.1: selectors and domains are dot-separated DNS labels.
_LABELS = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")

SIGNED_HEADERS = (
    b"From", b"To", b"Subject", b"Date", b"Message-ID", b"MIME-Version", b"Content-Type",
    b"List-Id", b"List-Unsubscribe", b"List-Unsubscribe-Post", b"Reply-To", b"Cc",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DkimKey:
    selector: str
    domain: str
    private_key: bytes  # PEM
    bits: int = 0  # the RSA modulus' length

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
        import dkim  # its crypto module is loaded with it

        bits = int(dkim.crypto.parse_pem_private_key(pem)["modulus"]).bit_length()
        key = DkimKey(selector, domain, pem, bits)
        sign(b"From: a@example.org\r\nSubject: key check\r\n\r\nx\r\n", key)
    except Exception as exc:  # noqa: BLE001 - dkimpy raises several kinds for a bad key
        raise ConfigError(
            f"{path} is not a usable DKIM private key ({exc}); it must be an RSA key in PEM "
            "form; check NEWSLETTER_DKIM_KEY_FILE"
        ) from None
    if bits < MIN_BITS:
        raise ConfigError(
            f"the DKIM key {path} (NEWSLETTER_DKIM_KEY_FILE) is {bits}-bit RSA: receivers "
            f"fail signatures from keys under {MIN_BITS} bits (RFC 8301). Make a {GOOD_BITS}-bit "
            "one (openssl genrsa -out dkim.pem 2048) and publish its public key under the "
            "selector"
        )
    return key


def sign(message: bytes, key: DkimKey) -> bytes:
    import dkim

    signature: bytes = dkim.sign(
        message,
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private_key,
        include_headers=list(SIGNED_HEADERS),
        canonicalize=(b"relaxed", b"relaxed"),
        linesep=b"\r\n",
    )
    return signature + message
