"""Command line: parses arguments, reads settings, wires the stages, prints, exits.

No logic lives here: each command turns the settings into typed inputs
(:mod:`newsletter.wiring`), calls its subsystem (a send is
:func:`newsletter.delivery.send_issue.send_issue`, with callbacks for what it
prints and asks; test copies :mod:`newsletter.delivery.test_copies`; the
scheduler's loop :func:`newsletter.schedule.runner.run_schedule`), prints what
comes back and sets the exit status. Heavy modules are imported inside the
command that needs them, so ``newsletter --help`` stays fast. Errors a user can cause are caught
in one place, :class:`_Commands`, for every command: a :class:`NewsletterError`
(the stores turn a database failing because of the file or the machine into
one, :class:`~newsletter.errors.StorageError`). Each is printed as one
error (exit 1) without a traceback; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
import textwrap
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

import click

from newsletter import __version__

if TYPE_CHECKING:
    import datetime as dt

    from newsletter.bounces.mailbox import Fetched, ImapAccount
    from newsletter.bounces.processing import Processed
    from newsletter.bounces.report import FeedbackReport
    from newsletter.build import BuildResult
    from newsletter.delivery.campaign import Campaign
    from newsletter.delivery.campaign import Progress as CampaignProgress
    from newsletter.delivery.message import MessageTemplate
    from newsletter.delivery.send_issue import SendPlan, SendRequest
    from newsletter.delivery.sending import SendReport
    from newsletter.delivery.transports import RelayReport, Transport
    from newsletter.delivery.workers import Helpers
    from newsletter.doctor.findings import Diagnosis
    from newsletter.schedule.runner import DueResult
    from newsletter.settings import Settings
    from newsletter.storage.base import MemberState, Storage, Subscribers


def _fail(exc: Exception | str) -> NoReturn:
    message = exc if isinstance(exc, str) else _problem(exc) or str(exc)
    step = _next_step(exc)
    click.secho(f"error: {message}" + (f"\n{step}" if step else ""), fg="red", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


def _problem(exc: Exception) -> str | None:
    """The message for an error a user (or the machine) can cause, or None for a bug."""
    from newsletter.errors import NewsletterError

    return str(exc) if isinstance(exc, NewsletterError) else None


def _next_step(exc: Exception | str) -> str | None:
    """What to do next, said after the error only where it is true (see NewsletterError)."""
    step: str | None = getattr(exc, "next_step", None)
    return step


class _Commands(click.Group):
    """The one place where an error a user can cause, from any command, becomes its
    error line: a NewsletterError (a database failing because of the file or the machine
    is one: the stores raise StorageError)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if _problem(exc) is None:
                raise  # a bug (or click's own exit): its traceback is the report
            _fail(exc)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="newsletter")
def main() -> None:
    """Compose and send the weekly research-news email.

    Settings come from NEWSLETTER_* environment variables or a .env file in the
    current folder; see .env.example.
    """


def _settings() -> Settings:
    from newsletter.settings import load_settings

    return load_settings()


def _build(
    settings: Settings, issue_file: Path, strict: bool, list_name: str | None = None
) -> BuildResult:
    from newsletter import wiring
    from newsletter.build import build

    result = build(wiring.build_inputs(settings, issue_file, strict, list_name))
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
    from newsletter.render.output import write_build

    settings = _settings()
    result = _build(settings, issue_file, strict)
    target = write_build(result, out_dir or settings.out_dir)
    kb = result.report.html_bytes / 1000
    click.echo(f"built {result.issue_id} into {target}/")
    for name in ("index.html", "index.txt", "issue.mjml", "preview.eml"):
        click.echo(f"  {target / name}  ({(target / name).stat().st_size:,} bytes)")
    click.echo(f"HTML {kb:.1f} KB of Gmail's ~102 KB; {len(result.report.warnings)} warning(s)")


@main.command("new")
@click.argument("day", metavar="[DATE]", required=False, type=click.DateTime(["%Y-%m-%d"]))
@click.option("--past", is_flag=True, help="Draft an issue for a day before today.")
def new_issue(day: dt.datetime | None, past: bool) -> None:
    """Draft ISSUES/DATE.yaml (default: the day of the schedule's next slot) with the
    usual sections of the latest issue and TODO: placeholders, which build and send
    refuse until they are filled in. Never overwrites a file."""
    import datetime as dt

    from newsletter.render.drafting import issue_day, plan_draft, write_draft
    from newsletter.schedule.slots import next_day, time_zone

    settings = _settings()
    schedule = settings.parsed_schedule if settings.schedule is not None else None
    zone = schedule.zone if schedule is not None else time_zone(settings.timezone)
    now = _now_override() or dt.datetime.now(dt.UTC)
    chosen = issue_day(
        day.date() if day is not None else None,
        next_slot=next_day(schedule, now) if schedule is not None else None,
        today=now.astimezone(zone).date(),
        zone=zone.key,
        allow_past=past,
    )
    draft = plan_draft(settings.issues_dir, chosen.day)
    write_draft(draft)
    why = f"the next slot of {schedule.describe()}" if chosen.from_schedule and schedule else ""
    model = f", {draft.articles} article(s) as in {draft.modelled_on}" if draft.modelled_on else ""
    click.echo(
        f"wrote {draft.path}: the issue for {draft.day:%a %Y-%m-%d}"
        + (f" ({why})" if why else "")
        + model
    )
    click.echo(
        f"next: replace its {draft.placeholders} TODO: placeholders, then "
        f"`newsletter build {draft.path}`"
    )


# ------------------------------------------------------------------ subscribers


@main.group()
def subscribers() -> None:
    """Manage subscriber lists and the suppression list (in NEWSLETTER_DATABASE)."""


def _store(*, create: bool = False) -> tuple[Settings, Subscribers]:
    """The settings and the subscriber store; the database must exist unless ``create``."""
    settings = _settings()
    return settings, _open(settings, create=create).subscribers


def _open(settings: Settings, *, create: bool = False) -> Storage:
    """The database NEWSLETTER_DATABASE names, migrated; it must exist unless ``create``."""
    from newsletter.storage import open_storage

    return open_storage(settings.database_location, create=create)


def _require_database(settings: Settings) -> None:
    """Refuse a missing database now, not at the first send hours later."""
    _open(settings).close()


def _list_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--list, checked by the rule NEWSLETTER_LIST_NAME has (it goes into List-Id and links)."""
    from newsletter.settings import list_name_problem

    problem = None if value is None else list_name_problem(value)
    if problem:
        raise click.BadParameter(f"{value!r} {problem}")
    return value


LIST_OPTION = click.option(
    "--list", "list_name", required=True, callback=_list_name, help="The list's name."
)
DEFAULT_LIST_OPTION = click.option(
    "--list",
    "list_name",
    default=None,
    callback=_list_name,
    help="The list (default: NEWSLETTER_LIST_NAME).",
)


def _encoding(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from newsletter.audience.csv_import import check_encoding

    try:
        return check_encoding(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _actor() -> str:
    """Who is at the keyboard, for the suppression log: ``cli:user@host``."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        user = f"uid{os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def _known_list(store: Subscribers, list_name: str) -> None:
    names = [name for name, _ in store.lists()]
    if list_name not in names:
        known = ", ".join(names) or "none yet"
        _fail(f"there is no list named {list_name!r} (lists: {known}); check --list")


@subscribers.command("import")
@click.argument("csv_file", type=click.Path(path_type=Path, dir_okay=False))
@LIST_OPTION
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Import the good rows even if some are bad; exit status 3 when rows were skipped.",
)
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    callback=_encoding,
    help="The file's encoding; Excel's plain CSV on Windows is cp1252.",
)
@click.option(
    "--consent",
    "consent_text",
    metavar="TEXT",
    default=None,
    help='How these addresses were gathered and agreed to get the newsletter ("signed up '
    "on paper at the 2026 members' day\"): kept, with the file's name and the time, as the "
    "consent record of each member without one.",
)
def subscribers_import(
    csv_file: Path, list_name: str, skip_invalid: bool, encoding: str, consent_text: str | None
) -> None:
    """Import CSV_FILE (columns: email, first_name, last_name, any others) into a list.

    A column the file does not have leaves the stored values alone; an empty
    cell clears them. Every member without a consent record for the list gets one
    (--consent says how they agreed). An address erased at the person's request
    (`subscribers erase`) is refused. Exit status: 0 all imported; 1 nothing
    imported (bad rows without --skip-invalid, or a bad file); 3 good rows
    imported, bad rows skipped (--skip-invalid); 130 interrupted, nothing imported.
    """
    import datetime as dt

    from newsletter.audience.csv_import import read_csv
    from newsletter.storage.signups import ErasureCheck, ImportConsent, erasure_key_check

    settings = _settings()
    text = _consent_text(consent_text)
    storage = _open(settings, create=True)  # an import is how a database comes to exist
    try:
        erased = set(storage.signups.erasure_hashes())
        key = settings.erasure_key
        if erased and (
            key is None or not storage.signups.erasure_key_matches(erasure_key_check(key))
        ):
            why = "without" if key is None else "with this"
            _fail(
                f"{len(erased):,} address(es) were erased at the person's request, and {why} "
                "NEWSLETTER_SECRET_KEY (the key of their hashes) this file cannot be checked "
                "against them: set it as it was when they were erased; nothing was imported"
            )
        consent = ImportConsent(
            source=csv_file.name,
            text=text,
            at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            actor=_actor(),
        )
        report = storage.subscribers.import_rows(
            list_name,
            read_csv(csv_file, encoding=encoding),
            skip_invalid=skip_invalid,
            actor=_actor(),
            consent=consent,
            erased=ErasureCheck(frozenset(erased), key) if key is not None else None,
        )
    except KeyboardInterrupt:
        click.secho("interrupted: nothing was imported; the lists are as they were", err=True)
        sys.exit(130)
    finally:
        storage.close()
    for problem in report.problems:
        click.secho(
            f"{'skipped' if skip_invalid else 'error'}: {problem}",
            err=True,
            fg="yellow" if skip_invalid else "red",
        )
    if report.more_problems:
        click.secho(f"... and {report.more_problems:,} more problem(s)", err=True)
    if not report.committed:
        click.secho(
            f"{report.skipped:,} bad row(s); nothing was imported. Fix them, or run again "
            "with --skip-invalid to import the good rows only.",
            fg="red",
            err=True,
        )
        sys.exit(1)
    click.echo(
        f"{list_name}: {report.added:,} added, {report.updated:,} already on the list "
        f"(updated), {report.duplicates:,} duplicate row(s) in the file, "
        f"{report.skipped:,} bad row(s) skipped"
    )
    if not (report.added or report.updated or report.duplicates or report.skipped or report.erased):
        click.echo(f"{csv_file} has no rows after its header line.")
    if report.erased:
        lines = ", ".join(str(n) for n in report.erased_lines)
        more = " ..." if report.erased > len(report.erased_lines) else ""
        click.secho(
            f"{report.erased:,} row(s) refused (line(s) {lines}{more}): those people asked for "
            "their data to be erased, and are never imported again (only a confirmed signup "
            "of their own brings them back)",
            fg="yellow",
        )
    if report.consented:
        said = "" if consent_text else " (how they agreed was not given: see --consent)"
        click.echo(f"{report.consented:,} consent record(s) kept, from {csv_file.name}{said}.")
    from newsletter.render.merge_fields import column_notes

    for note in column_notes(report.columns):
        click.secho(f"note: {note}", fg="yellow")
    if report.opted_out or report.newly_suppressed:
        click.echo(
            f"As the file's newsletter_state column says: {report.opted_out:,} opted out of "
            f"{list_name}, {report.newly_suppressed:,} suppressed."
        )
    if report.suppressed:
        click.echo(
            f"{report.suppressed:,} of them opted out of this list or are suppressed "
            "(unsubscribed, bounced or complained) and will not be mailed; importing does "
            "not change that."
        )
    if report.skipped:
        click.secho(
            f"{report.skipped:,} bad row(s) were not imported (listed above); exit status 3.",
            fg="yellow",
            err=True,
        )
    if report.skipped or report.erased:
        sys.exit(3)  # some rows were not imported: scripts must notice


# What an import without --consent records as how its members agreed.
NO_CONSENT_GIVEN = "not given (imported without --consent)"


def _consent_text(given: str | None) -> str:
    """--consent as kept: one line of text, or the note that none was given."""
    if given is None:
        return NO_CONSENT_GIVEN
    from newsletter.models import BIDI_MARKS, bidi_characters, character_names

    text = " ".join(given.split())
    if not text or len(text) > 1000:
        _fail("--consent must say, in 1 to 1000 characters, how the addresses were gathered")
    # The record is evidence a person reads later: nothing in it may hide or reorder
    # what it says (a bidi override, a control or other invisible format character).
    # Joiners (Persian, Indic scripts, emoji) and the marks in right-to-left text stay.
    controls, stray = bidi_characters(text)
    hidden = [*controls, *stray] + [
        ch for ch in dict.fromkeys(text)
        if unicodedata.category(ch) in ("Cc", "Cf")
        and ch not in BIDI_MARKS and ch not in controls and ch not in "\u200c\u200d"
    ]  # fmt: skip
    if hidden:
        _fail(f"--consent contains {character_names(hidden)}; type the text without it")
    return text


@subscribers.command("count")
@click.option(
    "--list",
    "list_name",
    default=None,
    callback=_list_name,
    help="One list (default: every list).",
)
def subscribers_count(list_name: str | None) -> None:
    """How many members each list has in each state: subscribed (will be mailed),
    opted out of that list, suppressed (by reason)."""
    _, store = _store()
    if list_name:
        _known_list(store, list_name)
    names = [list_name] if list_name else [name for name, _ in store.lists()]
    if not names:
        click.echo("no lists yet; import one with `newsletter subscribers import FILE --list NAME`")
    for name in names:
        states = store.states(name)
        by_reason = ", ".join(f"{n:,} {reason}" for reason, n in states.suppressed.items())
        suppressed = sum(states.suppressed.values())
        click.echo(
            f"{name}: {states.members:,} member(s): {states.subscribed:,} subscribed "
            f"(will be mailed), {states.opted_out:,} opted out of this list, "
            f"{suppressed:,} suppressed" + (f" ({by_reason})" if by_reason else "")
        )
        if list_name:
            from newsletter.render.merge_fields import known_fields

            fields = ", ".join(f"[[{f}]]" for f in known_fields(store.columns(name)))
            click.echo(f"  merge fields an issue sent to {name} can use: {fields}")


def _state_text(state: MemberState, reason: str | None, since: str | None) -> str:
    day = f" since {since[:10]}" if since else ""
    if state == "suppressed":
        return f"suppressed ({reason}){day}"
    return f"opted out of this list{day}" if state == "opted-out" else "subscribed"


@subscribers.command("list")
@LIST_OPTION
def subscribers_list(list_name: str) -> None:
    """Print the members of a list, each with its state: subscribed, opted out of this
    list, or suppressed (and why)."""
    _, store = _store()
    _known_list(store, list_name)
    for m in store.members(list_name):
        name = " ".join(p for p in (m.first_name, m.last_name) if p)
        since = m.suppressed_since if m.suppressed else m.opted_out_since
        state = _state_text(m.state, m.suppressed, since)
        click.echo(f"{m.email}  {state}{'  ' + name if name else ''}")


@subscribers.command("export")
@LIST_OPTION
@click.argument(
    "out", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True), default="-"
)
def subscribers_export(list_name: str, out: Path) -> None:
    """Write a list as CSV (to OUT, or standard output): every member, every attribute,
    and each member's state in newsletter_state (subscribed, opted-out, suppressed),
    newsletter_reason and newsletter_since. Importing the file again keeps those states."""
    from newsletter.audience.csv_import import export_to_file, write_export

    _, store = _store()
    _known_list(store, list_name)
    attributes = store.attribute_names(list_name)
    if str(out) == "-":
        write_export(sys.stdout, attributes, store.members(list_name))
        return
    export_to_file(out, attributes, store.members(list_name))


@subscribers.command("remove")
@LIST_OPTION
@click.argument("emails", nargs=-1, required=True)
def subscribers_remove(list_name: str, emails: tuple[str, ...]) -> None:
    """Take EMAILS off a list (they stay on other lists)."""
    from newsletter.audience.csv_import import normalise_address

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
    """Never mail EMAIL again, on any list, even if it is imported again.

    On a new installation this creates the database, so that a request that
    came by post or mail before the first import is kept (imports do not lift it)."""
    from newsletter.audience.csv_import import normalise_address

    address = _address(email, normalise_address)
    settings = _settings()
    new = not settings.database.exists()
    store = _open(settings, create=True).subscribers
    if new:
        click.secho(
            f"note: there was no database at {settings.database.shown} "
            "(NEWSLETTER_DATABASE); a new one was created to hold this suppression. If you "
            "already have a database, NEWSLETTER_DATABASE is wrong: the real one does not "
            "have it.",
            fg="yellow",
            err=True,
        )
    if store.suppress(address, reason, actor=_actor()):
        click.echo(f"{address} is suppressed ({reason}); no send will reach it")
    else:
        click.echo(f"{address} was already suppressed ({store.suppression(address)})")


def _reason(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from newsletter.storage.base import lift_reason

    try:
        return lift_reason(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@subscribers.command("unsuppress")
@click.argument("email")
@click.option(
    "--reason",
    required=True,
    callback=_reason,
    help="Why it may be mailed again (one line, at most 200 characters); recorded with who "
    "and when.",
)
def subscribers_unsuppress(email: str, reason: str) -> None:
    """Lift the suppression of EMAIL: sends to its lists reach it again.

    Opt-outs of single lists are separate and stay. Exit status 1 if EMAIL was
    not suppressed."""
    from newsletter.audience.csv_import import normalise_address

    _, store = _store()
    address = _address(email, normalise_address)
    before = store.suppression_info(address)
    if before is None or store.unsuppress(address, reason=reason, actor=_actor()) is None:
        _fail(f"{address} is not suppressed; nothing changed")
    origin = f", from {before.list_name}" if before.list_name else ""
    click.echo(
        f"{address} had been suppressed ({before.reason}{origin}) since {before.since}; "
        "that is lifted and recorded."
    )
    if before.reason == "complained":
        # Receivers count complaints against the sender; one more from the same
        # person weighs more than a missed issue.
        click.secho(
            f"warning: {address} reported your mail as spam. Mail it again only at the "
            "person's own request; another complaint harms delivery to everyone.",
            fg="yellow",
            err=True,
        )
    lists = store.lists_of(address)
    mailed = [name for name, left in lists if not left]
    left = [name for name, left in lists if left]
    if mailed:
        click.echo(
            f"From the next send it is mailed by: {', '.join(mailed)} (a send already under "
            "way keeps the audience it started with)."
        )
    else:
        click.echo("It is on no list it has not left, so no send will mail it yet.")
    if left:
        click.echo(
            f"It stays opted out of: {', '.join(left)} (a list opt-out is the subscriber's "
            "own choice; they can rejoin on the preferences page)."
        )


@subscribers.command("show")
@click.argument("email")
def subscribers_show(email: str) -> None:
    """Everything about EMAIL: its lists and state on each, its suppression, the history
    of suppressions and their lifting, every send to it and its outcome, and what the
    mail system said about it (bounces, complaints, unsubscribes), each with its
    evidence id for `bounces show`."""
    from newsletter.audience.csv_import import normalise_address
    from newsletter.storage.signups import erasure_hash

    settings = _settings()
    storage = _open(settings)
    try:
        store = storage.subscribers
        address = _address(email, normalise_address)
        lists = store.lists_of(address)
        info = store.suppression_info(address)
        history = store.suppression_history(address)
        heard = storage.feedback.about(address)
        named = storage.feedback.mentioning(address)
        sends = storage.feedback.deliveries_of(address)
        consents = storage.signups.consents(address)
        signups = storage.signups.signups_of(address)
        key = settings.erasure_key
        erased = None if key is None else storage.signups.erased(erasure_hash(key, address))
    finally:
        storage.close()
    held = lists or info or history or heard or named or sends or consents or signups
    if erased is not None and not held:
        click.echo(f"{address}: erased at the person's request on {erased}; nothing else is kept")
        return
    if erased is not None:
        click.echo(f"{address}: erased on {erased}; held since (run `subscribers erase` again):")
    if not held:
        _fail(f"{address} is on no list and has never been suppressed")
    click.echo(address)
    for name, left in lists:
        click.echo(f"  {name}: {'opted out' if left else 'member'}")
    methods = {"confirmed": "confirmed a signup", "import": "imported", "before": "listed"}
    for c in consents:
        posted = f", posted {c.posted_at} from {c.posted_ip or 'an unknown address'}" if (
            c.posted_at) else ""  # fmt: skip
        from_ip = f" from {c.confirmed_ip}" if c.confirmed_ip else ""
        lifted = f"; lifted {c.lifted}" if c.lifted else ""
        click.echo(
            _shown(
                f"  consent to {c.list_name}: {methods[c.method]} {c.confirmed_at}{from_ip} "
                f"({c.source}{posted}): {c.consent_text or 'no text'!r}{lifted}"
            )
        )
    for p in signups:
        if p.confirmed_at is None:
            click.echo(
                _shown(
                    f"  signup #{p.id} posted {p.posted_at} for {', '.join(p.lists)}: "
                    f"waiting for its confirmation until {p.expires_at}"
                )
            )
    if info is not None:
        click.echo(f"  suppressed ({info.reason}) since {info.since}: no list mails it")
    for when, action, why, list_name, actor in history:
        where = f" via {list_name}" if list_name else ""
        click.echo(f"  {when} {action} ({why}){where} by {actor}")
    for d in sends:
        said = f": {d.detail}" if d.detail and d.state != "sent" else ""
        click.echo(
            _shown(f"  {d.at} send {d.send_id} of {d.issue_id} to {d.list_name}: {d.state}{said}")
        )
    for kept in heard:
        status = f" {kept.status}" if kept.status else ""
        about = f" from send {kept.send_id}" if kept.send_id is not None else ""
        how = _SOURCE_TEXT.get(kept.source, kept.source)
        click.echo(
            _shown(
                f"  {kept.received_at} {_KIND_TEXT.get(kept.kind, kept.kind)}{status}{about} "
                f"({how}): {kept.outcome} [evidence #{kept.id}]"
            )
        )
    for kept in named:
        click.echo(
            f"  {kept.received_at} a message naming this address, matched to "
            f"{'someone else' if kept.email else 'nobody'} [evidence #{kept.id}]"
        )


@subscribers.command("export-person")
@click.argument("email")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the JSON to this file (whole, or not at all) instead of standard output.",
)
def subscribers_export_person(email: str, output: Path | None) -> None:
    """Everything stored about EMAIL, as JSON: for a subject access request (GDPR
    article 15). Its subscriber record and columns, lists and opt-outs, suppression and
    its history, consent records with the exact text shown, signups and the mail sent
    for them, every send and its outcome, and what the mail system said, with the
    messages kept. Exit status 1 when nothing is stored about it."""
    from newsletter.audience import person
    from newsletter.audience.csv_import import normalise_address

    settings = _settings()
    address = _address(email, normalise_address)
    storage = _open(settings)
    try:
        data = person.gather(storage, address, erasure_key=settings.erasure_key)
    finally:
        storage.close()
    if data.empty:
        _fail(f"nothing is stored about {address}")
    if output is None:
        click.echo(data.to_json(), nl=False)
        return
    person.write_json(data, output)
    click.echo(f"{address}: written to {output}", err=True)


@subscribers.command("erase")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask first.")
def subscribers_erase(email: str, yes: bool) -> None:
    """Erase everything stored about EMAIL, at the person's request (GDPR article 17).

    Removed: the subscriber record and columns, list memberships and opt-outs, the
    suppression and its history, consent records, signups and their mail. The send
    log's rows and the bounces kept about it stay, for the counts, without the address,
    names, columns, SMTP replies or messages. What stays is a keyed hash of the
    address (NEWSLETTER_SECRET_KEY is the key), so that no later import can add it
    again; only a signup the person confirms brings them back. Export first
    (`subscribers export-person`) if they asked for their data too."""
    from newsletter.audience import person
    from newsletter.audience.csv_import import normalise_address
    from newsletter.errors import ConfigError
    from newsletter.storage.signups import erasure_key_check

    settings = _settings()
    address = _address(email, normalise_address)
    key = settings.erasure_key
    if key is None:
        raise ConfigError(
            "NEWSLETTER_SECRET_KEY is not set: an erasure keeps a hash of the address keyed "
            "with it (so no import adds it again, and nobody holding the database alone can "
            "test an address); set it as the web pages have it"
        )
    storage = _open(settings)
    try:
        # One key for every hash: one made with another could not be checked by the
        # import that holds this one, and would let its address back in.
        if not storage.signups.erasure_key_matches(erasure_key_check(key)):
            _fail(
                "earlier erasures were made with another NEWSLETTER_SECRET_KEY (the key of "
                "their hashes): set it as it was then; nothing was erased"
            )
        data = person.gather(storage, address, erasure_key=key)
        if data.only_erased:
            click.echo(f"{address} was erased on {data.erased_at}; nothing more to erase")
            return
        if not yes:
            what = (
                "nothing is stored about it; keep its hash, so that no import adds it"
                if data.empty
                else f"{len(data.lists)} list membership(s), {len(data.sends)} send(s) made "
                f"anonymous, {len(data.consents)} consent record(s)"
            )
            click.confirm(f"Erase {address}: {what}? This cannot be undone", abort=True)
        done = person.erase(storage, address, key)
    finally:
        storage.close()
    removed = ", ".join(f"{n:,} {table}" for table, n in done.removed.items() if n)
    anonymous = ", ".join(f"{n:,} {table}" for table, n in done.anonymised.items() if n)
    click.echo(f"{address}: erased. Removed: {removed or 'nothing'}.")
    if anonymous:
        click.echo(f"Made anonymous (kept for the counts): {anonymous}.")
    click.echo(
        "Kept: a keyed hash of the address, so that no import adds it again; a signup the "
        "person confirms themselves lifts it."
    )


_SOURCE_TEXT = {
    "smtp": "refused in our own SMTP session",
    "pipe": "piped from the MTA",
    "file": "read from a file",
}


def _address(raw: str, normalise: Callable[[str], str]) -> str:
    try:
        return normalise(raw)
    except ValueError as exc:
        click.secho(f"error: {raw!r} is not a valid address: {exc}", fg="red", err=True)
        sys.exit(1)


# ------------------------------------------------------------------------ bounces

# What a Postfix pipe transport (and sendmail's) takes as "keep it, try again later".
EX_TEMPFAIL = 75


@main.group()
def bounces() -> None:
    """What the mail system says back: bounces and complaints, kept with their evidence."""


@bounces.command("process")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False, allow_dash=True))
@click.option(
    "--delivered-to",
    metavar="ADDRESS",
    help="The address the MTA delivered the message to (Postfix: ${original_recipient}).",
)
def bounces_process(files: tuple[Path, ...], delivered_to: str | None) -> None:
    """Read messages from the mail system, one per FILE or one from standard input, and
    suppress the addresses that bounced for good, complained, or bounced softly too often.

    Every message is kept as evidence, understood or not (what names no delivery of ours
    waits in `bounces review`). Exit status for a pipe from the MTA: 0 once every message
    is recorded; 75 (try again later) when the database or the settings cannot take it
    now, so the MTA keeps the message; 1 for a FILE that cannot be read."""
    from newsletter.errors import NewsletterError

    named = [(str(f), f) for f in files] or [("standard input", Path("-"))]
    try:
        settings = _settings()
        storage = _open(settings)
    except NewsletterError as exc:
        _fail_later(exc)
    _warn_without_verp(settings)
    unreadable = 0
    try:
        for shown, path in named:
            try:
                if str(path) == "-":
                    raw = _read_capped(sys.stdin.buffer)
                else:
                    with path.open("rb") as file:
                        raw = _read_capped(file)
            except OSError as exc:
                click.secho(f"error: cannot read {shown}: {exc.strerror}", fg="red", err=True)
                unreadable += 1
                continue
            try:
                source = "pipe" if str(path) == "-" else "file"
                done = _process(settings, storage, raw, source, delivered_to)
            except NewsletterError as exc:
                _fail_later(exc)
            click.echo(f"{shown}: {_processed_text(done)}")
    finally:
        storage.close()
    if unreadable:
        sys.exit(1)


@bounces.command("fetch")
@click.option("--watch", is_flag=True, help="Keep going: fetch again whenever new mail comes.")
@click.option(
    "--poll",
    type=click.FloatRange(5, 3600),
    default=60,
    show_default=True,
    help="With --watch, seconds between looks on a server without IMAP IDLE.",
)
def bounces_fetch(watch: bool, poll: float) -> None:
    """Read the bounce mailbox over IMAP (NEWSLETTER_BOUNCE_IMAP_*), and the unsubscribe
    mailbox where it has its own (NEWSLETTER_UNSUBSCRIBE_IMAP_*), and process each new
    message as `bounces process` does; once for cron, or with --watch until SIGTERM.

    What is understood is moved to the mailbox's processed folder; what is not stays
    where it is (and waits in `bounces review`). Nothing is ever deleted."""
    from newsletter import wiring
    from newsletter.bounces import mailbox

    settings = _settings()
    accounts = wiring.imap_accounts(settings)
    _warn_without_verp(settings)
    storage = _open(settings)
    # The database answers before the mailbox is touched: a message taken from the
    # server must have somewhere to go.
    try:
        for account in accounts:
            storage.feedback.mailbox_mark(account.name)
    except BaseException:
        storage.close()
        raise
    if watch:
        storage.close()  # each mailbox's thread has its own
        names = ", ".join(a.name for a in accounts)
        click.echo(f"{names}: watching for mail; Ctrl-C or SIGTERM to stop")
        _watch_mailboxes(settings, accounts, poll)
        click.echo(f"{names}: stopped")
        return
    failed = 0
    try:
        for account in accounts:
            try:
                with mailbox.Mailbox(account) as box:
                    handle = _mail_handler(settings, storage, account)
                    fetched = mailbox.fetch_new(box, storage.feedback, handle)
                click.echo(_fetched_text(account, fetched))
            except mailbox.MailboxError as exc:
                if len(accounts) == 1:
                    raise
                click.secho(f"error: {exc}", fg="red", err=True)  # the next mailbox still read
                failed += 1
    finally:
        storage.close()
    if failed:
        sys.exit(1)


def _mail_handler(
    settings: Settings, storage: Storage, account: ImapAccount
) -> Callable[[bytes], bool]:
    """A mailbox's message handler: processed, said, and True when it may be moved."""
    source = f"imap:{account.folder}"

    def handle(raw: bytes) -> bool:
        done = _process(settings, storage, raw, source)
        click.echo(f"{account.name}: {_processed_text(done)}")
        # What was decided when it was first recorded: a second look may decide otherwise
        # (an unsubscribe request, once it has taken effect, finds the address on no list).
        return (done.recorded.action or done.decision.action) != "review"

    return handle


def _fetched_text(account: ImapAccount, fetched: Fetched) -> str:
    return (
        f"{account.name}: {fetched.read} new message(s): {fetched.moved} moved to "
        f"{account.processed_folder!r}, {fetched.left} left for review"
    )


def _watch_mailboxes(settings: Settings, accounts: list[ImapAccount], poll: float) -> None:
    """`bounces fetch --watch`: each mailbox in a thread of its own, with its own
    storage, until SIGTERM or Ctrl-C, which end each wait for mail at once and
    otherwise let the message in hand finish."""
    import signal
    import threading

    from newsletter.bounces import mailbox
    from newsletter.errors import NewsletterError

    stopper = mailbox.Stopper()
    failures: list[BaseException] = []

    def on_signal(signum: int, frame: object) -> None:
        stopper.stop()

    def trouble(exc: NewsletterError) -> None:
        if stopper.keep_going():  # else only the stop, ending a wait
            click.secho(f"error: {exc}; trying again shortly", fg="red", err=True)

    def run(account: ImapAccount) -> None:
        def report(fetched: Fetched) -> None:
            if fetched.read:
                click.echo(_fetched_text(account, fetched))

        try:
            storage = _open(settings)
            try:
                mailbox.watch(
                    account,
                    storage.feedback,
                    _mail_handler(settings, storage, account),
                    report=report,
                    trouble=trouble,
                    poll=poll,
                    keep_going=stopper.keep_going,
                    idling=stopper.idling,
                )
            finally:
                storage.close()
        except BaseException as exc:  # noqa: BLE001 - given to the main thread, which raises it
            failures.append(exc)
            stopper.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    threads = [threading.Thread(target=run, args=(a,), name=a.name) for a in accounts]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(0.5)  # short, so that a signal is handled at once
    if failures:
        raise failures[0]


def _process(
    settings: Settings, storage: Storage, raw: bytes, source: str, delivered_to: str | None = None
) -> Processed:
    """One message read, decided and recorded, under the settings' rules."""
    from newsletter.bounces.processing import process

    return process(
        raw,
        storage.feedback,
        verp=settings.verp,
        source=source,
        soft=settings.soft_bounces,
        token_key=settings.unsubscribe_token_key,
        unsubscribe_to=settings.unsubscribe_address,
        delivered_to=delivered_to,
    )


def _warn_without_verp(settings: Settings) -> None:
    if settings.verp is None:
        click.secho(
            "warning: NEWSLETTER_BOUNCE_ADDRESS and NEWSLETTER_SECRET_KEY are not both set, so "
            "sends carry no VERP address and no message can be matched to its delivery: "
            "each is kept for review",
            fg="yellow",
            err=True,
        )


def _read_capped(stream: BinaryIO) -> bytes:
    """A message's first MAX_BYTES + 1 bytes (the reader refuses anything longer, kept
    cut), the rest read and dropped: memory stays flat for a 50 MB message, and the MTA
    writing into our pipe is not stopped by a pipe closed early."""
    from newsletter.bounces.reading import MAX_BYTES

    kept = stream.read(MAX_BYTES + 1)
    while stream.read(1024 * 1024):
        pass
    return kept


def _fail_later(exc: Exception) -> NoReturn:
    """The error line, and the exit status that makes the MTA keep the message."""
    click.secho(f"error: {exc}\nThe message was not recorded; the MTA offers it again later.",
                fg="red", err=True)  # fmt: skip
    sys.exit(EX_TEMPFAIL)


def _shown(text: object) -> str:
    """Words from a stranger's server, safe to print (an escape sequence in an SMTP
    reply): see models.visible."""
    from newsletter.models import visible

    return visible(str(text))


_KIND_TEXT = {
    "hard": "a permanent bounce",
    "soft": "a temporary bounce",
    "complaint": "a spam complaint",
    "auto_reply": "an automatic reply",
    "not_bounce": "a delivery report",
    "unsubscribe": "a request to unsubscribe",
    "refused": "a refusal",
    "unknown": "not understood",
}


def _processed_text(done: Processed) -> str:
    recorded = done.recorded
    what = _KIND_TEXT.get(done.feedback.kind, done.feedback.kind)
    who = f" for {done.decision.email}" if done.decision.email else ""
    again = "" if recorded.new else " (seen before)"
    return _shown(f"{what}{who}: {recorded.outcome} [evidence #{recorded.id}]{again}")


@bounces.command("report")
@click.argument("issue_id", required=False)
@click.option("--list", "list_name", default=None, help="Only the send to this list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")
def bounces_report(issue_id: str | None, list_name: str | None, as_json: bool) -> None:
    """What came back about each send of ISSUE_ID (id or file; default: the latest issue
    sent): bounce, complaint and unsubscribe rates, top domains and reasons, last events."""
    import json

    from newsletter.bounces.report import feedback_report

    settings = _settings()
    storage = _open(settings)
    try:
        if issue_id is None:
            issue_id = storage.feedback.latest_issue()
            if issue_id is None:
                _fail("nothing has been sent yet: there is no send to report on")
        issue_id = Path(issue_id).stem if issue_id.endswith((".yaml", ".yml")) else issue_id
        names = [list_name] if list_name else storage.send_log.lists_sent(issue_id)
        records = [r for n in names if (r := storage.send_log.find(issue_id, n)) is not None]
        if not records:
            _fail(f"{issue_id} has not been sent{f' to {list_name}' if list_name else ''}")
        reports = [
            feedback_report(r, storage.send_log.counts(r.id), storage.feedback.for_send(r.id))
            for r in records
        ]
    finally:
        storage.close()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in reports], indent=2))
        return
    for report in reports:
        _print_feedback_report(report)


_REPORTED = (
    ("hard", "hard bounces"),
    ("soft", "soft bounces"),
    ("complaint", "complaints"),
    ("unsubscribe", "unsubscribes"),
    ("refused", "refused"),  # blocked for policy or content: nobody suppressed
)


def _print_feedback_report(report: FeedbackReport) -> None:
    click.echo(
        f"{report.issue_id} to {report.list_name} (send {report.send_id}): "
        f"{report.attempted} of {report.audience} attempted"
    )
    for kind, label in _REPORTED:
        click.echo(f"  {label:13} {report.counts[kind]:6}  {report.rate(kind):6.2%}")
    if report.review:
        click.echo(f"  {report.review} message(s) about it kept for review (`bounces review`)")
    if report.domains:
        shown = [
            f"{d} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})"
            for d, c in report.domains
        ]
        click.echo("  top domains: " + ", ".join(shown))
    if report.reasons:
        click.echo(_shown("  top reasons: " + ", ".join(f"{r} {n}" for r, n in report.reasons)))
    if report.latest:
        click.echo("  latest:")
    for kept in report.latest:
        who = f" for {kept.email}" if kept.email else ""
        status = f" {kept.status}" if kept.status else ""
        click.echo(
            _shown(
                f"    {kept.received_at} {_KIND_TEXT.get(kept.kind, kept.kind)}{status}{who}: "
                f"{kept.outcome} [evidence #{kept.id}]"
            )
        )


@bounces.command("reprocess")
@click.argument("evidence_ids", nargs=-1, required=True, type=click.IntRange(min=1))
def bounces_reprocess(evidence_ids: tuple[int, ...]) -> None:
    """Read and decide again messages kept for review, under today's settings and
    database (after a setting was fixed, or a database restored). What is now understood
    is recorded as new evidence and leaves the review; what is not stays as it was."""
    from dataclasses import replace

    from newsletter.bounces.processing import understood
    from newsletter.storage.evidence import digest_of

    settings = _settings()
    storage = _open(settings)
    failed = 0
    try:
        for evidence_id in evidence_ids:
            kept = storage.feedback.get(evidence_id)
            problem = (
                "there is no such evidence" if kept is None
                else "it is not kept for review" if kept.action != "review"
                else f"only its first {len(kept.raw or b'')} bytes were kept: process the "
                "original with `newsletter bounces process FILE`" if kept.cut
                else ""
            )  # fmt: skip
            if problem or kept is None:
                click.secho(f"error: evidence #{evidence_id}: {problem}", fg="red", err=True)
                failed += 1
                continue
            raw = kept.raw or b""
            _, decision, evidence = understood(
                raw, storage.feedback, verp=settings.verp, source=f"{kept.source}, again",
                token_key=settings.unsubscribe_token_key,
                unsubscribe_to=settings.unsubscribe_address,
            )  # fmt: skip
            if decision.action == "review":
                click.echo(_shown(f"#{evidence_id}: still not understood: {decision.why}"))
                continue
            # Its own digest: the first record of these bytes stays what it was.
            again = replace(evidence, digest=f"{digest_of(raw)}:again:{evidence_id}")
            recorded = storage.feedback.record(again, settings.soft_bounces)
            storage.feedback.resolve(evidence_id, f"reprocessed as evidence #{recorded.id}")
            who = f" for {decision.email}" if decision.email else ""
            click.echo(_shown(f"#{evidence_id}{who}: {recorded.outcome} [evidence #{recorded.id}]"))
    finally:
        storage.close()
    if failed:
        sys.exit(1)


@bounces.command("review")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--dismiss",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="ID",
    help="Take this evidence off the review, having looked at it (with --reason).",
)
@click.option("--reason", default=None, help="Why it was dismissed (kept with it).")
def bounces_review(limit: int, dismiss: tuple[int, ...], reason: str | None) -> None:
    """The messages kept for review (not understood, or naming no delivery of ours),
    newest first, with why. `bounces show ID` prints one, `bounces reprocess ID` reads
    it again, `--dismiss ID --reason TEXT` takes it off the review."""
    if dismiss and not (reason or "").strip():
        raise click.UsageError("--dismiss needs --reason: say why, for whoever looks later")
    settings = _settings()
    storage = _open(settings)
    try:
        for evidence_id in dismiss:
            if not storage.feedback.resolve(evidence_id, f"dismissed: {reason}"):
                _fail(f"evidence #{evidence_id} is not kept for review")
            click.echo(f"#{evidence_id}: dismissed")
        total, latest = storage.feedback.kept_for_review(limit)
    finally:
        storage.close()
    if not total:
        click.echo("nothing is kept for review")
        return
    click.echo(
        f"{total} message(s) kept for review" + (f"; the latest {limit}:" if total > limit else ":")
    )
    for kept in latest:
        click.echo(_shown(f"  #{kept.id} {kept.received_at} ({kept.source}) {kept.why}"))


@bounces.command("show")
@click.argument("evidence_id", type=click.IntRange(min=1))
@click.option("--raw", "raw_only", is_flag=True, help="Print only the message as it was kept.")
def bounces_show(evidence_id: int, raw_only: bool) -> None:
    """One piece of evidence: what came, what was decided, and (with --raw) the message."""
    settings = _settings()
    storage = _open(settings)
    try:
        kept = storage.feedback.get(evidence_id)
    finally:
        storage.close()
    if kept is None:
        _fail(f"there is no evidence #{evidence_id}; `bounces review` lists those kept for review")
    if raw_only:
        sys.stdout.buffer.write(kept.raw or b"")
        return
    click.echo(f"evidence #{kept.id}, received {kept.received_at} ({kept.source})")
    click.echo(_shown(f"  kind: {kept.kind}; outcome: {kept.outcome}"))
    click.echo(_shown(f"  why: {kept.why}"))
    if kept.email:
        click.echo(f"  about: {kept.email} (send {kept.send_id}, recipient {kept.seq})")
    for label, value in (
        ("reported recipient", kept.reported),
        ("status", kept.status),
        ("diagnostic", kept.diagnostic),
        ("feedback type", kept.feedback_type),
        ("message id", kept.message_id),
    ):
        if value:
            click.echo(_shown(f"  {label}: {value}"))
    cut = f", the first {len(kept.raw or b'')} kept" if kept.cut else ""
    click.echo(f"  message: {kept.raw_size} bytes{cut} (--raw prints it)")


# ------------------------------------------------------------------------ send


@main.command()
@click.argument("issue_file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@DEFAULT_LIST_OPTION
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
@click.option(
    "--accept-changes",
    is_flag=True,
    help="Resume a send whose issue, footer or templates changed since it began: the rest "
    "get the email as it is now.",
)
@click.option(
    "--go",
    is_flag=True,
    help="Send the rest of the list once the canary (NEWSLETTER_CANARY_TO) was checked.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse to send on any warning, and on a merge field some recipients have no value for.",
)
@click.option(
    "--due",
    is_flag=True,
    help="Send the issue the schedule says is due now, if any (for cron or a systemd timer).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    default=1,
    show_default=True,
    help="Sender processes on this host for this send (PostgreSQL only).",
)
# A helper that --workers started: confirmed already, no bar of its own.
@click.option("--as-worker", is_flag=True, hidden=True)
def send(
    issue_file: Path | None,
    list_name: str | None,
    dry_run: bool,
    outbox: Path | None,
    test_to: tuple[str, ...],
    resend_unknown: bool,
    retry_rejected: bool,
    accept_changes: bool,
    go: bool,
    yes: bool,
    strict: bool,
    due: bool,
    workers: int,
    as_worker: bool,
) -> None:
    """Send ISSUE_FILE to a subscriber list; run it again to resume."""
    from newsletter import wiring
    from newsletter.delivery.send_issue import SendRequest
    from newsletter.errors import CanaryWaiting

    if due:
        if issue_file is not None or dry_run or test_to or list_name or outbox:
            raise click.UsageError(
                "--due picks the issue and the lists (NEWSLETTER_SCHEDULE_LISTS) itself; "
                "give no ISSUE_FILE, --list, --dry-run, --outbox or --to"
            )
        if resend_unknown or retry_rejected or accept_changes or go:
            # Silently ignored, they would leave the user thinking it was done.
            raise click.UsageError(
                "--resend-unknown, --retry-rejected, --accept-changes and --go are choices "
                "for one send: run `newsletter send ISSUE_FILE --list NAME --go` by hand"
            )
        _run_due_once(strict)
        return
    if issue_file is None:
        raise click.UsageError("give the ISSUE_FILE to send, or --due")
    settings = _settings()
    if workers > 1:
        if dry_run or test_to:
            raise click.UsageError("--workers is for a real send, not --dry-run or --to")
        if settings.database.kind != "postgresql":
            raise click.UsageError(
                "--workers needs a database several processes can share: set "
                "NEWSLETTER_DATABASE to a postgresql:// URL (on SQLite one process sends a "
                "send at a time)"
            )
    if test_to:
        if resend_unknown or retry_rejected:
            raise click.UsageError(
                "--to sends test copies outside the send log; --resend-unknown and "
                "--retry-rejected belong to a real send"
            )
        if not dry_run:
            wiring.require_secret(settings)
        _send_test_copies(settings, issue_file, test_to, list_name, dry_run=dry_run, strict=strict)
        return
    if not dry_run and not settings.unsubscribe_mailto:
        _mailto_reminder(settings)
    request = SendRequest(
        issue_file,
        list_name or settings.list_name,
        dry_run=dry_run,
        outbox=outbox,
        resend_unknown=resend_unknown,
        retry_rejected=retry_rejected,
        strict=strict,
        accept_changes=accept_changes,
        canary=settings.canary,
        canary_wait=settings.canary_wait_seconds,
        go=go,
    )
    try:
        report = _send_one(
            settings, request, confirm=not (yes or dry_run or as_worker), workers=workers,
            quiet=as_worker,
        )  # fmt: skip
    except CanaryWaiting as waiting:
        # Not a failure: the send waits for the person who checks the canary.
        click.secho(f"the canary went out: {waiting}", fg="yellow")
        sys.exit(waiting.exit_code)
    _summarise(report, dry_run)
    sys.exit(report.exit_code)


def _mailto_reminder(settings: Settings) -> None:
    # A request sent to an address nobody set up is lost, and its sender keeps
    # getting mail: the default is a guess that someone must make true.
    click.secho(
        f"note: List-Unsubscribe offers mailto:{settings.unsubscribe_address} (the default; "
        "NEWSLETTER_UNSUBSCRIBE_MAILTO is not set). Make sure mail to it reaches `newsletter "
        "bounces process` or the mailbox `bounces fetch` reads, or set the address that does",
        fg="yellow",
    )


def _template(settings: Settings, result: BuildResult, list_name: str | None) -> MessageTemplate:
    from newsletter import wiring
    from newsletter.delivery.message import MessageTemplate

    return MessageTemplate(
        result.rendered, wiring.sender(settings, list_name), signer=_signer(settings)
    )


def _send_one(
    settings: Settings,
    request: SendRequest,
    *,
    confirm: bool = False,
    workers: int = 1,
    quiet: bool = False,
) -> SendReport:
    """One send, by hand or scheduled: the send use case wired to the settings and the
    terminal (notes, the plan, the question, Ctrl-C and SIGTERM, the progress bar).
    ``workers`` > 1: this process and workers - 1 helpers it starts once the audience is
    frozen (delivery.workers), shown as one bar and summed up as one send."""
    import asyncio
    import signal

    from newsletter import wiring
    from newsletter.delivery.send_issue import SendDeclined, SendHooks, send_issue
    from newsletter.delivery.workers import Helpers, Watcher

    if not request.dry_run:
        wiring.require_secret(settings)
    bar = _ProgressBar(enabled=sys.stderr.isatty() and not quiet)
    helpers: Helpers | None = None
    watcher: Watcher | None = None
    transport, relay_reports = _transport_kept(settings)

    def on_start(campaign: Campaign) -> None:
        nonlocal helpers, watcher
        if workers > 1:
            helpers = Helpers(_worker_argv(request), workers - 1)
            watched = _open(settings)
            send_id = campaign.send_id
            started = helpers

            def counts() -> dict[str, int]:
                started.reap()
                return watched.send_log.counts(send_id)

            watcher = Watcher(counts, bar.done, close=watched.close)
            helpers.start()
            watcher.start()

        def stop(reason: str) -> None:
            campaign.stop(reason)
            if helpers is not None:
                helpers.stop()

        # Ctrl-C and SIGTERM finish the messages in flight, record them, then stop.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, f"stopped by {sig.name}")
        bar.start(campaign.progress.total)

    def ask(plan: SendPlan) -> bool:
        return click.confirm(
            f"Send {plan.issue_id} to the list {plan.list_name!r} through {plan.via}?"
        )

    hooks = SendHooks(
        note=lambda note: click.secho(f"note: {note}", fg="yellow"),
        plan=_describe_send,
        confirm=ask if confirm else None,
        on_start=on_start,
        on_progress=bar.update if workers == 1 else None,
    )
    try:
        report = send_issue(
            request,
            build=lambda: _build(
                settings, request.issue_file, request.strict, list_name=request.list_name
            ),
            open_storage=lambda: _open(settings),
            transport=transport,
            sender=wiring.sender(settings, request.list_name),
            options=wiring.send_options(settings),
            envelope_sender=settings.envelope_sender,
            verp=settings.verp,
            templates_dir=settings.templates_dir,
            out_dir=settings.out_dir,
            signer=lambda: _signer(settings),
            hooks=hooks,
            lease_ttl=settings.lease_seconds,
        )
        report.relays = relay_reports()
        if helpers is not None:
            joining, helpers = helpers, None
            _join_helpers(settings, joining, report)
        return report
    except SendDeclined:
        raise click.Abort from None  # "Aborted!", exit status 1, as click.confirm's own
    finally:
        if helpers is not None:
            helpers.stop()  # this run failed: they stop too, recording what they sent
            helpers.wait()
        if watcher is not None:
            watcher.stop()
        bar.stop()


def _transport_kept(
    settings: Settings,
) -> tuple[Callable[[], Transport], Callable[[], list[RelayReport]]]:
    """The send's transport maker, and what the relays it made did (NEWSLETTER_SMTP_RELAYS;
    none for one relay, or a dry run, which makes none)."""
    from newsletter import wiring
    from newsletter.delivery.transports import RelayPool

    made: list[Transport] = []

    def make() -> Transport:
        made.append(wiring.smtp_transport(settings))
        return made[-1]

    def reports() -> list[RelayReport]:
        return [r for t in made if isinstance(t, RelayPool) for r in t.report()]

    return make, reports


def _worker_argv(request: SendRequest) -> list[str]:
    """The command a helper of ``send --workers`` runs: this send, confirmed already."""
    argv = [sys.executable, "-m", "newsletter", "send", str(request.issue_file)]
    argv += ["--list", request.list_name, "--as-worker"]
    argv += ["--accept-changes"] if request.accept_changes else []
    argv += ["--go"] if request.go else []  # not left to a race with the pause's lifting
    return argv + (["--strict"] if request.strict else [])


def _join_helpers(settings: Settings, helpers: Helpers, report: SendReport) -> None:
    """Wait for the helpers; the report then tells the whole send as it stands after all
    of them. A helper that failed (not 0, not 3: recipients left) is named, with what it
    said, and makes this command fail too."""
    import signal

    results = helpers.wait()
    storage = _open(settings)
    try:
        log = storage.send_log
        report.result.counts = log.counts(report.record.id)
        report.unknown = log.in_state(report.record.id, "unknown")
    finally:
        storage.close()
    # Ended by the SIGTERM of our own stop before it could catch it: stopped, not failed.
    stopped = -signal.SIGTERM if helpers.stopped else None
    failed = [r for r in results if r.returncode not in (0, 3, stopped)]
    for r in failed:
        click.secho(f"worker process {r.pid} failed (exit {r.returncode}):", fg="red", err=True)
        click.echo(textwrap.indent(r.said, "  "), err=True)
    if failed:
        report.helpers_failed = len(failed)


def _signer(settings: Settings) -> Callable[[bytes], bytes] | None:
    """DKIM signing when a key is configured; its warnings are said when it is made."""
    from newsletter import wiring

    signer, warnings = wiring.signer(settings)
    for warning in warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    return signer


def _describe_send(plan: SendPlan) -> None:
    planned = plan.preview
    c = planned.counts
    verb = "resuming" if planned.resumed else "starting"
    if planned.opted_out is None:
        # A send under way recorded one number for both at its start.
        left_out = f"{planned.suppressed} suppressed or had left the list (left out)"
    else:
        left_out = (
            f"{planned.suppressed - planned.opted_out} suppressed and "
            f"{planned.opted_out} who left the list (left out)"
        )
    click.echo(
        f"{verb} {plan.issue_id} to {plan.list_name}: {planned.audience} recipient(s), "
        f"{left_out}; message about {plan.message_size / 1000:.1f} kB; via {plan.via}"
    )
    again = [
        f"{c[state]} {state} again ({flag})"
        for state, flag, asked in (
            ("unknown", "--resend-unknown", plan.resend_unknown),
            ("rejected", "--retry-rejected", plan.retry_rejected),
        )
        if asked and c[state]
    ]
    click.echo(
        f"  to send now: {c['pending']} pending, {c['deferred']} deferred"
        + "".join(f", {a}" for a in again)
        + f"; already: {c['sent']} sent, {c['rejected']} rejected, {c['unknown']} unknown"
    )
    if planned.duplicates:
        click.echo(
            f"  {planned.duplicates} left out: they have this issue from another list's send "
            "(each person gets an issue once)"
        )
    if planned.first:
        click.echo("  first: " + ", ".join(planned.first))
    if c["unknown"]:
        then = (
            "--resend-unknown sends to them again now."
            if plan.resend_unknown
            else "They are listed at the end; add --resend-unknown to send to them again."
        )
        click.secho(
            f"  {c['unknown']} recipient(s) were in flight when an earlier run stopped; "
            f"they may have the message already. {then}",
            fg="yellow",
        )


def _summarise(report: SendReport, dry_run: bool) -> None:
    r = report.result
    c = r.counts
    if dry_run:
        click.echo(
            f"dry run: {r.attempted} message(s) would be sent now, "
            f"{report.record.audience} in the whole send; nothing was sent or recorded"
        )
        click.echo(f"sample messages written to {report.outbox or '?'}/")
        return
    click.echo(
        f"sent {c['sent']}, rejected {c['rejected']}, "
        f"deferred {c['deferred']}, unknown {c['unknown']}, pending {c['pending']}, "
        f"left the list or suppressed since the start {c['suppressed']}; "
        f"this run {r.attempted} message(s) "
        f"in {r.elapsed:.1f} s ({r.rate:.0f}/s)"
    )
    if report.record.duplicates:
        click.echo(
            f"left out {report.record.duplicates} who have this issue from another list's send"
        )
    if r.stopped:
        # A cap's own reason says when to run again ("tomorrow"); others resume now.
        then = "" if r.stop_says_when else " Run the same command to resume."
        if r.paused is not None:
            from newsletter.bounces.refusals import PAUSE_ADVICE

            then = f" {PAUSE_ADVICE}"
        click.secho(f"stopped early: {r.stopped}.{then}", fg="yellow")
    for relay in report.relays:
        _relay_line(relay)
    for email, detail in report.unknown:
        click.secho(f"unknown: {email}: {detail}", fg="yellow")


def _relay_line(relay: RelayReport) -> None:
    """What one relay of NEWSLETTER_SMTP_RELAYS did in this run (this process's share)."""
    from newsletter.errors import shown_time

    did = [f"{relay.sent} sent"] + [
        f"{n} {what}"
        for n, what in (
            (relay.rejected, "rejected"),
            (relay.deferred, "deferred"),
            (relay.unknown, "unknown"),
            (relay.handed_on, "handed to another relay"),
            (relay.connect_failures, "connection(s) failed"),
        )
        if n
    ]
    said = {
        "out": "out of use at", "still out": "still failing at", "back": "back in use at",
        "refused": "refused the send at",
    }  # fmt: skip
    events = "".join(
        f"; {said[e.kind]} {shown_time(e.at)}"
        + (f" ({_shown(e.detail)})" if e.kind in ("out", "refused") else "")
        for e in relay.events
    )
    end = "" if relay.in_use else "; still out of use as the run ended"
    line = f"{relay.name} (weight {relay.weight:g}): {', '.join(did)}{events}{end}"
    click.secho(line, fg=None if relay.in_use and not relay.events else "yellow")


def _send_test_copies(
    settings: Settings,
    issue_file: Path,
    addresses: tuple[str, ...],
    list_name: str | None,
    *,
    dry_run: bool,
    strict: bool,
) -> None:
    """`send --to`: the test-copy checks and send (delivery.test_copies), printed."""
    import contextlib

    from newsletter import wiring
    from newsletter.delivery import test_copies
    from newsletter.delivery.transports import OutboxTransport
    from newsletter.errors import ConnectFailed

    name = list_name or settings.list_name
    result = _build(settings, issue_file, strict=strict, list_name=list_name)

    def transport_for(copies: int) -> Transport:
        if not dry_run:
            return wiring.smtp_transport(settings)
        # Every test copy asked for is written (a send's dry run keeps five samples).
        return OutboxTransport(settings.out_dir / result.issue_id / "test-copies", keep=copies)

    with contextlib.ExitStack() as stack:
        # Without a database (a first try-out) there is nobody to protect yet.
        storage = _open(settings) if settings.database.exists() else None
        if storage is not None:
            stack.callback(storage.close)
        try:
            results = test_copies.send_test_copies(
                storage,
                issue_id=result.issue_id,
                uses=result.merge_uses,
                list_name=name,
                addresses=addresses,
                make_template=lambda: _template(settings, result, list_name),
                transport_for=transport_for,
                envelope_sender=settings.envelope_sender,
                warn=lambda w: click.secho(f"warning: {w}", fg="yellow", err=True),
            )
        except ConnectFailed as exc:  # not a NewsletterError: the transport's own, said as one
            _fail(exc)
    for copy in results:
        o = copy.outcome
        click.echo(f"test copy to {copy.email}: {o.state} {o.code or ''} {o.detail}")
    if not all(copy.sent for copy in results):
        sys.exit(3)


@main.command()
@click.argument("issue_id")
@DEFAULT_LIST_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON, for monitoring scripts.")
def status(issue_id: str, list_name: str | None, as_json: bool) -> None:
    """Counts by state, the live processes and the last errors of the send of ISSUE_ID (id or
    file) to a list."""
    import json

    settings = _settings()
    name = list_name or settings.list_name
    issue_id = Path(issue_id).stem if issue_id.endswith((".yaml", ".yml")) else issue_id
    log = _open(settings).send_log
    record = log.find(issue_id, name)
    if record is None:
        others = log.lists_sent(issue_id)
        if as_json:
            click.echo(json.dumps({"issue_id": issue_id, "list": name, "started": False,
                                   "lists_sent": others}))  # fmt: skip
            sys.exit(1)
        where = (
            f"it has a send to {', '.join(others)} (`newsletter status {issue_id} --list "
            f"{others[0]}`)"
            if others
            else "it has not been sent to any list"
        )
        click.echo(f"{issue_id} has not been sent to {name}; {where}")
        sys.exit(1)
    from newsletter.delivery.status import send_status, stamp

    report = send_status(log, record)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    click.echo(
        f"{issue_id} to {name}: started {record.created_at}, audience {record.audience}, "
        f"{record.suppressed} suppressed or had left the list at the start, "
        f"{record.duplicates} left out "
        "(they have it from another list's send)"
    )
    for state, n in report.counts.items():
        click.echo(f"  {state:10} {n}")
    if report.orphaned:
        click.echo(
            f"  ({report.orphaned} of those sending were claimed by a process that is no "
            "longer alive: the next run counts them unknown)"
        )
    if report.workers:
        click.echo("processes sending now:")
        for w in report.workers:
            click.echo(
                f"  process {w.pid} on {w.host}: {w.claimed} in flight, since "
                f"{stamp(w.since)}, last heartbeat {stamp(w.heartbeat)}"
            )
    if report.errors:
        click.echo("last errors:")
        for when, email, state, detail in report.errors:
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
        self.done(progress.done)

    def done(self, done: int) -> None:
        if self._progress is None:
            return
        speed = self._progress.tasks[0].speed or 0
        self._progress.update(self._task, completed=done, rate=f"{speed:.0f}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# -------------------------------------------------------------------------- db


@main.group()
def db() -> None:
    """Look after the database itself (NEWSLETTER_DATABASE)."""


@db.command("migrate")
def db_migrate() -> None:
    """Bring a database made by an older version up to the current schema.

    Every command does this too when it opens the database, under the write lock;
    this does it on its own, say before a deployment's services start. On
    PostgreSQL it also creates newsletter's tables in an empty database."""
    from newsletter.storage import migrate

    settings = _settings()
    before, after = migrate(settings.database_location)
    where = settings.database.shown
    if before == after:
        click.echo(f"the database {where} is already up to date (schema {after})")
    elif before == 0:
        click.echo(f"created newsletter's tables in the database {where} (schema {after})")
    else:
        click.echo(f"migrated the database {where} from schema {before} to schema {after}")


@db.command("copy")
@click.argument("sqlite_path", type=click.Path(path_type=Path))
@click.argument("postgresql_url")
def db_copy(sqlite_path: Path, postgresql_url: str) -> None:
    """Move a deployment from its SQLite file to an empty PostgreSQL database.

    Every subscriber, list, opt-out, suppression, send log, slot and archived
    issue is copied with its id, in one transaction, and the counts are compared
    before it is committed; a target that holds anything is refused. The SQLite
    file is only read: stop the old deployment's services first, and run
    `newsletter db migrate` on it if it is at an older schema. The password is
    NEWSLETTER_DATABASE_PASSWORD's (or PGPASSWORD, ~/.pgpass)."""
    from newsletter.errors import ConfigError
    from newsletter.storage.copy import copy_database
    from newsletter.storage.location import parse_location

    settings = _settings()  # first, as every command: a wrong setting is said before all
    try:
        target = parse_location(postgresql_url)
    except ValueError as exc:
        raise ConfigError(f"POSTGRESQL_URL {exc}") from None
    if target.kind != "postgresql":
        raise ConfigError(
            f"POSTGRESQL_URL must be a postgresql:// URL, not {postgresql_url!r}; `db copy` "
            "copies an SQLite file into PostgreSQL"
        )
    secret = settings.database_password
    target = target.with_password(None if secret is None else secret.get_secret_value())
    target = target.given_as("POSTGRESQL_URL")

    def started(table: str, rows: int) -> None:
        if rows >= 10_000:  # only where the wait is long enough to wonder
            click.echo(f"copying {table}: {rows} row(s)...", err=True)

    report = copy_database(sqlite_path, target, on_table=started)
    width = max(len(c.table) for c in report.counts)
    click.echo(f"{'table':<{width}}  {'source':>10}  {'target':>10}")
    for c in report.counts:
        click.echo(f"{c.table:<{width}}  {c.source:>10}  {c.target:>10}")
    click.echo(
        f"copied {report.rows} row(s) from {sqlite_path.absolute()} to {target.shown} in "
        f"{report.seconds:.1f} s; the counts match"
    )
    click.echo(
        f"not copied: locks ({report.leases_left} row(s)): leases of runs on the old "
        "machine mean nothing to the new server"
    )
    if report.sending:
        click.echo(
            f"{report.sending} delivery(ies) left 'sending' by a run that died were copied "
            "as they are: the next send on PostgreSQL reports them as unknown (resend them "
            "with --resend-unknown)"
        )
    click.echo("next: point NEWSLETTER_DATABASE at the new database, then start the services")


# -------------------------------------------------------------------- schedule


def _check_due(
    settings: Settings, now: dt.datetime | None = None, *, strict: bool = False
) -> DueResult:
    """One look at the schedule, and the send it calls for: shared by --due and the loop."""
    import contextlib
    import datetime as dt

    from newsletter.delivery.send_issue import SendRequest
    from newsletter.schedule.runner import check_and_send

    def send_issue(path: Path, list_name: str) -> SendReport:
        report = _send_one(
            settings,
            SendRequest(
                path,
                list_name,
                strict=strict,
                resume_paused=False,
                canary=settings.canary,
                canary_wait=settings.canary_wait_seconds,
            ),
        )
        _summarise(report, False)
        return report

    with contextlib.closing(_open(settings)) as storage:
        return check_and_send(
            schedule=settings.parsed_schedule,
            lists=settings.scheduled_lists,
            issues_dir=settings.issues_dir,
            storage=storage,
            now=now or dt.datetime.now(dt.UTC),
            send_issue=send_issue,
            society_file=settings.society_file,
            lease_ttl=settings.lease_seconds,
        )


def _now_override() -> dt.datetime | None:
    """NEWSLETTER_TEST_NOW lets tests and rehearsals pretend it is another time."""
    import datetime as dt
    import os

    raw = os.environ.get("NEWSLETTER_TEST_NOW")
    return dt.datetime.fromisoformat(raw).astimezone(dt.UTC) if raw else None


def _run_due_once(strict: bool) -> None:
    result = _check_due(_settings(), _now_override(), strict=strict)
    click.echo(f"schedule: {result.message}")
    sys.exit(result.exit_code)


@main.group(invoke_without_command=True)
@click.pass_context
def schedule(ctx: click.Context) -> None:
    """Show the next scheduled sends (NEWSLETTER_SCHEDULE, NEWSLETTER_TIMEZONE)."""
    if ctx.invoked_subcommand is not None:
        return
    import datetime as dt

    from newsletter.schedule.runner import planned_slots

    settings = _settings()
    plan = settings.parsed_schedule
    now = _now_override() or dt.datetime.now(dt.UTC)
    click.echo(
        f"schedule: {plan.describe()}, catch-up {plan.catch_up}, "
        f"lists: {', '.join(settings.scheduled_lists)}"
    )
    storage = _open(settings)
    for planned in planned_slots(
        plan,
        now,
        storage=storage,
        issues_dir=settings.issues_dir,
        lists=settings.scheduled_lists,
        society_file=settings.society_file,
    ):
        slot, choice = planned.slot, planned.choice
        local = slot.at.astimezone(plan.zone).strftime("%a %Y-%m-%d %H:%M %Z")
        label = "  due now" if planned.due_now else ""
        click.echo(f"  {local}  ({slot.key})  {choice.path or 'no issue file yet'}{label}")
        for problem in planned.problems:
            click.secho(f"      cannot be sent: {problem}", fg="red")
        for note in choice.notes:
            click.echo(f"      note: {note}")
    recent = storage.slots.recent(5)
    if recent:
        click.echo("recent slots:")
        for key, day, issue_id, state, detail in recent:
            # Slots recorded by older versions may have none.
            why = detail or ("" if state in ("done", "sending") else "(no reason recorded)")
            click.echo(f"  {key}  {day}  {issue_id or '-'}  {state}  {why}")


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
@click.option(
    "--strict",
    is_flag=True,
    help="Fail a slot on any warning, and on a merge field some recipients have no value for.",
)
def schedule_run(poll: float, strict: bool) -> None:
    """Run the scheduler: send each issue when it is due, until SIGTERM or Ctrl-C."""
    import datetime as dt
    import signal
    import threading

    from newsletter.schedule.runner import run_schedule

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    def each_look() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def complain(line: str, trace: str | None) -> None:
        click.secho(line, fg="red", err=True)
        if trace is not None:
            click.echo(trace, err=True, nl=False)

    settings = _settings()
    plan = settings.parsed_schedule
    if dt.timedelta(seconds=poll) >= plan.catch_up:
        raise click.BadParameter(
            f"{poll:g} seconds between looks could let a whole catch-up window "
            f"({plan.catch_up}, NEWSLETTER_CATCH_UP_HOURS) pass unseen; poll more often",
            param_hint="'--poll'",
        )
    _require_database(settings)
    click.echo(f"scheduler: {plan.describe()}; Ctrl-C or SIGTERM to stop")
    run_schedule(
        lambda: _check_due(settings, _now_override(), strict=strict),
        poll=poll,
        stop=stop,
        say=click.echo,
        complain=complain,
        problem_of=_problem,
        each_look=each_look,
    )
    click.echo("scheduler: stopped")


# ---------------------------------------------------------------------- doctor


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON, for scripts.")
def doctor(as_json: bool) -> None:
    """Check that mail from these settings will be accepted under Gmail's, Yahoo's and
    Microsoft's bulk-sender rules, and say how to fix each finding: SPF, DKIM, DMARC
    and MX in DNS (NEWSLETTER_DNS_RESOLVER), TLS on the relay, one-click unsubscribing
    at NEWSLETTER_PUBLIC_URL (with a test link that changes nothing), the footer's
    postal address, the latest issue's size, the secret key. Exit status 0 when
    nothing fails, 1 otherwise."""
    import json

    from newsletter import wiring
    from newsletter.doctor import diagnose
    from newsletter.errors import ConfigError

    try:
        inputs = wiring.doctor_inputs(_settings())
    except ConfigError as exc:
        if not as_json:
            raise
        # A script reading --json gets JSON whatever happens (and the error on stderr).
        click.echo(json.dumps({"ok": False, "error": str(exc), "findings": []}, indent=2))
        _fail(exc)
    diagnosis = diagnose(inputs)
    if as_json:
        click.echo(json.dumps(diagnosis.as_json(), indent=2))
    else:
        _print_diagnosis(diagnosis)
    sys.exit(0 if diagnosis.ok else 1)


def _print_diagnosis(diagnosis: Diagnosis) -> None:
    from rich.console import Console
    from rich.table import Table

    colours = {"pass": "green", "warn": "yellow", "fail": "red", "info": "blue"}
    table = Table(show_lines=True)
    for column in ("status", "check", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for f in diagnosis.findings:
        colour = colours[f.status]
        table.add_row(f"[{colour}]{f.status}[/]", f.title, f.detail, f.fix)
    # A pipe or a file gets the whole lines (a terminal, its own width).
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    console.print(table)
    counts = diagnosis.counts()
    verdict = "nothing fails"
    if not diagnosis.ok:
        verdict = "fix what fails: receivers may refuse this mail or file it as spam"
    click.echo(", ".join(f"{n} {status}" for status, n in counts.items()) + f": {verdict}")


# ----------------------------------------------------------------------- serve


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: NEWSLETTER_SERVE_HOST).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (default: NEWSLETTER_SERVE_PORT).",
)
def serve(host: str | None, port: int | None) -> None:
    """Serve the unsubscribe, undo and preferences pages behind the links in every email,
    the archive of sent issues with its feed, the providers' webhooks and, when
    society.yaml has a `signup`, the public signup page (put HTTPS in front)."""
    import logging

    import uvicorn

    from newsletter import wiring
    from newsletter.errors import ConfigError
    from newsletter.render.loading import load_society
    from newsletter.storage import open_storage
    from newsletter.web.app import WebConfig, check_listen, create_app
    from newsletter.web.archive import Archive

    settings = _settings()
    if settings.secret_key is None:
        raise ConfigError(
            "NEWSLETTER_SECRET_KEY is not set: the pages cannot check the links' tokens"
        )
    society = load_society(settings.society_file).value
    # Checked before listening: pages on a missing database would answer
    # "nothing changed" to every opt-out.
    # Each server thread reopens it, waiting less for a writer than a command does.
    storage = open_storage(settings.database_location, busy_seconds=20.0)
    lists = storage.subscribers.lists()
    host = host or settings.serve_host
    port = port if port is not None else settings.serve_port
    check_listen(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("newsletter.serve").info(
        "database %s: %s list(s), %s member(s) in all",
        settings.database.shown,
        f"{len(lists):,}",
        f"{sum(n for _, n in lists):,}",
    )
    archive = Archive(settings.issues_dir, settings.templates_dir, society, settings.public_url)
    webhooks = wiring.webhook_config(settings)
    on = [
        name
        for name, configured in (
            ("ses", webhooks.ses_topics),
            ("mailgun", webhooks.mailgun_key),
            ("sendgrid", webhooks.sendgrid_key),
            ("postmark", webhooks.postmark_login),
        )
        if configured
    ]
    if on:
        logging.getLogger("newsletter.serve").info(
            "webhooks on: %s%s",
            ", ".join(f"/webhooks/{n}" for n in on),
            ""
            if webhooks.verp
            else " (no NEWSLETTER_BOUNCE_ADDRESS: events are matched "
            "by recipient, not by VERP address)",
        )
    policy = wiring.signup_policy(settings, society)
    mailer = None
    if policy is not None:
        from newsletter.signup.mailer import Mailer

        mailer = Mailer(
            storage.reopen(),
            wiring.signup_composer(settings, society, policy),
            wiring.smtp_transport(settings),
            settings.envelope_sender,
        )
        logging.getLogger("newsletter.serve").info(
            "signup on: %s/subscribe for %s; confirmation mail through %s",
            settings.public_url.rstrip("/"),
            ", ".join(item.name for item in policy.lists),
            mailer.transport.description,
        )
    app = create_app(
        WebConfig(
            settings.token_key,
            society,
            storage,
            archive,
            public_url=settings.public_url,
            webhooks=webhooks,
            signup=policy,
            mail_queued=mailer.wake if mailer is not None else (lambda: None),
            on_shutdown=mailer.stop if mailer is not None else (lambda: None),
        )
    )
    if mailer is not None:
        mailer.start()
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            proxy_headers=True,
            # X-Forwarded-For is believed from these only (the signup records the address).
            forwarded_allow_ips=settings.trusted_proxies or [],
            server_header=False,
            log_level="info",
            access_log=False,  # it prints paths, tokens included: the app logs requests itself
        )
    finally:
        if mailer is not None:
            mailer.stop()
