"""Provenance: which file an issue id was sent from, checked before a send and recorded at it.

Input: the archive store (:class:`newsletter.storage.base.IssueArchive`: every use of an
issue id, with the file it came from), the issue id and the :class:`Source` (path
and SHA-256) of the file about to be sent. Output: notes to show, or
:class:`IdAlreadyUsed` (nothing is sent); at a real send, the frozen
:class:`ArchivedIssue`.

:func:`check_source` refuses an issue id already sent from a different file: that
send would be taken for a resume of the earlier one and reach nobody new.
:func:`record_send` keeps the web version (the email's HTML without its "view in
browser" line and with every personal link made general) at the first send of
an issue, first writer wins, so editing a sent file never rewrites the archive.
The public pages (:mod:`newsletter.web.archive`) serve what it kept.
"""

from __future__ import annotations

from pathlib import Path

from newsletter.errors import ConfigError
from newsletter.models import Issue, Society
from newsletter.render import issue_ids
from newsletter.render.merge_fields import fill_general
from newsletter.render.pipeline import web_version
from newsletter.render.templating import load_templates
from newsletter.storage.base import ArchivedIssue, IssueArchive, Source

__all__ = ["IdAlreadyUsed", "check_source", "record_send", "same_issue"]


class IdAlreadyUsed(ConfigError):
    """An issue id was sent before from a different file; nothing was sent."""


def same_issue(earlier: Source, now: Source) -> bool:
    """Whether ``now`` is the issue ``earlier`` was sent from: the same bytes (renamed or
    moved), or the same file name (edited in place; moved and edited) unless the earlier
    file is still there and is another file, such as week1/issue.yaml copied to
    week2/issue.yaml. A path given another way (./issues/x.yaml, an absolute path from
    cron) is still the same file."""
    if earlier.sha256 == now.sha256:
        return True
    if Path(earlier.file).name != Path(now.file).name:
        return False
    try:
        # A relative path is read from here, as every command is run from the project.
        return not Path(earlier.file).is_file() or Path(earlier.file).samefile(now.file)
    except OSError:
        return True


def check_source(store: IssueArchive, issue_id: str, source: Source) -> list[str]:
    """Refuse ``issue_id`` if it was used before by a different file; return notes to show.

    Raises :class:`IdAlreadyUsed` naming both files. A file edited since its send
    started resumes, with a note that the archive keeps the version first sent."""
    notes = []
    for use in store.uses(issue_id):
        if use.source is None:
            # A send from before sends recorded their file: only the file named for the
            # id is known to be its file; another may be a copy that kept its `id:`.
            if Path(source.file).stem != issue_id:
                raise IdAlreadyUsed(_unrecorded_clash(issue_id, source, use.what, use.at))
            continue
        if not same_issue(use.source, source):
            raise IdAlreadyUsed(_clash(issue_id, source, use.what, use.source.file, use.at))
        if use.source.sha256 != source.sha256 and use.what == "the archive":
            notes.append(
                f"{source.file} has changed since {issue_id} was first sent ({use.at}); "
                "this send goes out as the file is now, but the archive keeps the version "
                f"first sent, from {use.source.file} (SHA-256 {use.source.sha256[:12]}...)"
            )
    return notes


def record_send(
    store: IssueArchive,
    send_id: int,
    issue: Issue,
    society: Society,
    templates_dir: Path,
    public_url: str,
    source: Source,
) -> ArchivedIssue:
    """At a real send: note its source, and freeze the web version if nobody has yet."""
    store.record_source(send_id, source)
    kept = store.get(issue.id)
    if kept is None:
        html = web_version(issue, society, load_templates(templates_dir), public_url)
        kept = store.freeze(
            ArchivedIssue(
                issue_id=issue.id,
                # Nobody in particular reads the archive: merge fields show their fallback.
                subject=fill_general(issue.subject),
                date=issue.date.isoformat(),
                preheader=fill_general(issue.preheader or ""),
                html=html,
                source=source,
            )
        )
    if not same_issue(kept.source, source):  # another file got there first, just now
        raise IdAlreadyUsed(
            _clash(issue.id, source, "the archive", kept.source.file, kept.frozen_at)
        )
    return kept


def _clash(issue_id: str, source: Source, what: str, other: str, at: str) -> str:
    claim = issue_ids.claim_of(Path(source.file))
    where = f"{source.file}:{claim.line}" if claim.line is not None else source.file
    fix = (
        f"change `id:` in {source.file}" + (f" (line {claim.line})" if claim.line else "")
        if claim.line is not None
        else f"add an `id:` line to {source.file}, or rename it"
    )
    return (
        f"{where}: id: the issue id {issue_id!r} was already used by {what} (started "
        f"{at[:16].replace('T', ' ')}), from {other}, a different file. Sending this file "
        f"would be taken for a resume of that send and reach nobody new. Give this issue "
        f"its own id: {fix}. Nothing was sent."
    )


def _unrecorded_clash(issue_id: str, source: Source, what: str, at: str) -> str:
    claim = issue_ids.claim_of(Path(source.file))
    where = f"{source.file}:{claim.line}" if claim.line is not None else source.file
    name = f"{issue_id}{Path(source.file).suffix}"
    return (
        f"{where}: id: the issue id {issue_id!r} was already used by {what} (started "
        f"{at[:16].replace('T', ' ')}), which was made by an older version of newsletter "
        f"and did not record its file. This file is not named {name}, so it may be a copy "
        "of that issue's file that kept its `id:`; sending it would be taken for a resume "
        f"of that send and reach nobody new. If this file is the one that send was "
        f"started from, name it {name} and send again; otherwise give this issue its own "
        f"id: change `id:` in {source.file}. Nothing was sent."
    )
