"""Command line: parses arguments, reads settings, wires the stages, prints, exits.

No logic lives here. Heavy modules are imported inside the command that needs
them, so ``newsletter --help`` stays fast. Only :class:`NewsletterError` is
caught (printed without a traceback, exit 1); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from newsletter import __version__


def _fail(exc: Exception) -> NoReturn:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="newsletter")
def main() -> None:
    """Compose and send the weekly research-news email.

    Settings come from NEWSLETTER_* environment variables or a .env file in the
    current folder; see .env.example.
    """


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
    from newsletter.build import BuildInputs
    from newsletter.build import build as run_build
    from newsletter.compose import Sender
    from newsletter.errors import NewsletterError
    from newsletter.models import Recipient
    from newsletter.output import write_build
    from newsletter.settings import load_settings

    try:
        settings = load_settings()
        preview_name, preview_addr = settings.preview_mailbox
        first, _, last = preview_name.partition(" ")
        inputs = BuildInputs(
            issue_file=issue_file,
            society_file=settings.society_file,
            templates_dir=settings.templates_dir,
            sender=Sender(
                name=settings.sender_name,
                address=settings.sender_address,
                list_name=settings.list_name,
                public_url=settings.public_url,
                token_key=settings.token_key,
                unsubscribe_mailto=settings.unsubscribe_address,
                reply_to=settings.reply_to,
            ),
            preview_recipient=Recipient(preview_addr, first, last),
            strict=strict,
        )
        result = run_build(inputs)
        target = write_build(result, out_dir or settings.out_dir)
    except NewsletterError as exc:
        _fail(exc)

    for warning in result.report.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    kb = result.report.html_bytes / 1000
    click.echo(f"built {result.issue_id} into {target}/")
    for name in ("index.html", "index.txt", "issue.mjml", "preview.eml"):
        click.echo(f"  {target / name}  ({(target / name).stat().st_size:,} bytes)")
    click.echo(f"HTML {kb:.1f} KB of Gmail's ~102 KB; {len(result.report.warnings)} warning(s)")
