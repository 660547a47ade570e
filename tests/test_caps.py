"""The hour and day caps, counted by each claim in the database over every send and every
process, on both backends (real SQLite files, a real PostgreSQL server)."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest

from newsletter.models import Outcome, Recipient
from newsletter.storage import Storage, open_storage
from newsletter.storage.caps import Caps, Claim

SENT = Outcome("sent", 250, "2.0.0 ok")


def people(n: int, prefix: str = "p") -> list[Recipient]:
    return [Recipient(f"{prefix}{i:05d}@example.org", f"P{i}", "") for i in range(n)]


def test_a_capped_claim_counts_what_every_send_sent_and_has_in_flight(any_db: Storage) -> None:
    log = any_db.send_log
    a = log.freeze("2026-12-03", "a", people(10, "a"), suppressed=0)
    b = log.freeze("2026-12-03", "b", people(10, "b"), suppressed=0)
    caps = Caps(per_day=5)
    now = time.time()
    first = log.claim(a.id, 3, now, caps=caps)
    assert len(first.deliveries) == 3 and first.capped is None  # room for 5
    # Send b has room for what a has not taken: a's three in flight count as sent.
    second = log.claim(b.id, 10, now, caps=caps)
    assert len(second.deliveries) == 2
    assert second.capped is not None and (second.capped.window, second.capped.cap) == ("day", 5)
    # Nothing is sent yet; a's rows in flight count from their claim.
    assert second.capped.room_at == pytest.approx(now + 86400, abs=2)
    log.record(a.id, [(d.seq, SENT) for d in first.deliveries])
    full = log.claim(a.id, 10, time.time(), caps=caps)
    assert full.deliveries == [] and full.capped is not None
    # Room comes back a day after the oldest of a's messages went out.
    assert full.capped.room_at is not None
    assert now + 86400 - 5 < full.capped.room_at < time.time() + 86400 + 1
    # A message in flight that ends unsent (deferred) gives its room back.
    deferred = Outcome("deferred", 451, "4.3.0 try later", retry_at=now + 600)
    log.record(b.id, [(d.seq, deferred) for d in second.deliveries])
    again = log.claim(a.id, 10, time.time(), caps=caps)
    assert len(again.deliveries) == 2 and again.capped is not None
    # Without caps a claim takes what it asks for.
    assert len(log.claim(b.id, 4, time.time()).deliveries) == 4
    assert log.counts(a.id)["pending"] == 5


def test_the_hour_window_slides(any_db: Storage) -> None:
    log = any_db.send_log
    record = log.freeze("2026-12-03", "news", people(10), suppressed=0)
    caps = Caps(per_hour=4, per_day=100)
    sent_at = time.time()
    claimed = log.claim(record.id, 10, sent_at, caps=caps)
    assert len(claimed.deliveries) == 4 and claimed.capped is not None
    assert claimed.capped.window == "hour"
    log.record(record.id, [(d.seq, SENT) for d in claimed.deliveries])
    # 59 minutes later the four still fill the hour; room comes an hour after they went.
    later = log.claim(record.id, 10, sent_at + 59 * 60, caps=caps)
    assert later.deliveries == [] and later.capped is not None
    assert later.capped.room_at == pytest.approx(sent_at + 3600, abs=2)
    # 61 minutes later they have left it: four more, and the day cap still counts them.
    next_hour = log.claim(record.id, 10, sent_at + 61 * 60, caps=caps)
    assert len(next_hour.deliveries) == 4
    day = log.claim(record.id, 10, sent_at + 61 * 60, caps=Caps(per_day=9))
    assert len(day.deliveries) == 1 and day.capped is not None and day.capped.window == "day"


def test_concurrent_capped_claims_never_pass_the_cap_together(database: str) -> None:
    """Four connections claim and record at once, as four processes do: no more than the
    cap go out, and the cap is filled."""
    with closing(open_storage(database, create=True)) as setup:
        record = setup.send_log.freeze("2026-12-03", "news", people(2000), suppressed=0)
    caps = Caps(per_hour=150)
    sent: list[int] = []
    errors: list[BaseException] = []

    def sender(name: str) -> None:
        try:
            with closing(open_storage(database)) as storage:
                log = storage.send_log
                while True:
                    claim = log.claim(record.id, 7, time.time(), holder=name, caps=caps)
                    if not claim.deliveries:
                        if claim.capped is not None and log.counts(record.id)["sending"]:
                            continue  # the others' rows in flight may end unsent
                        return
                    sent.extend(d.seq for d in claim.deliveries)
                    log.record(record.id, [(d.seq, SENT) for d in claim.deliveries],
                               holder=name)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(f"h{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(sent) == len(set(sent)) == 150
    with closing(open_storage(database)) as check:
        counts = check.send_log.counts(record.id)
    assert counts["sent"] == 150 and counts["pending"] == 1850


def test_what_counts_is_every_row_that_may_have_gone_out_in_the_window(any_db: Storage) -> None:
    """Unknown rows (a run died during their transaction) count as sent; rows a dead run
    left ``sending`` count until they leave the window, as a sent one would."""
    log = any_db.send_log
    dead = log.freeze("2026-12-03", "a", people(6, "a"), suppressed=0)
    record = log.freeze("2026-12-03", "b", people(10, "b"), suppressed=0)
    claimed_at = time.time()
    log.claim(dead.id, 6, claimed_at, holder="gone")  # six in flight, then kill -9
    log.record(dead.id, [(0, Outcome("unknown", None, "the run stopped"))], holder="gone")
    caps = Caps(per_hour=8)
    # One unknown and five sending count: room for two.
    assert len(log.claim(record.id, 10, claimed_at, caps=caps).deliveries) == 2
    # An hour later every row counted has left the window (the two just taken were
    # stamped at their claim too): the cap's eight are free again, for the eight left.
    later = log.claim(record.id, 10, claimed_at + 3601, caps=caps)
    assert len(later.deliveries) == 8


def test_a_claim_that_finds_nothing_due_names_no_cap(any_db: Storage) -> None:
    """A send finished exactly at its cap is finished, not held back by the cap."""
    log = any_db.send_log
    record = log.freeze("2026-12-03", "news", people(3), suppressed=0)
    caps = Caps(per_day=3)
    claimed = log.claim(record.id, 10, time.time(), caps=caps)
    assert len(claimed.deliveries) == 3  # room for exactly three (asked for ten)
    log.record(record.id, [(d.seq, SENT) for d in claimed.deliveries])
    assert log.claim(record.id, 10, time.time(), caps=caps) == Claim([], None)


def test_with_both_caps_full_the_day_is_named(any_db: Storage) -> None:
    log = any_db.send_log
    record = log.freeze("2026-12-03", "news", people(5), suppressed=0)
    caps = Caps(per_hour=2, per_day=2)
    first = log.claim(record.id, 10, time.time(), caps=caps)
    log.record(record.id, [(d.seq, SENT) for d in first.deliveries])
    full = log.claim(record.id, 10, time.time(), caps=caps)
    assert full.deliveries == [] and full.capped is not None
    assert full.capped.window == "day"  # waiting for the hour would not help
