"""Storage interface: what every stage needs from a database, as Protocols and records.

Input: nothing (the interface). Output: the Protocols :class:`Storage` (one open
database) with its stores :class:`Subscribers`, :class:`SendLogStore`,
:class:`IssueArchive`, :class:`SlotStore` and its :class:`Lease`s, and the
records (frozen dataclasses) that cross them. Stages take a ``Storage`` or the
narrow store they need, never a connection or a path.

:mod:`newsletter.storage.sqlite` implements it on one SQLite file; a PostgreSQL
backend (several machines sending one campaign) implements the same methods and
keeps the guarantees each docstring states. The ones the product rests on:

- **claim** is atomic: two senders never get the same recipient, and the rows
  are committed ``sending`` before it returns;
- **sending** after a crash means *fate unknown*: :meth:`SendLogStore.mark_interrupted`
  turns such rows ``unknown``, never silently ``pending``;
- **freeze** writes all of a send's rows or none, once per issue and list;
- a **lease** expires ``ttl`` seconds after its last renewal, and its holder
  learns when it lost it.

Errors: a store raises :class:`newsletter.errors.StorageBusy` or
:class:`newsletter.errors.StorageUnavailable` when the database cannot be used
(never the driver's own exception); a bug in a query stays a plain exception.
Threads: a store is used by one thread at a time, though not always the one
that opened it (a send hands its log to a database thread); a second thread
that needs the database at the same time takes :meth:`Storage.reopen`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from newsletter.errors import Problem
from newsletter.models import Delivery, DeliveryState, Outcome, Recipient
from newsletter.storage.caps import CapReached, Caps, Claim
from newsletter.storage.evidence import (
    DeliveryTo,
    Evidence,
    Kept,
    Recorded,
    Refusal,
    SentTo,
    SoftBounces,
)
from newsletter.storage.signups import (
    ConfirmedSignup,
    ConsentRecord,
    Erased,
    ErasureCheck,
    ImportConsent,
    Joined,
    MailState,
    NewSignup,
    OutboxMail,
    PendingSignup,
)

if TYPE_CHECKING:
    from newsletter.audience.csv_import import ParsedRow

__all__ = [
    "BATCH",
    "LEASE_SECONDS",
    "MAX_ERASED_LINES",
    "MAX_LIFT_REASON",
    "MAX_PROBLEMS",
    "ArchivedIssue",
    "CapReached",
    "Caps",
    "Claim",
    "Delivery",
    "Evidence",
    "FeedbackStore",
    "ImportReport",
    "IssueArchive",
    "Kept",
    "Lease",
    "ListStates",
    "Member",
    "Outcome",
    "Published",
    "Recorded",
    "SendLogStore",
    "SendRecord",
    "SentTo",
    "SlotKey",
    "SlotState",
    "SlotStore",
    "SoftBounces",
    "Source",
    "SourceUse",
    "Storage",
    "Subscribers",
    "Summary",
    "Suppression",
    "Worker",
    "batches",
    "lift_reason",
    "send_lease_name",
]

T = TypeVar("T")

LEASE_SECONDS = 120.0
MAX_LIFT_REASON = 200
# The problems an import keeps for its report; more are counted, not held (flat memory).
MAX_PROBLEMS = 10_000
# The lines of erased addresses an import names; more are counted.
MAX_ERASED_LINES = 20
# Rows a store reads (a stream) or writes (a removal) at a time, on every backend.
BATCH = 1000

# What became of a schedule slot (``newsletter schedule`` shows it).
SlotState = Literal["sending", "done", "incomplete", "missed", "expired", "no-issue", "failed"]
# Where a member of a list stands (Member.state; an export's newsletter_state column).
MemberState = Literal["subscribed", "opted-out", "suppressed"]
# The recipients a resumed send may queue again (--resend-unknown, --retry-rejected).
RequeueState = Literal["unknown", "rejected"]


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SendRecord:
    """One send: an issue to a list, frozen once; ``audience`` rows in its log."""

    id: int
    issue_id: str
    list_name: str
    created_at: str
    audience: int
    suppressed: int
    duplicates: int = 0  # left out: another list's send of this issue has them


@dataclass(slots=True)
class ImportReport:
    list_name: str
    added: int = 0  # new on this list
    updated: int = 0  # already on this list; the file's columns refreshed
    duplicates: int = 0  # the same address again further down the file
    suppressed: int = 0  # on the list now, but will never be mailed (opted out or suppressed)
    opted_out: int = 0  # of those, opted out of this list by the file's newsletter_state
    newly_suppressed: int = 0  # suppressed by the file's newsletter_state
    skipped: int = 0  # bad rows (records): each has one or more problems
    problems: list[Problem] = field(default_factory=list)  # the first MAX_PROBLEMS
    more_problems: int = 0  # problems beyond those
    committed: bool = False
    columns: list[str] = field(default_factory=list)  # the file's own, beyond email and names
    erased: int = 0  # rows refused: the person's data was erased at their request
    erased_lines: list[int] = field(default_factory=list)  # the first MAX_ERASED_LINES
    consented: int = 0  # consent records this import wrote (members without one for the list)

    def refuse_erased(self, line: int) -> None:
        self.erased += 1
        if len(self.erased_lines) < MAX_ERASED_LINES:
            self.erased_lines.append(line)


@dataclass(frozen=True, slots=True)
class Member:
    email: str
    first_name: str
    last_name: str
    attributes: dict[str, str]
    suppressed: str | None  # the reason, if the address is suppressed (every list)
    suppressed_since: str | None = None
    opted_out_since: str | None = None  # when it left this list, if it did

    @property
    def state(self) -> MemberState:
        """subscribed (will be mailed), opted-out (of this list) or suppressed (every list)."""
        if self.suppressed:
            return "suppressed"
        return "opted-out" if self.opted_out_since else "subscribed"


@dataclass(frozen=True, slots=True)
class ListStates:
    """A list's members by state; each member is counted once (suppressed first)."""

    subscribed: int  # will be mailed
    opted_out: int  # left this list
    suppressed: dict[str, int]  # by reason

    @property
    def members(self) -> int:
        return self.subscribed + self.opted_out + sum(self.suppressed.values())


@dataclass(frozen=True, slots=True)
class Suppression:
    email: str
    reason: str
    list_name: str | None  # where the request came from, if known
    since: str


@dataclass(frozen=True, slots=True)
class Source:
    """An issue file as a send used it: the path as given, and the SHA-256 of its bytes."""

    file: str
    sha256: str

    @classmethod
    def of(cls, path: Path) -> Source:
        return cls(str(path), hashlib.sha256(path.read_bytes()).hexdigest())


@dataclass(frozen=True, slots=True)
class ArchivedIssue:
    issue_id: str
    subject: str
    date: str  # YYYY-MM-DD
    preheader: str
    html: str  # the web version
    source: Source
    frozen_at: str = ""  # ISO time, UTC; empty: now, when it is frozen


@dataclass(frozen=True, slots=True)
class Published:
    """An issue delivered to at least one person: a line of the archive's index."""

    issue_id: str
    first_sent: str  # ISO time the first send of it started
    # False for a send made before the archive kept what was sent: its page is
    # then rendered from the issue file.
    archived: bool


@dataclass(frozen=True, slots=True)
class Summary:
    """An archive row without its HTML."""

    issue_id: str
    subject: str
    date: str
    preheader: str
    frozen_at: str


@dataclass(frozen=True, slots=True)
class SourceUse:
    """Where an issue id was used before: one send, or the archive row."""

    what: str  # "the send to LIST" or "the archive"
    source: Source | None  # None: recorded before sends kept their source
    at: str


@dataclass(frozen=True, slots=True)
class Worker:
    """A live process of a send: where it runs, since when, its last heartbeat, and how
    many recipients it has claimed and not yet recorded (``sending``)."""

    host: str
    pid: str
    since: float | None  # unix time it took its lease
    heartbeat: float | None  # unix time of its last renewal (the database's clock)
    expires: float  # unix time its lease runs out without another renewal
    claimed: int


class SlotKey(Protocol):
    """A schedule slot as the slot store keys it (``schedule.slots.Slot`` is one)."""

    @property
    def key(self) -> str: ...  # the slot's instant, UTC, e.g. 2026-12-03T14:00Z

    @property
    def local_day(self) -> dt.date: ...


# ---------------------------------------------------------------- pure helpers


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read as they are taken."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def send_lease_name(issue_id: str, list_name: str) -> str:
    """The name of the lease a run of the send of ``issue_id`` to ``list_name`` holds
    (on a backend that shares sends, each process's lease starts with it)."""
    return f"send:{issue_id}:{list_name}"


def lift_reason(text: str) -> str:
    """The reason given for lifting a suppression, stripped; ValueError unless it is one
    line of at most MAX_LIFT_REASON characters (it goes into the log, and onto screens)."""
    reason = text.strip()
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in reason):
        raise ValueError("must be one line of text, without control or direction characters")
    if not reason:
        raise ValueError("say why the address may be mailed again")
    if len(reason) > MAX_LIFT_REASON:
        raise ValueError(f"is {len(reason)} characters; at most {MAX_LIFT_REASON}")
    return reason


# ---------------------------------------------------------------- stores


class Subscribers(Protocol):
    """Lists, their members, opt-outs (one list) and suppressions (every list).

    Each member of a list is subscribed, opted out of that list, or suppressed
    (unsubscribed, bounced, complained). Every change commits before the method
    returns; no import lifts an opt-out or a suppression."""

    def import_rows(
        self,
        list_name: str,
        rows: Iterable[ParsedRow | Problem],
        *,
        skip_invalid: bool,
        actor: str = "import",
        consent: ImportConsent | None = None,
        erased: ErasureCheck | None = None,
    ) -> ImportReport:
        """Add rows to a list: every good row or, when a bad one is found and bad rows are
        not skipped, none (one transaction, ``report.committed`` says which). Columns a row
        lacks keep their stored values; an export's state column is recorded by ``actor``.
        The rows are read and checked before the write lock is taken. ``erased`` says
        which addresses were erased (refused, counted in ``report.erased``); ``consent``
        is written as the consent record of every row without one for this list."""
        ...

    def lists(self) -> list[tuple[str, int]]:
        """Every list with its number of members (any state), by name."""
        ...

    def count(self, list_name: str) -> tuple[int, int]:
        """(members, of whom suppressed or opted out)."""
        ...

    def states(self, list_name: str) -> ListStates:
        """The members of ``list_name`` by state; each counted once, suppressed first."""
        ...

    def attribute_names(self, list_name: str) -> list[str]:
        """Every attribute a member has and every column the list was imported with,
        sorted: the export's columns."""
        ...

    def columns(self, list_name: str) -> list[str]:
        """The columns ``list_name`` was ever imported with, beyond email and names, in the
        order they came (empty ones too): the merge fields a send to it can use."""
        ...

    def recipient(self, email: str) -> Recipient | None:
        """The subscriber ``email`` (normalised) with every attribute, or None."""
        ...

    def members(self, list_name: str) -> Iterator[Member]:
        """Every member with its state, in a stable order; memory stays flat."""
        ...

    def audience(self, list_name: str, columns: Sequence[str] = ()) -> Iterator[Recipient]:
        """Who a send to ``list_name`` goes to now: members less suppressed and opted-out
        ones, in a stable order, each with only the attributes named in ``columns``."""
        ...

    def suppression(self, email: str) -> str | None:
        """Why ``email`` is suppressed, or None."""
        ...

    def suppression_info(self, email: str) -> Suppression | None:
        """Why and since when ``email`` is suppressed, or None."""
        ...

    def suppression_history(self, email: str) -> list[tuple[str, str, str, str | None, str]]:
        """The suppression log of ``email``, oldest first: (when, action, reason, list, who)."""
        ...

    def remove(self, list_name: str, emails: Iterable[str]) -> int:
        """Take addresses off a list (one transaction); how many were on it."""
        ...

    def suppress(
        self, email: str, reason: str, *, list_name: str | None = None, actor: str = "cli"
    ) -> bool:
        """Never mail ``email`` again, on any list; False if it already was, for this reason
        or a weightier one (complained > bounced > unsubscribed replaces a lighter one).
        Logged with ``actor``."""
        ...

    def unsuppress(self, email: str, *, reason: str, actor: str) -> str | None:
        """Lift the suppression (logged with ``reason`` and ``actor``); the reason it had, or
        None. ValueError unless ``reason`` passes :func:`lift_reason`."""
        ...

    def opt_out(self, list_name: str, email: str) -> bool:
        """``email`` leaves ``list_name``: no later send to it reaches them, even after a
        re-import. False if it had left already."""
        ...

    def opt_in(self, list_name: str, email: str) -> bool:
        """Undo :meth:`opt_out`; False if it had not left."""
        ...

    def lists_of(self, email: str) -> list[tuple[str, bool]]:
        """The lists ``email`` is a member of, by name, each with whether it left it."""
        ...

    def choose_lists(self, email: str, wanted: Collection[str], *, actor: str) -> str | None:
        """Save a preferences form in one transaction; the suppression reason after.

        Stays on the lists in ``wanted`` it is a member of, leaves the others;
        leaving every one suppresses it (``unsubscribed``); choosing one lifts an
        ``unsubscribed`` suppression, never ``bounced`` or ``complained``."""
        ...


class SendLogStore(Protocol):
    """The durable record of every recipient's fate in each send.

    A recipient moves ``pending → sending → sent | rejected | deferred``; every
    move is committed before the method returns. ``sending`` is committed before
    its transaction starts, so after a crash the rows still ``sending`` are
    exactly those whose fate is unknown."""

    def find(self, issue_id: str, list_name: str) -> SendRecord | None:
        """The send of ``issue_id`` to ``list_name``, or None if it was never frozen."""
        ...

    def lists_sent(self, issue_id: str) -> list[str]:
        """The lists ``issue_id`` has a send to (started, finished or not), by name."""
        ...

    def freeze(
        self, issue_id: str, list_name: str, audience: Iterable[Recipient], suppressed: int
    ) -> SendRecord:
        """Record who this send goes to: all rows or none, once per issue and list (a
        second freeze of the same pair fails). Leaves out, and counts in ``duplicates``,
        every address another list's send of ``issue_id`` has (any state but
        ``suppressed``); two freezes of one issue take turns, so each sees the other's rows.
        A second freeze of the same pair raises :class:`newsletter.errors.SendExists`
        and writes nothing."""
        ...

    def duplicates(self, issue_id: str, list_name: str, first: int = 5) -> tuple[int, list[str]]:
        """What :meth:`freeze` would leave out now, read only: how many, and the first
        ``first`` addresses it would keep (when any are left out)."""
        ...

    def empty_values(
        self, issue_id: str, list_name: str, fields: Sequence[str]
    ) -> tuple[int, list[int]]:
        """(whom the send would mail now, how many of them have no value for each of
        ``fields``). Before the freeze: the audience less :meth:`duplicates`; after: its
        recipients still to be mailed. Blank and invisible-only values are no value."""
        ...

    def mark_interrupted(self, send_id: int) -> int:
        """Turn rows left ``sending`` by a dead run into ``unknown`` (they may have been
        delivered; never back to ``pending``); how many. On a backend of one process per
        send, call it only while holding the send's lease, so no live run's rows are taken
        for dead ones; on one that shares sends (:attr:`Storage.shared_sends`) it takes
        only rows whose claimant's lease has run out (by the database's clock), so any
        process may call it at any time."""
        ...

    def pause(self, send_id: int, reason: str | None) -> None:
        """Mark send ``send_id`` as paused for ``reason`` (its health), or (None) as not."""
        ...

    def paused(self, send_id: int) -> str | None:
        """Why send ``send_id`` paused itself, or None if it is not paused."""
        ...

    def make_deferred_due(self, send_id: int) -> None:
        """Make every deferred recipient due now (a new run retries them straight away)."""
        ...

    def requeue(self, send_id: int, state: RequeueState) -> int:
        """Put every recipient in ``state`` (``unknown`` or ``rejected``) back to
        ``pending``, when the user asks; how many. ValueError for any other state."""
        ...

    def claim(
        self, send_id: int, limit: int, now: float, *, holder: str = "", caps: Caps | None = None
    ) -> Claim:
        """Take up to ``limit`` due recipients (pending, then deferred due by ``now``),
        atomically: two senders never get the same one. They are committed ``sending``
        (attempts counted, ``holder`` noted as their claimant: the owner of the run's
        lease) before this returns; no row lock outlives the call. Someone who left or
        was suppressed since the freeze is marked ``suppressed``, not returned.

        With ``caps``, the claim takes no more than the caps leave room for, counted in
        the database over every send (messages sent in the window, and every row
        ``sending``: :mod:`newsletter.storage.caps`), and capped claims take turns, so
        that no number of processes passes a cap; ``Claim.capped`` then says which cap
        held it back. No deliveries and no cap: nothing is due."""
        ...

    def record(
        self, send_id: int, outcomes: Iterable[tuple[int, Outcome]], *, holder: str = ""
    ) -> None:
        """Commit the outcomes of finished transactions (by seq), as one batch; only rows
        still ``sending`` change, and on a backend that shares sends only rows ``holder``
        claimed (``unknown`` ones too: a run counted dead that was only slow still knows
        what became of them)."""
        ...

    def release(self, send_id: int, seqs: Iterable[int], *, holder: str = "") -> None:
        """Claimed but never attempted (the run is stopping): back to ``pending``, their
        attempt uncounted; only rows still ``sending`` change (and, on a backend that shares
        sends, only those ``holder`` claimed: a row counted unknown, queued again and now
        another process's is not this one's to hand back)."""
        ...

    def counts(self, send_id: int) -> dict[str, int]:
        """Recipients by state, every state present (0 when none)."""
        ...

    def in_state(
        self, send_id: int, state: DeliveryState, limit: int = 1000
    ) -> list[tuple[str, str]]:
        """(address, detail) of recipients in ``state``, in audience order."""
        ...

    def last_errors(self, send_id: int, limit: int = 10) -> list[tuple[str, str, str, str]]:
        """(time, address, state, detail) of the latest failures, newest first."""
        ...

    def next_retry(self, send_id: int) -> float | None:
        """When the earliest deferred recipient is due (unix time), or None."""
        ...

    def workers(self, send_id: int) -> list[Worker]:
        """The live processes of the send (their lease not run out), oldest first."""
        ...


class IssueArchive(Protocol):
    """The archive of sent issues (written once per issue), and where each send came from."""

    def published(self) -> list[Published]:
        """Every issue delivered to someone (a row ``sent``), in issue-id order. Asked on
        every request: an implementation may cache it until the database changes."""
        ...

    def summaries(self) -> dict[str, Summary]:
        """Every archive row but its HTML, by issue id."""
        ...

    def get(self, issue_id: str) -> ArchivedIssue | None:
        """The archive's copy of ``issue_id``, or None."""
        ...

    def uses(self, issue_id: str) -> list[SourceUse]:
        """Every earlier use of ``issue_id``: its sends (any list), then its archive row."""
        ...

    def freeze(self, issue: ArchivedIssue) -> ArchivedIssue:
        """Keep ``issue`` unless a copy is kept already (the first writer wins, committed);
        the copy kept."""
        ...

    def record_source(self, send_id: int, source: Source) -> None:
        """Note the file a send was started from; a resume keeps the first one noted."""
        ...

    def frozen(self, send_id: int) -> str | None:
        """What the send froze (delivery.fingerprint's JSON), or None: not yet noted."""
        ...

    def record_frozen(self, send_id: int, fingerprint: str, *, replace: bool = False) -> None:
        """Note what the send froze: the first one noted stays, unless ``replace`` (a
        person accepted a changed issue for the rest of the send)."""
        ...


class SlotStore(Protocol):
    """What became of each schedule slot (one row per slot, its latest state)."""

    def state(self, slot: SlotKey) -> SlotState | None:
        """The slot's recorded state, or None if no run acted on it."""
        ...

    def set(
        self, slot: SlotKey, state: SlotState, issue_id: str | None = None, detail: str = ""
    ) -> None:
        """Record the slot's state (committed); an issue id once set is kept when
        ``issue_id`` is None. ``detail`` is cut to 2,000 characters. ValueError (nothing
        written) unless ``state`` is a :data:`SlotState`."""
        ...

    def recent(self, limit: int = 10) -> list[tuple[str, str, str | None, str, str]]:
        """The latest slots, newest first: (key, local day, issue id, state, detail)."""
        ...


class FeedbackStore(Protocol):
    """What the mail system said back (bounces, complaints, mailed unsubscribes), each
    with its evidence, and the suppressions it made.

    Evidence is never deleted. Recording it and the suppression it makes are one
    transaction, so a crash leaves both or neither, and recording the same message
    again (same :attr:`Evidence.digest`) changes nothing."""

    def sent_to(self, send_id: int, seq: int) -> SentTo | None:
        """The recipient ``seq`` of send ``send_id``, or None if this database has none."""
        ...

    def latest_delivery(self, email: str, issue_id: str | None = None) -> SentTo | None:
        """The latest delivery (the highest send id) to ``email`` (normalised, as the send
        log keeps it) that may have gone out: any state but ``pending`` and
        ``suppressed``; only sends of ``issue_id`` when given. For a provider's report
        that carries no VERP address of ours; None when this database has none."""
        ...

    def record(self, evidence: Evidence, soft: SoftBounces, *, now: str | None = None) -> Recorded:
        """Keep ``evidence`` and do what its action says, in one transaction: ``suppress``
        suppresses :attr:`Evidence.email` for its reason (a weightier suppression stays);
        ``soft`` counts the sends with a soft bounce for that address within ``soft.days``
        (this one too) and suppresses it (``bounced``) once they reach ``soft.limit``;
        ``note`` and ``review`` only keep it. Two processes recording for one address take
        turns, so neither count misses the other's. ``now`` (ISO time, UTC) is when it
        was received; by default, now. A digest recorded before: that record, ``new``
        False, nothing changed."""
        ...

    def get(self, evidence_id: int) -> Kept | None:
        """The evidence ``evidence_id`` with its raw message, or None."""
        ...

    def about(self, email: str) -> list[Kept]:
        """The evidence about ``email``, oldest first, without the raw messages."""
        ...

    def mentioning(self, email: str) -> list[Kept]:
        """Kept messages (with their raw bytes) not matched to ``email`` whose message
        names it, in id order: a subject access request covers them, an erasure drops
        their messages."""
        ...

    def resolve(self, evidence_id: int, outcome: str) -> bool:
        """A person dealt with evidence ``evidence_id`` kept for review (reprocessed it, or
        dismissed it): it is noted with ``outcome`` and leaves the review. False when it
        was not kept for review."""
        ...

    def kept_for_review(self, limit: int = 50) -> tuple[int, list[Kept]]:
        """(how many are kept for review, the latest ``limit`` of them, newest first)."""
        ...

    def counts(self, send_id: int, since: str | None = None) -> dict[str, int]:
        """Send ``send_id``'s recipients with feedback that changed their mail, by what it
        was: ``hard`` and ``soft`` bounces, ``complaint``, ``unsubscribe``, and the
        ``refused`` (a block, not about the address: noted, yet counted here) (each
        recipient counted once per kind, whatever number of messages said it); only
        feedback received at or after ``since`` (ISO 8601, UTC) when given."""
        ...

    def deliveries_of(self, email: str) -> list[DeliveryTo]:
        """Every send's delivery to ``email``, oldest first."""
        ...

    def latest_issue(self) -> str | None:
        """The issue of the latest send, or None before the first."""
        ...

    def attempted_since(self, send_id: int, since: str) -> int:
        """Send ``send_id``'s recipients whose message was tried (sent, rejected,
        deferred, unknown) at or after ``since`` (ISO 8601, UTC), by every process."""
        ...

    def for_send(self, send_id: int) -> list[Kept]:
        """Every piece of evidence about send ``send_id``'s deliveries, oldest first."""
        ...

    def refusals(self, send_id: int, limit: int = 1000) -> list[Refusal]:
        """Send ``send_id``'s recipients the relay refused (state ``rejected``) that no
        evidence of source ``smtp`` records yet, in order."""
        ...

    def member_lists(self, email: str, *, with_left: bool = False) -> list[str]:
        """The lists ``email`` is a member of and has not left (``with_left``: those it
        left too)."""
        ...

    def mailbox_mark(self, mailbox: str) -> tuple[int, int] | None:
        """(UIDVALIDITY, the highest UID read) of an IMAP folder, named as
        ``imap://user@host:port/folder``; None if it was never read."""
        ...

    def set_mailbox_mark(self, mailbox: str, uidvalidity: int, last_uid: int) -> None:
        """Remember how far ``mailbox`` has been read (committed at once)."""
        ...


class Signups(Protocol):
    """Joining the list (:mod:`newsletter.storage.signups`, the same SQL on each backend):
    signups and their confirmation, consent records, the server's outbox, rate limits
    and single-use keys, and a person's data erased."""

    def begin(self, signup: NewSignup, *, limit: int | None = None, since: str = "") -> int | None:
        """Keep a signup as posted and queue its confirmation mail; returns its id, or
        None when the address had ``limit`` signups since ``since`` (nothing kept)."""
        ...

    def purge_unconfirmed(self, expired_before: str) -> int:
        """Forget signups never confirmed whose link expired before then, and their mail."""
        ...

    def signup(self, signup_id: int) -> PendingSignup | None: ...

    def confirm(
        self,
        signup_id: int,
        nonce: str,
        *,
        confirmed_ip: str | None,
        now: str,
        email_hash: str,
        welcome: bool,
    ) -> ConfirmedSignup | None:
        """Confirm once: the lists joined, the person's own opt-outs, suppression and
        erasure lifted, a consent record per list; None for anything else."""
        ...

    def mailed_lately(self, email: str, since: str) -> int: ...

    def consents(self, email: str) -> list[ConsentRecord]: ...

    def signups_of(self, email: str) -> list[PendingSignup]: ...

    def claim_mail(self, now: float) -> OutboxMail | None:
        """The next mail due, marked sending before its SMTP transaction."""
        ...

    def mail_done(
        self, mail_id: int, state: MailState, detail: str, *, retry_at: float | None = None
    ) -> None: ...

    def mail_interrupted(self, older_than: str) -> int: ...

    def outbox(self, email: str | None = None) -> list[OutboxMail]: ...

    def allow(self, bucket: str, limit: int, window: float, now: float) -> bool:
        """A rate limit shared by every process on the database."""
        ...

    def use_once(self, kind: str, key: str, expires: float, now: float) -> bool:
        """True the first time a key is used (replay protection)."""
        ...

    def was_used(self, kind: str, key: str, now: float) -> bool:
        """Whether a key was used and has not expired (nothing is written)."""
        ...

    def joined(self, email: str) -> tuple[str | None, list[Joined]]:
        """When ``email``'s subscriber record was made (None: none), and each list it
        joined or left, with the dates."""
        ...

    def consent_text(self, sha256: str) -> str | None:
        """The consent text of this hash, as it was shown."""
        ...

    def erased(self, email_hash: str) -> str | None: ...

    def erasure_hashes(self) -> Iterator[str]: ...

    def erase(self, email: str, email_hash: str, *, now: str, key_check: str = "") -> Erased:
        """Remove a person's data; keep its keyed hash against later imports."""
        ...

    def erasure_key_matches(self, key_check: str) -> bool:
        """Whether the erasures were made with this key (or none were made)."""
        ...


class Lease(Protocol):
    """A named lock that one run at a time holds, with an expiry.

    :meth:`acquire` takes it unless another live holder has it; the holder renews it
    in the background every ``ttl / 4``; it expires ``ttl`` seconds after the last
    renewal, so a holder that dies (kill -9, power cut) frees it within ``ttl`` (at
    once, when it ran on this machine and its process is gone: the same host name,
    boot and PID namespace, so a container sharing the host name is not "this
    machine"). A holder none of whose renewals succeeded for ``ttl`` seconds counts
    it :attr:`lost`: it may have run out and been taken meanwhile.

    Limit of the SQLite backend: expiry is judged by clocks of the clients. The
    holder writes ``expires`` from its own ``time.time()`` and a taker compares it
    with its own, so two machines whose clocks disagree by more than a few
    seconds shorten or stretch each other's leases by that much (one machine, or
    NTP-synchronised machines, is what it is meant for). A backend that serves
    several machines (PostgreSQL) must lift it: write and compare expiry with the
    database's clock (``now()``), never the client's."""

    @property
    def name(self) -> str: ...
    @property
    def ttl(self) -> float: ...
    @property
    def owner(self) -> str:
        """Who holds it when this object does (``host:pid:...``): what claims record."""
        ...

    def acquire(self, now: float) -> None:
        """Take the lease, or raise :class:`newsletter.errors.LockHeld` naming the live
        holder (host, process, since when, until when). Taking it again is a renewal."""
        ...

    @property
    def lost(self) -> str | None:
        """None while the lease is ours; once a renewal found it taken (it had run out and
        another run acquired it), that holder; once no renewal succeeded for ``ttl``
        seconds, a sentence saying so (whoever may hold it now is unknown). Either
        way the run must stop claiming, record what is in flight and end."""
        ...

    def check(self) -> None:
        """Raise :class:`newsletter.errors.LeaseLost` if :attr:`lost` says so."""
        ...

    def release(self) -> None:
        """Stop renewing and free the lease if it is still ours (never another's)."""
        ...


class Storage(Protocol):
    """One open database: its stores, leases, and the dry run's scratch copy."""

    @property
    def subscribers(self) -> Subscribers: ...
    @property
    def send_log(self) -> SendLogStore: ...
    @property
    def archive(self) -> IssueArchive: ...
    @property
    def slots(self) -> SlotStore: ...
    @property
    def feedback(self) -> FeedbackStore: ...
    @property
    def signups(self) -> Signups: ...

    @property
    def shared_sends(self) -> bool:
        """True when several processes may work on one send at once, each with a lease
        of its own (PostgreSQL); False when a send has one process at a time (SQLite)."""
        ...

    def lease(self, name: str, ttl: float = LEASE_SECONDS) -> Lease:
        """A lease named ``name`` on this database (not yet acquired)."""
        ...

    def send_lease(self, issue_id: str, list_name: str, ttl: float = LEASE_SECONDS) -> Lease:
        """The lease a run of this send takes (not yet acquired): the send's own, which
        one process holds at a time, or, when :attr:`shared_sends`, this process's own
        (named after the send, so that :meth:`SendLogStore.workers` finds it)."""
        ...

    def scratch_copy(self, issue_id: str, list_name: str) -> AbstractContextManager[Storage]:
        """A throw-away database holding what a send of ``issue_id`` to ``list_name``
        reads (its list, suppressions, opt-outs, columns, and every list's send of the
        issue), for the dry run: the same code path then writes there, never here. It
        is deleted on exit; memory stays flat for any list size."""
        ...

    def reopen(self) -> Storage:
        """A second, independent connection to the same database (for another thread);
        it never creates one. The caller closes it."""
        ...

    def current(self) -> Storage:
        """This storage while its database is still the one it opened; a new one, this one
        closed, once another database took its place (a backup moved over the file);
        :class:`newsletter.errors.StorageUnavailable` while it is gone (removed). Cheap:
        a long-lived holder (each web thread) asks before each request, so nothing is
        written into a database nobody reads any more."""
        ...

    def schema_version(self) -> int:
        """The schema version the database records (the current one once opened)."""
        ...

    def close(self) -> None:
        """Close the connection; the stores must not be used after."""
        ...
