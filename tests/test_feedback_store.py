"""The feedback store and its processor on both backends: each message from the mail
system kept with its evidence, suppressions made in the same transaction, soft bounces
counted by send with decay, the same message twice changing nothing, and nobody
suppressed on a message that does not name their own delivery."""

from __future__ import annotations

import datetime as dt
import re
import threading
from contextlib import closing
from pathlib import Path

import pytest

from newsletter.bounces.processing import Processed, process
from newsletter.models import Recipient
from newsletter.storage import Storage, open_storage
from newsletter.storage.evidence import RAW_KEEP, SoftBounces
from newsletter.verp import Verp

SAMPLES = Path(__file__).parent / "data" / "feedback"
VERP = Verp("bounces@bounce.example.org", b"test-secret-for-the-suite-0123456789")
SOFT = SoftBounces(limit=3, days=30)
READER = "reader0001@example.org"


def sample(name: str, verp: str, address: str = READER, *, tag: str = "") -> bytes:
    """A sample message from tests/data/feedback, returned to ``verp`` for ``address``;
    ``tag`` makes it another message (another Message-Id) with the same content."""
    raw = (SAMPLES / name).read_bytes().replace(b"{verp}", verp.encode())
    raw = re.sub(
        rb"reader000[0-9]@example\.(?:org|net)|someone@example\.com", address.encode(), raw
    )
    return raw.replace(b"Message-Id: <", f"Message-Id: <{tag}".encode(), 1)


def failed_soft(verp: str, address: str = READER, *, tag: str = "") -> bytes:
    """A DSN for a message the MTA gave up on with a 4.x.x code (mailbox full, expired)."""
    raw = sample("postfix-delayed.eml", verp, address, tag=tag)
    return raw.replace(b"Action: delayed", b"Action: failed")


@pytest.fixture
def db(any_db: Storage) -> Storage:
    """Two sends of one list of three readers: ``week1`` and ``week2``."""
    people = [Recipient(f"reader000{i}@example.org") for i in (1, 2, 3)]
    for week in ("week1", "week2", "week3"):
        any_db.send_log.freeze(week, "news", people, suppressed=0)
    return any_db


def send_id(db: Storage, issue_id: str) -> int:
    found = db.send_log.find(issue_id, "news")
    assert found is not None
    return found.id


def run(db: Storage, raw: bytes, *, now: str | None = None, soft: SoftBounces = SOFT) -> Processed:
    return process(raw, db.feedback, verp=VERP, source="test", soft=soft, now=now)


def test_a_hard_bounce_suppresses_its_delivery_with_the_evidence_kept(db: Storage) -> None:
    week1 = send_id(db, "week1")
    raw = sample("postfix-unknown-user.eml", VERP.sender(week1, 0))
    done = run(db, raw)
    assert done.decision.action == "suppress" and done.recorded.new
    assert done.recorded.suppressed == "bounced"
    assert db.subscribers.suppression(READER) == "bounced"
    assert db.subscribers.suppression("reader0002@example.org") is None
    (logged,) = db.subscribers.suppression_history(READER)
    assert logged[1:3] == ("suppress", "bounced")
    assert logged[4] == f"feedback #{done.recorded.id} (test)"
    kept = db.feedback.get(done.recorded.id)
    assert kept is not None and kept.raw == raw and kept.raw_size == len(raw)
    assert (kept.kind, kept.action, kept.status) == ("hard", "suppress", "5.1.1")
    assert (kept.email, kept.send_id, kept.seq) == (READER, week1, 0)
    assert kept.reported == READER and kept.diagnostic.startswith("550 5.1.1")
    assert kept.message_id == "<20261202040001.4Zk2@mx.example.net>"
    assert kept.outcome == "suppressed (bounced)"
    assert "permanent failure (5.1.1" in kept.why and "week1 to news" in kept.why
    assert db.feedback.counts(week1) == {
        "hard": 1, "soft": 0, "complaint": 0, "unsubscribe": 0, "refused": 0,
    }  # fmt: skip
    # The next send leaves the address out.
    assert READER not in {r.email for r in db.subscribers.audience("news")}


def test_the_same_message_twice_is_recorded_once(db: Storage) -> None:
    raw = failed_soft(VERP.sender(send_id(db, "week1"), 0))
    first = run(db, raw)
    again = run(db, raw)
    assert first.recorded.new and not again.recorded.new
    assert again.recorded.id == first.recorded.id
    assert again.recorded.outcome.startswith("recorded before (soft bounce: 1 of 3")
    assert len(db.feedback.about(READER)) == 1


def test_soft_bounces_suppress_after_three_sends_within_the_window(db: Storage) -> None:
    day = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    outcomes = []
    for n, week in enumerate(("week1", "week1", "week2", "week3")):
        raw = failed_soft(VERP.sender(send_id(db, week), 0), tag=f"{n}.")
        when = (day + dt.timedelta(days=7 * n)).isoformat(timespec="seconds")
        outcomes.append(run(db, raw, now=when).recorded)
    # Two reports about one send count once: a queue expiring sends one per recipient.
    assert [r.outcome for r in outcomes[:3]] == [
        "soft bounce: 1 of 3 sends within 30 days",
        "soft bounce: 1 of 3 sends within 30 days",
        "soft bounce: 2 of 3 sends within 30 days",
    ]
    assert outcomes[3].outcome == "soft bounce: 3 of 3 sends within 30 days; suppressed (bounced)"
    assert outcomes[3].suppressed == "bounced"
    assert db.subscribers.suppression(READER) == "bounced"


def test_old_soft_bounces_no_longer_count(db: Storage) -> None:
    day = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
    for n, (week, days) in enumerate((("week1", 0), ("week2", 10), ("week3", 45))):
        raw = failed_soft(VERP.sender(send_id(db, week), 0), tag=f"{n}.")
        done = run(db, raw, now=(day + dt.timedelta(days=days)).isoformat(timespec="seconds"))
    assert done.recorded.outcome == "soft bounce: 1 of 3 sends within 30 days"
    assert db.subscribers.suppression(READER) is None


def test_a_delay_the_mta_still_retries_is_noted_not_counted(db: Storage) -> None:
    done = run(db, sample("postfix-delayed.eml", VERP.sender(send_id(db, "week1"), 0)))
    assert done.decision.action == "note" and "still trying" in done.decision.why
    assert done.recorded.outcome == "noted"
    assert db.feedback.counts(send_id(db, "week1"))["soft"] == 0


def test_a_complaint_suppresses_and_outweighs_a_bounce(db: Storage) -> None:
    week1 = send_id(db, "week1")
    run(db, sample("postfix-unknown-user.eml", VERP.sender(week1, 0)))
    done = run(db, sample("yahoo-arf.eml", VERP.sender(week1, 0)))
    assert done.decision.action == "suppress" and done.recorded.suppressed == "complained"
    assert db.subscribers.suppression(READER) == "complained"
    assert db.feedback.counts(week1)["complaint"] == 1
    # A later bounce leaves the weightier reason as it is, and says so.
    later = run(db, sample("exchange-hard.eml", VERP.sender(send_id(db, "week2"), 0)))
    assert later.recorded.outcome == "already suppressed" and later.recorded.suppressed is None
    assert db.subscribers.suppression(READER) == "complained"


def test_nobody_is_suppressed_on_a_message_that_is_not_their_delivery(db: Storage) -> None:
    week1 = send_id(db, "week1")
    forged = VERP.sender(week1, 0).replace("+a", "+b", 1)
    other_key = Verp(VERP.address, b"another-deployment-secret-0123456789").sender(week1, 0)
    cases = {
        "forged": sample("postfix-unknown-user.eml", forged),
        "foreign key": sample("postfix-unknown-user.eml", other_key, tag="k."),
        "no such delivery": sample("postfix-unknown-user.eml", VERP.sender(week1, 99), tag="n."),
        "no such send": sample("postfix-unknown-user.eml", VERP.sender(9999, 0), tag="s."),
        # Recipient 0 is reader0001; the report says someone else failed.
        "another address": sample(
            "postfix-unknown-user.eml", VERP.sender(week1, 0), "stranger@example.net", tag="a."
        ),
        "not a bounce": b"Subject: hello\r\n\r\nunsubscribe me please\r\n",
        "garbage": bytes(range(256)) * 50,
    }
    for name, raw in cases.items():
        done = run(db, raw)
        assert done.decision.action == "review", name
        assert done.recorded.outcome == "kept for review", name
    for who in ("reader0001", "reader0002", "reader0003", "stranger"):
        domain = "example.net" if who == "stranger" else "example.org"
        assert db.subscribers.suppression(f"{who}@{domain}") is None
    total, latest = db.feedback.kept_for_review(limit=3)
    assert total == len(cases) and len(latest) == 3
    assert latest[0].id > latest[1].id > latest[2].id  # newest first
    assert latest[0].why.startswith("not a ")  # the garbage
    (stranger,) = [k for k in db.feedback.kept_for_review()[1] if "stranger" in k.why]
    assert "reports stranger@example.net, not reader0001@example.org" in stranger.why
    (missing,) = [k for k in db.feedback.kept_for_review()[1] if "99 of send" in k.why]
    assert "which this database does not have" in missing.why and missing.send_id is None


def test_auto_replies_and_delivery_reports_are_noted(db: Storage) -> None:
    ours = VERP.sender(send_id(db, "week1"), 0)
    for name in ("out-of-office.eml", "delivered.eml"):
        done = run(db, sample(name, ours))
        assert done.decision.action == "note" and done.recorded.outcome == "noted"
    assert db.subscribers.suppression(READER) is None


def test_a_huge_message_is_kept_cut_with_its_size(db: Storage) -> None:
    raw = sample("postfix-unknown-user.eml", VERP.sender(send_id(db, "week1"), 0))
    raw = raw.replace(b"--4Zk2.1764648001/mx.example.net--", b"X" * 400_000 + b"\n--end--")
    done = run(db, raw)
    kept = db.feedback.get(done.recorded.id)
    assert kept is not None and kept.cut and kept.raw_size == len(raw)
    assert kept.raw == raw[:RAW_KEEP]
    too_big = b"Subject: x\r\n\r\n" + b"y" * (3 * 1024 * 1024)
    done = run(db, too_big)
    assert done.decision.action == "review" and "larger than 2 MB" in done.decision.why
    kept = db.feedback.get(done.recorded.id)
    assert kept is not None and len(kept.raw or b"") == RAW_KEEP


def test_soft_bounces_recorded_at_once_by_two_connections_both_count(
    database: str, db: Storage
) -> None:
    """Two processes at once, each the last soft bounce the other needs: they take
    turns, so the second sees the first and suppresses (a limit of two)."""
    raws = [failed_soft(VERP.sender(send_id(db, w), 0), tag=w) for w in ("week1", "week2")]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def one(raw: bytes) -> None:
        try:
            with closing(open_storage(database)) as mine:
                start.wait()
                run(mine, raw, soft=SoftBounces(limit=2, days=30))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(raw,)) for raw in raws]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert db.subscribers.suppression(READER) == "bounced"
    outcomes = sorted(k.outcome for k in db.feedback.about(READER))
    assert outcomes == [
        "soft bounce: 1 of 2 sends within 30 days",
        "soft bounce: 2 of 2 sends within 30 days; suppressed (bounced)",
    ]


def _mark(db: Storage, issue_id: str, state: str) -> int:
    """Every recipient of ``issue_id``'s send claimed and recorded in ``state``."""
    from newsletter.models import Outcome

    sid = send_id(db, issue_id)
    claim = db.send_log.claim(sid, 10, now=0.0)
    db.send_log.record(sid, [(r.seq, Outcome(state, 250, "ok")) for r in claim.deliveries])
    return sid


def test_latest_delivery_is_the_newest_send_that_may_have_gone_out(db: Storage) -> None:
    """What a provider's event without our VERP address is matched to (webhooks)."""
    feedback = db.feedback
    assert feedback.latest_delivery(READER) is None  # frozen, never sent: nothing went out
    week1 = _mark(db, "week1", "sent")
    found = feedback.latest_delivery(READER)
    assert found is not None and (found.send_id, found.seq, found.issue_id) == (week1, 0, "week1")
    week2 = _mark(db, "week2", "deferred")
    found = feedback.latest_delivery(READER)
    assert found is not None and (found.send_id, found.state) == (week2, "deferred")
    # week3 is still pending: not the one an event about a message that went out names.
    assert feedback.latest_delivery(READER, "week1") == feedback.sent_to(week1, 0)
    assert feedback.latest_delivery(READER, "week3") is None
    assert feedback.latest_delivery("nobody@example.org") is None
    other = feedback.latest_delivery("reader0002@example.org", "week2")
    assert other is not None and (other.seq, other.email) == (1, "reader0002@example.org")
