"""Signed unsubscribe tokens: round trip, and nothing forged or altered passes."""

from __future__ import annotations

import pytest

from newsletter import tokens

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
