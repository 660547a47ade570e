"""The signup store on both backends: a signup kept and its mail queued at once, a
confirmation that works exactly once and lifts only the person's own opt-outs and
suppressions, consent records, the outbox's states, rate limits and single-use keys
shared through the database, and an erasure that leaves only a keyed hash."""

from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path

import pytest

from newsletter.audience.csv_import import ParsedRow
from newsletter.models import Recipient
from newsletter.storage import Storage, open_storage
from newsletter.storage.signups import (
    NewSignup,
    anonymous_address,
    consent_hash,
    erasure_hash,
    erasure_key,
    nonce,
)

KEY = erasure_key(b"test-secret-for-the-suite-0123456789")
TEXT = "Yes, email me the research news. I can unsubscribe at any time."
READER = "reader@example.org"


def signup(email: str = READER, *, lists: tuple[str, ...] = ("research-news",),
           posted_at: str = "2026-12-01T10:00:00+00:00",
           expires_at: str = "2026-12-03T10:00:00+00:00") -> NewSignup:  # fmt: skip
    return NewSignup(
        email=email,
        first_name="Ada",
        lists=lists,
        form="web:/subscribe",
        consent_text=TEXT,
        posted_at=posted_at,
        posted_ip="203.0.113.7",
        expires_at=expires_at,
        nonce=nonce(),
    )


def confirm(db: Storage, new: NewSignup, signup_id: int, *, at: str = "2026-12-01T10:05:00+00:00",
            welcome: bool = False):  # type: ignore[no-untyped-def]  # fmt: skip
    return db.signups.confirm(
        signup_id, new.nonce, confirmed_ip="198.51.100.2", now=at,
        email_hash=erasure_hash(KEY, new.email), welcome=welcome,
    )  # fmt: skip


def test_a_signup_joins_nothing_until_confirmed_and_then_exactly_once(any_db: Storage) -> None:
    new = signup(lists=("research-news", "events"))
    signup_id = any_db.signups.begin(new)
    assert any_db.subscribers.lists_of(READER) == []
    (mail,) = any_db.signups.outbox(READER)
    assert (mail.kind, mail.state, mail.signup_id) == ("confirm", "pending", signup_id)
    # Another nonce, or past its expiry: nothing.
    assert any_db.signups.confirm(signup_id, nonce(), confirmed_ip=None,
                                  now="2026-12-01T10:05:00+00:00",
                                  email_hash="x", welcome=False) is None  # fmt: skip
    assert confirm(any_db, new, signup_id, at="2026-12-03T10:00:00+00:00") is None
    done = confirm(any_db, new, signup_id, welcome=True)
    assert done is not None
    assert done.joined == ("research-news", "events") and done.lifted == ()
    assert any_db.subscribers.lists_of(READER) == [("events", False), ("research-news", False)]
    assert [r.email for r in any_db.subscribers.audience("events")] == [READER]
    recipient = any_db.subscribers.recipient(READER)
    assert recipient is not None and recipient.first_name == "Ada"
    records = any_db.signups.consents(READER)
    assert [(r.list_name, r.method) for r in records] == [
        ("research-news", "confirmed"), ("events", "confirmed")]  # fmt: skip
    first = records[0]
    assert (first.source, first.consent_text, first.consent_sha256) == (
        "web:/subscribe", TEXT, consent_hash(TEXT))  # fmt: skip
    assert (first.posted_at, first.posted_ip) == ("2026-12-01T10:00:00+00:00", "203.0.113.7")
    assert (first.confirmed_at, first.confirmed_ip) == ("2026-12-01T10:05:00+00:00",
                                                        "198.51.100.2")  # fmt: skip
    assert first.signup_id == signup_id
    assert [m.kind for m in any_db.signups.outbox(READER)] == ["confirm", "welcome"]
    # The same link again (a replay, a second click): nothing more.
    assert confirm(any_db, new, signup_id) is None
    assert len(any_db.signups.consents(READER)) == 2
    stored = any_db.signups.signup(signup_id)
    assert stored is not None and stored.confirmed_ip == "198.51.100.2"


def test_confirming_lifts_the_persons_own_opt_out_and_suppression_and_says_so(
    any_db: Storage,
) -> None:
    any_db.subscribers.import_rows(
        "research-news", [ParsedRow(2, READER, "Grace", None, {})], skip_invalid=False
    )
    any_db.subscribers.opt_out("research-news", READER)
    any_db.subscribers.suppress(READER, "bounced", actor="test")
    # Posted after those (now is later than the opt-out and the suppression).
    new = signup(posted_at="2999-01-01T00:00:00+00:00", expires_at="2999-01-03T00:00:00+00:00")
    done = confirm(any_db, new, any_db.signups.begin(new), at="2999-01-01T00:05:00+00:00")
    assert done is not None and done.joined == ("research-news",)
    assert done.lifted[0].startswith("the suppression (bounced, since ")
    assert done.lifted[1].startswith("the opt-out of research-news (since ")
    assert any_db.subscribers.suppression(READER) is None
    assert [r.email for r in any_db.subscribers.audience("research-news")] == [READER]
    recipient = any_db.subscribers.recipient(READER)
    assert recipient is not None and recipient.first_name == "Grace"  # theirs is kept
    history = any_db.subscribers.suppression_history(READER)
    assert history[-1][1:3] == ("unsuppress", "a confirmed signup of its own")
    (record,) = [r for r in any_db.signups.consents(READER) if r.method == "confirmed"]
    assert "the suppression (bounced" in record.lifted and "the opt-out of" in record.lifted


def test_one_link_confirmed_at_once_by_two_connections_counts_once(database: str) -> None:
    with closing(open_storage(database, create=True)) as db:
        new = signup()
        signup_id = db.signups.begin(new)
    results: list[object] = []

    def click() -> None:
        with closing(open_storage(database)) as own:
            results.append(confirm(own, new, signup_id))

    threads = [threading.Thread(target=click) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    with closing(open_storage(database)) as db:
        assert len(db.signups.consents(READER)) == 1


def test_the_outbox_claims_each_mail_once_and_keeps_its_fate(any_db: Storage) -> None:
    ids = [any_db.signups.begin(signup(f"r{i}@example.org")) for i in range(3)]
    first = any_db.signups.claim_mail(now=1000.0)
    assert first is not None and (first.state, first.attempts) == ("sending", 1)
    second = any_db.signups.claim_mail(now=1000.0)
    assert second is not None and second.id != first.id
    any_db.signups.mail_done(first.id, "sent", "250 ok")
    any_db.signups.mail_done(second.id, "deferred", "451 later", retry_at=2000.0)
    third = any_db.signups.claim_mail(now=1000.0)
    assert third is not None and third.signup_id == ids[2]
    assert any_db.signups.claim_mail(now=1000.0) is None  # the deferred one is not due
    again = any_db.signups.claim_mail(now=2000.0)
    assert again is not None and (again.id, again.attempts) == (second.id, 2)
    # A process that died in the SMTP transaction: unknown, never sent again.
    assert any_db.signups.mail_interrupted("9999-01-01") == 2
    assert any_db.signups.claim_mail(now=5000.0) is None
    states = {m.id: m.state for m in any_db.signups.outbox()}
    assert states == {first.id: "sent", second.id: "unknown", third.id: "unknown"}


def test_rate_limits_and_single_use_keys_are_shared_through_the_database(database: str) -> None:
    with closing(open_storage(database, create=True)) as a, closing(open_storage(database)) as b:
        assert [a.signups.allow("ip:x", 3, 60, now=100.0 + i) for i in range(2)] == [True] * 2
        assert b.signups.allow("ip:x", 3, 60, now=103.0) is True
        assert a.signups.allow("ip:x", 3, 60, now=104.0) is False  # another process's hits
        assert b.signups.allow("ip:y", 3, 60, now=104.0) is True  # another bucket
        assert a.signups.allow("ip:x", 3, 60, now=161.0) is True  # the first ones went by
        assert a.signups.use_once("altcha", "sig1", expires=200.0, now=100.0) is True
        assert b.signups.use_once("altcha", "sig1", expires=200.0, now=150.0) is False
        assert b.signups.use_once("altcha", "sig1", expires=400.0, now=201.0) is True  # expired


def test_erasure_leaves_only_a_keyed_hash_and_anonymous_counts(any_db: Storage) -> None:
    other = "other@example.org"
    any_db.subscribers.import_rows(
        "research-news",
        [
            ParsedRow(2, READER, "Ada", "Lovelace", {"city": "London"}),
            ParsedRow(3, other, None, None, {}),
        ],
        skip_invalid=False,
    )
    new = signup(lists=("events",))
    confirm(any_db, new, any_db.signups.begin(new))
    any_db.subscribers.opt_out("research-news", READER)
    any_db.send_log.freeze("2026-12-01", "research-news",
                           [Recipient(READER, "Ada", "Lovelace"), Recipient(other)],
                           suppressed=0)  # fmt: skip
    digest = erasure_hash(KEY, READER)
    done = any_db.signups.erase(READER, digest, now="2026-12-02T00:00:00+00:00")
    assert done.found
    assert done.removed["subscribers"] == 1 and done.removed["list_members"] == 2
    assert done.removed["consents"] == 1 and done.removed["signups"] == 1
    assert done.anonymised["deliveries"] == 1
    assert any_db.subscribers.recipient(READER) is None
    assert any_db.subscribers.lists_of(READER) == []
    assert any_db.signups.consents(READER) == [] and any_db.signups.outbox(READER) == []
    assert any_db.subscribers.suppression_history(READER) == []
    assert any_db.signups.erased(digest) == "2026-12-02T00:00:00+00:00"
    assert list(any_db.signups.erasure_hashes()) == [digest]
    send = any_db.send_log.find("2026-12-01", "research-news")
    assert send is not None and send.audience == 2
    assert any_db.feedback.deliveries_of(READER) == []
    assert len(any_db.feedback.deliveries_of(anonymous_address(digest))) == 1
    # The other member is untouched; erasing again finds nothing more.
    assert [r.email for r in any_db.subscribers.audience("research-news")] == [other]
    assert not any_db.signups.erase(READER, digest, now="2026-12-03T00:00:00+00:00").found
    # Their own confirmed signup later lifts the erasure, and the record says so.
    back = signup(posted_at="2026-12-05T10:00:00+00:00", expires_at="2026-12-07T10:00:00+00:00")
    done_back = confirm(any_db, back, any_db.signups.begin(back), at="2026-12-05T10:01:00+00:00")
    assert done_back is not None
    assert done_back.lifted == ("the erasure of 2026-12-02T00:00:00+00:00",)
    assert any_db.signups.erased(digest) is None


@pytest.mark.parametrize("posted", ["2026-12-01T09:00:00+00:00", "2026-12-01T11:00:00+00:00"])
def test_mailed_lately_counts_an_addresses_signups_since(any_db: Storage, posted: str) -> None:
    any_db.signups.begin(signup(posted_at=posted))
    any_db.signups.begin(signup("someone@example.org", posted_at=posted))
    expected = 1 if posted >= "2026-12-01T10:00:00+00:00" else 0
    assert any_db.signups.mailed_lately(READER, "2026-12-01T10:00:00+00:00") == expected


def test_members_from_before_schema_6_get_a_record_saying_so(tmp_path: Path) -> None:
    from newsletter.storage.sqlite.connection import SCHEMA_VERSION, connect

    path = tmp_path / "old.sqlite3"
    with closing(open_storage(str(path), create=True)) as db:
        db.subscribers.import_rows("news", [ParsedRow(2, READER, None, None, {})],
                                   skip_invalid=False)  # fmt: skip
    conn = connect(path)
    for table in ("outbox", "consents", "signups", "consent_texts", "rate_hits", "used_once",
                  "erasures"):  # fmt: skip
        conn.execute(f"DROP TABLE {table}")
    conn.execute("ALTER TABLE sends DROP COLUMN frozen")  # schema 7's
    conn.execute("PRAGMA user_version=5")
    conn.close()
    with closing(open_storage(str(path))) as db:
        assert db.schema_version() == SCHEMA_VERSION == 7
        (record,) = db.signups.consents(READER)
        assert (record.list_name, record.method, record.actor) == ("news", "before", "schema 6")
        assert record.source == "on the list before consent was recorded"


def test_lifting_a_suppression_keeps_the_lists_not_chosen_left(any_db: Storage) -> None:
    for name in ("research-news", "fundraising"):
        any_db.subscribers.import_rows(name, [ParsedRow(2, READER, None, None, {})],
                                       skip_invalid=False)  # fmt: skip
    any_db.subscribers.suppress(READER, "unsubscribed", actor="test")
    new = signup(posted_at="2999-01-01T00:00:00+00:00", expires_at="2999-01-03T00:00:00+00:00")
    assert confirm(any_db, new, any_db.signups.begin(new), at="2999-01-01T00:05:00+00:00")
    assert any_db.subscribers.lists_of(READER) == [("fundraising", True), ("research-news", False)]
    assert [r.email for r in any_db.subscribers.audience("fundraising")] == []


def test_an_older_link_cannot_undo_a_later_unsubscribe(any_db: Storage) -> None:
    first, second = signup(), signup()
    first_id, second_id = any_db.signups.begin(first), any_db.signups.begin(second)
    assert first_id is not None and second_id is not None
    assert confirm(any_db, first, first_id) is not None
    any_db.subscribers.opt_out("research-news", READER)  # the person left again, now
    assert confirm(any_db, second, second_id, at="2026-12-01T10:06:00+00:00") is None
    assert any_db.subscribers.lists_of(READER) == [("research-news", True)]


def test_posts_at_the_same_moment_cannot_pass_the_addresss_limit(database: str) -> None:
    with closing(open_storage(database, create=True)):
        pass
    got: list[int | None] = []

    def post() -> None:
        with closing(open_storage(database)) as own:
            got.append(own.signups.begin(signup(), limit=1, since="2026-12-01T00:00:00+00:00"))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(g is not None for g in got) == 1
    with closing(open_storage(database)) as db:
        assert len(db.signups.outbox(READER)) == 1


def test_erasing_an_address_a_send_has_not_reached_yet_leaves_it_unsent(any_db: Storage) -> None:
    any_db.send_log.freeze("2026-12-01", "news", [Recipient(READER), Recipient("b@example.org")],
                           suppressed=0)  # fmt: skip
    any_db.signups.erase(READER, erasure_hash(KEY, READER), now="2026-12-02T00:00:00+00:00")
    send = any_db.send_log.find("2026-12-01", "news")
    assert send is not None
    claimed = any_db.send_log.claim(send.id, 10, now=0).deliveries
    assert [d.recipient.email for d in claimed] == ["b@example.org"]


def test_unconfirmed_signups_are_forgotten_a_day_after_their_link_expired(
    any_db: Storage,
) -> None:
    any_db.signups.begin(signup())
    assert any_db.signups.purge_unconfirmed("2026-12-03T10:00:00+00:00") == 0  # not yet past
    assert any_db.signups.purge_unconfirmed("2026-12-04T10:00:01+00:00") == 1
    assert any_db.signups.signups_of(READER) == [] and any_db.signups.outbox(READER) == []


def test_an_erasure_made_while_an_import_reads_its_file_is_not_undone(database: str) -> None:
    from collections.abc import Iterator as Rows

    from newsletter.storage.signups import ErasureCheck

    other = "other@example.org"
    with closing(open_storage(database, create=True)) as db:
        db.subscribers.import_rows("news", [ParsedRow(2, other, None, None, {})],
                                   skip_invalid=False)  # fmt: skip

    def rows() -> Rows[ParsedRow]:
        yield ParsedRow(2, READER, "Ada", None, {})
        yield ParsedRow(3, other, None, None, {})
        # The person is erased (another process) while the file is still being read.
        with closing(open_storage(database)) as elsewhere:
            elsewhere.signups.erase(READER, erasure_hash(KEY, READER), now="2026-12-02T00:00:00")

    with closing(open_storage(database)) as db:
        report = db.subscribers.import_rows("news", rows(), skip_invalid=False,
                                            erased=ErasureCheck(frozenset(), KEY))  # fmt: skip
        assert report.committed and report.erased == 1
        assert db.subscribers.lists_of(READER) == [] and db.subscribers.recipient(READER) is None
        assert [r.email for r in db.subscribers.audience("news")] == [other]


def _kept(db: Storage, raw: bytes, *, email: str | None = None) -> int:
    from newsletter.storage.evidence import Evidence, SoftBounces, digest_of

    evidence = Evidence(
        digest=digest_of(raw), source="file", kind="not_bounce", action="review",
        why="names no delivery of ours", raw=raw, email=email,
        diagnostic=f"about {READER}" if email else "",
    )  # fmt: skip
    return db.feedback.record(evidence, SoftBounces()).id


def test_messages_matched_to_nobody_that_name_the_address_are_exported_and_erased(
    any_db: Storage,
) -> None:
    import base64

    from newsletter.audience import person

    plain = f"Subject: please\r\n\r\nTake {READER.upper()} off your list.\r\n".encode()
    hidden = (
        "Subject: fwd\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(f"Forwarded from {READER}, who asked to stop.".encode()).decode()
        + "\r\n"
    ).encode()
    someone_else = b"Subject: x\r\n\r\nA message about other@example.org only.\r\n"
    theirs = f"Subject: y\r\n\r\nBob writes: my friend {READER} wants out.\r\n".encode()
    ids = [_kept(any_db, plain), _kept(any_db, hidden), _kept(any_db, someone_else),
           _kept(any_db, theirs, email="bob@example.org")]  # fmt: skip
    found = [kept.id for kept in any_db.feedback.mentioning(READER)]
    assert found == [ids[0], ids[1], ids[3]]
    data = person.gather(any_db, READER, erasure_key=KEY)
    assert [(f["evidence"], f["matched"]) for f in data.feedback] == [
        (ids[0], False), (ids[1], False), (ids[3], False)]  # fmt: skip
    assert "Take READER@EXAMPLE.ORG off" in data.feedback[0]["message"]
    assert not data.empty  # held about them, though matched to nobody

    done = person.erase(any_db, READER, KEY)
    assert done.anonymised["feedback"] == 3
    assert any_db.feedback.mentioning(READER) == []
    anonymous = anonymous_address(erasure_hash(KEY, READER))
    for row_id, owner in ((ids[0], anonymous), (ids[1], anonymous), (ids[3], "bob@example.org")):
        kept = any_db.feedback.get(row_id)
        assert kept is not None and kept.raw == b"" and kept.raw_size == 0
        assert kept.email == owner and READER not in kept.diagnostic
        assert kept.outcome == "kept without its message (erased)"
    untouched = any_db.feedback.get(ids[2])
    assert untouched is not None and untouched.raw == someone_else
    # Erased again (something new was held since): what was made anonymous is not again.
    assert person.erase(any_db, READER, KEY).anonymised["feedback"] == 0


def test_an_erased_address_leaves_no_bytes_in_the_sqlite_file_or_its_wal(tmp_path: Path) -> None:
    path = tmp_path / "news.sqlite3"
    person = "frank.unforgettable@example.org"
    with closing(open_storage(path, create=True)) as db:
        db.subscribers.import_rows(
            "research-news",
            [ParsedRow(2, person, "Frank", "Unforgettable", {"town": "Leeds"}),
             ParsedRow(3, READER, "Ada", None, {})],
            skip_invalid=False,
        )  # fmt: skip
        frozen = [Recipient(person, "Frank"), Recipient(READER)]
        db.send_log.freeze("2026-12-01", "research-news", frozen, suppressed=0)
        new = signup(person)
        db.signups.begin(new)
        files = [p for p in tmp_path.iterdir() if p.name.startswith("news.sqlite3")]
        assert any(b"unforgettable" in p.read_bytes() for p in files)  # there, before
        db.signups.erase(person, erasure_hash(KEY, person), now="2026-12-02T00:00:00+00:00")
        for p in tmp_path.iterdir():
            if p.name.startswith("news.sqlite3"):
                assert b"unforgettable" not in p.read_bytes().lower(), p.name
        assert [r.email for r in db.subscribers.audience("research-news")] == [READER]
