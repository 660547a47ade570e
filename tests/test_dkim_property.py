"""Property: for any header and body content, our signature is one dkimpy verifies,
the very one its own signer makes at the same t=, and no longer verifies once a
signed header or the body is changed."""

from __future__ import annotations

import base64
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter.delivery import dkim_sign

PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = PRIVATE.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
RECORD = b"v=DKIM1; k=rsa; p=" + base64.b64encode(
    PRIVATE.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
)
KEY = dkim_sign.DkimKey("news", "example.org", PEM)
WHEN = 1_700_000_000

# Header text: printable ASCII, 8bit bytes, and runs of spaces and tabs. Not the
# other ASCII controls: dkimpy strips \v and \f as whitespace, RFC 6376 does not.
TEXT = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if (c >= 0x20 and c != 0x7F) or c == 0x09)
) | st.sampled_from([b"", b" ", b"\t", b"  a  ", b"=?utf-8?q?Zo=C3=AB?=", "Zoë".encode()])
NAMES = st.sampled_from(
    [b"To", b"Subject", b"Date", b"Cc", b"Reply-To", b"List-Id", b"Auto-Submitted",
     b"Content-Type", b"X-Mailer", b"Received", b"Comments", b"SUBJECT", b"list-unsubscribe"]
)  # fmt: skip


@st.composite
def header_fields(draw: st.DrawFn) -> bytes:
    """A field, perhaps folded over several lines, each continuation starting with WSP."""
    name = draw(NAMES)
    parts = draw(st.lists(TEXT, min_size=1, max_size=3))
    folds = [draw(st.sampled_from([b" ", b"\t", b"  ", b" \t"])) + p for p in parts[1:]]
    return name + b":" + b"\r\n".join([parts[0], *folds]) + b"\r\n"


LINES = st.lists(
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    | st.sampled_from([b"", b" ", b"\t", b"a  b", b"trailing \t ", b"=3D=20", b".", b"\x00"]),
    max_size=8,
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(header_fields(), max_size=8))
    fields.insert(draw(st.integers(0, len(fields))), b"From: " + draw(TEXT) + b"\r\n")
    # Every line ends with CRLF, as SMTP delivers it (the bodies without one are in
    # test_dkim_cases.py: dkimpy, unlike RFC 6376 3.4.4, adds no CRLF to them).
    body = b"".join(line + b"\r\n" for line in draw(LINES))
    body += b"\r\n" * draw(st.integers(0, 3))  # empty lines at the end: ignored
    return b"".join(fields) + b"\r\n" + body


def lookup(name: bytes, timeout: int = 5) -> bytes:
    assert name == b"news._domainkey.example.org."
    return RECORD


def tags(header: bytes) -> dict[str, str]:
    value = header.decode("ascii").split(":", 1)[1]
    pairs = (tag.split("=", 1) for tag in value.split(";") if tag.strip())
    return {k.strip(): re.sub(r"\s+", "", v) for k, v in pairs}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_dkimpy_verifies_it_and_signs_the_same(message: bytes) -> None:
    ours = dkim_sign.signature(message, KEY, timestamp=WHEN)
    assert dkim.verify(ours + message, dnsfunc=lookup)
    theirs = _dkimpy_sign(message)
    assert tags(ours) == tags(theirs)


def _dkimpy_sign(message: bytes) -> bytes:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dkim.time, "time", lambda: float(WHEN))
        signed: bytes = dkim.sign(
            message,
            b"news",
            b"example.org",
            PEM,
            include_headers=list(dkim_sign.SIGNED_HEADERS),
            canonicalize=(b"relaxed", b"relaxed"),
        )
    return signed


@settings(max_examples=100, deadline=None)
@given(messages(), st.data())
def test_a_changed_header_or_body_fails(message: bytes, data: st.DataObject) -> None:
    raw = dkim_sign.sign(message, KEY)
    head, _, body = message.partition(b"\r\n\r\n")
    # A visible character of the From field or of the body, changed to another.
    start = re.search(rb"(?:^|\r\n)From:", head).end()  # type: ignore[union-attr]
    end = start + len(re.match(rb"[^\r]*", head[start:]).group())  # type: ignore[union-attr]
    spots = [start + m.start() for m in re.finditer(rb"[!-~\x80-\xff]", head[start:end])]
    spots += [len(head) + 4 + m.start() for m in re.finditer(rb"[!-~\x80-\xff]", body)]
    if not spots:
        return
    at = len(raw) - len(message) + data.draw(st.sampled_from(spots))
    changed = raw[:at] + (b"#" if raw[at : at + 1] != b"#" else b"!") + raw[at + 1 :]
    assert not dkim.verify(changed, dnsfunc=lookup)
