"""DKIM signing: a real RSA key, verified by dkimpy against the matching public key."""

from __future__ import annotations

import base64
import datetime as dt
import pickle
import re
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import EXAMPLE, build_file, sender
from newsletter.delivery import dkim_sign
from newsletter.delivery.message import MessageTemplate
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


def rsa_pem(bits: int) -> bytes:
    """An RSA key of any size: `cryptography` will not generate one under 1024 bits,
    so weak keys for the refusal test are made from primes found here."""
    import math
    import secrets

    if bits >= 1024:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:

        def prime(size: int) -> int:
            while True:
                n = secrets.randbits(size) | (1 << (size - 1)) | 1
                if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)):
                    return n

        e = 65537
        while True:
            p, q = prime(bits // 2), prime(bits // 2)
            phi = (p - 1) * (q - 1)
            if p != q and math.gcd(e, phi) == 1 and (p * q).bit_length() == bits:
                break
        d = pow(e, -1, phi)
        numbers = rsa.RSAPrivateNumbers(
            p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
        )
        key = numbers.private_key()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_key_size_is_checked_when_the_key_is_loaded(tmp_path: Path) -> None:
    weak = tmp_path / "weak.pem"
    weak.write_bytes(rsa_pem(768))
    with pytest.raises(ConfigError, match=r"768-bit RSA.*under 1024 bits") as info:
        dkim_sign.load_key(weak, "news", "example.org")
    assert "NEWSLETTER_DKIM_KEY_FILE" in str(info.value) and str(weak) in str(info.value)
    short = tmp_path / "short.pem"
    short.write_bytes(rsa_pem(1024))
    key = dkim_sign.load_key(short, "news", "example.org")
    assert key.bits == 1024 and key.weak  # accepted, with a warning from the CLI


def test_strong_key_is_not_weak(keypair: tuple[Path, bytes]) -> None:
    key = dkim_sign.load_key(keypair[0], "news", "example.org")
    assert key.bits == 2048 and not key.weak


@pytest.mark.parametrize(
    "selector", ["s1; x=y", "", "-news", "news-", "new s", "news.", "a..b", "sél", "x" * 64]
)
def test_selector_must_be_dns_labels(keypair: tuple[Path, bytes], selector: str) -> None:
    with pytest.raises(ConfigError, match="NEWSLETTER_DKIM_SELECTOR"):
        dkim_sign.load_key(keypair[0], selector, "example.org")


@pytest.mark.parametrize("selector", ["news", "news.2026", "s-1", "2026"])
def test_good_selectors(keypair: tuple[Path, bytes], selector: str) -> None:
    assert dkim_sign.load_key(keypair[0], selector, "example.org").selector == selector


@pytest.mark.parametrize("domain", ["example", "exa mple.org", "example.org;x=y", "exämple.org"])
def test_domain_must_be_a_domain(keypair: tuple[Path, bytes], domain: str) -> None:
    with pytest.raises(ConfigError, match="NEWSLETTER_DKIM_DOMAIN"):
        dkim_sign.load_key(keypair[0], "news", domain)


def test_cli_refuses_a_weak_key_warns_on_a_short_one_and_checks_the_selector(
    project: Path, tmp_path: Path
) -> None:
    from conftest import run_cli

    env = {
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_DKIM_SELECTOR": "news",
    }
    args = ("send", f"issues/{EXAMPLE.name}", "--to", "ed@example.org", "--dry-run")
    weak = tmp_path / "weak.pem"
    weak.write_bytes(rsa_pem(768))
    refused = run_cli(*args, cwd=project, env={**env, "NEWSLETTER_DKIM_KEY_FILE": str(weak)})
    assert refused.returncode == 1 and "768-bit RSA" in refused.stderr
    assert "NEWSLETTER_DKIM_KEY_FILE" in refused.stderr
    assert not (project / "build" / "2020-12-23" / "test-copies").exists()
    short = tmp_path / "short.pem"
    short.write_bytes(rsa_pem(1024))
    warned = run_cli(*args, cwd=project, env={**env, "NEWSLETTER_DKIM_KEY_FILE": str(short)})
    assert warned.returncode == 0, warned.stderr
    assert "warning: the DKIM key" in warned.stderr and "1024-bit RSA; use 2048" in warned.stderr
    bad = {**env, "NEWSLETTER_DKIM_KEY_FILE": str(short), "NEWSLETTER_DKIM_SELECTOR": "s1; x=y"}
    selector = run_cli(*args, cwd=project, env=bad)
    assert selector.returncode == 1
    assert "NEWSLETTER_DKIM_SELECTOR: 's1; x=y' is not a DKIM selector" in selector.stderr


def test_cli_warns_when_the_signing_domain_does_not_align_with_from(
    project: Path, keypair: tuple[Path, bytes]
) -> None:
    from conftest import run_cli

    env = {
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_DKIM_SELECTOR": "news",
        "NEWSLETTER_DKIM_KEY_FILE": str(keypair[0]),
    }
    args = ("send", f"issues/{EXAMPLE.name}", "--to", "ed@example.org", "--dry-run")
    for domain, warned in (("other.example", True), ("example.org", False), ("EXAMPLE.org", False)):
        result = run_cli(*args, cwd=project, env={**env, "NEWSLETTER_DKIM_DOMAIN": domain})
        assert result.returncode == 0, result.stderr
        assert ("DMARC will not count this signature" in result.stderr) == warned, domain


def test_a_key_file_that_is_not_a_key_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than any RSA key"):
        dkim_sign.load_key(Path("/dev/zero"), "news", "example.org")
    with pytest.raises(ConfigError, match="cannot read the DKIM key"):
        dkim_sign.load_key(tmp_path, "news", "example.org")


# ---------------------------------------------------------------------- the header we write

MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"


def test_the_header_names_todays_headers_and_auto_submitted(keypair: tuple[Path, bytes]) -> None:
    key = dkim_sign.load_key(keypair[0], "news", "example.org")
    header = dkim_sign.signature(MESSAGE, key, timestamp=1_608_681_600)
    assert header.endswith(b"\r\n") and dkim_sign.sign(MESSAGE, key).endswith(MESSAGE)
    unfolded = header.decode("ascii").replace("\r\n", "")
    tags = dict(t.strip().split("=", 1) for t in unfolded.split(":", 1)[1].split(";"))
    assert tags["h"].replace(" ", "") == (
        "from:to:subject:date:message-id:mime-version:content-type:list-id:"
        "list-unsubscribe:list-unsubscribe-post:reply-to:cc:auto-submitted"
    )
    assert (tags["v"], tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "1", "rsa-sha256", "relaxed/relaxed", "example.org", "news"
    )  # fmt: skip
    assert tags["t"] == "1608681600" and "l" not in tags and "x" not in tags
    assert len(base64.b64decode(tags["b"].replace(" ", ""))) == 256  # RSA-2048
    # Folded: no line over 78 characters, b= on lines of its own.
    lines = header.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert all(line.startswith((b" ", b"\t")) for line in lines[1:])
    assert sum(line.startswith(b" b=") for line in lines) == 1
    # Without a timestamp, t= is now.
    t = int(re.search(rb"t=(\d+);", dkim_sign.signature(MESSAGE, key)).group(1))  # type: ignore[union-attr]
    assert abs(t - time.time()) < 60


def test_a_bare_cr_or_lf_is_refused(keypair: tuple[Path, bytes]) -> None:
    key = dkim_sign.load_key(keypair[0], "news", "example.org")
    for bad in (MESSAGE.replace(b"body\r\n", b"bo\ndy\r\n"), MESSAGE + b"x\r", b"From: a\n\nb\n"):
        with pytest.raises(ValueError, match="bare CR or LF"):
            dkim_sign.sign(bad, key)
    with pytest.raises(ValueError, match="not a header field"):
        dkim_sign.sign(b"From a@example.org\r\n\r\nb\r\n", key)


def test_the_key_is_parsed_once_and_travels_to_another_process_as_pem(
    keypair: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = dkim_sign.load_key(keypair[0], "news", "example.org")
    monkeypatch.setattr(
        serialization, "load_pem_private_key", lambda *a, **k: pytest.fail("parsed again")
    )
    signed = dkim_sign.sign(MESSAGE, key, timestamp=1)
    monkeypatch.undo()
    again = pickle.loads(pickle.dumps(key))  # noqa: S301 - our own bytes, as a process pool does
    assert again == key and again.bits == 2048
    assert dkim_sign.sign(MESSAGE, again, timestamp=1) == signed
    assert dkim.verify(signed, dnsfunc=dns_for(keypair[1]))


def test_a_key_that_is_not_rsa_or_is_encrypted_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    others = {
        "ed25519.pem": ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "encrypted.pem": rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    }  # fmt: skip
    for name, pem in others.items():
        (tmp_path / name).write_bytes(pem)
        with pytest.raises(ConfigError, match="not a usable DKIM private key") as info:
            dkim_sign.load_key(tmp_path / name, "news", "example.org")
        assert "NEWSLETTER_DKIM_KEY_FILE" in str(info.value)
