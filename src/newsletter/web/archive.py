"""Archive stage: issues as they were sent → web pages, an Atom feed, and their HTTP caching.

Input: the archive store (:class:`newsletter.storage.base.IssueArchive`: the web version
each issue's first send froze, and which issues were delivered to someone),
the society and the public URL. Output: :class:`Page` values (body, strong
ETag, Last-Modified, max-age) for the index, each issue and the feed.

This is the serving side. The sending side (refusing an issue id already sent
from a different file, freezing the web version at an issue's first send) is
:mod:`newsletter.delivery.provenance`: only a send uses it.

Each request costs one indexed query (:meth:`IssueArchive.published`)
compared with the last answer; the index, the feed and each issue page are
rendered once per change and kept, so a busy archive never parses YAML or
runs MJML. Sends made before the archive kept what was sent have no archive
row: their page is rendered once per server process from the one issue file
that claims the id, and left out (with a log line) when no file or several
files claim it, or when the one that does is not named for the id (it may be
a copy that kept the id of a file tidied away).
:func:`newsletter.delivery.provenance.check_source` refuses to resume such a
send from a file not named for its id, for the same reason.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape

from newsletter.errors import NewsletterError
from newsletter.models import Issue, Society
from newsletter.render import issue_ids
from newsletter.render.loading import load_issue
from newsletter.render.merge_fields import fill_general
from newsletter.render.pipeline import web_version
from newsletter.render.templating import Templates, load_templates
from newsletter.storage.base import IssueArchive, Published

log = logging.getLogger("newsletter.archive")

INDEX_MAX_AGE = 300  # seconds: a new issue shows within five minutes of a cache
ISSUE_MAX_AGE = 3600  # an issue page never changes once frozen
MAX_KEPT_PAGES = 256  # issue pages kept in memory (about 40 kB each)


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    issue_id: str
    subject: str
    date: dt.date
    preheader: str | None
    first_sent: str  # ISO time of the first send
    frozen_at: str | None  # None: sent before the archive kept what was sent

    @property
    def changed(self) -> str:
        return max(self.first_sent, self.frozen_at or "")


@dataclass(frozen=True, slots=True)
class Page:
    """A public page, rendered once, with what HTTP caches need to keep it."""

    body: bytes
    media_type: str
    etag: str  # strong, quoted
    modified: dt.datetime  # UTC, whole seconds
    max_age: int
    # Whether If-Modified-Since is answered: only for a page that never changes once
    # made (a frozen issue). The list and the feed can change without their latest
    # date moving (an issue started earlier and delivered later), and a page rendered
    # from a file can change with a restart: those answer If-None-Match only.
    dated: bool = True

    @classmethod
    def of(
        cls, body: bytes, media_type: str, changed: str, max_age: int, *, dated: bool = True
    ) -> Page:
        digest = hashlib.sha256(body).hexdigest()[:32]
        return cls(body, media_type, f'"{digest}"', _utc(changed), max_age, dated)

    @property
    def last_modified(self) -> str:
        return email.utils.format_datetime(self.modified, usegmt=True)

    def headers(self) -> dict[str, str]:
        return {
            "etag": self.etag,
            "last-modified": self.last_modified,
            "cache-control": f"public, max-age={self.max_age}",
        }

    def not_modified(self, if_none_match: str | None, if_modified_since: str | None) -> bool:
        """Whether a conditional GET or HEAD may be answered 304 (RFC 9110 13.1)."""
        if if_none_match is not None:
            # If-None-Match wins over If-Modified-Since and compares weakly.
            tags = [t.strip() for t in if_none_match.split(",")]
            return any(t == "*" or t.removeprefix("W/") == self.etag for t in tags)
        if if_modified_since and self.dated:
            try:
                since = email.utils.parsedate_to_datetime(if_modified_since)
            except (TypeError, ValueError, IndexError):
                return False  # an unreadable date is ignored, as the RFC says
            if since.tzinfo is None:
                since = since.replace(tzinfo=dt.UTC)
            if since > dt.datetime.now(dt.UTC):
                return False  # a date from a wrong clock says nothing about our copy
            return self.modified <= since
        return False


@dataclass(frozen=True, slots=True)
class _Snapshot:
    key: tuple[Published, ...]
    entries: tuple[ArchiveEntry, ...]  # newest first
    changed: str


class Archive:
    def __init__(
        self,
        issues_dir: Path,
        templates_dir: Path,
        society: Society,
        public_url: str,
        *,
        index_max_age: int = INDEX_MAX_AGE,
        issue_max_age: int = ISSUE_MAX_AGE,
    ) -> None:
        self.issues_dir = issues_dir
        self.templates_dir = templates_dir
        self.society = society
        self.public_url = public_url.rstrip("/")
        self.index_max_age = index_max_age
        self.issue_max_age = issue_max_age
        self._lock = threading.Lock()
        self._snapshot = _Snapshot((), (), _EPOCH)
        self._pages: dict[str, Page] = {}  # "index" and "feed", for the current snapshot
        self._issue_pages: dict[str, Page] = {}  # frozen: kept across snapshots
        # Sends from before the archive kept what was sent: the id's file, read once
        # (None: no file or several files claim the id); its page is rendered on demand.
        self._legacy: dict[str, Issue | None] = {}
        self._templates: Templates | None = None

    def url(self, issue_id: str) -> str:
        return f"{self.public_url}/issues/{quote(issue_id, safe='')}"

    def entries(self, store: IssueArchive) -> tuple[ArchiveEntry, ...]:
        """Published issues, newest first."""
        return self._current(store).entries

    def index_page(
        self, store: IssueArchive, render: Callable[[tuple[ArchiveEntry, ...]], bytes]
    ) -> Page:
        """The list of issues; ``render`` makes its HTML, once per change."""
        snap = self._current(store)
        return self._page(
            "index",
            snap,
            lambda: Page.of(
                render(snap.entries),
                "text/html; charset=utf-8",
                snap.changed,
                self.index_max_age,
                dated=False,
            ),
        )

    def feed_page(self, store: IssueArchive) -> Page:
        snap = self._current(store)
        return self._page(
            "feed",
            snap,
            lambda: Page.of(
                self.atom(snap.entries).encode(),
                "application/atom+xml; charset=utf-8",
                snap.changed,
                self.index_max_age,
                dated=False,
            ),
        )

    def issue_page(self, store: IssueArchive, issue_id: str) -> Page | None:
        """The web version of a published issue, as it was sent; None if there is none."""
        snap = self._current(store)
        entry = next((e for e in snap.entries if e.issue_id == issue_id), None)
        if entry is None:
            return None
        page = self._issue_pages.get(issue_id)
        if page is not None:
            return page
        if entry.frozen_at is not None:
            kept = store.get(issue_id)
            html = kept.html if kept is not None else None
        else:
            html = self._legacy_html(issue_id)
        if html is None:
            return None
        page = Page.of(
            html.encode(),
            "text/html; charset=utf-8",
            entry.changed,
            self.issue_max_age,
            dated=entry.frozen_at is not None,
        )
        with self._lock:
            if len(self._issue_pages) >= MAX_KEPT_PAGES:  # years of issues: keep the recent
                self._issue_pages.pop(next(iter(self._issue_pages)))
            self._issue_pages[issue_id] = page
        return page

    def atom(self, entries: tuple[ArchiveEntry, ...] | list[ArchiveEntry]) -> str:
        base = self.public_url
        updated = max((e.first_sent for e in entries), default=_EPOCH)
        items = []
        for e in entries:
            url = self.url(e.issue_id)
            summary = e.preheader or e.subject
            items.append(
                f"<entry><id>{escape(url)}</id><title>{escape(e.subject)}</title>"
                f'<link rel="alternate" type="text/html" href="{escape(url)}"/>'
                f"<updated>{escape(_rfc3339(e.first_sent))}</updated>"
                f"<published>{e.date.isoformat()}T00:00:00Z</published>"
                f"<summary>{escape(summary)}</summary></entry>"
            )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            '<feed xmlns="http://www.w3.org/2005/Atom">'
            f"<id>{escape(base)}/issues/</id><title>{escape(self.society.newsletter_name)}</title>"
            f'<link rel="self" href="{escape(base)}/feed.xml"/>'
            f'<link rel="alternate" type="text/html" href="{escape(base)}/issues/"/>'
            f"<author><name>{escape(self.society.name)}</name></author>"
            f"<updated>{escape(_rfc3339(updated))}</updated>" + "".join(items) + "</feed>\n"
        )

    # ------------------------------------------------------------------ caching

    def _current(self, store: IssueArchive) -> _Snapshot:
        key = tuple(store.published())
        snap = self._snapshot
        if key == snap.key:
            return snap
        with self._lock:  # one rebuild at a time; the others wait and reuse it
            if key != self._snapshot.key:
                self._snapshot = self._rebuild(key, store)
                self._pages = {}
            return self._snapshot

    def _page(self, name: str, snap: _Snapshot, make: Callable[[], Page]) -> Page:
        page = self._pages.get(name)
        if page is not None and self._snapshot is snap:
            return page
        page = make()
        with self._lock:
            if self._snapshot is snap:
                self._pages[name] = page
        return page

    def _rebuild(self, key: tuple[Published, ...], store: IssueArchive) -> _Snapshot:
        summaries = store.summaries() if any(row.archived for row in key) else {}
        self._read_legacy([row.issue_id for row in key if row.issue_id not in summaries])
        entries = []
        for row in key:
            kept = summaries.get(row.issue_id)
            if kept is not None:
                entries.append(
                    ArchiveEntry(
                        row.issue_id,
                        kept.subject,
                        dt.date.fromisoformat(kept.date),
                        kept.preheader or None,
                        row.first_sent,
                        kept.frozen_at,
                    )
                )
                continue
            issue = self._legacy.get(row.issue_id)
            if issue is not None:
                entries.append(
                    ArchiveEntry(
                        issue.id,
                        fill_general(issue.subject),
                        issue.date,
                        None if issue.preheader is None else fill_general(issue.preheader),
                        row.first_sent,
                        None,
                    )
                )
        entries.sort(key=lambda e: (e.date, e.issue_id), reverse=True)
        changed = max((e.changed for e in entries), default=_EPOCH)
        return _Snapshot(key, tuple(entries), changed)

    def _read_legacy(self, wanted: list[str]) -> None:
        """Find the one file that claims each id sent before the archive kept what was sent."""
        unknown = [issue_id for issue_id in wanted if issue_id not in self._legacy]
        if not unknown:
            return
        by_id: dict[str, list[Path]] = {}
        for claim in issue_ids.claims(self.issues_dir):
            by_id.setdefault(claim.issue_id, []).append(claim.file)
        for issue_id in unknown:
            files = by_id.get(issue_id, [])
            found = None
            why = None
            if not files:
                why = "no issue file has that id"
            elif len(files) > 1:
                why = "several files claim that id: " + ", ".join(map(str, files))
            elif files[0].stem != issue_id:
                # Such a send recorded no file: one named otherwise that claims the id
                # with `id:` may be a copy of the sent file, tidied away since.
                why = (
                    f"the one file that claims it, {files[0]}, does so with `id:` under "
                    f"another name (rename it {issue_id}{files[0].suffix} if it is the "
                    "issue that was sent)"
                )
            if why is not None:
                log.warning(
                    "issue %s was sent before the archive kept what was sent, and %s; "
                    "it is left out of the archive",
                    issue_id,
                    why,
                )
            else:
                try:
                    found = load_issue(files[0]).value
                except NewsletterError as exc:
                    log.warning("issue %s is left out of the archive: %s", issue_id, exc)
            self._legacy[issue_id] = found

    def _legacy_html(self, issue_id: str) -> str | None:
        issue = self._legacy.get(issue_id)
        if issue is None:
            return None
        try:
            if self._templates is None:
                self._templates = load_templates(self.templates_dir)
            return web_version(issue, self.society, self._templates, self.public_url)
        except NewsletterError as exc:
            log.warning("issue %s cannot be shown: %s", issue_id, exc)
            return None


_EPOCH = "1970-01-01T00:00:00+00:00"


def _utc(iso: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).replace(microsecond=0)


def _rfc3339(iso: str) -> str:
    return _utc(iso).strftime("%Y-%m-%dT%H:%M:%SZ")
