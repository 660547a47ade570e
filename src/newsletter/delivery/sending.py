"""Send steps: an issue and a list → a started or resumed send, run to its end.

Input: the rendered issue, a :class:`newsletter.storage.base.Storage`, the list
name, a transport and the options. Output: a :class:`SendReport`. These are the
steps of every send (:func:`preview`, :func:`check_merge_fields`,
:func:`prepare`, :func:`run_send`), which :mod:`newsletter.delivery.send_issue`
runs in order for a real one (SMTP transport, the project database) and a dry
run (an outbox transport and the storage's scratch copy, ``with
storage.scratch_copy(issue, list) as scratch``, so the real send log is not
touched); tests also call them with a memory transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from newsletter.bounces.refusals import SendHealth
from newsletter.delivery.campaign import Campaign, Progress, RunResult, SendOptions
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.transports import RelayReport, Transport
from newsletter.errors import (
    CampaignAborted,
    ConfigError,
    Problem,
    SendExists,
    ValidationFailed,
)
from newsletter.render import merge_fields
from newsletter.storage.base import ListStates, SendRecord, Storage, Subscribers
from newsletter.verp import Verp


@dataclass(slots=True)
class SendReport:
    record: SendRecord
    resumed: bool
    result: RunResult
    unknown: list[tuple[str, str]] = field(default_factory=list)  # left in doubt, by address
    requeued_unknown: int = 0
    requeued_rejected: int = 0
    outbox: Path | None = None  # a dry run's samples: where they were written
    helpers_failed: int = 0  # send --workers: helper processes that ended in an error
    # NEWSLETTER_SMTP_RELAYS: what went through each relay in this process's run.
    relays: list[RelayReport] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.helpers_failed:
            return 1
        c = self.result.counts
        if c["pending"] or c["deferred"] or c["unknown"] or c["rejected"] or c["sending"]:
            return 3
        return 0


@dataclass(slots=True)
class Prepared:
    record: SendRecord
    resumed: bool
    requeued_unknown: int
    requeued_rejected: int


@dataclass(slots=True)
class Preview:
    """What a send would do, read without writing anything (shown before confirming)."""

    resumed: bool
    audience: int
    suppressed: int
    counts: dict[str, int]
    first: list[str]
    duplicates: int = 0  # left out: another list's send of this issue has them
    # Of ``suppressed``, those who left this list only; None when resuming (the send
    # recorded one number for both).
    opted_out: int | None = None
    paused: str | None = None  # why the send paused itself, if it is paused


class NobodyMailable(ConfigError):
    """The list has members, but every one of them has left it or is suppressed.

    Not a mistake to fix by importing: people left. Nothing is frozen, so a
    later import still reaches this issue."""

    def __init__(self, list_name: str, states: ListStates) -> None:
        self.list_name = list_name
        self.members = states.members
        reasons = ", ".join(f"{n} {reason}" for reason, n in states.suppressed.items())
        parts = []
        if states.opted_out:
            parts.append(f"{states.opted_out} opted out of this list")
        if states.suppressed:
            parts.append(f"{sum(states.suppressed.values())} suppressed ({reasons})")
        self.summary = (
            f"all {states.members} have left" if states.members > 1 else "its one member has left"
        )
        super().__init__(
            f"the list {list_name!r} has nobody to send to: {_members(states.members)}, none "
            f"of them mailable: {' and '.join(parts)}. Nothing was sent; "
            f"`newsletter subscribers count --list {list_name}` shows them"
        )


def _members(n: int) -> str:
    return "1 member" if n == 1 else f"{n} members"


def _check_mailable(list_name: str, states: ListStates) -> None:
    if states.members == 0:
        raise ConfigError(
            f"the list {list_name!r} has nobody to send to: no members; import "
            f"subscribers with `newsletter subscribers import FILE.csv --list {list_name}`"
        )
    if states.subscribed == 0:
        raise NobodyMailable(list_name, states)


def preview(storage: Storage, issue_id: str, list_name: str) -> Preview:
    """What :func:`prepare` and the run would do now, read only."""
    log = storage.send_log
    store = storage.subscribers
    record = log.find(issue_id, list_name)
    if record is not None:
        counts = log.counts(record.id)
        # A dead run's in-flight rows will be unknown; on a shared send, those of the
        # processes still working on it are theirs, and not counted as anything yet.
        live = sum(w.claimed for w in log.workers(record.id)) if storage.shared_sends else 0
        counts["unknown"] += max(0, counts.pop("sending") - live)
        first = [email for email, _ in log.in_state(record.id, "pending", limit=5)]
        return Preview(
            True, record.audience, record.suppressed, counts, first, record.duplicates,
            paused=log.paused(record.id),
        )  # fmt: skip
    states = store.states(list_name)
    _check_mailable(list_name, states)
    suppressed = states.members - states.subscribed
    duplicates, first = log.duplicates(issue_id, list_name, first=5)
    if not duplicates:
        for recipient in store.audience(list_name):
            first.append(recipient.email)
            if len(first) == 5:
                break
    audience = states.subscribed - duplicates
    counts = {"pending": audience, "deferred": 0, "sent": 0, "rejected": 0,
              "unknown": 0, "suppressed": 0}  # fmt: skip
    return Preview(
        False, audience, suppressed, counts, first, duplicates, opted_out=states.opted_out
    )


def check_merge_fields(
    storage: Storage,
    issue_id: str,
    list_name: str,
    uses: Sequence[merge_fields.FieldUse],
    *,
    strict: bool = False,
) -> list[str]:
    """Check the issue's merge fields against the list, before anything is sent.

    A field the list was never imported with is an error (a misspelt name would
    otherwise be empty for everyone). A field without a fallback that some
    recipients have no value for is a note naming how many, or an error when
    ``strict``. Counted over whom this run would mail: the list's audience, or
    the frozen send's recipients not mailed yet. Returns the notes."""
    if not uses:
        return []
    store = storage.subscribers
    if not store.count(list_name)[0] and not storage.send_log.find(issue_id, list_name):
        return []  # no such list (a misspelt --list): the preview says so, plainly
    columns = store.columns(list_name)
    offered = merge_fields.known_fields(columns)
    problems = [
        Problem(
            u.file,
            u.line,
            u.path,
            f"[[{u.field.name}]]: the list {list_name!r} was never imported with a column "
            f"for this field (a misspelt name?); the fields it has: {', '.join(offered)}. "
            f"Correct the name, or import the list with a {u.field.name!r} column",
        )
        for u in uses
        if u.field.name not in offered
    ]
    if problems:
        raise ValidationFailed(problems, outcome="nothing was sent")
    bare = [u for u in uses if not u.field.fallback and u.field.name != "email"]
    # The field's stored name: a column's, or first_name / last_name.
    stored = {
        u.field.name: merge_fields.column_for(u.field.name, columns) or u.field.name for u in bare
    }
    if not stored:
        return []
    names = list(dict.fromkeys(stored.values()))
    total, counts = storage.send_log.empty_values(issue_id, list_name, names)
    empty = dict(zip(names, counts, strict=True))
    found: list[Problem] = []
    for u in bare:
        n = empty[stored[u.field.name]]
        if n:
            found.append(
                Problem(
                    u.file,
                    u.line,
                    u.path,
                    f"[[{u.field.name}]] has no value for {n:,} of the {total:,} recipient(s) "
                    f"this send would mail on {list_name!r}, who would see nothing there; "
                    f"give it a fallback, as in [[{u.field.name}|...]]",
                )
            )
    if strict and found:
        raise ValidationFailed([_strict(p) for p in found], outcome="nothing was sent")
    return [f"{p} (--strict refuses this)" for p in found]


def merge_columns(
    subscribers: Subscribers, list_name: str, uses: Sequence[merge_fields.FieldUse]
) -> dict[str, str]:
    """Field name → the stored column of ``list_name`` that fills it, for every attribute
    field the issue uses: a send reads that column, and freezes only those."""
    columns = subscribers.columns(list_name)
    found = {u.field.name: merge_fields.column_for(u.field.name, columns) for u in uses}
    return {name: column for name, column in found.items() if column is not None}


def _strict(problem: Problem) -> Problem:
    return Problem(problem.file, problem.line, problem.field, f"(--strict) {problem.message}")


def prepare(
    storage: Storage,
    issue_id: str,
    list_name: str,
    *,
    resend_unknown: bool = False,
    retry_rejected: bool = False,
    columns: Sequence[str] = (),
) -> Prepared:
    """Freeze the audience on the first run; on later runs, sort out what the last one left.

    Each frozen recipient keeps the attributes named in ``columns``: the ones the
    issue's merge fields use (see :func:`merge_columns`), not every column."""
    log = storage.send_log
    store = storage.subscribers
    record = log.find(issue_id, list_name)
    resumed = record is not None
    if record is None:
        states = store.states(list_name)
        # Checked before freezing: an empty frozen audience would stay
        # empty for this issue even after subscribers are imported.
        _check_mailable(list_name, states)
        suppressed = states.members - states.subscribed
        try:
            record = log.freeze(issue_id, list_name, store.audience(list_name, columns), suppressed)
        except SendExists:
            # Another process of a shared send froze it first: this one joins it.
            record = log.find(issue_id, list_name)
            if record is None:
                raise
            resumed = True
    log.mark_interrupted(record.id)
    unknown = log.requeue(record.id, "unknown") if resend_unknown else 0
    rejected = log.requeue(record.id, "rejected") if retry_rejected else 0
    log.make_deferred_due(record.id)
    return Prepared(record, resumed, unknown, rejected)


async def run_send(
    storage: Storage,
    prepared: Prepared,
    template: MessageTemplate,
    transport: Transport,
    options: SendOptions,
    *,
    envelope_sender: str,
    on_start: Callable[[Campaign], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    guard: Callable[[], str | None] | None = None,
    on_note: Callable[[str], None] | None = None,
    holder: str = "",
    verp: Verp | None = None,
) -> SendReport:
    """Run the prepared send; ``guard``, ``on_note``, ``holder`` and ``verp`` are the
    :class:`Campaign`'s (the send's lease; what the run says while it goes on, such as a
    wait for a busy database; the lease's owner, noted on every claim; the envelope
    senders that name each delivery)."""
    log = storage.send_log
    limits = options.health
    health = None
    if limits is not None:
        health = SendHealth(storage.feedback, prepared.record.id, limits, options.soft).check
    campaign = Campaign(
        log,
        prepared.record.id,
        template,
        transport,
        options,
        envelope_sender=envelope_sender,
        on_progress=on_progress,
        guard=guard,
        on_note=on_note,
        holder=holder,
        shared=storage.shared_sends,
        verp=verp,
        health=health,
    )
    # A person resumed it (send_issue checked), or its canary's wait is over: lifted
    # before on_start, which may start the helpers of `send --workers`, who must not
    # find it paused.
    log.pause(prepared.record.id, None)
    if on_start is not None:
        on_start(campaign)
    try:
        async with template.signing():
            result = await campaign.run()
    except CampaignAborted as exc:
        exc.sent = log.counts(prepared.record.id)["sent"]
        raise
    if result.paused is not None:
        log.pause(prepared.record.id, result.paused)
    return SendReport(
        record=prepared.record,
        resumed=prepared.resumed,
        result=result,
        unknown=log.in_state(prepared.record.id, "unknown"),
        requeued_unknown=prepared.requeued_unknown,
        requeued_rejected=prepared.requeued_rejected,
    )
