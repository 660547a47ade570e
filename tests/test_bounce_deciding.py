"""Deciding what a bounce means for its address (newsletter.bounces.deciding): by the
status code's subject, so that a provider's block of our mail (5.7.x) never empties the
list, and our own session's refusals are judged the same way (bounces.refusals)."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.bounces.deciding import decide, permanent_weight
from newsletter.bounces.reading import read
from newsletter.bounces.refusals import judge_refusal
from newsletter.storage.evidence import SentTo
from newsletter.verp import Verp

SAMPLES = Path(__file__).parent / "data" / "feedback"
VERP = Verp("bounces@bounce.example.org", b"test-secret-for-the-suite-0123456789")
SENT = SentTo(3, 17, "reader0001@example.org", "2026-12-02", "research-news", "sent")


@pytest.mark.parametrize(
    ("status", "weight"),
    [
        ("5.1.1", "hard"),  # no such user
        ("5.1.2", "hard"),  # no such domain
        ("5.1.10", "hard"),  # null MX (Exchange's "recipient not found" too)
        ("5.2.1", "hard"),  # mailbox disabled
        ("5.4.4", "hard"),  # unroutable
        ("5.0.0", "soft"),  # says nothing of why: counted, not suppressed at once
        ("5.2.2", "soft"),  # mailbox full
        ("5.4.7", "soft"),  # delivery time expired
        ("5.1.7", "none"),  # our sender's address
        ("5.1.8", "none"),
        ("5.2.3", "none"),  # the message too large
        ("5.6.0", "none"),  # content
        ("5.7.1", "none"),  # policy: blocked, spam
        ("5.7.26", "none"),  # DMARC
        ("5.9.9", "none"),  # a class RFC 3463 does not define
    ],
)
def test_a_permanent_failure_weighs_by_what_its_code_is_about(status: str, weight: str) -> None:
    assert permanent_weight(status) == weight


def bounced_with(status: str, diagnostic: str) -> bytes:
    raw = (SAMPLES / "postfix-unknown-user.eml").read_bytes()
    raw = raw.replace(b"{verp}", VERP.sender(3, 17).encode())
    raw = raw.replace(b"Status: 5.1.1", f"Status: {status}".encode())
    old = b"550 5.1.1 <reader0001@example.org>: Recipient address\r\n    rejected: User unknown"
    if old not in raw:
        old = old.replace(b"\r\n", b"\n")
    assert old in raw  # the sample as this test knows it
    return raw.replace(old, diagnostic.encode())


def test_a_dsn_for_a_blocked_message_suppresses_nobody() -> None:
    blocked = read(bounced_with("5.7.1", "550 5.7.1 Message rejected as spam"), VERP)
    assert blocked.kind == "hard"  # the reader says what the report says: permanent
    decision = decide(blocked, SENT)
    assert decision.action == "note" and decision.reason is None
    assert "not of the address" in decision.why
    vague = decide(read(bounced_with("5.0.0", "550 5.0.0 Unrouteable address"), VERP), SENT)
    assert vague.action == "soft" and "counted as a soft bounce" in vague.why
    gone = decide(read(bounced_with("5.1.1", "550 5.1.1 no such user"), VERP), SENT)
    assert (gone.action, gone.reason, gone.email) == ("suppress", "bounced", SENT.email)


@pytest.mark.parametrize(
    ("code", "detail", "action"),
    [
        (550, "RCPT TO: 5.1.1 <x@example.org>: Recipient address rejected", "suppress"),
        (552, "RCPT TO: 5.2.2 Mailbox full", "soft"),
        (550, "RCPT TO: 5.0.0 Unrouteable address", "soft"),
        (554, "RCPT TO: 5.7.1 Service unavailable; client host blocked using Spamhaus", "note"),
        (550, "DATA: 5.7.26 Unauthenticated email is not accepted", "note"),
        (550, "RCPT TO: No such user here", "note"),  # no code: words are not enough
        (550, "RCPT TO: see 25.1.1.1 in the FAQ", "note"),  # not a status code at all
    ],
)
def test_our_own_sessions_refusals_weigh_as_bounces_do(code: int, detail: str, action: str) -> None:
    assert judge_refusal(code, detail).action == action
