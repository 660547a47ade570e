"""Evidence records: what the mail system said back, as the feedback store keeps it.

Input: the raw bytes of a message (or a provider's payload) and what was made of
it. Output: the records that cross :class:`~newsletter.storage.base.FeedbackStore`
(:class:`Evidence` to keep, :class:`Recorded` for what keeping it did,
:class:`Kept` read back, :class:`SentTo` for the delivery a report names), the
soft-bounce policy :class:`SoftBounces`, and the pure helpers both backends use
to store the raw message (:func:`packed`, :func:`unpacked`). No SQL here.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ACTIONS",
    "COUNTED_KINDS",
    "INSERT_COLUMNS",
    "KEPT_COLUMNS",
    "RAW_KEEP",
    "Action",
    "DeliveryTo",
    "Evidence",
    "Kept",
    "Plan",
    "Recorded",
    "Refusal",
    "SentTo",
    "SoftBounces",
    "already",
    "digest_of",
    "frozen_columns",
    "insert_values",
    "kept_row",
    "mentions",
    "packed",
    "planned",
    "scan_mentions",
    "soft_outcome",
    "unpacked",
    "window_start",
]

# The bytes of a message kept as evidence, before compression. A DSN is a few kB and
# returns at most our own message (~50-100 kB); a larger one is kept cut, its full size
# noted, so ten thousand bounces stay tens of megabytes, not gigabytes.
RAW_KEEP = 256 * 1024

# What a piece of feedback makes the store do: suppress the address (``reason``
# says why), count a soft bounce (and suppress once there are too many), take the
# address off the lists it asked to leave (``lists``), note it and do nothing (an
# auto-reply, a delivery report, a delay), or keep it for a person to look at (it
# names no delivery of ours, or not the one it should).
Action = Literal["suppress", "soft", "unsubscribe", "note", "review"]
ACTIONS: tuple[Action, ...] = ("suppress", "soft", "unsubscribe", "note", "review")


@dataclass(frozen=True, slots=True)
class SoftBounces:
    """When soft bounces suppress an address: ``limit`` sends, each with a soft bounce
    the MTA gave up on, within ``days`` days. Older ones no longer count (the decay), so
    a mailbox that was full once is not lost for ever."""

    limit: int = 3
    days: float = 30.0


@dataclass(frozen=True, slots=True)
class SentTo:
    """The delivery a report names (from its VERP address), as the send log has it."""

    send_id: int
    seq: int
    email: str
    issue_id: str
    list_name: str
    state: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A recipient the relay refused in our own SMTP session, as the send log has it."""

    seq: int
    email: str
    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class DeliveryTo:
    """One send's delivery to an address, as ``subscribers show`` lists them."""

    issue_id: str
    list_name: str
    send_id: int
    state: str
    detail: str
    at: str  # its last change
    # What the send log froze for it: the name and columns the message was made with.
    first_name: str = ""
    last_name: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    code: int | None = None  # the relay's last reply code


@dataclass(frozen=True, slots=True)
class Evidence:
    """One message from the mail system and what was decided about it, to be kept.

    ``digest`` identifies it: the same message processed twice (a mailbox fetched
    again after a crash) is recorded once and changes nothing the second time."""

    digest: str
    source: str  # how it came: "pipe", "file", "imap:INBOX", "smtp", "webhook:ses"
    kind: str  # what the reader made of it (a FeedbackKind), or "unsubscribe"
    action: Action
    why: str  # the reason for the action, in words
    raw: bytes  # as it came; cut to RAW_KEEP and compressed when stored
    reason: str | None = None  # the suppression reason, for "suppress"
    email: str | None = None  # whom it is about: the delivery's address, once matched
    send_id: int | None = None
    seq: int | None = None
    reported: str = ""  # the address the report names
    status: str = ""  # RFC 3463 code
    diagnostic: str = ""
    feedback_type: str = ""
    message_id: str = ""
    lists: tuple[str, ...] = ()  # for "unsubscribe": the lists it leaves


@dataclass(frozen=True, slots=True)
class Recorded:
    """What recording a piece of evidence did."""

    id: int  # the evidence id (the one kept before, when ``new`` is False)
    new: bool  # False: this message was recorded before, and nothing changed now
    outcome: str  # in words: "suppressed (bounced)", "soft bounce 2 of 3 within 30 days", ...
    suppressed: str | None = None  # the reason, when this record suppressed the address
    action: Action | None = None  # what was decided when it was first recorded


@dataclass(frozen=True, slots=True)
class Kept:
    """A piece of evidence read back (``raw`` only when asked for, uncompressed)."""

    id: int
    received_at: str
    source: str
    kind: str
    action: Action
    outcome: str
    why: str
    email: str | None
    send_id: int | None
    seq: int | None
    reported: str
    status: str
    diagnostic: str
    feedback_type: str
    message_id: str
    raw_size: int
    raw: bytes | None = field(default=None, repr=False)

    @property
    def cut(self) -> bool:
        """True when only the first RAW_KEEP bytes of it were kept."""
        return self.raw_size > RAW_KEEP


def kept_row(row: Sequence[Any], raw: bytes | None = None) -> Kept:
    """A :class:`Kept` from a row of the backends' shared column list (:data:`KEPT_COLUMNS`)."""
    (id_, received_at, source, kind, action, outcome, why, email, send_id, seq, reported,
     status, diagnostic, feedback_type, message_id, raw_size) = row  # fmt: skip
    return Kept(
        int(id_), str(received_at), str(source), str(kind), action, str(outcome), str(why),
        email, send_id, seq, str(reported), str(status), str(diagnostic), str(feedback_type),
        str(message_id), int(raw_size), raw,
    )  # fmt: skip


# The columns kept_row reads, in its order: both backends select them.
KEPT_COLUMNS = (
    "id, received_at, source, kind, action, outcome, why, email, send_id, seq, reported, "
    "status, diagnostic, feedback_type, message_id, raw_size"
)


def digest_of(raw: bytes) -> str:
    """What identifies a message: the SHA-256 of its bytes, line ends made alike (an MTA
    pipes it with LF, an IMAP server gives it with CRLF: the same message)."""
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def packed(raw: bytes) -> bytes:
    """What is stored of ``raw``: its first RAW_KEEP bytes, gzip-compressed."""
    return gzip.compress(raw[:RAW_KEEP], compresslevel=6, mtime=0)


def unpacked(stored: bytes) -> bytes:
    """The kept bytes back; at most RAW_KEEP of them, whatever the column holds (a file
    edited by hand cannot make this inflate without end)."""
    inflater = zlib.decompressobj(wbits=31)
    return inflater.decompress(bytes(stored), RAW_KEEP)


# The kinds a send's feedback is counted by (FeedbackStore.counts, the send's health):
# "refused" is a refusal in our own session that is not about the address (a block).
COUNTED_KINDS = ("hard", "soft", "complaint", "unsubscribe", "refused")


def window_start(received: str, soft: SoftBounces) -> str:
    """The ISO time ``soft.days`` before ``received``: soft bounces since then count."""
    start = dt.datetime.fromisoformat(received) - dt.timedelta(days=soft.days)
    return start.isoformat(timespec="seconds")


def soft_outcome(sends: int, soft: SoftBounces) -> tuple[str, bool]:
    """(the outcome in words, whether the address is to be suppressed) for an address
    with soft bounces in ``sends`` sends within the window, this one counted."""
    said = f"soft bounce: {sends} of {soft.limit} sends within {soft.days:g} days"
    return said, sends >= soft.limit


def already(outcome: str) -> str:
    """The outcome of a message recorded before, as the second recording says it."""
    return f"recorded before ({outcome}); nothing changed"


def planned(evidence: Evidence, soft_sends: Callable[[], int], soft: SoftBounces) -> Plan:
    """What recording ``evidence`` does: its outcome so far and the suppression it makes.
    ``soft_sends`` counts the address's sends with a soft bounce in the window, this one
    too; it is asked only for a soft bounce (a query, inside the caller's transaction)."""
    if evidence.action == "suppress":
        assert evidence.email and evidence.reason
        return Plan("", evidence.reason)
    if evidence.action == "soft":
        assert evidence.email
        said, bounced = soft_outcome(soft_sends(), soft)
        return Plan(said, "bounced" if bounced else None)
    if evidence.action == "unsubscribe":
        assert evidence.email and evidence.lists
        return Plan("", None, evidence.lists)
    return Plan({"note": "noted", "review": "kept for review"}[evidence.action], None)


@dataclass(frozen=True, slots=True)
class Plan:
    outcome: str
    suppress: str | None  # the suppression reason, when there is one to make
    leave: tuple[str, ...] = ()  # the lists to opt the address out of

    def done(self, made: bool, left: Sequence[str] = ()) -> str:
        """The outcome once the suppression was tried (``made``: it was new), or the
        opt-outs made (``left``: the lists it had not left before)."""
        if self.leave:
            before = [name for name in self.leave if name not in left]
            parts = [f"left {', '.join(left)}"] if left else []
            parts += [f"had already left {', '.join(before)}"] if before else []
            return "; ".join(parts)
        if self.suppress is None:
            return self.outcome
        said = f"suppressed ({self.suppress})" if made else "already suppressed"
        return f"{self.outcome}; {said}" if self.outcome else said


INSERT_COLUMNS = (
    "digest, received_at, source, kind, action, outcome, why, email, send_id, seq, reported, "
    "status, diagnostic, feedback_type, message_id, raw, raw_size"
)


# The domain of the send log's rows for erased people (storage.signups.anonymous_address).
ERASED_DOMAIN = "@erased.invalid"


def insert_values(evidence: Evidence, received: str, outcome: str) -> tuple[Any, ...]:
    """The values of :data:`INSERT_COLUMNS` for ``evidence``, its raw message packed."""
    e = evidence
    if e.email and e.email.endswith(ERASED_DOMAIN):
        # About a delivery to someone erased (a late bounce or complaint): kept for the
        # counts, without what would name them again.
        return (
            e.digest, received, e.source, e.kind, e.action, outcome or "pending", "", e.email,
            e.send_id, e.seq, "", e.status, "", e.feedback_type, "", packed(b""), 0,
        )  # fmt: skip
    return (
        e.digest, received, e.source, e.kind, e.action, outcome or "pending", e.why, e.email,
        e.send_id, e.seq, e.reported, e.status, e.diagnostic, e.feedback_type, e.message_id,
        packed(e.raw), len(e.raw),
    )  # fmt: skip


def frozen_columns(stored: Any) -> dict[str, str]:
    """A delivery's frozen columns as read back: SQLite gives the JSON text, PostgreSQL
    the decoded jsonb, rows frozen before columns were kept NULL (then none)."""
    if stored is None:
        return {}
    value = json.loads(stored) if isinstance(stored, str | bytes) else stored
    return {str(k): str(v) for k, v in sorted(dict(value).items())}


def mentions(raw: bytes, address: str) -> bool:
    """Whether a kept message names ``address`` (normalised) anywhere: in its bytes as
    they came, or in a part's body once its transfer encoding is undone (a returned
    message in base64 or quoted-printable hides the address from a plain search)."""
    wanted = address.lower().encode("utf-8")
    if wanted in raw.lower():
        return True
    try:
        parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
        for part in parsed.walk():
            if part.is_multipart():
                continue
            body = part.get_payload(decode=True)
            if isinstance(body, bytes) and wanted in body.lower():
                return True
    except Exception:  # noqa: BLE001 - a message too broken to parse was searched as bytes
        return False
    return False


# Rows of feedback read at once when searching the kept messages (each up to RAW_KEEP).
SCAN_BATCH = 200


def scan_mentions(
    read: Callable[[str, tuple[Any, ...]], Any], address: str, after_id: int = 0
) -> tuple[list[int], int]:
    """The ids of kept messages not matched to ``address`` whose message names it
    (:func:`mentions`), among those after ``after_id``, and the last id looked at (a
    second scan, inside the erasure's transaction, reads only what came since).
    ``read(sql, params)`` runs a query with ``?`` placeholders; rows whose message was
    already dropped (an erasure before) are not read."""
    found: list[int] = []
    last = after_id
    while True:
        rows = read(
            "SELECT id, raw FROM feedback WHERE id > ? AND raw_size > 0 "
            "AND (email IS NULL OR email <> ?) ORDER BY id LIMIT ?",
            (last, address, SCAN_BATCH),
        ).fetchall()
        for row_id, stored in rows:
            last = int(row_id)
            if mentions(unpacked(stored), address):
                found.append(last)
        if len(rows) < SCAN_BATCH:
            return found, last
