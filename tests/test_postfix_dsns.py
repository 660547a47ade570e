"""Real delivery status notifications, made by a real Postfix, read by the bounce reader.

A private Postfix (tests/postfix_server.py) takes each message by SMTP from a VERP
sender of ours and fails to deliver it: to an unknown local user, to a relay (a
test SMTP server) that refuses the recipient with 550, or with 451 until the
message expires from the queue, after a delay warning. The reports it sends back go
to our VERP domain, routed to another test SMTP server that keeps them; each is
read with newsletter.bounces.reading.read, and judged with deciding.decide as the
send log would have it. Skipped where Postfix cannot run (not installed, not root),
unless NEWSLETTER_TEST_POSTFIX_REQUIRED=1, where that fails.

Two of the reports, recorded with {verp} for the VERP address, are in
tests/data/feedback (postfix-local-unknown-user.eml, postfix-expired-4xx.eml), read
by the last test without Postfix.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from newsletter.bounces.deciding import decide
from newsletter.bounces.reading import Feedback, Reported, read
from newsletter.storage.evidence import SentTo
from newsletter.verp import Delivered, Verp
from postfix_server import LOCAL_DOMAIN, QUEUE_LIFETIME, Postfix, missing, running
from smtp_server import Received, Server

SAMPLES = Path(__file__).parent / "data" / "feedback"
VERP = Verp("bounces@bounce.test", b"test-secret-for-the-postfix-dsns-0123")
SEND_ID = 41
RELAY_DOMAIN = "relay.test"
GONE = f"gone@{RELAY_DOMAIN}"
FULL = f"full@{RELAY_DOMAIN}"
GONE_SAYS = f"5.1.1 <{GONE}>: Recipient address rejected: User unknown"
FULL_SAYS = f"4.2.2 <{FULL}>: Mailbox full"
WAIT = 30.0  # seconds a report may take to come back (they take one, or QUEUE_LIFETIME)


@dataclass
class Mail:
    postfix: Postfix
    returned: Server  # where the reports to our VERP domain go
    relay: Server  # RELAY_DOMAIN's server: refuses GONE with 550 and FULL with 451


@pytest.fixture(scope="module")
def mail() -> Iterator[Mail]:
    """One private Postfix for the module, with its two SMTP servers."""
    why = missing()
    if why:
        if os.environ.get("NEWSLETTER_TEST_POSTFIX_REQUIRED"):
            pytest.fail(f"Postfix is required here (NEWSLETTER_TEST_POSTFIX_REQUIRED) but {why}")
        pytest.skip(why)
    returned, relay = Server().start(), Server().start()
    relay.handler.behaviour.reject = {GONE: (550, GONE_SAYS), FULL: (451, FULL_SAYS)}
    try:
        routes = {VERP.domain: returned.port, RELAY_DOMAIN: relay.port}
        with running(routes) as postfix:
            yield Mail(postfix, returned, relay)
    finally:
        returned.stop()
        relay.stop()


def send(mail: Mail, seq: int, to: str) -> str:
    """Hand Postfix one message of delivery (SEND_ID, seq) for ``to``; its VERP sender."""
    sender = VERP.sender(SEND_ID, seq)
    message = EmailMessage()
    message["From"] = "Research News <news@example.org>"
    message["To"] = to
    message["Subject"] = f"Research news, delivery {seq}"
    message.set_content("This week in research.\n")
    mail.postfix.send(sender, to, message)
    return sender


def returned_to(
    mail: Mail, address: str, wanted: Callable[[Feedback], bool], *, within: float = WAIT
) -> tuple[Received, Feedback]:
    """The first report Postfix sent back to ``address`` that ``wanted`` says is the one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for received in mail.returned.handler.to(address):
            feedback = read(received.data, VERP)
            if wanted(feedback):
                return received, feedback
        time.sleep(0.05)
    got = [r.data.decode(errors="replace") for r in mail.returned.handler.to(address)]
    pytest.fail(f"no such report to {address} within {within} s; got {got}\n"
                f"Postfix's log:\n{mail.postfix.log()}")  # fmt: skip


def failed(feedback: Feedback) -> bool:
    return any(r.action == "failed" for r in feedback.recipients)


def sent_to(seq: int, email: str) -> SentTo:
    return SentTo(SEND_ID, seq, email, "2026-12-03", "research-news", "sent")


def test_an_unknown_local_user_is_a_hard_bounce_of_the_delivery_its_verp_address_names(
    mail: Mail,
) -> None:
    to = f"nobody-here@{LOCAL_DOMAIN}"
    sender = send(mail, 1, to)
    received, feedback = returned_to(mail, sender, failed)
    # Sent to our VERP address from the null sender (a bounce is never bounced).
    assert received.rcpt_tos == [sender] and received.mail_from == "<>"
    assert feedback.kind == "hard" and feedback.delivery == Delivered(SEND_ID, 1)
    assert feedback.recipients == (
        Reported(to, "failed", "5.1.1", 'unknown user: "nobody-here"', to),
    )  # fmt: skip
    assert feedback.message_id == received.message["Message-Id"]
    # The address the MTA delivered it to names the same delivery.
    assert read(received.data, VERP, delivered_to=received.rcpt_tos[0]) == feedback
    decision = decide(feedback, sent_to(1, to))
    assert (decision.action, decision.reason, decision.email) == ("suppress", "bounced", to)


def test_a_relay_refusing_the_recipient_with_550_is_a_hard_bounce_with_its_words(
    mail: Mail,
) -> None:
    sender = send(mail, 2, GONE)
    _, feedback = returned_to(mail, sender, failed)
    assert feedback.kind == "hard" and feedback.delivery == Delivered(SEND_ID, 2)
    assert feedback.recipients == (Reported(GONE, "failed", "5.1.1", f"550 {GONE_SAYS}", GONE),)
    assert not mail.relay.handler.to(GONE)
    assert decide(feedback, sent_to(2, GONE)).action == "suppress"


def test_a_mailbox_full_until_the_message_expires_is_a_soft_bounce_the_mta_gave_up_on(
    mail: Mail,
) -> None:
    sent_at = time.monotonic()
    sender = send(mail, 3, FULL)
    received, feedback = returned_to(mail, sender, failed, within=WAIT + QUEUE_LIFETIME)
    # Retried with 451 until it was QUEUE_LIFETIME seconds old, then returned as failed
    # with the 4.x.x status of the last attempt.
    assert received.at - sent_at >= QUEUE_LIFETIME - 1
    queue_id = re.search(rb"X-Postfix-Queue-ID: (\w+)", received.data)
    assert queue_id is not None
    deferred = rf"{queue_id[1].decode()}: to=<{re.escape(FULL)}>.* status=deferred \(.* 451 4\.2\.2"
    tries = re.findall(deferred, mail.postfix.log())
    assert len(tries) >= 2, mail.postfix.log()
    assert feedback.kind == "soft" and feedback.delivery == Delivered(SEND_ID, 3)
    assert feedback.recipients == (Reported(FULL, "failed", "4.2.2", f"451 {FULL_SAYS}", FULL),)
    assert received.message["Subject"] == "Undelivered Mail Returned to Sender"
    decision = decide(feedback, sent_to(3, FULL))
    assert decision.action == "soft" and "gave up" in decision.why


def test_a_delay_warning_is_soft_for_the_reader_and_only_noted_by_the_decision(
    mail: Mail,
) -> None:
    sent_at = time.monotonic()
    sender = send(mail, 4, FULL)
    received, feedback = returned_to(mail, sender, lambda f: True)  # the first one back
    # The warning comes while Postfix still retries: before the message expires.
    assert received.at - sent_at < QUEUE_LIFETIME
    assert received.message["Subject"] == "Delayed Mail (still being retried)"
    # read() judges a recipient by Action and Status together: delayed with 4.x.x is
    # soft, as a failed 4.x.x is; the decision tells the two apart.
    assert feedback.kind == "soft" and feedback.delivery == Delivered(SEND_ID, 4)
    assert feedback.recipients == (
        Reported(FULL, "delayed", "4.2.2", f"451 {FULL_SAYS}", FULL),
    )  # fmt: skip
    decision = decide(feedback, sent_to(4, FULL))
    assert decision.action == "note" and "still trying" in decision.why


@pytest.mark.parametrize(
    ("name", "kind", "recipient"),
    [
        (
            "postfix-local-unknown-user.eml",
            "hard",
            Reported("nobody-here@local.test", "failed", "5.1.1",
                     'unknown user: "nobody-here"', "nobody-here@local.test"),
        ),
        (
            "postfix-expired-4xx.eml",
            "soft",
            Reported(FULL, "failed", "4.2.2", f"451 {FULL_SAYS}", FULL),
        ),
    ],
)  # fmt: skip
def test_the_recorded_postfix_reports_read_as_the_live_ones(
    name: str, kind: str, recipient: Reported
) -> None:
    ours = VERP.sender(SEND_ID, 9)
    data = (SAMPLES / name).read_bytes().replace(b"{verp}", ours.encode())
    feedback = read(data, VERP)
    assert feedback.kind == kind and feedback.delivery == Delivered(SEND_ID, 9)
    assert feedback.recipients == (recipient,)
