"""VERP envelope senders: each message's MAIL FROM names its delivery, signed; forged,
altered or foreign addresses name nothing. End to end through the real CLI and the test
SMTP server."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_cli
from newsletter.verp import Delivered, Verp
from smtp_server import Server
from test_send_cli import env_for, write_csv

KEY = b"test-secret-for-the-suite-0123456789"
VERP = Verp("bounces@bounce.example.org", KEY)


def test_an_envelope_sender_names_its_delivery_and_nothing_else() -> None:
    address = VERP.sender(7, 42)
    local, _, domain = address.partition("@")
    assert domain == "bounce.example.org" and local.startswith("bounces+a")
    assert len(local) <= 64 and re.fullmatch(r"[a-z0-9+]+", local)  # safe in any MTA
    assert VERP.read(address) == Delivered(7, 42)
    assert VERP.read(f"<{address}>") == Delivered(7, 42)  # as a header may carry it
    assert VERP.read(address.upper()) == Delivered(7, 42)  # a system that changed the case
    assert VERP.sender(7, 43) != address and VERP.sender(8, 42) != address
    assert VERP.read(VERP.sender(2**32 - 1, 0)) == Delivered(2**32 - 1, 0)


def test_forged_altered_and_foreign_addresses_name_nothing() -> None:
    address = VERP.sender(7, 42)
    local, _, domain = address.partition("@")
    token = local.split("+", 1)[1]
    for i in range(1, len(token)):  # every character changed, one at a time
        for c in "a2z7":
            if token[i] != c:
                altered = token[:i] + c + token[i + 1 :]
                assert VERP.read(f"bounces+{altered}@{domain}") is None, altered
    others = [
        Verp("bounces@bounce.example.org", b"another key").sender(7, 42),  # another deployment
        f"bounces+{token}@elsewhere.example.org",
        f"other+{token}@{domain}",
        f"bounces@{domain}",  # the plain address: no delivery
        f"bounces+b{token[1:]}@{domain}",  # a version we do not know
        f"bounces+{token}x@{domain}",
        f"bounces+{token[:-1]}@{domain}",
        f"bounces+{token}",
        "",
        "@",
        "+@",
        f"bounces+{'a' * 5000}@{domain}",
        f"bounces+{token[:-1]}\u0131@{domain}",  # a dotless i, which upper() makes an I
        f"bounces+{token}@{domain}@{domain}",
        f"bounces+{token.replace('k', chr(0x212A))}@{domain}" if "k" in token else "x",
        f"bounces+{token}@{domain}".replace("b", "\uff42", 1),  # fullwidth b
    ]
    for other in others:
        assert VERP.read(other) is None, other


def test_the_last_character_spelt_another_way_is_refused() -> None:
    """Base32 of 16 bytes leaves two spare bits in the last character: the same bytes can
    be spelt four ways, and only ours is one of ours."""
    address = VERP.sender(7, 42)
    local, _, domain = address.partition("@")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(local[-1])
    for spare in range(1, 4):
        spelt = local[:-1] + alphabet[last ^ spare]
        assert VERP.read(f"{spelt}@{domain}") is None


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def test_a_send_gives_each_message_the_envelope_sender_of_its_row(
    project: Path, server: Server
) -> None:
    env = env_for(server, project, NEWSLETTER_BOUNCE_ADDRESS="Bounces <bounces@bounce.example.org>")
    emails = write_csv(project, 12)
    run_cli("subscribers", "import", "subs.csv", "--list", "research-news", cwd=project, env=env)
    done = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    verp = Verp("bounces@bounce.example.org", env["NEWSLETTER_SECRET_KEY"].encode())
    conn = sqlite3.connect(project / "newsletter.sqlite3")
    try:
        rows = dict(conn.execute("SELECT seq, email FROM deliveries"))
        (send_id,) = conn.execute("SELECT id FROM sends").fetchone()
    finally:
        conn.close()
    named = {}
    for message in server.handler.received:
        found = verp.read(message.mail_from)
        assert found is not None and found.send_id == send_id, message.mail_from
        named[message.rcpt_tos[0]] = rows[found.seq]
    assert sorted(named) == emails and all(k == v for k, v in named.items())
    # A test copy is outside the send log: the plain bounce address.
    copy = run_cli("send", f"issues/{EXAMPLE.name}", "--to", "editor@example.org",
                   cwd=project, env=env)  # fmt: skip
    assert copy.returncode == 0, copy.stdout + copy.stderr
    assert server.handler.to("editor@example.org")[-1].mail_from == "bounces@bounce.example.org"


def test_a_send_id_or_seq_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="send id and seq"):
        VERP.sender(2**32, 0)
    with pytest.raises(ValueError, match="send id and seq"):
        VERP.sender(1, -1)


def test_no_verp_without_a_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from newsletter.settings import Settings

    monkeypatch.delenv("NEWSLETTER_SECRET_KEY", raising=False)
    plain = Settings(bounce_address="bounces@bounce.example.org", _env_file=None)  # type: ignore[call-arg]
    assert plain.verp is None  # a public key would let anyone forge tokens
    keyed = Settings(
        bounce_address="bounces@bounce.example.org", secret_key="k" * 40, _env_file=None
    )  # type: ignore[call-arg]
    assert keyed.verp is not None
