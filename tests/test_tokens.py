"""Tokens: round trip, opaque, and nothing forged or altered passes (versions 1 and 2)."""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import re
from pathlib import Path

import pytest

from conftest import EXAMPLE, TEST_KEY, build_file, sender
from newsletter import tokens
from newsletter.delivery.message import MessageTemplate, Sender
from newsletter.models import Recipient, RenderedIssue
from newsletter.render import placeholders

KEY = b"k" * 32


def test_round_trip_and_case_insensitive_address() -> None:
    token = tokens.sign(KEY, "research-news", "Ann@Example.org")
    assert tokens.verify(KEY, token) == tokens.TokenSubject("research-news", "ann@example.org")
    assert token == tokens.sign(KEY, "research-news", "ann@example.org")
    assert len(token) < 120 and token.isascii()
    assert all(c.isalnum() or c in "-_." for c in token)


def test_non_ascii_list_and_address() -> None:
    token = tokens.sign(KEY, "nouvelles-recherche", "zoë@exämple.org")
    assert tokens.verify(KEY, token) == tokens.TokenSubject(
        "nouvelles-recherche", "zoë@exämple.org"
    )


def test_every_single_character_change_is_rejected() -> None:
    token = tokens.sign(KEY, "research-news", "ann@example.org")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(token):
        if ch == ".":
            continue
        for other in (
            alphabet[(alphabet.index(ch) + 1) % 64],
            alphabet[(alphabet.index(ch) + 7) % 64],
        ):
            altered = token[:i] + other + token[i + 1 :]
            if altered != token:
                assert tokens.verify(KEY, altered) is None, altered


def test_other_key_and_forged_payloads_are_rejected() -> None:
    token = tokens.sign(KEY, "research-news", "ann@example.org")
    assert tokens.verify(b"another key", token) is None
    _body, mac = token.split(".")
    forged_body = tokens.sign(b"attacker", "research-news", "bob@example.org").split(".")[0]
    assert tokens.verify(KEY, f"{forged_body}.{mac}") is None


@pytest.mark.parametrize(
    "bad", ["", ".", "abc", "a.b.c", "!!!.???", "é.é", "AAAA.AAAA", "x" * 5000]
)
def test_malformed_tokens_are_rejected(bad: str) -> None:
    assert tokens.verify(KEY, bad) is None


# -- version 2: opaque, with a kind and an issue time ---------------------------------

SENT = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)


def test_v2_round_trip_with_kind_and_time() -> None:
    for kind in (tokens.Kind.UNSUBSCRIBE, tokens.Kind.PREFERENCES, tokens.Kind.UNDO):
        token = tokens.make(KEY, kind, "research-news", "Ann@Example.org", SENT)
        assert tokens.read(KEY, token) == tokens.TokenSubject(
            "research-news", "ann@example.org", kind, SENT
        )
        assert all(c.isalnum() or c in "-_" for c in token) and len(token) < 100
    # deterministic: the same link for the same inputs, so builds repeat exactly
    assert tokens.make(KEY, tokens.Kind.UNSUBSCRIBE, "l", "a@b.org", SENT) == tokens.make(
        KEY, tokens.Kind.UNSUBSCRIBE, "l", "a@b.org", SENT
    )
    assert tokens.read(KEY, tokens.sign(KEY, "l", "a@b.org")) == tokens.TokenSubject(
        "l", "a@b.org", tokens.Kind.LEGACY, None
    )
    assert tokens.read(KEY, "zoë") is None


def test_v2_tokens_are_opaque() -> None:
    """Nothing in the token says which address or list it is for, nor how long it is."""
    short = tokens.make(KEY, tokens.Kind.UNSUBSCRIBE, "research-news", "ann@example.org", SENT)
    longer = tokens.make(KEY, tokens.Kind.UNSUBSCRIBE, "research-news", "anne@example.org", SENT)
    raw = base64.urlsafe_b64decode(short + "=" * (-len(short) % 4))
    for secret in (b"ann", b"example", b"research"):
        assert secret not in raw and secret not in short.encode()
        assert base64.urlsafe_b64encode(secret)[:3] not in short.encode()
    assert len(short) == len(longer)  # padded: the length hides the address's length
    other_kind = tokens.make(KEY, tokens.Kind.PREFERENCES, "research-news", "ann@example.org", SENT)
    assert other_kind[:8] != short[:8]  # no shared prefix to correlate links with


def test_v2_every_single_character_change_is_rejected() -> None:
    token = tokens.make(KEY, tokens.Kind.UNSUBSCRIBE, "research-news", "ann@example.org", SENT)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tried = 0
    for i, ch in enumerate(token):
        for step in (1, 7, 32):
            altered = token[:i] + alphabet[(alphabet.index(ch) + step) % 64] + token[i + 1 :]
            assert tokens.read(KEY, altered) is None, altered
            tried += 1
    for cut in (token[:-1], token[1:], token + "A", token[:-4], token + "AAAA", token + "."):
        assert tokens.read(KEY, cut) is None, cut
    assert tried == 3 * len(token)


def test_v2_other_key_or_forged_bytes_are_rejected() -> None:
    token = tokens.make(KEY, tokens.Kind.UNDO, "research-news", "ann@example.org", SENT)
    assert tokens.read(b"another key", token) is None
    assert tokens.read(KEY, tokens.make(b"x" * 32, tokens.Kind.UNDO, "l", "a@b.org", SENT)) is None
    for size in (0, 1, 15, 16, 17, 48, 700):
        assert tokens.read(KEY, base64.urlsafe_b64encode(b"\0" * size).decode().rstrip("=")) is None


def test_v2_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="NUL"):
        tokens.make(KEY, tokens.Kind.UNSUBSCRIBE, "l", "a\0@b.org", SENT)
    with pytest.raises(ValueError, match="time zone"):
        tokens.make(KEY, tokens.Kind.UNSUBSCRIBE, "l", "a@b.org", dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="sign"):
        tokens.make(KEY, tokens.Kind.LEGACY, "l", "a@b.org", SENT)


def test_list_unsubscribe_stays_within_998_octets_a_line_for_the_longest_address() -> None:
    """A 254-character address (the most SMTP allows), through the real header code."""
    local = "a" * 64
    domain = ".".join(["b" * 63, "c" * 63, "d" * 57]) + ".org"
    address = f"{local}@{domain}"
    assert len(address) == 254

    def header(list_name: str, public_url: str, mailto: str) -> bytes:
        sender = Sender("News", "news@example.org", list_name, public_url, KEY, mailto)
        html = f"<p>{placeholders.UNSUBSCRIBE_URL}</p>"
        rendered = RenderedIssue("2026-12-03", "Subject", None, "en", html, "text", "")
        raw = MessageTemplate(rendered, sender).personalise(Recipient(address), date=SENT)
        lines = raw.split(b"\r\n")
        at = next(i for i, h in enumerate(lines) if h.startswith(b"List-Unsubscribe:"))
        link, mailto = lines[at], lines[at + 1]  # folded once, between the two URIs
        assert mailto.startswith(b" <mailto:") and not lines[at + 2].startswith(b" ")
        token = link.split(b"/unsubscribe/")[1].split(b">")[0].decode()
        assert tokens.read(KEY, token) == tokens.TokenSubject(
            list_name, address, tokens.Kind.UNSUBSCRIBE, SENT
        )
        assert mailto.endswith(f"?subject=unsubscribe%20{token}>".encode())
        return link, mailto

    # measured: a 406-character token; lines of 464 and 462 octets with our usual settings
    usual = header("research-news", "https://news.example.org", "unsubscribe@example.org")
    assert len(usual[0].split(b"/unsubscribe/")[1].split(b">")[0]) == 406
    assert [len(line) for line in usual] == [464, 462] and b"=?" not in b"".join(usual)
    # and at most 998 with every setting at its longest: a 64-character list name, a
    # 200-character public URL and a 254-character unsubscribe address
    longest = header("l" * 64, "https://" + "u" * 192, "m" * 64 + "@" + domain[:189])
    assert max(len(line) for line in longest) <= 998, [len(line) for line in longest]


def test_the_preview_and_every_message_carry_v2_links_of_their_date(project: Path) -> None:
    """The preview's links are dated like its Date header (so builds repeat); a sent
    message's links are dated by the Date it carries."""
    from newsletter.settings import PREVIEW_KEY

    result = build_file(project / "issues" / EXAMPLE.name, project)
    eml = email.message_from_bytes(result.eml, policy=email.policy.default)
    date = eml["Date"].datetime
    found = re.findall(
        r"https://news\.example\.org/(unsubscribe|preferences)/([\w-]+)", result.html
    )
    assert {kind for kind, _ in found} == {"unsubscribe", "preferences"}
    for kind, token in found:
        subject = tokens.read(TEST_KEY, token)
        assert subject is not None and subject.issued == date
        assert subject.kind.name.lower() == kind and subject.email == "sam.sample@example.org"
    later = dt.datetime(2026, 12, 3, 9, 0, 5, tzinfo=dt.UTC)
    raw = MessageTemplate(result.rendered, sender()).personalise(
        Recipient("ann@example.org"), date=later
    )
    link = str(email.message_from_bytes(raw, policy=email.policy.default)["List-Unsubscribe"])
    subject = tokens.read(TEST_KEY, link.split("/unsubscribe/")[1].split(">", maxsplit=1)[0])
    assert subject == tokens.TokenSubject(
        "research-news", "ann@example.org", tokens.Kind.UNSUBSCRIBE, later
    )
    assert PREVIEW_KEY != TEST_KEY  # the preview key signs the same way when no secret is set
    token = tokens.make(PREVIEW_KEY, tokens.Kind.UNSUBSCRIBE, "l", "a@b.org", date)
    assert tokens.read(PREVIEW_KEY, token) is not None and tokens.read(TEST_KEY, token) is None
