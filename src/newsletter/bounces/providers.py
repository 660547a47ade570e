"""Reading providers' webhooks: one authenticated payload → typed events.

Input: the parsed JSON of a webhook request whose signature or login
:mod:`newsletter.bounces.signatures` has checked, from Amazon SES (the SES
notification inside an SNS message), Mailgun, SendGrid or Postmark. Output:
:class:`ProviderEvent`, one per event: what happened (a
:data:`~newsletter.bounces.reading.FeedbackKind`), the recipients it reports with
their status codes, what names our delivery (the VERP address as its envelope
sender, our Message-ID), the provider's own event id, and the event's bytes to keep
as evidence. Nothing is decided or written here; a payload this cannot read is an
``unknown`` event, kept for review like a bounce nobody understood.

Judged as a mailed DSN is (:mod:`newsletter.bounces.reading`): by the RFC 3463
enhanced status code wherever the provider puts it (``5.x.x`` hard, ``4.x.x`` soft),
never by its label alone: SES has labelled ``550 5.4.4`` "Transient". Only when the
provider gives no code at all is its label used, as a last resort
(:attr:`ProviderEvent.assumed`), and the event says so. A provider's *block* (a
receiving server refusing the sender, SendGrid ``blocked``, Postmark ``Blocked``) is
judged as a refusal in our own SMTP session is (:mod:`newsletter.bounces.refusals`):
only a code about the address suppresses it. A delay (the provider is still trying)
and events about anything but delivery (opens, clicks, a provider's own drop) are
only noted (:attr:`ProviderEvent.noted`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, Unpack

from newsletter.bounces.reading import MAX_DIAGNOSTIC, FeedbackKind, Reported
from newsletter.bounces.refusals import judge_refusal
from newsletter.models import visible

__all__ = [
    "NAMES",
    "Provider",
    "ProviderEvent",
    "canonical",
    "read_mailgun",
    "read_postmark",
    "read_sendgrid",
    "read_ses",
]

Provider = Literal["ses", "mailgun", "sendgrid", "postmark"]

_CODE = re.compile(r"(?<![0-9.])([45])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.])", re.ASCII)
_SMTP_REPLY = re.compile(r"\s*([45][0-9][0-9])(?![0-9])", re.ASCII)
# How the reasons name each provider.
NAMES = {"ses": "SES", "mailgun": "Mailgun", "sendgrid": "SendGrid", "postmark": "Postmark"}


class _Names(TypedDict):
    """What names an event and its delivery, as each reader finds it."""

    event_id: str
    message_id: str
    envelope_sender: NotRequired[str]


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One event of a provider's webhook, read (module docstring)."""

    provider: Provider
    kind: FeedbackKind  # hard, soft (given up on), complaint, not_bounce, unknown
    raw: bytes  # what is kept as evidence: the payload, or the one event of an array
    recipients: tuple[Reported, ...] = ()
    event_id: str = ""  # the provider's own id of this event, when it gives one
    envelope_sender: str = ""  # the MAIL FROM the provider reports (our VERP address)
    message_id: str = ""  # the message's Message-ID as the provider quotes it
    feedback_type: str = ""  # a complaint's type (abuse, ...)
    noted: str = ""  # when only to be noted: what it is, in words
    # The class code ("5.0.0", "4.0.0") judged by when the provider gave no status code
    # and its label decided, as a last resort; "" when a real code decided.
    assumed: str = ""
    why: str = ""  # for an unknown event: why; for an assumed one: the label that decided

    @property
    def email(self) -> str:
        """The address it is about (its first recipient), or ""."""
        return self.recipients[0].email if self.recipients else ""


def _text(value: object, limit: int = 254) -> str:
    """A payload's value as one line of plain text, control characters made visible
    (it is printed on terminals and kept), cut to ``limit``."""
    if value is None or isinstance(value, dict | list):
        return ""
    return visible(" ".join(str(value).split()))[:limit]


def _code(*texts: str) -> str:
    """The first enhanced status code (4.x.x or 5.x.x) in ``texts``, or ""."""
    for text in texts:
        found = _CODE.search(text[:1000])
        if found:
            return ".".join(found.groups())
    return ""


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object, most: int = 50) -> list[Any]:
    """A list's first ``most`` items (our messages have one recipient), or []."""
    return value[:most] if isinstance(value, list) else []


def _bounce(
    provider: Provider,
    raw: bytes,
    recipients: tuple[Reported, ...],
    label: Literal["hard", "soft", ""],
    said: str,
    **names: Unpack[_Names],
) -> ProviderEvent:
    """A bounce judged by its codes; by ``label`` (the provider's words, ``said``) only
    when none of its recipients has one."""
    codes = {r.status[:1] for r in recipients if r.status}
    if "5" in codes:
        return ProviderEvent(provider, "hard", raw, recipients, **names)
    if "4" in codes:
        return ProviderEvent(provider, "soft", raw, recipients, **names)
    if not recipients:
        return ProviderEvent(provider, "unknown", raw, why=f"{said} naming no recipient",
                             **names)  # fmt: skip
    if label:
        word = {"hard": "permanent", "soft": "temporary"}[label]
        return ProviderEvent(
            provider, label, raw, recipients,
            assumed="5.0.0" if label == "hard" else "4.0.0",
            why=f"{NAMES[provider]} gave no status code: judged {word} by its label ({said}), "
            "as a last resort",
            **names,
        )  # fmt: skip
    return ProviderEvent(provider, "unknown", raw, recipients,
                         why=f"{said} without a status code", **names)  # fmt: skip


def _blocked(
    provider: Provider,
    raw: bytes,
    recipient: Reported,
    reply: str,
    said: str,
    **names: Unpack[_Names],
) -> ProviderEvent:
    """A receiving server's block, judged as a refusal in our own session."""
    found = _SMTP_REPLY.match(reply)
    if found:
        judged = judge_refusal(int(found.group(1)), reply[found.end() :].strip(" -"))
    else:  # no SMTP reply code: the class of the enhanced code stands for it
        judged = judge_refusal(550 if recipient.status[:1] != "4" else 450, reply)
    if judged.kind in ("hard", "soft"):
        return ProviderEvent(provider, "hard" if judged.kind == "hard" else "soft", raw,
                             (recipient,), **names)  # fmt: skip
    return ProviderEvent(
        provider, "not_bounce", raw, (recipient,),
        noted=f"{said}: {judged.why}", **names,
    )  # fmt: skip


# ------------------------------------------------------------------ Amazon SES


_SES_LABELS: dict[str, Literal["hard", "soft"]] = {"Permanent": "hard", "Transient": "soft"}


def read_ses(message: object, raw: bytes, event_id: str) -> ProviderEvent:
    """An SES notification (``notificationType``) or event (``eventType``), as the
    ``Message`` of an SNS notification; ``raw`` is the whole SNS message (what was
    signed), ``event_id`` its SNS MessageId (a retry carries the same)."""
    body = _dict(message)
    kind = _text(body.get("notificationType") or body.get("eventType"), 40)
    mail = _dict(body.get("mail"))
    headers = _list(mail.get("headers"))
    ours = _text(_dict(mail.get("commonHeaders")).get("messageId"), 300) or next(
        (_text(_dict(h).get("value"), 300) for h in headers
         if _text(_dict(h).get("name")).lower() == "message-id"),
        "",
    )  # fmt: skip
    names = _Names(event_id=event_id, envelope_sender=_text(mail.get("source")),
                   message_id=ours)  # fmt: skip
    if kind == "Bounce":
        bounce = _dict(body.get("bounce"))
        label = _text(bounce.get("bounceType"), 40)
        by_label: Literal["hard", "soft", ""] = _SES_LABELS.get(label, "")
        found = bounce.get("bouncedRecipients")
        recipients = tuple(
            Reported(
                _text(_dict(r).get("emailAddress")),
                "failed",  # SES reports a bounce once it has stopped trying
                _code(
                    _text(_dict(r).get("status"), 40),
                    _text(_dict(r).get("diagnosticCode"), MAX_DIAGNOSTIC),
                ),
                _text(_dict(r).get("diagnosticCode"), MAX_DIAGNOSTIC),
            )
            for r in _list(found)
        )
        said = f"an SES Bounce of bounceType {label or '(none)'}"
        return _bounce("ses", raw, recipients, by_label, said, **names)
    if kind == "Complaint":
        complaint = _dict(body.get("complaint"))
        found = complaint.get("complainedRecipients")
        recipients = tuple(
            Reported(_text(_dict(r).get("emailAddress")), "", "", "") for r in _list(found)
        )
        feedback_type = _text(complaint.get("complaintFeedbackType"), 40)
        if feedback_type == "not-spam":
            return ProviderEvent("ses", "not_bounce", raw, recipients, noted="an SES "
                                 "complaint of type not-spam: the reader said it is not "
                                 "spam", **names)  # fmt: skip
        return ProviderEvent("ses", "complaint", raw, recipients,
                             feedback_type=feedback_type or "not given", **names)  # fmt: skip
    if kind == "Delivery":
        found = _dict(body.get("delivery")).get("recipients")
        recipients = tuple(Reported(_text(r), "delivered", "", "") for r in _list(found))
        return ProviderEvent("ses", "not_bounce", raw, recipients, **names)
    if kind in ("DeliveryDelay", "Send", "Reject", "Open", "Click", "Rendering Failure",
                "Subscription", "AmazonSnsSubscriptionSucceeded"):  # fmt: skip
        what = "a delay: SES is still trying" if kind == "DeliveryDelay" else "nothing to do"
        found = mail.get("destination")
        recipients = tuple(Reported(_text(r), "", "", "") for r in _list(found, 1))
        return ProviderEvent("ses", "not_bounce", raw, recipients,
                             noted=f"an SES {kind} event: {what}", **names)  # fmt: skip
    return ProviderEvent("ses", "unknown", raw, why=f"an SNS notification that is not an SES "
                         f"event this reads (type {kind or 'missing'})", **names)  # fmt: skip


# --------------------------------------------------------------------- Mailgun


def read_mailgun(payload: object, raw: bytes) -> ProviderEvent:
    """A Mailgun webhook of the current format (``signature`` and ``event-data``)."""
    data = _dict(_dict(payload).get("event-data"))
    event = _text(data.get("event"), 40)
    headers = _dict(_dict(data.get("message")).get("headers"))
    names = _Names(
        event_id=_text(data.get("id"), 200),
        envelope_sender=_text(_dict(data.get("envelope")).get("sender")),
        message_id=_text(headers.get("message-id"), 300),
    )
    recipient = _text(data.get("recipient"))
    if event == "failed":
        status = _dict(data.get("delivery-status"))
        message = _text(status.get("message"), MAX_DIAGNOSTIC)
        description = _text(status.get("description"), MAX_DIAGNOSTIC)
        code = _code(_text(status.get("enhanced-code"), 40), message, description)
        said = f"{_text(status.get('code'), 10)} {message or description}".strip()
        reported = Reported(recipient, "failed", code, said[:MAX_DIAGNOSTIC])
        severity = _text(data.get("severity"), 20)
        if severity == "temporary":
            # Mailgun retries a temporary failure; it reports a permanent one if it gives up.
            return ProviderEvent("mailgun", "soft", raw, (reported,), noted="a Mailgun "
                                 f"temporary failure ({said}): it is still trying",
                                 **names)  # fmt: skip
        label: Literal["hard", ""] = "hard" if severity == "permanent" else ""
        said = f"a Mailgun failed event of severity {severity or '(none)'}"
        return _bounce("mailgun", raw, (reported,), label, said, **names)
    if event == "complained":
        return ProviderEvent("mailgun", "complaint", raw, (Reported(recipient, "", "", ""),),
                             feedback_type="abuse", **names)  # fmt: skip
    if event == "delivered":
        return ProviderEvent("mailgun", "not_bounce", raw,
                             (Reported(recipient, "delivered", "", ""),), **names)  # fmt: skip
    if event:
        return ProviderEvent("mailgun", "not_bounce", raw, (Reported(recipient, "", "", ""),),
                             noted=f"a Mailgun {event} event: nothing to do",
                             **names)  # fmt: skip
    return ProviderEvent("mailgun", "unknown", raw, why="a Mailgun webhook without "
                         "event-data.event", **names)  # fmt: skip


# -------------------------------------------------------------------- SendGrid


def read_sendgrid(event: object, raw: bytes) -> ProviderEvent:
    """One event of a SendGrid Event Webhook's array; ``raw`` is that event's JSON."""
    data = _dict(event)
    if not data:
        return ProviderEvent("sendgrid", "unknown", raw, why="a SendGrid event that is not "
                             "a JSON object")  # fmt: skip
    kind = _text(data.get("event"), 40)
    names = _Names(event_id=_text(data.get("sg_event_id"), 200),
                   message_id=_text(data.get("smtp-id"), 300))  # fmt: skip
    email = _text(data.get("email"))
    reason = _text(data.get("reason") or data.get("response"), MAX_DIAGNOSTIC)
    code = _code(_text(data.get("status"), 40), reason)
    if kind == "bounce":
        reported = Reported(email, "failed", code, reason)
        kind_of = _text(data.get("type"), 20) or _text(data.get("bounce_classification"), 40)
        if kind_of == "blocked":
            return _blocked("sendgrid", raw, reported, reason or code,
                            "a SendGrid block", **names)  # fmt: skip
        # SendGrid reports a bounce (type "bounce") once it has given up.
        return _bounce("sendgrid", raw, (reported,), "hard" if kind_of == "bounce" else "",
                       f"a SendGrid bounce of type {kind_of or '(none)'}",
                       **names)  # fmt: skip
    if kind == "spamreport":
        return ProviderEvent("sendgrid", "complaint", raw, (Reported(email, "", "", ""),),
                             feedback_type="abuse", **names)  # fmt: skip
    if kind == "delivered":
        return ProviderEvent("sendgrid", "not_bounce", raw,
                             (Reported(email, "delivered", code, reason),),
                             **names)  # fmt: skip
    if kind == "deferred":
        return ProviderEvent("sendgrid", "soft", raw, (Reported(email, "delayed", code, reason),),
                             noted=f"a SendGrid deferral ({reason or 'no reason given'}): it "
                             "is still trying", **names)  # fmt: skip
    if kind == "dropped":
        # SendGrid's own suppression list (an address it saw bounce, or unsubscribe from
        # its links), not a report from the receiving server: no evidence of our own.
        return ProviderEvent("sendgrid", "not_bounce", raw, (Reported(email, "", "", reason),),
                             noted=f"dropped by SendGrid without sending "
                             f"({reason or 'no reason given'})", **names)  # fmt: skip
    if kind:
        return ProviderEvent("sendgrid", "not_bounce", raw, (Reported(email, "", "", ""),),
                             noted=f"a SendGrid {kind} event: nothing to do",
                             **names)  # fmt: skip
    return ProviderEvent("sendgrid", "unknown", raw, why="a SendGrid event without its "
                         "event field", **names)  # fmt: skip


# -------------------------------------------------------------------- Postmark

# Postmark's bounce Types, by what they say about the address when no code is given.
_POSTMARK_LABELS: dict[str, Literal["hard", "soft"]] = {
    "HardBounce": "hard",
    "BadEmailAddress": "hard",
    "SoftBounce": "soft",
}
# Types that say nothing about the address (Transient and DnsError: Postmark retries).
_POSTMARK_NOTED = {
    "Transient": "a delay: Postmark is still trying",
    "DnsError": "a DNS error: Postmark is still trying",
    "AutoResponder": "an automatic reply (out of office or the like)",
    "SpamNotification": "a receiving server's spam filter notice, not a reader's complaint",
    "ManuallyDeactivated": "deactivated in Postmark by hand",
    "Unsubscribe": "an unsubscribe in Postmark",
    "Subscribe": "a subscribe in Postmark",
    "OpenRelayTest": "an open relay test",
    "ChallengeVerification": "a challenge-response request",
}


def read_postmark(payload: object, raw: bytes) -> ProviderEvent:
    """A Postmark webhook: RecordType Bounce, SpamComplaint or Delivery (others noted)."""
    data = _dict(payload)
    record = _text(data.get("RecordType"), 40)
    headers = _list(data.get("Headers"))
    metadata = {str(k).lower(): v for k, v in _dict(data.get("Metadata")).items()}
    ours = _text(metadata.get("message-id") or metadata.get("message_id"), 300) or next(
        (_text(_dict(h).get("Value"), 300) for h in headers
         if _text(_dict(h).get("Name")).lower() == "message-id"),
        "",
    )  # fmt: skip
    event_id = _text(data.get("ID"), 100)
    if not event_id and data.get("MessageID"):
        event_id = f"{_text(data.get('MessageID'), 100)} {record}"
    names = _Names(event_id=event_id, message_id=ours)
    email = _text(data.get("Email") or data.get("Recipient"))
    if record == "Bounce":
        details = _text(data.get("Details"), MAX_DIAGNOSTIC)
        description = _text(data.get("Description"), MAX_DIAGNOSTIC)
        code = _code(details, description)
        reported = Reported(email, "failed", code, details or description)
        kind = _text(data.get("Type"), 40)
        if kind == "Blocked":
            return _blocked("postmark", raw, reported, details.removeprefix("smtp;") or code,
                            "a Postmark block", **names)  # fmt: skip
        if kind in _POSTMARK_NOTED and not (code and kind in ("Transient", "DnsError")):
            return ProviderEvent("postmark", "not_bounce", raw, (reported,),
                                 noted=f"a Postmark {kind} bounce: {_POSTMARK_NOTED[kind]}",
                                 **names)  # fmt: skip
        if kind in ("Transient", "DnsError"):
            # Postmark retries these: whatever the code, it has not given up yet.
            return ProviderEvent("postmark", "soft", raw, (reported,),
                                 noted=f"a Postmark {kind} bounce ({code}): "
                                 f"{_POSTMARK_NOTED[kind]}", **names)  # fmt: skip
        return _bounce("postmark", raw, (reported,), _POSTMARK_LABELS.get(kind, ""),
                       f"a Postmark bounce of Type {kind or '(none)'}", **names)  # fmt: skip
    if record == "SpamComplaint":
        return ProviderEvent("postmark", "complaint", raw, (Reported(email, "", "", ""),),
                             feedback_type="abuse", **names)  # fmt: skip
    if record == "Delivery":
        return ProviderEvent("postmark", "not_bounce", raw,
                             (Reported(email, "delivered", "", ""),), **names)  # fmt: skip
    if record:
        return ProviderEvent("postmark", "not_bounce", raw, (Reported(email, "", "", ""),),
                             noted=f"a Postmark {record} event: nothing to do",
                             **names)  # fmt: skip
    return ProviderEvent("postmark", "unknown", raw, why="a Postmark webhook without its "
                         "RecordType", **names)  # fmt: skip


def canonical(value: object) -> bytes:
    """``value`` as JSON bytes, keys sorted: one SendGrid event kept as its own evidence."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
