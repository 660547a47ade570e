"""Providers' webhooks on `newsletter serve` (SES through SNS, Mailgun, SendGrid, Postmark),
through a real uvicorn server on 127.0.0.1, on both backends: each provider's payloads
in its documented format, signed as the provider signs them, suppress exactly the
addresses they should, every accepted event kept as evidence, a retry recorded once;
and every refused request (a bad signature, a wrong key or login, a stale timestamp, a
replay, a certificate off the SNS hosts, an oversized or non-JSON body) changes nothing.

SNS certificates cannot be fetched here (no network): the app takes an
:class:`~newsletter.bounces.signatures.SnsFetcher`, and these tests give it one that
serves a test certificate for the one allowed URL and records every URL asked for.
The URL rules are the app's, checked before any fetcher is asked; the real fetcher's
own checks are tested without fetching."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from starlette.types import ASGIApp

from conftest import REPO, TEST_KEY
from newsletter.audience.csv_import import ParsedRow
from newsletter.bounces.signatures import (
    HttpsSnsFetcher,
    Refused,
    SeenTokens,
    sns_canonical,
    sns_url_problem,
)
from newsletter.errors import ConfigError
from newsletter.models import Outcome
from newsletter.render.loading import load_society
from newsletter.settings import load_settings
from newsletter.storage import Storage, open_storage
from newsletter.verp import Verp
from newsletter.web.app import WebConfig, create_app
from newsletter.web.webhooks import WebhookConfig
from test_web import call, running

ISSUE = "2020-12-23"
LIST = "research-news"
READERS = [f"reader{i}@example.org" for i in range(8)]
VERP = Verp("bounces@bounce.example.org", b"test-secret-for-the-suite-0123456789")
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-feedback"
CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem"
MAILGUN_KEY = "mailgun-signing-key-0123456789abcdef"
POSTMARK = ("postmark", "postmark-password-0123456789")
JSON = "application/json"


def _certificate() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


SNS_KEY, SNS_PEM = _certificate()
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
SENDGRID_PUBLIC = base64.b64encode(
    SENDGRID_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()


@dataclass
class FakeSns:
    """Serves the test certificate at CERT_URL only; records what it is asked."""

    asked: list[str] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)

    def certificate(self, url: str) -> bytes:
        self.asked.append(url)
        if url != CERT_URL:
            raise Refused(502, f"no certificate at {url}")
        return SNS_PEM

    def confirm(self, url: str) -> None:
        self.confirmed.append(url)


@dataclass
class Hooks:
    base: str
    storage: Storage
    sns: FakeSns
    senders: dict[str, str]  # reader → the VERP address of its message
    database: str = ""

    def post(self, provider: str, body: bytes, **headers: str) -> tuple[int, str]:
        status, text, _ = call(f"{self.base}/webhooks/{provider}", body, JSON, headers=headers)
        return status, text

    def suppressed(self) -> dict[str, str]:
        found = {r: self.storage.subscribers.suppression(r) for r in READERS}
        return {r: why for r, why in found.items() if why}

    def evidence(self, reader: str) -> list[Any]:
        return self.storage.feedback.about(reader)


def _app(base: str, storage_at: str, sns: FakeSns, config: WebhookConfig | None) -> ASGIApp:
    return create_app(
        WebConfig(
            TEST_KEY,
            load_society(REPO / "society.yaml").value,
            open_storage(storage_at, busy_seconds=5),
            None,
            public_url=base,
            webhooks=config or WebhookConfig(verp=None),
        )
    )


def all_on(sns: FakeSns) -> WebhookConfig:
    return WebhookConfig(
        verp=VERP,
        ses_topics=frozenset({TOPIC}),
        sns_fetcher=sns,
        mailgun_key=MAILGUN_KEY.encode(),
        sendgrid_key=SENDGRID_PUBLIC,
        postmark_login=POSTMARK,
    )


@pytest.fixture
def hooks(database: str) -> Iterator[Hooks]:
    """A database with a send of ISSUE to READERS (each message sent), and the server."""
    with closing(open_storage(database, create=True)) as storage:
        rows = [ParsedRow(i + 2, r, "", "") for i, r in enumerate(READERS)]
        storage.subscribers.import_rows(LIST, rows, skip_invalid=False)
        send = storage.send_log.freeze(ISSUE, LIST, storage.subscribers.audience(LIST), 0)
        claim = storage.send_log.claim(send.id, 100, now=0.0)
        storage.send_log.record(
            send.id, [(d.seq, Outcome("sent", 250, "2.0.0 ok")) for d in claim.deliveries]
        )
        senders = {d.recipient.email: VERP.sender(send.id, d.seq) for d in claim.deliveries}
        sns = FakeSns()
        with running(lambda base: _app(base, database, sns, all_on(sns))) as base:
            yield Hooks(base, storage, sns, senders, database)


def our_message_id(reader: str, issue: str = ISSUE) -> str:
    """The Message-ID our message to ``reader`` carries (delivery/message.py's rule)."""
    digest = hashlib.sha256(f"{issue}\0{reader}".encode()).hexdigest()[:24]
    return f"<{issue}.{digest}@example.org>"


# ------------------------------------------------------------------ SES / SNS


def sns_signed(
    inner: dict[str, Any] | str,
    *,
    version: str = "1",
    kind: str = "Notification",
    topic: str = TOPIC,
    key: rsa.RSAPrivateKey = SNS_KEY,
    cert_url: str = CERT_URL,
    **extra: str,
) -> dict[str, str]:
    """An SNS message as SNS posts it, signed as AWS documents: the signed fields in their
    order, each name and value followed by a newline."""
    message = {
        "Type": kind,
        "MessageId": secrets.token_hex(16),
        "TopicArn": topic,
        "Message": inner if isinstance(inner, str) else json.dumps(inner),
        "Timestamp": "2026-12-03T09:30:00.000Z",
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
        **extra,
    }
    if kind == "Notification":
        fields = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        fields = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    text = "".join(f"{n}\n{message[n]}\n" for n in fields if n in message)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 - SNS v1
    message["Signature"] = base64.b64encode(
        key.sign(text.encode(), padding.PKCS1v15(), algorithm)
    ).decode()
    return message


def ses_event(reader: str, source: str, kind: str, detail: dict[str, Any]) -> dict[str, Any]:
    """An SES notification (notificationType, as identity notifications send it)."""
    return {
        "notificationType": kind,
        "mail": {
            "timestamp": "2026-12-03T09:00:00.000Z",
            "source": source,
            "messageId": "0100018c-ses-own-id",
            "destination": [reader],
            "commonHeaders": {"messageId": our_message_id(reader)},
        },
        **detail,
    }


def bounced(reader: str, bounce_type: str, status: str | None, diagnostic: str) -> dict[str, Any]:
    recipient: dict[str, str] = {"emailAddress": reader, "action": "failed"}
    if status:
        recipient["status"] = status
        recipient["diagnosticCode"] = diagnostic
    return {"bounce": {"bounceType": bounce_type, "bounceSubType": "General",
                       "bouncedRecipients": [recipient]}}  # fmt: skip


def test_ses_events_suppress_exactly_the_addresses_they_should(hooks: Hooks) -> None:
    r, s = READERS, hooks.senders
    events = {
        # SignatureVersion 1 and 2 both accepted.
        "hard": sns_signed(ses_event(r[0], s[r[0]], "Bounce", bounced(
            r[0], "Permanent", "5.1.1", "smtp; 550 5.1.1 user unknown"))),
        # Labelled Transient, but 5.4.4: the code decides (hard).
        "labelled": sns_signed(ses_event(r[1], s[r[1]], "Bounce", bounced(
            r[1], "Transient", "5.4.4", "smtp; 550 5.4.4 unrouteable")), version="2"),
        "complaint": sns_signed({**ses_event(r[2], s[r[2]], "Complaint", {"complaint": {
            "complainedRecipients": [{"emailAddress": r[2]}],
            "complaintFeedbackType": "abuse"}})}, version="2"),
        "delivery": sns_signed({**ses_event(r[3], s[r[3]], "Delivery", {"delivery": {
            "recipients": [r[3]], "smtpResponse": "250 2.0.0 OK"}})}),
        "no status": sns_signed(ses_event(r[4], s[r[4]], "Bounce", bounced(
            r[4], "Permanent", None, ""))),
        "soft": sns_signed(ses_event(r[5], s[r[5]], "Bounce", bounced(
            r[5], "Transient", "4.2.2", "smtp; 452 4.2.2 mailbox full")), version="2"),
        # Event publishing (eventType) with a delay: noted only.
        "delay": sns_signed({"eventType": "DeliveryDelay", "mail": {"source": s[r[6]],
                             "destination": [r[6]]}, "deliveryDelay": {}}),
    }  # fmt: skip
    for name, message in events.items():
        status, text = hooks.post("ses", json.dumps(message).encode())
        assert (status, text) == (200, "recorded 1 event(s)\n"), name
    # No status code: the label "Permanent" says 5.0.0 at most, which only counts (soft).
    assert hooks.suppressed() == {r[0]: "bounced", r[1]: "bounced", r[2]: "complained"}
    (hard,) = hooks.evidence(r[0])
    assert (hard.source, hard.kind, hard.action, hard.status) == (
        "webhook:ses",
        "hard",
        "suppress",
        "5.1.1",
    )
    assert "matched by its VERP address" in hard.why and hard.outcome == "suppressed (bounced)"
    kept = hooks.storage.feedback.get(hard.id)
    assert kept is not None and json.loads(kept.raw or b"") == events["hard"]
    (last_resort,) = hooks.evidence(r[4])
    assert last_resort.status == "" and "as a last resort" in last_resort.why
    (soft,) = hooks.evidence(r[5])
    assert soft.action == "soft" and soft.outcome == "soft bounce: 1 of 3 sends within 30 days"
    assert [e.action for e in hooks.evidence(r[3])] == ["note"]
    assert [e.action for e in hooks.evidence(r[6])] == ["note"]
    assert "DeliveryDelay" in hooks.evidence(r[6])[0].why
    # SNS retries the same message: recorded once, nothing changes.
    status, text = hooks.post("ses", json.dumps(events["soft"]).encode())
    assert (status, text) == (200, "recorded 1 event(s) (1 recorded before)\n")
    assert len(hooks.evidence(r[5])) == 1
    assert hooks.sns.asked == [CERT_URL]  # fetched once, then kept
    # The next send leaves out exactly those suppressed.
    audience = [x.email for x in hooks.storage.subscribers.audience(LIST)]
    assert audience == [r[3], r[4], r[5], r[6], r[7]]  # r[4]: only counted


def test_sns_subscriptions_are_confirmed_only_for_allowed_topics(hooks: Hooks) -> None:
    url = "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=t"
    confirm = {"SubscribeURL": url, "Token": "t"}
    other = sns_signed("join", kind="SubscriptionConfirmation",
                       topic="arn:aws:sns:eu-west-1:999999999999:not-ours", **confirm)  # fmt: skip
    assert hooks.post("ses", json.dumps(other).encode())[0] == 403
    forged = sns_signed("join", kind="SubscriptionConfirmation", key=OTHER_KEY, **confirm)
    assert hooks.post("ses", json.dumps(forged).encode())[0] == 403
    elsewhere = sns_signed(
        "join",
        kind="SubscriptionConfirmation",
        **{**confirm, "SubscribeURL": "https://evil.example.org/confirm"},
    )
    assert hooks.post("ses", json.dumps(elsewhere).encode())[0] == 403
    assert hooks.sns.confirmed == []
    good = sns_signed("join", kind="SubscriptionConfirmation", version="2", **confirm)
    assert hooks.post("ses", json.dumps(good).encode()) == (200, "subscription confirmed\n")
    assert hooks.sns.confirmed == [url]


# --------------------------------------------------------------------- Mailgun


def mailgun(event: dict[str, Any], *, at: float | None = None, key: str = MAILGUN_KEY,
            token: str | None = None) -> bytes:  # fmt: skip
    timestamp = str(int(time.time() if at is None else at))
    token = token or secrets.token_hex(25)
    mac = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    signature = {"timestamp": timestamp, "token": token, "signature": mac}
    return json.dumps({"signature": signature, "event-data": event}).encode()


def mailgun_event(reader: str, sender: str, event: str, **more: Any) -> dict[str, Any]:
    return {
        "id": secrets.token_hex(8),
        "event": event,
        "timestamp": time.time(),
        "recipient": reader,
        "envelope": {"sender": sender, "targets": reader, "transport": "smtp"},
        "message": {"headers": {"message-id": our_message_id(reader).strip("<>")}},
        **more,
    }


def test_mailgun_events_and_its_signature(hooks: Hooks) -> None:
    r, s = READERS, hooks.senders
    failed = mailgun_event(r[0], s[r[0]], "failed", severity="permanent", reason="bounce",
                           **{"delivery-status": {"code": 550, "message": "5.1.1 The email "
                              "account that you tried to reach does not exist"}})  # fmt: skip
    temporary = mailgun_event(
        r[1],
        s[r[1]],
        "failed",
        severity="temporary",
        **{"delivery-status": {"code": 452, "message": "4.2.2 full"}},
    )
    complained = mailgun_event(r[2], s[r[2]], "complained")
    delivered = mailgun_event(
        r[3], s[r[3]], "delivered", **{"delivery-status": {"code": 250, "message": "OK"}}
    )
    # Signed hours ago: a retry that kept its first signature (Mailgun retries for 8 hours).
    bodies = [mailgun(e, at=time.time() - 7 * 3600) for e in (failed, temporary)]
    bodies += [mailgun(e) for e in (complained, delivered)]
    # Refused first: none of these changes anything.
    stale = mailgun(failed, at=time.time() - 73 * 3600)
    ahead = mailgun(failed, at=time.time() + 600)
    wrong = mailgun(failed, key="another-key-0123456789abcdef")
    assert hooks.post("mailgun", stale)[0] == 403
    assert hooks.post("mailgun", ahead)[0] == 403
    assert hooks.post("mailgun", wrong)[0] == 403
    assert hooks.post("mailgun", b'{"signature": "nope"}')[0] == 400
    assert hooks.suppressed() == {} and hooks.evidence(r[0]) == []
    for body in bodies:
        assert hooks.post("mailgun", body) == (200, "recorded 1 event(s)\n")
    assert hooks.suppressed() == {r[0]: "bounced", r[2]: "complained"}
    (hard,) = hooks.evidence(r[0])
    assert (hard.source, hard.status, hard.send_id) == ("webhook:mailgun", "5.1.1", 1)
    assert [e.action for e in hooks.evidence(r[1])] == ["note"]
    assert "still trying" in hooks.evidence(r[1])[0].why
    assert [e.action for e in hooks.evidence(r[3])] == ["note"]
    # Mailgun retrying the same request: let through, recorded before.
    assert hooks.post("mailgun", bodies[0])[1] == "recorded 1 event(s) (1 recorded before)\n"
    # Its signature carried by another body (the signature does not cover it): a replay.
    token = json.loads(bodies[3])["signature"]["token"]
    signature = json.loads(bodies[3])["signature"]
    forged = json.dumps({"signature": signature, "event-data": mailgun_event(
        r[4], s[r[4]], "complained")}).encode()  # fmt: skip
    assert json.loads(forged)["signature"]["token"] == token
    status, text = hooks.post("mailgun", forged)
    assert status == 409 and "replay" in text
    assert r[4] not in hooks.suppressed() and hooks.evidence(r[4]) == []
    # Another server on the database (or this one restarted) knows the token too.
    with running(lambda base: _app(base, hooks.database, hooks.sns, all_on(hooks.sns))) as second:
        again = call(f"{second}/webhooks/mailgun", forged, JSON)
        assert again[0] == 409 and "replay" in again[1]
        retried = call(f"{second}/webhooks/mailgun", bodies[3], JSON)
        assert retried[0] == 200 and "recorded before" in retried[1]
    assert r[4] not in hooks.suppressed()


def test_seen_tokens_forget_the_oldest_and_then_refuse_what_was_signed_before_it() -> None:
    seen = SeenTokens(keep=3600, most=2)
    seen.check("a", 100, b"one", now=100)
    seen.check("b", 110, b"two", now=110)
    seen.check("a", 100, b"one", now=120)  # a retry: the same body
    with pytest.raises(Refused) as replay:
        seen.check("b", 110, b"forged", now=130)
    assert replay.value.status == 409
    seen.check("c", 140, b"three", now=140)  # full: "a" (arrived at 100) is forgotten
    with pytest.raises(Refused) as forgotten:
        seen.check("a", 100, b"anything", now=150)
    assert forgotten.value.status == 403 and "oldest" in str(forgotten.value)
    seen.check("d", 145, b"signed after it", now=150)  # "b" forgotten now, at 110
    with pytest.raises(Refused):
        seen.check("b", 110, b"two", now=150)  # even with its own body: nobody can tell


# -------------------------------------------------------------------- SendGrid


def sendgrid_headers(body: bytes, *, at: float | None = None,
                     key: ec.EllipticCurvePrivateKey = SENDGRID_KEY) -> dict[str, str]:  # fmt: skip
    timestamp = str(int(time.time() if at is None else at))
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def sendgrid_event(reader: str, event: str, **more: Any) -> dict[str, Any]:
    return {
        "email": reader,
        "timestamp": int(time.time()),
        "event": event,
        "sg_event_id": secrets.token_hex(11),
        "sg_message_id": "sg.own.id",
        **more,
    }


def test_sendgrid_events_matched_by_message_id_or_address(hooks: Hooks) -> None:
    r = READERS
    events = [
        sendgrid_event(r[0], "bounce", type="bounce", status="5.1.1",
                       reason="550 5.1.1 no such user", **{"smtp-id": our_message_id(r[0])}),
        # No Message-ID: the latest delivery to the address.
        sendgrid_event(r[1], "bounce", type="bounce", status="5.1.1", reason="550 gone"),
        # A block for policy: not the address, nobody suppressed.
        sendgrid_event(r[2], "bounce", type="blocked", status="5.7.1",
                       reason="550 5.7.1 blocked by policy"),
        sendgrid_event(r[3], "spamreport"),
        sendgrid_event(r[4], "deferred", response="451 4.7.1 try later"),
        sendgrid_event(r[5], "delivered", response="250 OK"),
        # Our Message-ID, but for another recipient than the one it names: nobody.
        sendgrid_event(r[6], "bounce", type="bounce", status="5.1.1", reason="550 5.1.1",
                       **{"smtp-id": our_message_id(r[7])}),
        sendgrid_event("stranger@example.net", "bounce", type="bounce", status="5.1.1"),
    ]  # fmt: skip
    body = json.dumps(events).encode()
    for at in (time.time() - 73 * 3600, time.time() + 600):
        assert hooks.post("sendgrid", body, **sendgrid_headers(body, at=at))[0] == 403
    assert hooks.post("sendgrid", body, **sendgrid_headers(body[:-1] + b" ]"))[0] == 403
    other = ec.generate_private_key(ec.SECP256R1())
    assert hooks.post("sendgrid", body, **sendgrid_headers(body, key=other))[0] == 403
    assert hooks.post("sendgrid", body)[0] == 401
    assert hooks.suppressed() == {}
    assert hooks.post("sendgrid", body, **sendgrid_headers(body)) == (
        200, "recorded 8 event(s)\n")  # fmt: skip
    assert hooks.suppressed() == {r[0]: "bounced", r[1]: "bounced", r[3]: "complained"}
    assert "our Message-ID (issue 2020-12-23)" in hooks.evidence(r[0])[0].why
    assert "recipient alone, to the latest delivery" in hooks.evidence(r[1])[0].why
    (blocked,) = hooks.evidence(r[2])
    assert blocked.action == "note" and "not the address" in blocked.why
    assert [e.action for e in hooks.evidence(r[4]) + hooks.evidence(r[5])] == ["note", "note"]
    total, review = hooks.storage.feedback.kept_for_review()
    assert total == 2 and {k.reported for k in review} == {r[6], "stranger@example.net"}
    assert all(k.email is None for k in review)
    kept = hooks.storage.feedback.get(hooks.evidence(r[3])[0].id)
    assert kept is not None and json.loads(kept.raw or b"") == events[3]  # one event as raw
    # The same batch again (a retry): every event recorded before.
    again = hooks.post("sendgrid", body, **sendgrid_headers(body))
    assert again == (200, "recorded 8 event(s) (8 recorded before)\n")


# -------------------------------------------------------------------- Postmark


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def postmark_bounce(reader: str, kind: str, details: str, n: int) -> bytes:
    return json.dumps({"RecordType": "Bounce", "ID": 4323372036854775800 + n, "Type": kind,
                       "TypeCode": 1, "MessageID": secrets.token_hex(8), "Email": reader,
                       "Details": details, "Description": "The server was unable to deliver",
                       "BouncedAt": "2026-12-03T09:31:00Z", "Metadata": {}}).encode()  # fmt: skip


def test_postmark_events_behind_basic_auth(hooks: Hooks) -> None:
    r = READERS
    auth = basic(*POSTMARK)
    hard = postmark_bounce(r[0], "HardBounce", "smtp;550 5.1.1 The email account does not exist", 1)
    assert hooks.post("postmark", hard)[0] == 401
    assert (
        hooks.post("postmark", hard, Authorization=basic(POSTMARK[0], "wrong-password"))[0] == 401
    )
    assert hooks.post("postmark", hard, Authorization=basic("someone", POSTMARK[1]))[0] == 401
    assert hooks.suppressed() == {}
    bodies = [
        hard,
        postmark_bounce(r[1], "SoftBounce", "smtp;452 4.2.2 mailbox full", 2),
        # Labelled hard, but its code is 4.x.x: the code decides (soft).
        postmark_bounce(r[2], "HardBounce", "smtp;421 4.4.2 connection dropped", 3),
        postmark_bounce(r[3], "HardBounce", "", 4),  # no code: the label, as a last resort
        json.dumps({"RecordType": "SpamComplaint", "ID": 42, "Type": "SpamComplaint",
                    "Email": r[4], "MessageID": "pm-1", "Metadata": {
                        "Message-ID": our_message_id(r[4])}}).encode(),
        json.dumps({"RecordType": "Delivery", "MessageID": "pm-2", "Recipient": r[5],
                    "DeliveredAt": "2026-12-03T09:31:00Z", "Details": "ok"}).encode(),
    ]  # fmt: skip
    for body in bodies:
        assert hooks.post("postmark", body, Authorization=auth) == (200, "recorded 1 event(s)\n")
    # No code: judged permanent by the label, which only counts (a vague 5.0.0: soft).
    assert hooks.suppressed() == {r[0]: "bounced", r[4]: "complained"}
    assert [e.action for e in hooks.evidence(r[1]) + hooks.evidence(r[2])] == ["soft", "soft"]
    assert [e.action for e in hooks.evidence(r[3])] == ["soft"]
    assert "as a last resort" in hooks.evidence(r[3])[0].why
    assert "our Message-ID" in hooks.evidence(r[4])[0].why
    assert [e.action for e in hooks.evidence(r[5])] == ["note"]


# ------------------------------------------------------- refused: nothing changes


def test_refused_requests_change_nothing(hooks: Hooks) -> None:
    r, s = READERS, hooks.senders
    inner = ses_event(r[0], s[r[0]], "Bounce", bounced(r[0], "Permanent", "5.1.1", "550 5.1.1"))
    message = sns_signed(inner)
    altered = {**message, "Message": message["Message"].replace("5.1.1", "5.1.2")}
    assert hooks.post("ses", json.dumps(altered).encode())[0] == 403
    forged = sns_signed(inner, key=OTHER_KEY)
    assert hooks.post("ses", json.dumps(forged).encode())[0] == 403
    for url in ("https://sns.eu-west-1.amazonaws.com.evil.org/cert.pem",
                "http://sns.eu-west-1.amazonaws.com/cert.pem",
                "https://sns.eu-west-1.amazonaws.com/cert.txt",
                "https://evil.example.org/sns.eu-west-1.amazonaws.com.pem"):  # fmt: skip
        assert hooks.post("ses", json.dumps(sns_signed(inner, cert_url=url)).encode())[0] == 403
    assert hooks.post("ses", json.dumps(sns_signed(inner, version="3")).encode())[0] == 400
    other_topic = sns_signed(inner, topic="arn:aws:sns:eu-west-1:999999999999:theirs")
    assert hooks.post("ses", json.dumps(other_topic).encode())[0] == 403
    assert hooks.sns.asked == [CERT_URL]  # the bad hosts were never fetched
    too_big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    for provider in ("ses", "mailgun", "sendgrid"):
        assert hooks.post(provider, too_big)[0] == 413, provider
        assert hooks.post(provider, b"not json {")[0] in (400, 401), provider
    assert hooks.post("postmark", too_big, Authorization=basic(*POSTMARK))[0] == 413
    assert hooks.post("postmark", b"\xff\xfe", Authorization=basic(*POSTMARK))[0] == 400
    assert hooks.post("ses", b"not json {")[0] == 400
    assert hooks.post("mailgun", b"[1, 2]")[0] == 400
    body = b'{"not": "an array"}'
    assert hooks.post("sendgrid", body, **sendgrid_headers(body))[0] == 400
    status, _, _ = call(f"{hooks.base}/webhooks/ses")  # a GET
    assert status == 405
    assert hooks.suppressed() == {}
    assert all(hooks.evidence(x) == [] for x in READERS)
    assert hooks.storage.feedback.kept_for_review()[0] == 0


def test_webhooks_are_off_until_configured(tmp_path: Path) -> None:
    db = tmp_path / "off.sqlite3"
    open_storage(db, create=True).close()
    with running(lambda base: _app(base, str(db), FakeSns(), None)) as base:
        for provider in ("ses", "mailgun", "sendgrid", "postmark"):
            status, _, _ = call(f"{base}/webhooks/{provider}", b"{}", JSON)
            assert status == 404, provider


# ------------------------------------------------------------ the pieces alone


def test_sns_canonical_string_ends_with_a_newline_and_skips_a_missing_subject() -> None:
    base = {"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": "hi",
            "Timestamp": "ts", "SignatureVersion": "1"}  # fmt: skip
    assert sns_canonical(base) == b"Message\nhi\nMessageId\nm\nTimestamp\nts\nTopicArn\nt\nType\n"\
        b"Notification\n"  # fmt: skip
    with_subject = sns_canonical({**base, "Subject": "s"})
    assert with_subject.startswith(b"Message\nhi\nMessageId\nm\nSubject\ns\nTimestamp\n")
    confirmation = {**base, "Type": "SubscriptionConfirmation", "SubscribeURL": "u", "Token": "k"}
    assert sns_canonical(confirmation) == (
        b"Message\nhi\nMessageId\nm\nSubscribeURL\nu\nTimestamp\nts\nToken\nk\nTopicArn\nt\n"
        b"Type\nSubscriptionConfirmation\n"
    )


def test_the_real_fetcher_refuses_urls_off_the_sns_hosts_without_fetching() -> None:
    good = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"
    assert sns_url_problem(good, certificate=True) is None
    assert (
        sns_url_problem(
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-9f.pem",
            certificate=True,
        )
        is None
    )
    for bad in ("http://sns.us-east-1.amazonaws.com/x.pem",
                "https://sns.us-east-1.amazonaws.com.evil.org/x.pem",
                "https://evil.org/sns.us-east-1.amazonaws.com/x.pem",
                "https://user@sns.us-east-1.amazonaws.com/x.pem",
                "https://sns.us-east-1.amazonaws.com:8443/x.pem",
                "https://sns.us-east-1.amazonaws.com/x.pem?x=1",
                "https://sns.us-east-1.amazonaws.com/x.txt",
                "https://s3.amazonaws.com/x.pem", "https://127.0.0.1/x.pem",
                # the host is right, but the path is not SNS's own certificate's
                "https://sns.us-east-1.amazonaws.com/x.pem",
                "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem/..",
                "https://sns.us-east-1.amazonaws.com/a/SimpleNotificationService-a.pem",
                ):  # fmt: skip
        assert sns_url_problem(bad, certificate=True), bad
        with pytest.raises(Refused) as refused:
            HttpsSnsFetcher(timeout=0.01).certificate(bad)
        assert refused.value.status == 403
    confirm = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=t"
    assert sns_url_problem(confirm, certificate=False) is None
    with pytest.raises(Refused):
        HttpsSnsFetcher(timeout=0.01).confirm("https://evil.org/?Action=ConfirmSubscription")


def test_webhook_settings_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("NEWSLETTER_WEBHOOK_SES_TOPICS", "NEWSLETTER_WEBHOOK_SENDGRID_KEY",
                "NEWSLETTER_WEBHOOK_POSTMARK_USER", "NEWSLETTER_WEBHOOK_MAILGUN_KEY"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    settings = load_settings(webhook_ses_topics=f"{TOPIC}, arn:aws:sns:us-east-1:123456789012:b",
                             webhook_sendgrid_key=SENDGRID_PUBLIC)  # fmt: skip
    assert settings.ses_topics == {TOPIC, "arn:aws:sns:us-east-1:123456789012:b"}
    for bad, said in (
        ({"webhook_ses_topics": "ses-feedback"}, "is not an SNS topic ARN"),
        ({"webhook_sendgrid_key": "bm90IGEga2V5"}, "is not a base64 public key"),
        ({"webhook_postmark_user": "pm"}, "set both or neither"),
        ({"webhook_mailgun_key": "short"}, "signing key"),
    ):
        with pytest.raises(ConfigError, match=said):
            load_settings(**bad)


def test_the_settings_make_the_webhook_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from newsletter import wiring

    monkeypatch.chdir(tmp_path)
    settings = load_settings(
        secret_key="test-secret-for-the-suite-0123456789",  # noqa: S106 - a test key
        bounce_address="bounces@bounce.example.org",
        webhook_ses_topics=TOPIC,
        webhook_mailgun_key=MAILGUN_KEY,
        webhook_postmark_user=POSTMARK[0],
        webhook_postmark_password=POSTMARK[1],
    )
    config = wiring.webhook_config(settings)
    assert config.verp == VERP and config.ses_topics == {TOPIC}
    assert config.mailgun_key == MAILGUN_KEY.encode() and config.postmark_login == POSTMARK
    assert config.sendgrid_key is None  # off
    assert isinstance(config.sns_fetcher, HttpsSnsFetcher)
    assert MAILGUN_KEY not in repr(config) and POSTMARK[1] not in repr(config)
