"""Send use case: an issue file and a list → one send started or resumed, and run to its end.

Input: a :class:`SendRequest` (what was asked), a way to build the issue and to
open the :class:`~newsletter.storage.base.Storage`, the real transport (a dry
run writes to an outbox instead, on the storage's scratch copy), the
:class:`~newsletter.delivery.campaign.SendOptions`, the sender, and
:class:`SendHooks`: a callback for everything a front end shows or asks (notes,
the plan, the confirmation, the start and progress of the run). Output: a
:class:`~newsletter.delivery.sending.SendReport`.

:func:`send_issue` is the one path of every send: ``newsletter send`` (by hand,
and the dry run), the scheduler's sends (through the same CLI wiring) and the
send benchmark. In order: build the issue, refuse what may be previewed but not
sent, open the database, take the send's lease (a real send: one process per
issue and list) or the scratch copy (a dry run), check the merge fields and the
file the id comes from, show the plan and ask; only then write (freeze the
audience, keep the archive's web version) and run the campaign. Declining
changes nothing and frees the lease (:class:`SendDeclined`). A run whose lease
another run took stops claiming, records what was in flight and raises
:class:`~newsletter.errors.LeaseLost`. A run whose database another program
holds stops the same way and waits for it to record what it sent (saying so
through ``hooks.note``); if it is still held, the campaign's
:class:`~newsletter.delivery.campaign.SendLogBusy` lists what went out
unrecorded, and says how to resume (``next_step``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from newsletter.delivery.campaign import (
    Campaign,
    Progress,
    SendLogBusy,
    SendLogFailed,
    SendOptions,
)
from newsletter.delivery.fingerprint import Fingerprint, fingerprint
from newsletter.delivery.message import MessageTemplate, Sender
from newsletter.delivery.provenance import check_source, record_send
from newsletter.delivery.sending import (
    Preview,
    SendReport,
    check_merge_fields,
    merge_columns,
    prepare,
    preview,
    run_send,
)
from newsletter.delivery.test_copies import (
    CopiesRefused,
    check_addresses,
    recipients,
    send_copies,
)
from newsletter.delivery.transports import OutboxTransport, Transport
from newsletter.errors import (
    CampaignAborted,
    CanaryWaiting,
    ConfigError,
    ConnectFailed,
    LeaseLost,
    SendPaused,
    StorageError,
)
from newsletter.render.checks import refuse_unsendable
from newsletter.storage.base import LEASE_SECONDS, Lease, Source, Storage
from newsletter.verp import Verp

if TYPE_CHECKING:
    from newsletter.build import BuildResult

__all__ = [
    "RESUME",
    "SendDeclined",
    "SendHooks",
    "SendPlan",
    "SendRequest",
    "send_issue",
]

# Said after a relay's refusal ends a recorded send: the refusal (a login, the
# sender, no STARTTLS) does not go away by itself, but the send log keeps the place.
RESUME = "Run the same command again to resume once that is fixed; nobody is sent twice."
# Said after the database failed during a run: what was recorded stays, and the pending
# ones go on a rerun; only --resend-unknown would mail the unrecorded deliveries again.
RESUME_DATABASE = (
    "Run the same command again (without --resend-unknown) to resume once the database is "
    "free again or fixed: the recipients still pending are sent then, and nobody recorded "
    "is sent twice."
)

Signer = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class SendRequest:
    """What was asked: which issue to which list, and how."""

    issue_file: Path
    list_name: str
    dry_run: bool = False
    outbox: Path | None = None  # a dry run's samples (default: OUT/<issue-id>/outbox)
    resend_unknown: bool = False
    retry_rejected: bool = False
    strict: bool = False  # a merge field some recipients have no value for is refused
    # A send that paused itself is resumed only by a person (`send`), never by the
    # schedule (`send --due`, `schedule run`), which would undo the pause at once.
    resume_paused: bool = True
    # Resume a send whose issue, footer or templates changed since it froze (the
    # rest get the new version: delivery.fingerprint).
    accept_changes: bool = False
    # A real send's canary (NEWSLETTER_CANARY_TO): those addresses first, outside the
    # send log; then the rest after ``canary_wait`` seconds, or (None) once a person
    # runs the send again with ``go``.
    canary: tuple[str, ...] = ()
    canary_wait: float | None = None
    go: bool = False


@dataclass(frozen=True, slots=True)
class SendPlan:
    """What the send is about to do, read without writing anything (shown, then asked)."""

    issue_id: str
    list_name: str
    preview: Preview
    via: str  # the transport's description
    message_size: int  # bytes of the preview message
    # What the request puts back in the queue when it is confirmed (the preview reads
    # the log before anything is written, so its counts do not include them yet).
    resend_unknown: bool = False
    retry_rejected: bool = False


class SendDeclined(Exception):
    """The confirmation said no: nothing was written, and the lease is freed."""


def _ignore(_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class SendHooks:
    """Everything a send shows or asks, in the order it happens.

    ``note`` gets each note (a merge field some recipients lack, an edited
    file); ``plan`` what is about to happen; ``confirm`` (when given) is asked
    after the plan and may decline; ``on_start`` gets the campaign before it
    runs (to install signal handlers, start a progress bar); ``on_progress``
    its progress as outcomes arrive."""

    note: Callable[[str], None] = _ignore
    plan: Callable[[SendPlan], None] = _ignore
    confirm: Callable[[SendPlan], bool] | None = None
    on_start: Callable[[Campaign], None] | None = None
    on_progress: Callable[[Progress], None] | None = None


def _no_signer() -> Signer | None:
    return None


def send_issue(
    request: SendRequest,
    *,
    build: Callable[[], BuildResult],
    open_storage: Callable[[], Storage],
    transport: Callable[[], Transport],
    sender: Sender,
    options: SendOptions,
    envelope_sender: str,
    templates_dir: Path,
    out_dir: Path,
    signer: Callable[[], Signer | None] = _no_signer,
    hooks: SendHooks = SendHooks(),
    lease_ttl: float = LEASE_SECONDS,
    verp: Verp | None = None,
) -> SendReport:
    """Build, start or resume, and run one send of ``request``; the module docstring says how.

    ``build`` builds the issue for ``request.list_name`` (``sender`` is that list's);
    ``open_storage`` is called once the issue built, and what it opens is closed at
    the end; ``transport`` makes the real transport once the lease is held (a dry
    run never calls it); ``signer`` makes the DKIM signer once the send is
    confirmed; ``templates_dir`` and ``sender.public_url`` render the archive's web
    version at the first real send; ``out_dir`` holds the default outbox; ``verp``
    gives each message an envelope sender naming its delivery (dry runs too, so the
    outbox shows what would go). Raises
    :class:`SendDeclined` when ``hooks.confirm`` says no, :class:`LeaseLost` when
    another run took the send's lease during the run, and the errors of each step
    (every one a :class:`~newsletter.errors.NewsletterError`)."""
    built = build()
    refuse_unsendable(built.report)  # a preview may show bidi controls; a send may not
    issue_id, name = built.issue_id, request.list_name
    with contextlib.ExitStack() as stack:
        # Closed at the end: `schedule run` sends week after week in one process.
        real = open_storage()
        stack.callback(real.close)
        lease: Lease | None = None
        outbox: Path | None = None
        via: Transport
        if request.dry_run:
            outbox = request.outbox or out_dir / issue_id / "outbox"
            via = OutboxTransport(outbox, keep=5)
            storage = stack.enter_context(real.scratch_copy(issue_id, name))
        else:
            # Taken before anything is read or asked. One process per send (SQLite): a
            # second one would show a preview of rows the first is changing, and would
            # take its in-flight rows for dead ones. A shared send (PostgreSQL): this
            # process's own lease, by which the others tell its rows from a dead one's.
            lease = real.send_lease(issue_id, name, lease_ttl)
            lease.acquire(time.time())
            stack.callback(_release, lease, hooks.note)
            via = transport()
            storage = real
        # Before anything is asked or sent: a field the list cannot fill is an error.
        for note in check_merge_fields(
            storage, issue_id, name, built.merge_uses, strict=request.strict
        ):
            hooks.note(note)
        # An id sent before from another file is refused, not "resumed" (a dry run too).
        source = Source.of(request.issue_file)
        for note in check_source(real.archive, issue_id, source):
            hooks.note(note)
        # Read, ask, and only then write: declining changes nothing (and frees the lease).
        planned = preview(storage, issue_id, name)
        _check_paused(planned, request, issue_id, name, hooks.note)
        now_frozen, accepted = _check_frozen(
            storage, planned, request, (issue_id, name), fingerprint(built, sender), hooks.note
        )
        canary = _canary_for(storage, request, planned, name, changed=accepted)
        plan = SendPlan(
            issue_id,
            name,
            planned,
            via.description,
            len(built.eml),
            resend_unknown=request.resend_unknown,
            retry_rejected=request.retry_rejected,
        )
        hooks.plan(plan)
        if hooks.confirm is not None and not hooks.confirm(plan):
            raise SendDeclined(f"the send of {issue_id} to {name} was not confirmed")
        columns = merge_columns(storage.subscribers, name, built.merge_uses)
        template = MessageTemplate(built.rendered, sender, signer=signer(), columns=columns)
        prepared = prepare(
            storage,
            issue_id,
            name,
            resend_unknown=request.resend_unknown,
            retry_rejected=request.retry_rejected,
            columns=list(columns.values()),
        )
        if lease is not None:
            # What it froze, and (the first send) the web version the archive shows.
            storage.archive.record_frozen(
                prepared.record.id, now_frozen.to_json(), replace=accepted
            )
            record_send(storage.archive, prepared.record.id, built.issue, built.society,
                        templates_dir, sender.public_url, source)  # fmt: skip
            Canary(request, storage, prepared.record.id, lease, hooks.note).fly(
                template, via, canary, envelope_sender
            )
        try:
            report = asyncio.run(
                run_send(
                    storage,
                    prepared,
                    template,
                    via,
                    options,
                    envelope_sender=envelope_sender,
                    on_start=hooks.on_start,
                    on_progress=hooks.on_progress,
                    guard=None if lease is None else _guard(lease),
                    on_note=hooks.note,
                    holder="" if lease is None else lease.owner,
                    verp=verp,
                )
            )
        except (SendLogBusy, SendLogFailed) as exc:
            exc.next_step = RESUME_DATABASE
            raise
        except CampaignAborted as exc:
            # Only here is a relay's refusal the end of a send in the log, which the
            # same command resumes; every error before (settings, the issue, the
            # lease, an empty list) and a test copy's refusal have nothing to resume.
            exc.next_step = RESUME
            raise
        if lease is not None and report.result.lost is not None:
            raise LeaseLost(
                lease.name,
                report.result.lost,
                _recorded(report),
                sent=report.result.counts.get("sent", 0),
            )
        report.outbox = outbox
        return report


def _release(lease: Lease, note: Callable[[str], None]) -> None:
    """Free the lease as the send ends. A database still busy (or failing) must not hide
    the send's own outcome or error: the lease then runs out by itself."""
    try:
        lease.release()
    except StorageError as exc:
        note(
            f"the send's lock could not be freed ({exc}); it frees itself within "
            f"{lease.ttl:.0f} s (at once for a run on this machine, once this one has ended)"
        )


def _guard(lease: Lease) -> Callable[[], str | None]:
    """The campaign's guard: who holds the lease now, once it is not ours."""
    return lambda: lease.lost


def _recorded(report: SendReport) -> str:
    """What a run that lost its lease leaves in the send log, for LeaseLost's message."""
    c = report.result.counts
    return (
        f"this run made {report.result.attempted} attempt(s), and the send log now has "
        f"{c['sent']} sent, {c['rejected']} rejected, {c['deferred']} deferred, "
        f"{c['unknown']} unknown and {c['pending']} pending"
    )


class SendChanged(ConfigError):
    """A resume whose issue, footer or templates changed since the send froze; nothing
    was sent (``send --accept-changes`` sends the rest as they are now)."""


# The states a resume would send (again): a send with none of them left sends nothing.
_LEFT_TO_SEND = ("pending", "deferred")


def _check_frozen(
    storage: Storage, planned: Preview, request: SendRequest, frozen: tuple[str, str],
    now: Fingerprint, note: Callable[[str], None],
) -> tuple[Fingerprint, bool]:  # fmt: skip
    """Refuse to resume a send whose message changed since it froze (SendChanged), unless
    ``request.accept_changes``; ``now``, and True when a change was accepted (and
    noted). ``frozen`` is the send's (issue id, list)."""
    record = storage.send_log.find(*frozen) if planned.resumed else None
    kept = None if record is None else storage.archive.frozen(record.id)
    if record is None or kept is None:
        return now, False  # new, or frozen before sends kept their fingerprint
    changed = now.changed_since(Fingerprint.from_json(kept))
    left = sum(planned.counts.get(state, 0) for state in _LEFT_TO_SEND)
    again = (planned.counts.get("unknown", 0) if request.resend_unknown else 0) + (
        planned.counts.get("rejected", 0) if request.retry_rejected else 0
    )
    if not changed or not (left or again):
        return now, False
    what = ", ".join(changed)
    if _waiting(planned) and not planned.counts.get("sent", 0) and not request.go:
        # Nobody on the list has it yet: the new version gets a canary of its own.
        note(f"{what} changed since the canary went: a new one goes, with the email as it is")
        return now, True
    if request.accept_changes:
        note(f"{what} changed since this send began; the rest get the email as it is now")
        return now, True
    issue_id, name = frozen
    sent = planned.counts.get("sent", 0)
    raise SendChanged(
        f"the send of {issue_id} to {name} began on {record.created_at[:16].replace('T', ' ')} "
        f"({sent:,} sent) and {what} changed since: resuming now would send the other "
        f"{left + again:,} a different email. Put the file(s) back as they were and run "
        f"the same command again, or send the rest as they are now: `newsletter send "
        f"{request.issue_file} --list {name} --accept-changes`. Nothing was sent."
    )


# What marks a send whose canary is due (frozen, nothing sent: set before the canary's
# copies go, so that a run stopped there sends them next time, never the list without
# them), and one waiting after its canary until `send --go` (sends.paused).
CANARY_DUE = "its canary is due"
CANARY_PAUSE = "waiting after its canary"


def _waiting(planned: Preview) -> bool:
    return planned.paused in (CANARY_DUE, CANARY_PAUSE)


def _canary_for(
    storage: Storage, request: SendRequest, planned: Preview, name: str, *, changed: bool
) -> list[str]:
    """The canary's addresses when a canary is to go now (a real send not begun, one
    whose canary is due, or one waiting whose email ``changed``): checked now, before
    anything is asked (a suppressed one refuses the send); or [] for none. A send
    waiting after its canary goes on only with ``go`` (CanaryWaiting otherwise)."""
    if request.dry_run:
        return []
    due = bool(request.canary) and (
        not planned.resumed
        or planned.paused == CANARY_DUE
        or (planned.paused == CANARY_PAUSE and changed and not request.go)
    )
    if not due:
        if _waiting(planned) and not request.go:
            waiting = CanaryWaiting(
                f"the send of {request.issue_file} to {name} is {CANARY_PAUSE}: check the canary's "
                f"email, then send the rest: `newsletter send {request.issue_file} --list "
                f"{request.list_name} --go`"
            )
            waiting.sent = planned.counts.get("sent", 0)
            raise waiting
        return []
    check = check_addresses(storage, request.canary, name, asked_by="NEWSLETTER_CANARY_TO")
    if check.problems:
        raise CopiesRefused(check.problems)
    return check.addresses


@dataclass
class Canary:
    """A send's canary: copies to the canary's addresses, then the wait (module
    docstring). The send is frozen already, so the list gets exactly what they got."""

    request: SendRequest
    storage: Storage
    send_id: int
    lease: Lease
    note: Callable[[str], None]

    def fly(
        self, template: MessageTemplate, via: Transport, to: list[str], envelope_sender: str
    ) -> None:
        """Send the canary (none: nothing to do), then wait or stop (CanaryWaiting)."""
        if not to:
            return
        log = self.storage.send_log
        log.pause(self.send_id, CANARY_DUE)  # before anything goes (see CANARY_DUE)
        try:
            results = send_copies(template, recipients(self.storage, to), via,
                                  envelope_sender=envelope_sender)  # fmt: skip
        except ConnectFailed as exc:
            raise CanaryWaiting(
                f"the canary could not be sent ({exc}), and nothing went to the list: run "
                "the same command again once the relay answers"
            ) from None
        log.pause(self.send_id, CANARY_PAUSE)
        for result in results:
            said = "sent" if result.sent else f"{result.outcome.state}: {result.outcome.detail}"
            self.note(f"canary to {result.email}: {said}")
        if not all(result.sent for result in results):
            self._wait_for_go("not every canary copy was accepted; look into it, then")
        wait = self.request.canary_wait
        if wait is None:
            self._wait_for_go("check the canary's email, then")
        self.note(f"the rest of the list goes in {wait:,.0f} s (Ctrl-C stops it here)")
        try:
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, self.lease.ttl / 3))
                self.lease.acquire(time.time())  # renewed: nobody takes it meanwhile
        except KeyboardInterrupt:
            self._wait_for_go("stopped during the canary's wait;")

    def _wait_for_go(self, why: str) -> NoReturn:
        raise CanaryWaiting(
            f"{why} send the rest of the list: `newsletter send {self.request.issue_file} "
            f"--list {self.request.list_name} --go`"
        )


def _check_paused(
    planned: Preview, request: SendRequest, issue_id: str, name: str, note: Callable[[str], None]
) -> None:
    """A send that paused itself goes on only when a person asked (module docstring);
    one paused after its canary only with ``go``."""
    if planned.paused is None:
        return
    if _waiting(planned):
        if request.go:
            note("the canary was checked: the rest of the list goes now")
        return  # decided with the canary (_canary_for)
    if not request.resume_paused:
        paused = SendPaused(
            f"the send of {issue_id} to {name} paused itself ({planned.paused}); a "
            f"scheduled run does not resume it: run `newsletter send "
            f"{request.issue_file} --list {name}` by hand when the list is right"
        )
        paused.sent = planned.counts["sent"]  # it began: the slot is incomplete
        raise paused
    note(f"this send paused itself ({planned.paused}); it goes on now, as asked")
