"""DKIM signing: a real RSA key, verified by dkimpy against the matching public key."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import EXAMPLE, build_file, sender
from newsletter import dkim_sign
from newsletter.compose import MessageTemplate
from newsletter.errors import ConfigError
from newsletter.models import Recipient


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path = tmp_path_factory.mktemp("dkim") / "news.pem"
    path.write_bytes(pem)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return path, record


def dns_for(record: bytes) -> object:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"news._domainkey.example.org."
        return record

    return lookup


def test_signed_message_verifies_and_covers_one_click_headers(
    project: Path, keypair: tuple[Path, bytes]
) -> None:
    path, record = keypair
    key = dkim_sign.load_key(path, "news", "example.org")
    rendered = build_file(project / "issues" / EXAMPLE.name, project).rendered
    template = MessageTemplate(rendered, sender(), signer=lambda m: dkim_sign.sign(m, key))
    raw = template.personalise(
        Recipient("ann@example.org", "Ann", "Lee"), date=dt.datetime(2020, 12, 23, tzinfo=dt.UTC)
    )
    assert raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;")
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii").replace("\r\n ", " ").lower()
    signed = head.split(" h=", 1)[1].split(";", 1)[0].replace(" ", "").split(":")
    for name in ("from", "to", "subject", "list-unsubscribe", "list-unsubscribe-post", "reply-to"):
        assert name in signed
    assert dkim.verify(raw, dnsfunc=dns_for(record))
    tampered = raw.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"X-Nothing: 1")
    assert not dkim.verify(tampered, dnsfunc=dns_for(record))


def test_unusable_key_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a usable DKIM private key"):
        dkim_sign.load_key(bad, "news", "example.org")
    with pytest.raises(ConfigError, match="cannot read the DKIM key"):
        dkim_sign.load_key(tmp_path / "missing.pem", "news", "example.org")
