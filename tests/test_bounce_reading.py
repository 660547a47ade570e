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


# Samples written after each provider's own format (Gmail, Exim's RFC 3464 report, Microsoft's
# feedback loop and Exchange Online's NDR, a Yahoo deferral given up on), read and decided.


def test_a_gmail_report_of_an_address_that_does_not_exist_is_a_hard_bounce() -> None:
    """Gmail's DSN: a multipart/related human part (text, HTML, an icon), its status part
    with a 550-5.1.1 reply folded over several lines, the message returned whole."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("gmail-hard.eml"), VERP)
    assert found.kind == "hard" and found.delivery == Delivered(3, 17)
    assert found.message_id == "<674da1ca.050a0220.3b8d2a.1c2eGMR@mx.google.com>"
    (reported,) = found.recipients
    assert (reported.email, reported.action, reported.status) == (
        "reader0006@example.com", "failed", "5.1.1",
    )  # fmt: skip
    # the continuation lines, unfolded: each still starts with the reply's own code
    assert reported.diagnostic.startswith(
        "550-5.1.1 The email account that you tried to reach does not exist. Please try "
        "550-5.1.1 double-checking the recipient's email address"
    )
    decision = decide(
        found, SentTo(3, 17, "reader0006@example.com", "2026-12-02", "research-news", "sent")
    )
    assert (decision.action, decision.reason, decision.email) == (
        "suppress", "bounced", "reader0006@example.com",
    )  # fmt: skip


def test_a_gmail_dmarc_rejection_is_read_as_its_code_says() -> None:
    """Gmail refusing our message for failing DMARC (5.7.26, "Unauthenticated email from
    example.org is not accepted"): the reader reports it as the code says, hard 5.7.26 (a
    failed 5.x.x). The decision weighs the code (deciding.permanent_weight): a 5.7 policy
    refusal is about our authentication, the sender, not the reader's address, so it
    suppresses nobody (it once did, by the reader's hard kind alone)."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("gmail-blocked.eml"), VERP)
    assert found.kind == "hard" and found.delivery == Delivered(3, 17)
    assert found.message_id == "<674da208.170a0220.1f2e3d.0b7aGMR@mx.google.com>"
    (reported,) = found.recipients
    assert (reported.email, reported.action, reported.status) == (
        "reader0007@example.com", "failed", "5.7.26",
    )  # fmt: skip
    assert reported.diagnostic.startswith("550-5.7.26 Unauthenticated email from example.org")
    # Hard by the reader, yet only noted: a provider refusing our mail for DMARC would
    # otherwise suppress every reader it hosts in one send.
    decision = decide(
        found, SentTo(3, 17, "reader0007@example.com", "2026-12-02", "research-news", "sent")
    )
    assert (decision.action, decision.reason, decision.email) == (
        "note", None, "reader0007@example.com",
    )  # fmt: skip
    assert "not of the address" in decision.why


def test_an_exim_report_is_read_by_the_remote_code_its_vague_status_stands_for() -> None:
    """Exim writes Action before Final-Recipient, always Status 5.0.0 for a failure, its
    X-Remote-MTA-* and X-Exim-Diagnostic fields, and the remote reply as Diagnostic-Code:
    the 5.0.0 says nothing of why, so the remote server's own code of the same class in
    that reply (5.1.1) is the report's word, and the address is suppressed."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("exim-dsn.eml"), VERP)
    assert found.kind == "hard" and found.delivery == Delivered(3, 17)
    assert not found.nonstandard and found.message_id == "<E1tI2kQ-00A1bC-0x@mail.example.net>"
    (reported,) = found.recipients
    assert (reported.email, reported.action, reported.status) == (
        "reader0008@example.net", "failed", "5.1.1",
    )  # fmt: skip
    assert reported.diagnostic == (
        "550 5.1.1 <reader0008@example.net>: Recipient address rejected: User unknown in "
        "local recipient table"
    )
    sent = SentTo(3, 17, "reader0008@example.net", "2026-12-02", "research-news", "sent")
    assert (decide(found, sent).action, decide(found, sent).reason) == ("suppress", "bounced")
    # A 5.0.0 whose reply has no code, or one of another class, stays 5.0.0: counted.
    for reply, expected in (
        (b"550 Unrouteable address", "5.0.0"),
        (b"550 see 4.2.2 in our FAQ", "5.0.0"),
        (b"550 see 25.1.1.1 in our FAQ", "5.0.0"),
    ):
        raw = sample("exim-dsn.eml").replace(
            b"550 5.1.1 <reader0008@example.net>: Recipient address rejected: User unknown in",
            reply,
        )
        (vague,) = read(raw, VERP).recipients
        assert vague.status == expected, reply
        assert decide(read(raw, VERP), sent).action == "soft"


def test_a_microsoft_feedback_loop_complaint_with_the_recipient_redacted() -> None:
    """Outlook.com's JMRP report comes to our feedback address with the recipient blanked
    ("To: redacted", no Original-Rcpt-To): the delivery is named by Original-Mail-From, or
    by the reported message's Return-Path (Exchange writes it without angle brackets)."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("microsoft-arf.eml"), VERP)
    assert found.kind == "complaint" and found.feedback_type == "abuse"
    assert found.delivery == Delivered(3, 17) and found.recipients == ()
    assert found.message_id == "<a4f1b2c3-d5e6-4f70-8192-a3b4c5d6e7f8@jmrp.example.com>"
    decision = decide(
        found, SentTo(3, 17, "reader0009@example.com", "2026-12-02", "research-news", "sent")
    )
    assert (decision.action, decision.reason, decision.email, decision.reported) == (
        "suppress", "complained", "reader0009@example.com", None,
    )  # fmt: skip
    # without Original-Mail-From, the reported message's Return-Path names it
    mail_from = b"Original-Mail-From: <" + OURS.encode() + b">\r\n"
    assert mail_from in sample("microsoft-arf.eml")
    without = sample("microsoft-arf.eml").replace(mail_from, b"")
    assert read(without, VERP).delivery == Delivered(3, 17)


def test_an_exchange_online_access_denied_is_a_hard_bounce() -> None:
    """Exchange Online's NDR for a recipient its directory refuses ("550 5.4.1 Recipient
    address rejected: Access denied", directory-based edge blocking: no such recipient):
    hard by 5.4.1, with Original-Recipient and the X-Display-Name Exchange adds; 5.4.1
    suppresses (deciding.permanent_weight counts it as the address gone)."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("outlook-ndr.eml"), VERP)
    assert found.kind == "hard" and found.delivery == Delivered(3, 17)
    assert found.message_id == (
        "<5b0f9e8d-7c6b-4a59-8e7d-6c5b4a392817@AM9PR01MB7890.eurprd01.prod.exchangelabs.com>"
    )
    reported = found.recipients[0]
    assert (reported.email, reported.original, reported.action, reported.status) == (
        "reader0010@example.com", "reader0010@example.com", "failed", "5.4.1",
    )  # fmt: skip
    assert reported.diagnostic.startswith(
        "550 5.4.1 Recipient address rejected: Access denied. For more information see"
    )
    decision = decide(
        found, SentTo(3, 17, "reader0010@example.com", "2026-12-02", "research-news", "sent")
    )
    assert (decision.action, decision.reason) == ("suppress", "bounced")


def test_an_exchange_online_report_has_only_the_recipients_it_names() -> None:
    """Exchange ends its status part with a blank line before the boundary: an empty
    block, which names no recipient and is none."""
    found = read(sample("outlook-ndr.eml"), VERP)
    assert [r.email for r in found.recipients] == ["reader0010@example.com"]


def test_a_yahoo_deferral_given_up_on_is_a_soft_bounce() -> None:
    """Yahoo deferring us ("421 4.7.0 [TSS04] ... temporarily deferred") until our MTA gives up
    on the message: failed with 4.7.0 is soft, counted, never suppressed at once."""
    from newsletter.bounces.deciding import decide
    from newsletter.storage.evidence import SentTo

    found = read(sample("yahoo-dsn-soft.eml"), VERP)
    assert found.kind == "soft" and found.delivery == Delivered(3, 17)
    assert found.message_id == "<4ZrH1k2m3nz5Kq@mail.example.org>"
    (reported,) = found.recipients
    assert (reported.email, reported.action, reported.status) == (
        "reader0011@example.net", "failed", "4.7.0",
    )  # fmt: skip
    assert reported.diagnostic.startswith(
        "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected"
    )
    decision = decide(
        found, SentTo(3, 17, "reader0011@example.net", "2026-12-02", "research-news", "sent")
    )
    assert (decision.action, decision.reason) == ("soft", None)
    assert "the MTA gave up on" in decision.why


def test_a_complaint_naming_our_verp_address_with_a_forged_signature_names_no_one() -> None:
    """A feedback report anyone could write: our bounce address with one character of its
    signature changed, in Original-Mail-From and the reported Return-Path alike."""
    from newsletter.bounces.deciding import decide

    at = OURS.index("@") - 3  # within the token's MAC (not its last, padded character)
    forged = OURS[:at] + ("b" if OURS[at] != "b" else "c") + OURS[at + 1 :]
    assert len(forged) == len(OURS) and forged != OURS and VERP.read(forged) is None
    found = read(sample("microsoft-arf.eml", forged), VERP)
    assert found.kind == "complaint" and found.delivery is None
    decision = decide(found, None)
    assert decision.action == "review" and decision.reason is None
    assert "names no delivery of ours" in decision.why


def test_a_request_whose_from_failed_dmarc_where_it_came_is_left_for_a_person() -> None:
    """A bare request to the unsubscribe address trusts its From; when the server that
    received it found that From forged (dmarc=fail), nobody is taken off (only a failure
    counts: anyone can write "pass" into a header)."""
    from newsletter.bounces.deciding import decide

    head = "From: reader0001@example.org\nTo: leave@example.org\nSubject: unsubscribe\n"
    forged = plain(
        "Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=evil.example;\n"
        " dmarc=fail (p=none) header.from=example.org\n" + head
    )
    honest = plain(
        "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org\n" + head
    )
    lists = lambda email, with_left=False: ["research-news"]  # noqa: E731 - the lists
    for raw, action in ((forged, "review"), (honest, "unsubscribe"), (plain(head), "unsubscribe")):
        found = read(raw, VERP, unsubscribe_to="leave@example.org")
        assert found.kind == "unsubscribe" and found.to_unsubscribe_address
        assert decide(found, None, member_lists=lists).action == action
    assert (
        "failed DMARC"
        in decide(
            read(forged, VERP, unsubscribe_to="leave@example.org"), None, member_lists=lists
        ).why
    )
