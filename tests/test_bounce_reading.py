"""Reading what the mail system sends back (newsletter.bounces.reading): delivery status
notifications by status code, feedback reports, auto-replies, and hostile messages that
must never crash the reader nor name anyone they should not.

The samples in tests/data/feedback are written after the formats Postfix, Exchange and
a feedback loop (ARF) produce, with {verp} standing for the message's VERP address."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from newsletter.bounces.reading import MAX_BYTES, MAX_DEPTH, MAX_PARTS, Reported, read
from newsletter.verp import Delivered, Verp

SAMPLES = Path(__file__).parent / "data" / "feedback"
VERP = Verp("bounces@bounce.example.org", b"test-secret-for-the-suite-0123456789")
OURS = VERP.sender(3, 17)


def sample(name: str, verp: str = OURS) -> bytes:
    return (SAMPLES / name).read_bytes().replace(b"{verp}", verp.encode())


def test_a_postfix_unknown_user_is_a_hard_bounce_of_our_delivery() -> None:
    found = read(sample("postfix-unknown-user.eml"), VERP)
    assert found.kind == "hard" and found.delivery == Delivered(3, 17)
    (reported,) = found.recipients
    assert reported.email == "reader0001@example.org" and reported.status == "5.1.1"
    assert reported.action == "failed"
    assert reported.diagnostic.startswith("550 5.1.1 <reader0001@example.org>: Recipient")
    assert found.message_id == "<20261202040001.4Zk2@mx.example.net>"


def test_a_full_mailbox_still_retried_is_a_soft_bounce() -> None:
    found = read(sample("postfix-delayed.eml"), VERP)
    assert found.kind == "soft" and found.delivery == Delivered(3, 17)
    assert found.recipients == (
        Reported("reader0002@example.org", "delayed", "4.2.2",
                 "452 4.2.2 <reader0002@example.org>: Mailbox full"),
    )  # fmt: skip


def test_an_exchange_report_is_read_by_its_code_not_its_words() -> None:
    found = read(sample("exchange-hard.eml"), VERP)
    assert found.kind == "hard" and found.recipients[0].status == "5.1.10"
    assert found.delivery == Delivered(3, 17)  # from To: (Exchange adds no Delivered-To)


def test_a_feedback_loop_report_is_a_complaint_found_through_the_reported_message() -> None:
    found = read(sample("yahoo-arf.eml"), VERP)
    assert found.kind == "complaint" and found.feedback_type == "abuse"
    assert found.delivery == Delivered(3, 17)  # To: is the loop's own address: not ours
    assert found.recipients[0].email == "reader0003@example.net"


def test_an_out_of_office_reply_and_a_success_report_are_not_bounces() -> None:
    assert read(sample("out-of-office.eml"), VERP).kind == "auto_reply"
    # Outlook asks robots not to answer mail people write: that is no auto-reply.
    person = (
        b"From: r@example.org\nTo: "
        + OURS.encode()
        + (b"\nSubject: please stop\nX-Auto-Response-Suppress: All\n\nunsubscribe\n")
    )
    assert read(person, VERP).kind == "unknown"
    delivered = read(sample("delivered.eml"), VERP)
    assert delivered.kind == "not_bounce" and delivered.recipients[0].status == "2.0.0"


def test_a_forged_or_foreign_verp_address_names_no_delivery() -> None:
    forged = OURS.replace("bounces+a", "bounces+b")
    found = read(sample("postfix-unknown-user.eml", forged), VERP)
    assert found.kind == "hard" and found.delivery is None
    other = Verp("bounces@bounce.example.org", b"someone else's key").sender(3, 17)
    assert read(sample("postfix-unknown-user.eml", other), VERP).delivery is None
    # The address the MTA delivered to counts first (a pipe transport passes it).
    given = read(sample("postfix-unknown-user.eml", "x@example.org"), VERP, delivered_to=OURS)
    assert given.delivery == Delivered(3, 17)


def _nested(depth: int) -> bytes:
    head = b"From: x@example.org\nTo: " + OURS.encode() + b"\nMIME-Version: 1.0\n"
    body = b"deep\n"
    for level in range(depth):
        boundary = b"b%d" % level
        body = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\n\n--"
                + boundary + b"\n" + body + b"\n--" + boundary + b"--\n")  # fmt: skip
    return head + body


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_nested(MAX_DEPTH + 5), "nested deeper"),
        (_nested(3000), "MIME boundaries"),
        (
            b'Content-Type: multipart/mixed; boundary="x"\n\n'
            + b"--x\nContent-Type: text/plain\n\nhi\n" * (MAX_PARTS + 1)
            + b"--x--\n",
            "more than",
        ),
        (b"x" * (MAX_BYTES + 1), "larger than"),
        (bytes(range(256)) * 100, "not a delivery status"),
        (b"", "not a delivery status"),
        (
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="q"\n\n'
            b"--q\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
            b"Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 9.9.9\n--q--\n",
            "no valid status code",
        ),
        (
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="q"\n\n'
            b"--q\nContent-Type: text/plain\n\ntruncated before the status part",
            "without its status part",
        ),
    ],
    ids=["deep", "very deep", "many parts", "huge", "binary", "empty", "bad code", "truncated"],
)
def test_hostile_or_broken_messages_are_unknown_with_the_reason(data: bytes, why: str) -> None:
    found = read(data, VERP)
    assert found.kind == "unknown" and why in found.why, found
    assert found.delivery is None or found.delivery == Delivered(3, 17)


def test_a_zip_bomb_attachment_is_not_opened() -> None:
    """A report with a gzip that expands to 1 GB: the reader never decompresses anything."""
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    import base64

    attachment = base64.encodebytes(bomb)
    data = (
        sample("postfix-unknown-user.eml").replace(b"--4Zk2.1764648001/mx.example.net--", b"")
        + b"--4Zk2.1764648001/mx.example.net\nContent-Type: application/gzip\n"
        b"Content-Transfer-Encoding: base64\n\n" + attachment
        + b"\n--4Zk2.1764648001/mx.example.net--\n"
    )  # fmt: skip
    found = read(data, VERP)
    assert found.kind == "hard" and found.delivery == Delivered(3, 17)


def _dsn(action: str, status: str, extra: bytes = b"") -> bytes:
    return (
        b"To: " + OURS.encode() + b"\nContent-Type: multipart/report; "
        b'report-type=delivery-status; boundary="q"\n\n--q\n'
        b"Content-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
        b"Final-Recipient: rfc822; a@example.org\n"
        + (b"Action: " + action.encode() + b"\n" if action else b"")
        + b"Status: "
        + status.encode()
        + b"\n\n"
        + extra
        + b"--q--\n"
    )


@pytest.mark.parametrize(
    ("action", "status", "kind"),
    [
        ("failed", "5.1.1", "hard"),
        ("failed (permanent)", "5.1.1", "hard"),
        ("failed", "4.4.7", "soft"),  # expired in a queue: transient by its code
        ("delayed", "4.2.2", "soft"),
        ("delayed", "5.1.1", "unknown"),  # a delay is not a final failure
        ("delivered", "5.1.1", "unknown"),
        ("failed", "2.0.0", "unknown"),
        ("", "5.1.1", "unknown"),  # Action is required
        ("delivered", "2.0.0", "not_bounce"),
        ("failed", "5.1.1.9", "unknown"),
    ],
)
def test_action_and_status_are_judged_together(action: str, status: str, kind: str) -> None:
    assert read(_dsn(action, status), VERP).kind == kind


def test_a_report_inside_the_returned_message_is_not_this_reports_status() -> None:
    inner = _dsn("failed", "5.1.1").replace(b'"q"', b'"r"').replace(b"--q", b"--r")
    outer = _dsn("delivered", "2.0.0").replace(
        b"--q--\n", b"--q\nContent-Type: message/rfc822\n\n" + inner + b"\n--q--\n"
    )
    assert read(outer, VERP).kind == "not_bounce"


def test_where_it_was_delivered_is_not_taken_from_display_names_or_comments() -> None:
    token = OURS.split("@")[0]
    for to in (f'"{OURS}" <victim@example.org>', f"victim@example.org ({OURS})"):
        data = _dsn("failed", "5.1.1").replace(b"To: " + OURS.encode(), b"To: " + to.encode())
        assert read(data, VERP).delivery is None, to
    # What the MTA says it delivered to is the only word, when it gives one.
    assert (
        read(_dsn("failed", "5.1.1"), VERP, delivered_to="bounces@bounce.example.org").delivery
        is None
    )
    assert token.startswith("bounces+")


def test_a_feedback_report_without_its_type_is_no_complaint() -> None:
    data = sample("yahoo-arf.eml").replace(b"Feedback-Type: abuse\n", b"")
    found = read(data, VERP)
    assert found.kind == "unknown" and "without its Feedback-Type" in found.why


def test_split_parameters_beyond_a_few_are_refused_before_parsing() -> None:
    pieces = b"".join(b"; report-type*%d*=x" % i for i in range(500))
    data = b"Content-Type: multipart/report" + pieces + b"\n\nhi\n"
    found = read(data, VERP)
    assert found.kind == "unknown" and "split header parameters" in found.why


def plain(headers: str, body: str = "Take me off, please.\r\n") -> bytes:
    return (headers.replace("\n", "\r\n") + "\r\n" + body).encode()


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        # what a mail program sends from our List-Unsubscribe mailto:
        ("From: a@example.net\nTo: leave@example.org\nSubject: unsubscribe AbC_-0123456789xyzW\n",
         "AbC_-0123456789xyzW"),
        # a reply to the newsletter that asks in its Subject, anywhere
        ("From: a@example.net\nTo: news@example.org\nSubject: RE: Fwd: Unsubscribe\n", ""),
        # anything mailed to the unsubscribe address itself, +subaddress too
        ("From: a@example.net\nTo: leave+x@example.org\nSubject: Stop this\n", ""),
    ],
)  # fmt: skip
def test_a_request_to_unsubscribe_is_one_by_subject_or_address(headers: str, token: str) -> None:
    found = read(plain(headers), VERP, unsubscribe_to="leave@example.org")
    assert found.kind == "unsubscribe"
    assert (found.token, found.requester) == (token, "a@example.net")


def test_what_only_looks_like_a_request_to_unsubscribe_is_not_one() -> None:
    to_us = "From: a@example.net\nTo: leave@example.org\n"
    # an out-of-office reply to the unsubscribe address is an auto-reply
    auto = read(plain(to_us + "Subject: Away\nAuto-Submitted: auto-replied\n"), VERP,
                unsubscribe_to="leave@example.org")  # fmt: skip
    assert auto.kind == "auto_reply"
    # "unsubscribed" or "unsubscribe" later in the Subject; another address of the domain
    for headers in (
        "From: a@example.net\nTo: news@example.org\nSubject: unsubscribed already?\n",
        "From: a@example.net\nTo: news@example.org\nSubject: How do I unsubscribe?\n",
        "From: a@example.net\nTo: leaves@example.org\nSubject: hello\n",
    ):
        found = read(plain(headers), VERP, unsubscribe_to="leave@example.org")
        assert found.kind == "unknown", headers
    # a bounce to the unsubscribe address is still a bounce
    dsn = read(sample("postfix-unknown-user.eml"), VERP, unsubscribe_to="leave@example.org")
    assert dsn.kind == "hard"


def test_a_bounce_in_an_mtas_own_format_is_read_by_the_code_next_to_the_address() -> None:
    """qmail writes the RFC 3463 code after the address, "(#5.1.1)": hard by that code."""
    found = read(sample("qmail-hard.eml"), VERP)
    assert found.kind == "hard" and found.nonstandard and found.delivery == Delivered(3, 17)
    (reported,) = found.recipients
    assert (reported.email, reported.action, reported.status) == (
        "reader0001@example.org", "failed", "5.1.1",
    )  # fmt: skip
    assert reported.diagnostic.startswith("Sorry, no mailbox here by that name.")


def test_a_nonstandard_bounce_without_a_code_is_only_ever_soft() -> None:
    """Old Exim says "permanent error" in words, with no code: only counted (decay and three
    sends), since words are what a reader misreads."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("exim-plain-hard.eml"), VERP)
    assert found.kind == "soft" and found.nonstandard
    (reported,) = found.recipients
    assert (reported.email, reported.action, reported.status) == (
        "reader0001@example.org", "failed", "",
    )  # fmt: skip
    sent = SentTo(3, 17, "reader0001@example.org", "2026-12-02", "research-news", "sent")
    decision = decide(found, sent)
    assert decision.action == "soft" and decision.email == "reader0001@example.org"
    assert "without a status code (retry timeout exceeded)" in decision.why
    # the qmail one, by its code, suppresses
    assert decide(read(sample("qmail-hard.eml"), VERP), sent).action == "suppress"


def test_a_person_writing_about_failed_mail_is_no_bounce() -> None:
    words = plain(
        "From: reader0001@example.org\nTo: news@example.org\nSubject: Re: This week\n",
        "I could not deliver your message to my colleague, the address failed.\r\n",
    )
    found = read(words, VERP)
    assert found.kind == "unknown" and not found.nonstandard
