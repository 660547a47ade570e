"""Reading what the mail system sends back: one raw message → what it says happened.

Input: the bytes of one message as it arrived (from a mailbox, a pipe from the
MTA), the :class:`~newsletter.verp.Verp` of this deployment and, when the MTA
gives it, the address the message was delivered to. Output: a
:class:`Feedback`: its kind (a hard or soft bounce, a complaint, an
auto-reply, not a bounce at all, or unknown), the recipients it reports with
their status codes and diagnostics, and the delivery our VERP address names.
Nothing here decides what to do about it, and nothing is written.

How it classifies, in this order:

1. a message larger than :data:`MAX_BYTES`, or one whose MIME nests deeper
   than :data:`MAX_DEPTH` or holds more than :data:`MAX_PARTS` parts, is
   ``unknown`` (kept for review), before any further reading;
2. a feedback report (ARF, RFC 5965: ``multipart/report;
   report-type=feedback-report``) with Feedback-Type ``abuse`` (or none) is
   a ``complaint``; other feedback types are ``unknown``;
3. a delivery status notification (RFC 3464: ``multipart/report;
   report-type=delivery-status``) is judged by each recipient's Status code,
   never by a provider's words: ``5.x.x`` is ``hard``, ``4.x.x`` is ``soft``;
   Action ``delivered``, ``relayed`` or ``expanded`` (and ``2.x.x``) is
   ``not_bounce``; a report without a valid code is ``unknown``;
4. an auto-reply (RFC 3834 ``Auto-Submitted`` other than ``no``, or the
   X-Autoreply / X-Autorespond headers, Precedence auto_reply) that is not a
   report is ``auto_reply``;
5. anything else is ``unknown``: non-standard bounces are for a later stage.

The delivery comes from our VERP address where the message reached it: the
address the MTA says it delivered to, then Delivered-To, X-Original-To,
Envelope-To and To, then (in a complaint) the reported message's
Original-Mail-From or Return-Path. A message naming no delivery of ours is
still read; what becomes of it is for the caller.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from newsletter.verp import Delivered, Verp

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_PARTS", "Feedback", "FeedbackKind", "Reported", "read"]

MAX_BYTES = 10 * 1024 * 1024  # a DSN is a few kB; its returned message may be large
MAX_DEPTH = 12  # report in a message in a report: a handful of levels, never dozens
MAX_PARTS = 200
MAX_DIAGNOSTIC = 500  # characters of a diagnostic kept

FeedbackKind = Literal["hard", "soft", "complaint", "auto_reply", "not_bounce", "unknown"]

_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_NOT_BOUNCES = {"delivered", "relayed", "expanded"}
# Where a message delivered to our VERP address carries that address, best first.
_DELIVERED_TO = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
# Headers out-of-office programs set besides RFC 3834's Auto-Submitted. Not
# X-Auto-Response-Suppress: Outlook puts it on mail people write, to ask that
# others' robots do not answer it.
_AUTO_REPLY = ("X-Autoreply", "X-Autorespond")


@dataclass(frozen=True, slots=True)
class Reported:
    """One recipient of a delivery status notification, as it reports it."""

    email: str
    action: str  # failed, delayed, delivered, relayed, expanded (lower case), or ""
    status: str  # the RFC 3463 code, "5.1.1", or "" when it gave none that is valid
    diagnostic: str  # the remote MTA's words, cut to MAX_DIAGNOSTIC characters


@dataclass(frozen=True, slots=True)
class Feedback:
    """What one message from the mail system says."""

    kind: FeedbackKind
    delivery: Delivered | None  # the delivery our VERP address names, if any
    recipients: tuple[Reported, ...] = ()
    why: str = ""  # for unknown ones: why it could not be read (kept with it for review)
    feedback_type: str = ""  # a complaint's Feedback-Type (abuse, fraud, ...)
    message_id: str = ""  # its own Message-ID, to know it again


def read(data: bytes, verp: Verp | None, *, delivered_to: str | None = None) -> Feedback:
    """What the message ``data`` says (module docstring); never raises on its content."""
    if len(data) > MAX_BYTES:
        return Feedback("unknown", None, why=f"larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        parts = list(_parts(message))
    except _TooComplex as exc:
        return Feedback("unknown", None, why=str(exc))
    except RecursionError:  # the standard parser's own walk, thousands of levels down
        return Feedback("unknown", None, why=f"MIME nested deeper than {MAX_DEPTH} levels")
    except Exception as exc:  # noqa: BLE001 - hostile input must not crash the reader
        return Feedback("unknown", None, why=f"not a readable message ({type(exc).__name__})")
    message_id = _text(message.get("Message-ID"))[:200]
    found = _addresses(message, delivered_to)
    delivery = _named(found, verp)
    report = _report_type(message)
    if report == "feedback-report":
        return _complaint(message, parts, verp, delivery, message_id)
    if report == "delivery-status":
        return _dsn(parts, delivery, message_id)
    if _is_auto_reply(message):
        return Feedback("auto_reply", delivery, message_id=message_id)
    return Feedback("unknown", delivery, why="not a delivery status notification nor a "
                    "feedback report", message_id=message_id)  # fmt: skip


class _TooComplex(Exception):
    pass


def _parts(message: Message) -> Iterator[Message]:
    """Every part, depth first, without recursion, within MAX_DEPTH and MAX_PARTS."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    count = 0
    while stack:
        part, depth = stack.pop()
        count += 1
        if count > MAX_PARTS:
            raise _TooComplex(f"more than {MAX_PARTS} MIME parts")
        if depth > MAX_DEPTH:
            raise _TooComplex(f"MIME nested deeper than {MAX_DEPTH} levels")
        yield part
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, Message))


def _text(value: object) -> str:
    """A header's value as plain text (compat32 may give a Header object)."""
    return "" if value is None else " ".join(str(value).split())


def _report_type(message: Message) -> str:
    if message.get_content_type() != "multipart/report":
        return ""
    return _text(message.get_param("report-type", "")).lower()


def _addresses(message: Message, delivered_to: str | None) -> tuple[str, ...]:
    found = [delivered_to] if delivered_to else []
    for name in _DELIVERED_TO:
        for value in message.get_all(name) or []:
            found += re.findall(r"[^\s<>,;\"']+@[^\s<>,;\"']+", _text(value))
    return tuple(dict.fromkeys(a for a in found if a))


def _named(addresses: tuple[str, ...], verp: Verp | None) -> Delivered | None:
    if verp is None:
        return None
    for address in addresses:
        delivery = verp.read(address)
        if delivery is not None:
            return delivery
    return None


def _dsn(parts: list[Message], delivery: Delivered | None, message_id: str) -> Feedback:
    status_parts = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    if not status_parts:
        return Feedback("unknown", delivery, why="a delivery report without its status part",
                        message_id=message_id)  # fmt: skip
    reported = []
    for part in status_parts:
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        # The first block is the per-message fields; each later one is a recipient's.
        for block in blocks[1:]:
            if isinstance(block, Message):
                reported.append(_recipient(block))
    codes = [r.status[0] for r in reported if r.status]
    if any(r.action in _NOT_BOUNCES for r in reported) and not any(c in "45" for c in codes):
        return Feedback("not_bounce", delivery, tuple(reported), message_id=message_id)
    if "5" in codes:
        kind: FeedbackKind = "hard"
    elif "4" in codes:
        kind = "soft"
    elif codes:
        kind = "not_bounce"
    else:
        return Feedback("unknown", delivery, tuple(reported),
                        why="a delivery report with no valid status code",
                        message_id=message_id)  # fmt: skip
    return Feedback(kind, delivery, tuple(reported), message_id=message_id)


def _recipient(block: Message) -> Reported:
    final = _text(block.get("Final-Recipient") or block.get("Original-Recipient"))
    address = final.split(";", 1)[-1].strip().strip("<>")
    match = _STATUS.match(_text(block.get("Status")))
    status = ".".join(match.groups()) if match else ""
    diagnostic = _text(block.get("Diagnostic-Code")).split(";", 1)[-1].strip()
    action = _text(block.get("Action")).lower()
    return Reported(address[:254], action[:20], status, diagnostic[:MAX_DIAGNOSTIC])


def _complaint(
    message: Message,
    parts: list[Message],
    verp: Verp | None,
    delivery: Delivered | None,
    message_id: str,
) -> Feedback:
    reports = [p for p in parts if p.get_content_type() == "message/feedback-report"]
    if not reports:
        return Feedback("unknown", delivery, why="a feedback report without its report part",
                        message_id=message_id)  # fmt: skip
    fields = _fields(reports[0])
    kind = fields.get("feedback-type", "abuse").lower()
    if delivery is None:
        # A feedback loop sends the report to its own address: ours is in what it reports.
        named: list[str] = [fields.get("original-mail-from", "")]
        for part in parts:
            if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
                named += _returned_senders(part)
        delivery = _named(tuple(a.strip().strip("<>") for a in named if a), verp)
    who = fields.get("original-rcpt-to", "").strip().strip("<>")
    recipients = (Reported(who[:254], "", "", ""),) if who else ()
    if kind != "abuse":
        why = f"a feedback report of type {kind[:40]!r}"
        return Feedback("unknown", delivery, recipients, why=why, feedback_type=kind[:40],
                        message_id=message_id)  # fmt: skip
    return Feedback("complaint", delivery, recipients, feedback_type=kind, message_id=message_id)


def _fields(part: Message) -> dict[str, str]:
    """The fields of a message/feedback-report part (its body is a header block)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        found: dict[str, str] = {}
        for block in payload:
            if isinstance(block, Message):
                for name, value in block.items():
                    found.setdefault(name.lower(), _text(value))
        return found
    text = payload if isinstance(payload, str) else ""
    parsed = email.message_from_string(text.lstrip(), policy=email.policy.compat32)
    return {name.lower(): _text(value) for name, value in parsed.items()}


def _returned_senders(part: Message) -> list[str]:
    """Return-Path of the message a report returns (whole, or its headers only)."""
    payload = part.get_payload()
    inner: Message | None = None
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        inner = payload[0]
    elif isinstance(payload, str):
        inner = email.message_from_string(payload.lstrip(), policy=email.policy.compat32)
    if inner is None:
        return []
    return [_text(v) for v in inner.get_all("Return-Path") or []]


def _is_auto_reply(message: Message) -> bool:
    submitted = _text(message.get("Auto-Submitted")).lower()
    if submitted and not submitted.startswith("no"):
        return True
    if any(message.get(name) is not None for name in _AUTO_REPLY):
        return True
    precedence = _text(message.get("Precedence")).lower()
    return precedence in ("auto_reply", "auto-reply")
