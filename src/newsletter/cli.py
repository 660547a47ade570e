"""Command line: parses arguments, reads settings, wires the stages, prints, exits.

No logic lives here. Heavy modules are imported inside the command that needs
them, so ``newsletter --help`` stays fast. Only :class:`NewsletterError` is
caught (printed without a traceback, exit 1); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from newsletter import __version__

if TYPE_CHECKING:
    import datetime as dt
    import sqlite3

    from newsletter.build import BuildResult
    from newsletter.campaign import Progress as CampaignProgress
    from newsletter.compose import MessageTemplate, Sender
    from newsletter.scheduler import DueResult
    from newsletter.sending import Prepared, Preview, SendReport
    from newsletter.settings import Settings
    from newsletter.subscribers import SubscriberStore
    from newsletter.transports import SmtpTransport, Transport


def _fail(exc: Exception | str) -> NoReturn:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="newsletter")
def main() -> None:
    """Compose and send the weekly research-news email.

    Settings come from NEWSLETTER_* environment variables or a .env file in the
    current folder; see .env.example.
    """


def _settings() -> Settings:
    from newsletter.settings import load_settings

    return load_settings()


def _sender(settings: Settings, list_name: str | None = None) -> Sender:
    from newsletter.compose import Sender

    return Sender(
        name=settings.sender_name,
        address=settings.sender_address,
        list_name=list_name or settings.list_name,
        public_url=settings.public_url,
        token_key=settings.token_key,
        unsubscribe_mailto=settings.unsubscribe_address,
        reply_to=settings.reply_to,
    )


def _build(
    settings: Settings, issue_file: Path, strict: bool, list_name: str | None = None
) -> BuildResult:
    from newsletter.build import BuildInputs, build
    from newsletter.models import Recipient

    preview_name, preview_addr = settings.preview_mailbox
    first, _, last = preview_name.partition(" ")
    result = build(
        BuildInputs(
            issue_file=issue_file,
            society_file=settings.society_file,
            templates_dir=settings.templates_dir,
            sender=_sender(settings, list_name),
            preview_recipient=Recipient(preview_addr, first, last),
            strict=strict,
        )
    )
    for warning in result.report.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    return result


@main.command()
@click.argument("issue_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for the build (default: NEWSLETTER_OUT_DIR, or build/).",
)
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
def build(issue_file: Path, out_dir: Path | None, strict: bool) -> None:
    """Build ISSUE_FILE into OUT/<issue-id>/: index.html, index.txt, issue.mjml, preview.eml."""
    from newsletter.errors import NewsletterError
    from newsletter.output import write_build

    try:
        settings = _settings()
        result = _build(settings, issue_file, strict)
        target = write_build(result, out_dir or settings.out_dir)
    except NewsletterError as exc:
        _fail(exc)
    kb = result.report.html_bytes / 1000
    click.echo(f"built {result.issue_id} into {target}/")
    for name in ("index.html", "index.txt", "issue.mjml", "preview.eml"):
        click.echo(f"  {target / name}  ({(target / name).stat().st_size:,} bytes)")
    click.echo(f"HTML {kb:.1f} KB of Gmail's ~102 KB; {len(result.report.warnings)} warning(s)")


# ------------------------------------------------------------------ subscribers


@main.group()
def subscribers() -> None:
    """Manage subscriber lists and the suppression list (in NEWSLETTER_DATABASE)."""


def _store() -> tuple[Settings, SubscriberStore]:
    from newsletter.database import connect
    from newsletter.subscribers import SubscriberStore

    settings = _settings()
    return settings, SubscriberStore(connect(settings.database))


LIST_OPTION = click.option("--list", "list_name", required=True, help="The list's name.")


@subscribers.command("import")
@click.argument("csv_file", type=click.Path(path_type=Path, dir_okay=False))
@LIST_OPTION
@click.option("--skip-invalid", is_flag=True, help="Import the good rows even if some are bad.")
def subscribers_import(csv_file: Path, list_name: str, skip_invalid: bool) -> None:
    """Import CSV_FILE (columns: email, first_name, last_name, any others) into a list."""
    from newsletter.csv_import import read_csv
    from newsletter.errors import NewsletterError

    try:
        _, store = _store()
        report = store.import_rows(list_name, read_csv(csv_file), skip_invalid=skip_invalid)
    except NewsletterError as exc:
        _fail(exc)
    for problem in report.problems:
        click.secho(
            f"{'skipped' if skip_invalid else 'error'}: {problem}",
            err=True,
            fg="yellow" if skip_invalid else "red",
        )
    if not report.committed:
        click.secho(
            f"{len(report.problems)} bad row(s); nothing was imported. Fix them, or run again "
            "with --skip-invalid to import the good rows only.",
            fg="red",
            err=True,
        )
        sys.exit(1)
    click.echo(
        f"{list_name}: {report.added} added, {report.updated} already on the list (updated), "
        f"{report.duplicates} duplicate row(s) in the file, {len(report.problems)} skipped"
    )
    if report.suppressed:
        click.echo(
            f"{report.suppressed} of them are on the suppression list (unsubscribed, bounced or "
            "complained) and will not be mailed."
        )


@subscribers.command("count")
@click.option("--list", "list_name", default=None, help="One list (default: every list).")
def subscribers_count(list_name: str | None) -> None:
    """How many subscribers each list has, and how many of them are suppressed."""
    _, store = _store()
    names = [list_name] if list_name else [name for name, _ in store.lists()]
    for name in names:
        members, suppressed = store.count(name)
        click.echo(
            f"{name}: {members} subscriber(s), {suppressed} suppressed, "
            f"{members - suppressed} mailable"
        )


@subscribers.command("list")
@LIST_OPTION
def subscribers_list(list_name: str) -> None:
    """Print the addresses on a list (suppressed ones are marked)."""
    _, store = _store()
    for m in store.members(list_name):
        name = " ".join(p for p in (m.first_name, m.last_name) if p)
        flag = f"  [{m.suppressed}]" if m.suppressed else ""
        click.echo(f"{m.email}{'  ' + name if name else ''}{flag}")


@subscribers.command("export")
@LIST_OPTION
@click.argument("out", type=click.File("w", encoding="utf-8"), default="-")
def subscribers_export(list_name: str, out: TextIO) -> None:
    """Write a list as CSV (to OUT, or standard output)."""
    import csv

    _, store = _store()
    members = store.members(list_name)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["email", "first_name", "last_name", "suppressed"])
    for m in members:
        writer.writerow([m.email, m.first_name, m.last_name, m.suppressed or ""])


@subscribers.command("remove")
@LIST_OPTION
@click.argument("emails", nargs=-1, required=True)
def subscribers_remove(list_name: str, emails: tuple[str, ...]) -> None:
    """Take EMAILS off a list (they stay on other lists)."""
    from newsletter.csv_import import normalise_address

    _, store = _store()
    removed = store.remove(list_name, [_address(e, normalise_address) for e in emails])
    click.echo(f"{list_name}: {removed} of {len(emails)} removed")


@subscribers.command("unsubscribe")
@click.argument("email")
@click.option(
    "--reason",
    type=click.Choice(["unsubscribed", "bounced", "complained"]),
    default="unsubscribed",
    show_default=True,
)
def subscribers_unsubscribe(email: str, reason: str) -> None:
    """Never mail EMAIL again, on any list, even if it is imported again."""
    from newsletter.csv_import import normalise_address

    _, store = _store()
    address = _address(email, normalise_address)
    if store.suppress(address, reason):
        click.echo(f"{address} is suppressed ({reason}); no send will reach it")
    else:
        click.echo(f"{address} was already suppressed ({store.suppression(address)})")


def _address(raw: str, normalise: Callable[[str], str]) -> str:
    try:
        return normalise(raw)
    except ValueError as exc:
        click.secho(f"error: {raw!r} is not a valid address: {exc}", fg="red", err=True)
        sys.exit(1)


# ------------------------------------------------------------------------ send


def _smtp_transport(settings: Settings) -> SmtpTransport:
    import ssl

    from newsletter.transports import SmtpConfig, SmtpTransport

    context = ssl.create_default_context(
        cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    )
    return SmtpTransport(
        SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port_or_default,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            helo_name=settings.smtp_helo_name or settings.sender_address.rpartition("@")[2],
            timeout=settings.smtp_timeout,
            message_timeout=settings.send_message_timeout,
            tls_context=context if settings.smtp_security != "none" else None,
        )
    )


@main.command()
@click.argument("issue_file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--list", "list_name", default=None, help="The list (default: NEWSLETTER_LIST_NAME).")
@click.option("--dry-run", is_flag=True, help="Connect to nothing, record nothing; write samples.")
@click.option(
    "--outbox",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where --dry-run writes sample messages (default: OUT/<issue-id>/outbox).",
)
@click.option("--to", "test_to", multiple=True, help="Send a test copy to this address only.")
@click.option("--resend-unknown", is_flag=True, help="Resend to those whose fate is unknown.")
@click.option("--retry-rejected", is_flag=True, help="Queue this send's rejected ones again.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--due",
    is_flag=True,
    help="Send the issue the schedule says is due now, if any (for cron or a systemd timer).",
)
def send(
    issue_file: Path | None,
    list_name: str | None,
    dry_run: bool,
    outbox: Path | None,
    test_to: tuple[str, ...],
    resend_unknown: bool,
    retry_rejected: bool,
    yes: bool,
    due: bool,
) -> None:
    """Send ISSUE_FILE to a subscriber list; run it again to resume."""
    from newsletter.errors import NewsletterError

    if due:
        if issue_file is not None or dry_run or test_to:
            raise click.UsageError(
                "--due picks the issue itself; give no ISSUE_FILE, --dry-run or --to"
            )
        _run_due_once()
        return
    if issue_file is None:
        raise click.UsageError("give the ISSUE_FILE to send, or --due")
    try:
        settings = _settings()
        if test_to:
            result = _build(settings, issue_file, strict=False, list_name=list_name)
            _send_test_copies(settings, _template(settings, result, list_name), test_to, dry_run)
            return
        report, transport = _send_one(
            settings,
            issue_file,
            list_name or settings.list_name,
            dry_run=dry_run,
            outbox=outbox,
            resend_unknown=resend_unknown,
            retry_rejected=retry_rejected,
            confirm=not (yes or dry_run),
        )
    except NewsletterError as exc:
        _fail(f"{exc}\nRun the same command again to resume; nobody is sent twice.")
    _summarise(report, dry_run, transport)
    sys.exit(report.exit_code)


def _template(settings: Settings, result: BuildResult, list_name: str | None) -> MessageTemplate:
    from newsletter.compose import MessageTemplate

    return MessageTemplate(result.rendered, _sender(settings, list_name), signer=_signer(settings))


def _send_one(
    settings: Settings,
    issue_file: Path,
    name: str,
    *,
    dry_run: bool = False,
    outbox: Path | None = None,
    resend_unknown: bool = False,
    retry_rejected: bool = False,
    confirm: bool = False,
) -> tuple[SendReport, Transport]:
    """Build, start or resume, and run one send: the path of `send` and of scheduled sends."""
    import contextlib
    import tempfile
    import time

    from newsletter.database import connect
    from newsletter.errors import ConfigError
    from newsletter.locks import Lease
    from newsletter.sending import dry_run_copy, prepare, preview
    from newsletter.transports import OutboxTransport

    if settings.secret_key is None and not dry_run:
        raise ConfigError(
            "NEWSLETTER_SECRET_KEY is not set: unsubscribe links would not be secure. "
            'Make one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    result = _build(settings, issue_file, strict=False, list_name=name)
    from newsletter.checks import refuse_unsendable

    refuse_unsendable(result.report)  # a preview may show bidi controls; a send may not
    template = _template(settings, result, name)
    transport: Transport
    with contextlib.ExitStack() as stack:
        # Closed at the end: `schedule run` sends week after week in one process.
        real = stack.enter_context(contextlib.closing(connect(settings.database)))
        if dry_run:
            box = outbox or settings.out_dir / result.issue_id / "outbox"
            transport = OutboxTransport(box, keep=5)
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="newsletter-dry-"))
            conn = stack.enter_context(
                contextlib.closing(connect(Path(scratch) / "dry-run.sqlite3"))
            )
            dry_run_copy(real, conn, result.issue_id, name)
        else:
            transport = _smtp_transport(settings)
            conn = real
        # Read first, ask, and only then write: declining changes nothing.
        planned = preview(conn, result.issue_id, name)
        _describe_send(planned, result.issue_id, name, transport.description, len(result.eml))
        if confirm:
            click.confirm(
                f"Send {result.issue_id} to the list {name!r} through {transport.description}?",
                abort=True,
            )
        if not dry_run:
            # One process per send: a second one would take in-flight rows for dead ones.
            lease = Lease(settings.database, f"send:{result.issue_id}:{name}")
            lease.acquire(time.time())
            stack.callback(lease.release)
        prepared = prepare(
            conn,
            result.issue_id,
            name,
            resend_unknown=resend_unknown,
            retry_rejected=retry_rejected,
        )
        return _run_campaign(conn, prepared, template, transport, settings), transport


def _run_campaign(
    conn: sqlite3.Connection,
    prepared: Prepared,
    template: MessageTemplate,
    transport: Transport,
    settings: Settings,
) -> SendReport:
    import asyncio
    import signal

    from newsletter.campaign import Campaign, SendOptions
    from newsletter.sending import run_send

    options = SendOptions(
        connections=settings.send_connections,
        rate=settings.send_rate,
        per_hour=settings.send_per_hour,
        per_day=settings.send_per_day,
        max_consecutive_errors=settings.send_max_errors,
        max_wait=settings.send_max_wait,
    )
    bar = _ProgressBar(enabled=sys.stderr.isatty())

    def on_start(campaign: Campaign) -> None:
        # Ctrl-C and SIGTERM finish the messages in flight, record them, then stop.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, campaign.stop, f"stopped by {sig.name}")
        bar.start(campaign.progress.total)

    async def go() -> SendReport:
        try:
            return await run_send(
                conn,
                prepared,
                template,
                transport,
                options,
                envelope_sender=settings.envelope_sender,
                on_start=on_start,
                on_progress=bar.update,
            )
        finally:
            bar.stop()

    return asyncio.run(go())


def _signer(settings: Settings) -> Callable[[bytes], bytes] | None:
    """DKIM signing when a key is configured (the preview in build/ is never signed)."""
    if settings.dkim_key_file is None or settings.dkim_selector is None:
        return None
    import functools

    from newsletter import dkim_sign

    key = dkim_sign.load_key(
        settings.dkim_key_file,
        settings.dkim_selector,
        settings.dkim_domain or settings.sender_address.rpartition("@")[2],
    )
    return functools.partial(dkim_sign.sign, key=key)


def _describe_send(planned: Preview, issue_id: str, name: str, via: str, size: int) -> None:
    c = planned.counts
    verb = "resuming" if planned.resumed else "starting"
    click.echo(
        f"{verb} {issue_id} to {name}: {planned.audience} recipient(s), "
        f"{planned.suppressed} suppressed and left out; message about {size / 1000:.1f} kB; "
        f"via {via}"
    )
    click.echo(
        f"  to send now: {c['pending']} pending, {c['deferred']} deferred; already: "
        f"{c['sent']} sent, {c['rejected']} rejected, {c['unknown']} unknown"
    )
    if planned.first:
        click.echo("  first: " + ", ".join(planned.first))
    if c["unknown"]:
        click.secho(
            f"  {c['unknown']} recipient(s) were in flight when an earlier run stopped; "
            "they may have the message already. They are listed at the end; add "
            "--resend-unknown to send to them again.",
            fg="yellow",
        )


def _summarise(report: SendReport, dry_run: bool, transport: Transport) -> None:
    r = report.result
    c = r.counts
    if dry_run:
        click.echo(
            f"dry run: {r.attempted} message(s) would be sent now, "
            f"{report.record.audience} in the whole send; nothing was sent or recorded"
        )
        click.echo(f"sample messages written to {getattr(transport, 'folder', '?')}/")
        return
    click.echo(
        f"sent {c['sent']}, rejected {c['rejected']}, "
        f"deferred {c['deferred']}, unknown {c['unknown']}, pending {c['pending']}, "
        f"suppressed since start {c['suppressed']}; this run {r.attempted} message(s) "
        f"in {r.elapsed:.1f} s ({r.rate:.0f}/s)"
    )
    if r.stopped:
        click.secho(f"stopped early: {r.stopped}. Run the same command to resume.", fg="yellow")
    for email, detail in report.unknown:
        click.secho(f"unknown: {email}: {detail}", fg="yellow")


def _send_test_copies(
    settings: Settings, template: MessageTemplate, addresses: tuple[str, ...], dry_run: bool
) -> None:
    import asyncio
    import datetime as dt

    from newsletter.csv_import import normalise_address
    from newsletter.models import Recipient
    from newsletter.transports import Envelope, OutboxTransport

    recipients = [Recipient(_address(a, normalise_address)) for a in addresses]
    transport: Transport = (
        OutboxTransport(settings.out_dir / template.rendered.issue_id / "test-copies")
        if dry_run
        else _smtp_transport(settings)
    )

    async def go() -> list[tuple[str, str]]:
        session = await transport.open()
        out = []
        try:
            for r in recipients:
                data = template.personalise(r, date=dt.datetime.now(dt.UTC))
                outcome = await session.send(Envelope(settings.envelope_sender, r.email, data))
                out.append((r.email, f"{outcome.state} {outcome.code or ''} {outcome.detail}"))
        finally:
            await session.close()
        return out

    from newsletter.transports import ConnectFailed

    try:
        results = asyncio.run(go())
    except ConnectFailed as exc:
        _fail(exc)
    for email, what in results:
        click.echo(f"test copy to {email}: {what}")
    if any(" sent " not in f" {w} " for _, w in results):
        sys.exit(3)


@main.command()
@click.argument("issue_id")
@click.option("--list", "list_name", default=None, help="The list (default: NEWSLETTER_LIST_NAME).")
def status(issue_id: str, list_name: str | None) -> None:
    """Counts by state and the last errors of the send of ISSUE_ID (id or file) to a list."""
    from newsletter.database import connect
    from newsletter.send_log import SendLog

    settings = _settings()
    name = list_name or settings.list_name
    issue_id = Path(issue_id).stem if issue_id.endswith((".yaml", ".yml")) else issue_id
    log = SendLog(connect(settings.database))
    record = log.find(issue_id, name)
    if record is None:
        click.echo(f"{issue_id} has not been sent to {name}")
        sys.exit(1)
    counts = log.counts(record.id)
    click.echo(
        f"{issue_id} to {name}: started {record.created_at}, audience {record.audience}, "
        f"{record.suppressed} suppressed at the start"
    )
    for state, n in counts.items():
        click.echo(f"  {state:10} {n}")
    errors = log.last_errors(record.id)
    if errors:
        click.echo("last errors:")
        for when, email, state, detail in errors:
            click.echo(f"  {when}  {state:8} {email}: {detail}")


class _ProgressBar:
    """A rich progress bar on a terminal; silence otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("sending"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task("send", total=total, rate="0")
        self._progress.start()

    def update(self, progress: CampaignProgress) -> None:
        if self._progress is None:
            return
        speed = self._progress.tasks[0].speed or 0
        self._progress.update(self._task, completed=progress.done, rate=f"{speed:.0f}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# -------------------------------------------------------------------- schedule


def _check_due(settings: Settings, now: dt.datetime | None = None) -> DueResult:
    """One look at the schedule, and the send it calls for: shared by --due and the loop."""
    import contextlib
    import datetime as dt

    from newsletter.database import connect
    from newsletter.scheduler import check_and_send

    def send_issue(path: Path, list_name: str) -> SendReport:
        report, transport = _send_one(settings, path, list_name)
        _summarise(report, False, transport)
        return report

    with contextlib.closing(connect(settings.database)) as conn:
        return check_and_send(
            schedule=settings.parsed_schedule,
            lists=settings.scheduled_lists,
            issues_dir=settings.issues_dir,
            conn=conn,
            db_path=settings.database,
            now=now or dt.datetime.now(dt.UTC),
            send_issue=send_issue,
        )


def _now_override() -> dt.datetime | None:
    """NEWSLETTER_TEST_NOW lets tests and rehearsals pretend it is another time."""
    import datetime as dt
    import os

    raw = os.environ.get("NEWSLETTER_TEST_NOW")
    return dt.datetime.fromisoformat(raw).astimezone(dt.UTC) if raw else None


def _run_due_once() -> None:
    from newsletter.errors import NewsletterError

    try:
        result = _check_due(_settings(), _now_override())
    except NewsletterError as exc:
        _fail(f"{exc}\nNothing was sent for this slot.")
    click.echo(f"schedule: {result.message}")
    sys.exit(result.exit_code)


@main.group(invoke_without_command=True)
@click.pass_context
def schedule(ctx: click.Context) -> None:
    """Show the next scheduled sends (NEWSLETTER_SCHEDULE, NEWSLETTER_TIMEZONE)."""
    if ctx.invoked_subcommand is not None:
        return
    import datetime as dt

    from newsletter.database import connect
    from newsletter.errors import NewsletterError
    from newsletter.schedule import latest, upcoming
    from newsletter.scheduler import Slots, find_issue, issue_problems

    try:
        settings = _settings()
        plan = settings.parsed_schedule
        now = _now_override() or dt.datetime.now(dt.UTC)
        click.echo(
            f"schedule: {plan.describe()}, catch-up {plan.catch_up}, "
            f"lists: {', '.join(settings.scheduled_lists)}"
        )
        slots = Slots(connect(settings.database))
        due = latest(plan, now, within=plan.catch_up)
        # A slot whose window is still open is shown with the ones to come.
        current = [due] if due is not None and slots.state(due) != "done" else []
        for slot in current + upcoming(plan, now, 5):
            choice = find_issue(settings.issues_dir, slot.local_day)
            local = slot.at.astimezone(plan.zone).strftime("%a %Y-%m-%d %H:%M %Z")
            label = "  due now" if slot is due else ""
            click.echo(f"  {local}  ({slot.key})  {choice.path or 'no issue file yet'}{label}")
            for problem in issue_problems(choice):
                click.secho(f"      cannot be sent: {problem}", fg="red")
            for note in choice.notes:
                click.echo(f"      note: {note}")
        recent = slots.recent(5)
        if recent:
            click.echo("recent slots:")
            for key, day, issue_id, state, detail in recent:
                click.echo(f"  {key}  {day}  {issue_id or '-'}  {state}  {detail}")
    except NewsletterError as exc:
        _fail(exc)


POLL_MIN, POLL_MAX = 1.0, 3600.0


def _poll_seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # `not (a <= x <= b)` also refuses NaN, which every comparison lets through.
    if not POLL_MIN <= value <= POLL_MAX:
        raise click.BadParameter(
            f"must be between {POLL_MIN:g} and {POLL_MAX:g} seconds (got {value:g})"
        )
    return value


@schedule.command("run")
@click.option(
    "--poll",
    type=float,
    default=60.0,
    show_default=True,
    callback=_poll_seconds,
    help=f"Seconds between looks ({POLL_MIN:g} to {POLL_MAX:g}).",
)
def schedule_run(poll: float) -> None:
    """Run the scheduler: send each issue when it is due, until SIGTERM or Ctrl-C."""
    import datetime as dt
    import signal
    import threading
    import traceback

    from newsletter.errors import NewsletterError

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    try:
        settings = _settings()
        plan = settings.parsed_schedule
    except NewsletterError as exc:
        _fail(exc)
    if dt.timedelta(seconds=poll) >= plan.catch_up:
        raise click.BadParameter(
            f"{poll:g} seconds between looks could let a whole catch-up window "
            f"({plan.catch_up}, NEWSLETTER_CATCH_UP_HOURS) pass unseen; poll more often",
            param_hint="'--poll'",
        )
    click.echo(f"scheduler: {plan.describe()}; Ctrl-C or SIGTERM to stop")
    said = ""  # say each thing once, not at every poll
    while not stop.is_set():
        # (Re)installed each time: a send's event loop takes the signals over
        # (to finish the messages in flight) and resets them when it ends.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        try:
            result = _check_due(settings, _now_override())
            if result.state not in ("nothing-due", "done-already") and result.message != said:
                click.echo(f"{stamp} {result.message}")
                said = result.message
            if any((r.result.stopped or "").startswith("stopped by SIG") for r in result.reports):
                stop.set()  # the signal arrived during the send, which has stopped cleanly
        except NewsletterError as exc:
            # A failed send is logged; the scheduler keeps going for the next slot.
            if str(exc) != said:
                click.secho(f"{stamp} error: {exc}", fg="red", err=True)
                said = str(exc)
        except Exception as exc:  # noqa: BLE001 - a long-running service must outlive a bug
            click.secho(
                f"{stamp} unexpected error: {exc!r}; the scheduler goes on", fg="red", err=True
            )
            traceback.print_exc()
        stop.wait(poll)
    click.echo("scheduler: stopped")


# ----------------------------------------------------------------------- serve


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: NEWSLETTER_SERVE_HOST).")
@click.option("--port", type=int, default=None, help="Port (default: NEWSLETTER_SERVE_PORT).")
def serve(host: str | None, port: int | None) -> None:
    """Serve the unsubscribe pages behind the links in every email (put HTTPS in front)."""
    import logging

    import uvicorn

    from newsletter.archive import Archive
    from newsletter.errors import ConfigError, NewsletterError
    from newsletter.loading import load_society
    from newsletter.web import WebConfig, create_app, store_per_thread

    try:
        settings = _settings()
        if settings.secret_key is None:
            raise ConfigError(
                "NEWSLETTER_SECRET_KEY is not set: the pages cannot check the links' tokens"
            )
        society = load_society(settings.society_file).value
    except NewsletterError as exc:
        _fail(exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    archive = Archive(settings.issues_dir, settings.templates_dir, society, settings.public_url)
    app = create_app(
        WebConfig(settings.token_key, society, store_per_thread(settings.database), archive)
    )
    uvicorn.run(
        app,
        host=host or settings.serve_host,
        port=port if port is not None else settings.serve_port,
        proxy_headers=True,
        server_header=False,
        log_level="info",
    )
