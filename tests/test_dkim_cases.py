"""DKIM signatures on awkward messages, checked by two verifiers that share no code with ours.

dkimpy's ``dkim.verify`` (the public key through its ``dnsfunc`` hook) and
OpenDKIM's own library, through the daemon's test mode (``opendkim -t``, the key
from a ``TestPublicKeys`` file). OpenDKIM is skipped, with the reason, where it is
not installed (``apt-get install opendkim``), and required where
NEWSLETTER_TEST_DKIM_VERIFIER_REQUIRED is set (CI).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter.delivery import dkim_sign

DNS_NAME = b"news._domainkey.example.org."
HEAD = b"From: News <news@example.org>\r\nTo: ann@example.org\r\n"

# name -> the message as a composer might give it (CRLF; a body after the blank line).
CASES: dict[str, bytes] = {
    "plain": HEAD + b"Subject: hello\r\n\r\nHello, Ann.\r\n",
    "folded headers": HEAD
    + b"Subject: a subject\r\n  that is folded\r\n\tand folded again\r\n"
    + b"List-Unsubscribe: <https://news.example.org/u/tok>,\r\n <mailto:u@example.org>\r\n"
    + b"\r\nbody\r\n",
    "repeated headers": HEAD
    + b"Received: one\r\nReceived: two\r\nSubject: first\r\nComments: a\r\n"
    + b"Subject: second\r\nComments: b\r\n\r\nbody\r\n",
    "whitespace everywhere": b"From:   News  <news@example.org>   \r\nTo:\tann@example.org\t\r\n"
    + b"Subject:  many    spaces\t\there \r\n\r\n"
    + b"  leading\r\nin  the \t middle\r\ntrailing   \r\n\t\r\n \r\n\r\n\r\n",
    "empty body": HEAD + b"Subject: nothing\r\n\r\n",
    "body of one empty line": HEAD + b"Subject: nothing\r\n\r\n\r\n",
    "body of empty lines": HEAD + b"Subject: nothing\r\n\r\n\r\n\r\n\r\n",
    "no body at all": HEAD + b"Subject: only headers\r\n",
    "long lines": HEAD
    + b"Subject: "
    + b"word " * 190
    + b"end\r\nX-Long: "
    + b"x" * 990
    + b"\r\n\r\n"
    + b"y" * 998
    + b"\r\n"
    + (b"=3D" * 25 + b"=\r\n") * 2000,
    "non-ASCII, RFC 2047": b"From: =?utf-8?q?Zo=C3=AB_M=C3=BCller?= <zoe@example.org>\r\n"
    + b"To: =?utf-8?b?Sm9zw6k=?= <jose@example.org>\r\n"
    + b"Subject: =?utf-8?q?Caf=C3=A9_et_cr=C3=A8me?=\r\n =?utf-8?q?_br=C3=BBl=C3=A9e?=\r\n"
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
    + b"\r\n\r\nCaf=C3=A9\r\n",
    "8bit": "From: Zoë <zoe@example.org>\r\nTo: José <jose@example.org>\r\n"
    "Subject: Ünïcödé   en  route\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße  aus\tKöln \r\n日本語\r\n".encode(),
    "signed headers present": HEAD
    + b"Subject: s\r\nCc: bob@example.org\r\nReply-To: r@example.org\r\n"
    + b"Auto-Submitted: auto-generated\r\nList-Id: <l.example.org>\r\n"
    + b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nb\r\n",
}
# A body without its final CRLF: SMTP adds one (RFC 5321 4.1.1.4), and so does
# relaxed canonicalisation (RFC 6376 3.4.4), so the signature is of the message as
# it arrives. dkimpy hashes the bytes it is given as they are (it adds no CRLF),
# so it is shown the message as received; so is OpenDKIM, whose test mode reports
# a file without a final line end as "not signed".
NO_FINAL_CRLF: dict[str, bytes] = {
    "no final CRLF": HEAD + b"Subject: s\r\n\r\nfirst\r\nlast line",
    "no final CRLF, trailing spaces": HEAD + b"Subject: s\r\n\r\nlast line  \t ",
    "no final CRLF, one space": HEAD + b"Subject: s\r\n\r\n ",
}
ALL = {**CASES, **NO_FINAL_CRLF}


@pytest.fixture(scope="module")
def key_and_record(tmp_path_factory: pytest.TempPathFactory) -> tuple[dkim_sign.DkimKey, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path_factory.mktemp("dkim") / "news.pem"
    path.write_bytes(pem)
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return dkim_sign.load_key(path, "news", "example.org"), b"v=DKIM1; k=rsa; p=" + (
        base64.b64encode(der)
    )


def dnsfunc(record: bytes) -> Callable[..., bytes]:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == DNS_NAME
        return record

    return lookup


def as_received(raw: bytes) -> bytes:
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


def dkimpy_verifies(raw: bytes, record: bytes) -> bool:
    return bool(dkim.verify(as_received(raw), dnsfunc=dnsfunc(record)))


def tampered(raw: bytes) -> dict[str, bytes]:
    """Changes the signature must not survive, each with its name."""
    at = raw.index(b"\r\nFrom:") + 2
    sig, message = raw[:at], raw[at:]
    head, sep, body = message.partition(b"\r\n\r\n")
    changes = {
        "From changed": sig + message.replace(b"example.org>", b"example.com>", 1),
        # Below the others: a verifier hashes the bottom-most of each name (a copy
        # added above the signed one is the one it does not look at; see h=).
        "Subject added below": sig + head + b"\r\nSubject: forged" + sep + body,
    }
    # Over-signed: named in h= though absent, so one added anywhere breaks it.
    for name in (b"Cc", b"Reply-To", b"Auto-Submitted", b"List-Id"):
        if not re.search(rb"(?im)^" + name + rb":", head):
            changes[f"{name.decode()} added"] = sig + name + b": forged\r\n" + message
    if re.search(rb"[^\s]", body):
        changed = re.sub(rb"[^\s]", b"#" if not body.startswith(b"#") else b"!", body, count=1)
        changes["body changed"] = sig + head + sep + changed
    changes["body line added"] = sig + head + (sep or b"\r\n\r\n") + body + b"\r\nP.S. forged\r\n"
    return changes


@pytest.mark.parametrize("name", ALL)
def test_dkimpy_verifies_each_case_and_no_change_survives(
    key_and_record: tuple[dkim_sign.DkimKey, bytes], name: str
) -> None:
    key, record = key_and_record
    raw = dkim_sign.sign(ALL[name], key)
    assert raw.endswith(ALL[name])
    assert dkimpy_verifies(raw, record), name
    for what, changed in tampered(raw).items():
        assert not dkimpy_verifies(changed, record), f"{name}: {what} still verifies"
    # A header the signature does not name may be added (relays add Received).
    assert dkimpy_verifies(b"Received: by relay\r\n" + raw, record)


@pytest.mark.parametrize("name", NO_FINAL_CRLF)
def test_a_body_without_final_crlf_is_hashed_with_one(
    key_and_record: tuple[dkim_sign.DkimKey, bytes], name: str
) -> None:
    raw = dkim_sign.sign(NO_FINAL_CRLF[name], key_and_record[0])
    body = NO_FINAL_CRLF[name].split(b"\r\n\r\n", 1)[1]
    # RFC 6376 3.4.4 by hand: trailing WSP of the line goes, one CRLF ends it.
    canonical = re.sub(rb"[ \t]+", b" ", body).rstrip(b" \t") + b"\r\n"
    canonical = b"" if canonical == b"\r\n" else canonical
    expected = base64.b64encode(hashlib.sha256(canonical).digest())
    assert b"bh=" + expected + b";" in raw


@pytest.mark.parametrize("name", CASES)
def test_the_same_signature_as_dkimpys_signer(
    key_and_record: tuple[dkim_sign.DkimKey, bytes], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RSA PKCS#1 v1.5 is deterministic: at the same t=, the same bytes hashed give the
    same b= as dkimpy's own signer, so our canonical form is byte for byte its."""
    key, _ = key_and_record
    ours = dkim_sign.signature(CASES[name], key, timestamp=1_700_000_000)
    monkeypatch.setattr(dkim.time, "time", lambda: 1_700_000_000.0)
    theirs = dkim.sign(
        CASES[name],
        b"news",
        b"example.org",
        key.private_key,
        include_headers=list(dkim_sign.SIGNED_HEADERS),
        canonicalize=(b"relaxed", b"relaxed"),
    )
    assert tags(ours) == tags(theirs)


def tags(header: bytes) -> dict[str, str]:
    value = header.decode("ascii").split(":", 1)[1]
    pairs = (tag.split("=", 1) for tag in value.split(";") if tag.strip())
    return {k.strip(): re.sub(r"\s+", "", v) for k, v in pairs}


# ---------------------------------------------------------------------- OpenDKIM

REQUIRED = bool(os.environ.get("NEWSLETTER_TEST_DKIM_VERIFIER_REQUIRED"))
OPENDKIM = shutil.which("opendkim") or shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")


@pytest.fixture(scope="module")
def opendkim(
    key_and_record: tuple[dkim_sign.DkimKey, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[bytes], str]:
    """A function: message -> OpenDKIM's dkim= result for it (pass, fail, ...)."""
    if OPENDKIM is None:
        why = "OpenDKIM is not installed (apt-get install opendkim): no second verifier"
        if REQUIRED:
            pytest.fail(f"NEWSLETTER_TEST_DKIM_VERIFIER_REQUIRED is set, but {why}")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("opendkim")
    keys = folder / "keys"
    keys.write_bytes(DNS_NAME.rstrip(b".") + b" " + key_and_record[1] + b"\n")
    conf = folder / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\n", encoding="ascii")

    def verify(raw: bytes) -> str:
        message = folder / "message.eml"
        message.write_bytes(raw)
        # -t: test mode, the message from a file; -vv: the Authentication-Results it
        # would add, on standard output.
        done = subprocess.run(
            [OPENDKIM, "-x", str(conf), "-t", str(message), "-vv"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        found = re.search(rb"dkim=(\w+)", done.stdout + done.stderr)
        assert found, (done.stdout + done.stderr).decode(errors="replace")
        return found.group(1).decode()

    return verify


@pytest.mark.parametrize("name", ALL)
def test_opendkim_verifies_each_case_and_no_change_survives(
    key_and_record: tuple[dkim_sign.DkimKey, bytes], opendkim: Callable[[bytes], str], name: str
) -> None:
    raw = dkim_sign.sign(ALL[name], key_and_record[0])
    assert opendkim(as_received(raw)) == "pass", name
    for what, changed in tampered(raw).items():
        assert opendkim(as_received(changed)) == "fail", f"{name}: {what} still passes OpenDKIM"
