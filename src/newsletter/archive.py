"""Archive stage: issues that were sent → the web versions and an Atom feed.

Input: the issues folder, the send log (which issues went out), the
templates and the society. Output: :class:`ArchiveEntry` values, the web
version of an issue (the email's HTML with every per-recipient link replaced
by a general one, so it holds no personal data) and an Atom document. An
issue appears once it has been sent to at least one list; its page is
rendered once and kept.
"""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from newsletter import placeholders
from newsletter.build import render_issue
from newsletter.errors import NewsletterError
from newsletter.loading import load_issue
from newsletter.models import Issue, Society
from newsletter.templating import load_templates


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    issue: Issue
    first_sent: str  # ISO time of the first send


class Archive:
    def __init__(
        self, issues_dir: Path, templates_dir: Path, society: Society, public_url: str
    ) -> None:
        self.issues_dir = issues_dir
        self.templates_dir = templates_dir
        self.society = society
        self.public_url = public_url

    def entries(self, conn: sqlite3.Connection) -> list[ArchiveEntry]:
        """Sent issues, newest first; files that no longer load are left out."""
        # Sent means delivered to someone: a send that was only frozen, or whose
        # every message was refused, is not in the archive.
        sent = dict(
            conn.execute(
                "SELECT issue_id, min(created_at) FROM sends s WHERE EXISTS (SELECT 1 FROM "
                "deliveries d WHERE d.send_id = s.id AND d.state = 'sent') GROUP BY issue_id"
            ).fetchall()
        )
        found = []
        for issue in self._issues():
            if issue.id in sent:
                found.append(ArchiveEntry(issue, str(sent[issue.id])))
        return sorted(found, key=lambda e: (e.issue.date, e.issue.id), reverse=True)

    def _issues(self) -> list[Issue]:
        out = []
        for path in sorted(self.issues_dir.glob("*.y*ml")):
            try:
                out.append(load_issue(path).value)
            except NewsletterError:
                continue
        return out

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Archive per server, issues are few
    def web_version(self, issue_id: str) -> str:
        issue = next(i for i in self._issues() if i.id == issue_id)
        rendered = render_issue(
            issue, self.society, load_templates(self.templates_dir), self.public_url
        )
        general = {
            placeholders.UNSUBSCRIBE_URL: f"{self.public_url}/unsubscribe",
            placeholders.PREFERENCES_URL: f"{self.public_url}/preferences",
            placeholders.EMAIL: "each subscriber",
        }
        return placeholders.fill(rendered.html, general, is_html=True)

    def atom(self, entries: list[ArchiveEntry]) -> str:
        base = self.public_url
        updated = max((e.first_sent for e in entries), default=_epoch())
        items = []
        for e in entries:
            url = f"{base}/issues/{e.issue.id}"
            summary = e.issue.preheader or e.issue.subject
            items.append(
                f"<entry><id>{escape(url)}</id><title>{escape(e.issue.subject)}</title>"
                f'<link rel="alternate" type="text/html" href="{escape(url)}"/>'
                f"<updated>{escape(_rfc3339(e.first_sent))}</updated>"
                f"<published>{e.issue.date.isoformat()}T00:00:00Z</published>"
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


def _rfc3339(iso: str) -> str:
    when = dt.datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch() -> str:
    return "1970-01-01T00:00:00+00:00"
