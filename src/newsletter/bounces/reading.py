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
4. a request to unsubscribe with a token in its Subject (what our List-Unsubscribe
   mailto: puts there) is ``unsubscribe``, whatever else it carries;
5. a bounce in an MTA's own format (qmail, older Exim, ...) is read by
   :mod:`~newsletter.bounces.nonstandard`: ``hard`` or ``soft`` by a status
   code written next to the address, ``soft`` when there is none
   (:attr:`Feedback.nonstandard` says it was read so);
6. an auto-reply (RFC 3834 ``Auto-Submitted`` other than ``no``, or the
   X-Autoreply / X-Autorespond headers, Precedence auto_reply) is ``auto_reply``;
7. another request to unsubscribe is ``unsubscribe`` too: a Subject starting
   with the word "unsubscribe", or any message delivered to the unsubscribe
   address (RFC 2369: sending to it is the request, whatever it says);
   :attr:`Feedback.token` is the token, if any, :attr:`Feedback.requester` the
   From address, :attr:`Feedback.to_unsubscribe_address` where it came;
8. anything else is ``unknown``.

The delivery comes from our VERP address where the message reached it: the
address the MTA says it delivered to, then Delivered-To, X-Original-To,
Envelope-To and To, then (in a complaint) the reported message's
Original-Mail-From or Return-Path. A message naming no delivery of ours is
still read; what becomes of it is for the caller.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from newsletter.bounces import nonstandard
from newsletter.bounces.status_codes import IN_WORDS
from newsletter.models import visible
from newsletter.verp import Delivered, Verp

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_PARTS",
    "Feedback",
    "FeedbackKind",
    "Reported",
    "judged",
    "read",
]

# A DSN is a few kB and returns at most our own message (~50 kB): 2 MB is generous, and
# bounds what the standard parser may spend on a hostile one.
MAX_BYTES = 2 * 1024 * 1024
# Read before the parser runs: its cost grows with open boundaries and with RFC 2231
# parameter pieces faster than with size.
MAX_BOUNDARIES = 32
MAX_PARAMETER_PIECES = 64
MAX_DEPTH = 12  # report in a message in a report: a handful of levels, never dozens
MAX_PARTS = 200
MAX_DIAGNOSTIC = 500  # characters of a diagnostic kept

FeedbackKind = Literal[
    "hard", "soft", "complaint", "auto_reply", "not_bounce", "unsubscribe", "unknown"
]

_STATUS = re.compile(r"\s*([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![.0-9])", re.ASCII)
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
    # The address as first given (before a forward or an alias), when the report says:
    # the caller matches the failing recipient to the delivery's address by it.
    original: str = ""


@dataclass(frozen=True, slots=True)
class Feedback:
    """What one message from the mail system says."""

    kind: FeedbackKind
    delivery: Delivered | None  # the delivery our VERP address names, if any
    recipients: tuple[Reported, ...] = ()
    why: str = ""  # for unknown ones: why it could not be read (kept with it for review)
    feedback_type: str = ""  # a complaint's Feedback-Type (abuse, fraud, ...)
    message_id: str = ""  # its own Message-ID, to know it again
    nonstandard: bool = False  # a bounce in an MTA's own format, not an RFC 3464 report
    token: str = ""  # an unsubscribe request's token, as its Subject gives it (unchecked)
    requester: str = ""  # an unsubscribe request's From address
    to_unsubscribe_address: bool = False  # it came to our List-Unsubscribe mailto: address
    # The receiving server found its From forged: an Authentication-Results header says
    # dmarc=fail (RFC 8601, 7489). Only a failure counts: a "pass" anyone can write.
    dmarc_failed: bool = False


def read(
    data: bytes,
    verp: Verp | None,
    *,
    delivered_to: str | None = None,
    unsubscribe_to: str | None = None,
) -> Feedback:
    """What the message ``data`` says (module docstring); never raises on its content.
    ``unsubscribe_to`` is the address of our List-Unsubscribe ``mailto:``."""
    if len(data) > MAX_BYTES:
        return Feedback("unknown", None, why=f"larger than {MAX_BYTES // (1024 * 1024)} MB")
    too_complex = _prescan(data)
    if too_complex:
        return Feedback("unknown", None, why=too_complex)
    try:
        message = email.message_from_bytes(data, policy=email.policy.compat32)
        for _ in _parts(message):  # MAX_DEPTH and MAX_PARTS, before anything is read
            pass
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
    # The report's own parts are the top-level report's children (RFC 3464 s. 2,
    # RFC 5965 s. 2); a report inside the returned message is not this one's.
    children = [p for p in message.get_payload() if isinstance(p, Message)] if report else []
    if report == "feedback-report":
        return _complaint(children, verp, delivery, message_id)
    if report == "delivery-status":
        return _dsn(children, delivery, message_id)
    # A request with our token comes first: an auto-reply header, or a quoted bounce in
    # its body, must not hide that someone asked to leave (the law gives two days).
    asked = _UNSUBSCRIBE.match(_subject(message))
    token = (asked.group(1) or "") if asked else ""
    to_us = bool(unsubscribe_to) and _delivered_to(found, unsubscribe_to or "")
    if token:
        return _request(message, delivery, message_id, token, to_us)
    failed = nonstandard.failures(message)
    if failed:
        reported = tuple(Reported(a, action, status, words) for a, action, status, words in failed)
        kind: FeedbackKind = "hard" if any(judged(r) == "hard" for r in reported) else "soft"
        return Feedback(kind, delivery, reported, message_id=message_id, nonstandard=True,
                        why="a bounce in an MTA's own format, not a standard report")  # fmt: skip
    if _is_auto_reply(message):
        return Feedback("auto_reply", delivery, message_id=message_id)
    if asked or to_us:
        return _request(message, delivery, message_id, "", to_us)
    return Feedback("unknown", delivery, why="not a delivery status notification, a "
                    "feedback report nor a request to unsubscribe",
                    message_id=message_id)  # fmt: skip


def _request(
    message: Message, delivery: Delivered | None, message_id: str, token: str, to_us: bool
) -> Feedback:
    senders = email.utils.getaddresses([_text(v) for v in message.get_all("From") or []])
    requester = next((a for _, a in senders if "@" in a), "")[:254]
    results = " ".join(_text(v) for v in message.get_all("Authentication-Results") or [])
    return Feedback("unsubscribe", delivery, message_id=message_id, token=token,
                    requester=requester, to_unsubscribe_address=to_us,
                    dmarc_failed=bool(_DMARC_FAIL.search(results)))  # fmt: skip


_DMARC_FAIL = re.compile(r"\bdmarc\s*=\s*fail\b", re.IGNORECASE | re.ASCII)


def _subject(message: Message) -> str:
    """The Subject as a person reads it: RFC 2047 encoded words decoded."""
    raw = message.get("Subject")
    if raw is None:
        return ""
    try:
        decoded = str(email.header.make_header(email.header.decode_header(str(raw))))
    except (ValueError, LookupError, UnicodeError):  # a broken encoded word: as it is
        decoded = str(raw)
    return _text(decoded)[:2000]


# "unsubscribe" as the Subject's first word (after any Re: or Fwd:), and the token
# our mailto: puts after it (base64url; a version 1 token has a dot).
_UNSUBSCRIBE = re.compile(
    r"\s*(?:(?:re|aw|fwd?|wg|tr)\s*:\s*)*unsubscribe\b[\s:]*([A-Za-z0-9_.-]{16,1000}(?![^\s]))?",
    re.IGNORECASE | re.ASCII,
)


def _delivered_to(found: tuple[str, ...], address: str) -> bool:
    """Whether one of ``found`` is ``address`` (or a +subaddress of it)."""
    local, _, domain = address.lower().rpartition("@")
    for each in found:
        got_local, _, got_domain = each.lower().rpartition("@")
        if got_domain == domain and (got_local == local or got_local.startswith(local + "+")):
            return True
    return False


def _prescan(data: bytes) -> str:
    """Why ``data`` is too costly to hand to the parser at all, or ""."""
    lowered = data.lower()
    if lowered.count(b"boundary") > MAX_BOUNDARIES:
        return f"more than {MAX_BOUNDARIES} MIME boundaries"
    if lowered.count(b"\n--") > 4 * MAX_PARTS:
        return f"more than {MAX_PARTS} MIME parts"
    if len(re.findall(rb"\*[0-9]+\*?\s*=", data)) > MAX_PARAMETER_PIECES:
        return f"more than {MAX_PARAMETER_PIECES} pieces of split header parameters"
    return ""


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
    """A header's value as plain text (compat32 may give a Header object), on one line,
    with control and format characters made visible: it is printed on terminals (an
    escape sequence from a stranger's server must not reach them) and kept."""
    if value is None:
        return ""
    return visible(" ".join(str(value).split()))


def _report_type(message: Message) -> str:
    if message.get_content_type() != "multipart/report":
        return ""
    value = message.get_param("report-type", "")
    return _text(email.utils.collapse_rfc2231_value(value)).lower()


def _addresses(message: Message, delivered_to: str | None) -> tuple[str, ...]:
    """Where the message was delivered: what the MTA says alone, when it says; otherwise
    the addresses (not display names or comments) of the headers that carry it."""
    if delivered_to:
        return (delivered_to,)
    found = []
    for name in _DELIVERED_TO:
        values = [_text(v) for v in message.get_all(name) or []]
        found += [address for _, address in email.utils.getaddresses(values) if address]
    return tuple(dict.fromkeys(found))


def _named(addresses: tuple[str, ...], verp: Verp | None) -> Delivered | None:
    if verp is None:
        return None
    for address in addresses:
        delivery = verp.read(address)
        if delivery is not None:
            return delivery
    return None


def _dsn(children: list[Message], delivery: Delivered | None, message_id: str) -> Feedback:
    status_parts = [p for p in children if p.get_content_type() == "message/delivery-status"]
    if not status_parts:
        return Feedback("unknown", delivery, why="a delivery report without its status part",
                        message_id=message_id)  # fmt: skip
    reported = []
    for part in status_parts:
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        # The first block is the per-message fields; each later one is a recipient's. A
        # block naming no recipient (a blank line before the boundary) is none.
        for block in blocks[1:]:
            if isinstance(block, Message) and (
                block.get("Final-Recipient") or block.get("Original-Recipient")
            ):
                reported.append(_recipient(block))
    kinds = {judged(r) for r in reported}
    # The worst that is sure: one recipient failing for good makes it hard.
    order: tuple[FeedbackKind, ...] = ("hard", "soft", "not_bounce")
    for kind in order:
        if kind in kinds:
            return Feedback(kind, delivery, tuple(reported), message_id=message_id)
    return Feedback("unknown", delivery, tuple(reported),
                    why="a delivery report with no valid status code for its action",
                    message_id=message_id)  # fmt: skip


def judged(reported: Reported) -> FeedbackKind:
    """One recipient, by its Action and Status together (RFC 3464 s. 2.3.3): failed with
    5.x.x is hard; failed or delayed with 4.x.x soft (a message expired in a queue too);
    delivered, relayed or expanded with 2.x.x not a bounce; any other pair unknown."""
    code, action = reported.status[:1], reported.action
    if action == "failed" and code == "5":
        return "hard"
    if action in ("failed", "delayed") and code == "4":
        return "soft"
    if action in _NOT_BOUNCES and code == "2":
        return "not_bounce"
    return "unknown"


def _recipient(block: Message) -> Reported:
    final = _typed_address(block.get("Final-Recipient") or block.get("Original-Recipient"))
    original = _typed_address(block.get("Original-Recipient"))
    match = _STATUS.match(_text(block.get("Status")))
    status = ".".join(match.groups()) if match else ""
    diagnostic = _text(block.get("Diagnostic-Code")).split(";", 1)[-1].strip()
    if status.endswith(".0.0"):
        # A vague Status (Exim writes 5.0.0 for every failure) with the remote server's
        # own code of the same class in its reply: that code is the report's word.
        said = IN_WORDS.search(diagnostic[:200])
        if said and said.group(1) == status[0]:
            status = ".".join(said.groups())
    action = (_text(block.get("Action")).lower().split() or [""])[0]  # no (comment)
    return Reported(final, action[:20], status, diagnostic[:MAX_DIAGNOSTIC], original)


def _typed_address(value: object) -> str:
    """The address of an ``rfc822; addr`` field, cut to what an address may be."""
    return _text(value).split(";", 1)[-1].strip().strip("<>")[:254]


def _complaint(
    children: list[Message],
    verp: Verp | None,
    delivery: Delivered | None,
    message_id: str,
) -> Feedback:
    reports = [p for p in children if p.get_content_type() == "message/feedback-report"]
    if not reports:
        return Feedback("unknown", delivery, why="a feedback report without its report part",
                        message_id=message_id)  # fmt: skip
    fields = _fields(reports[0])
    kind = fields.get("feedback-type", "").lower()  # required (RFC 5965 s. 3.1)
    if delivery is None:
        # A feedback loop sends the report to its own address: ours is in what it reports.
        named: list[str] = [fields.get("original-mail-from", "")]
        for part in children:
            if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
                named += _returned_senders(part)
        delivery = _named(tuple(a.strip().strip("<>") for a in named if a), verp)
    who = fields.get("original-rcpt-to", "").strip().strip("<>")
    recipients = (Reported(who[:254], "", "", ""),) if who else ()
    if kind != "abuse":
        why = f"a feedback report of type {kind[:40]!r}" if kind else "a feedback report "
        why = why if kind else why + "without its Feedback-Type"
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
    submitted = (_text(message.get("Auto-Submitted")).lower().split(";") or [""])[0].strip()
    if submitted and submitted != "no":
        return True
    if any(message.get(name) is not None for name in _AUTO_REPLY):
        return True
    precedence = _text(message.get("Precedence")).lower()
    return precedence in ("auto_reply", "auto-reply")
