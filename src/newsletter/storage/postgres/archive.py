"""PostgreSQL archive: the sent issues, and where each send's issue came from.

Input: an autocommit psycopg connection. Output: the rows of the ``archive``
table (the web version of each issue as its first send froze it, with the
source file and its SHA-256) and the ``source_file`` / ``source_sha256`` of
each send, as :mod:`newsletter.storage.sqlite.archive` gives them
(:class:`newsletter.storage.base.IssueArchive`). The archive is written once per
issue, by the first send that gets there (``ON CONFLICT DO NOTHING``): editing a
file after it was sent never rewrites what the archive shows.

:meth:`PgArchive.published` is not cached: it is one indexed query per call
(a probe per send for a delivered row), and a cache here could not see what
the other hosts sharing the database commit. The web archive keeps its
rendered pages until that answer changes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from newsletter.storage.base import ArchivedIssue, Published, Source, SourceUse, Summary
from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import translated

__all__ = ["PgArchive"]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@translated
class PgArchive:
    """The archive on PostgreSQL (:class:`newsletter.storage.base.IssueArchive`)."""

    def __init__(self, conn: psycopg.Connection[Any], location: Location) -> None:
        self.conn = conn
        self.location = location

    def published(self) -> list[Published]:
        """Every issue delivered to someone, in issue-id order (byte order, as SQLite),
        with whether the archive keeps its version.

        Sent means delivered: a send that was only frozen, or whose every message
        was refused, is not published. Asked on every request: the EXISTS probes use
        deliveries' (send_id, state, seq) index, and the archive's key index (its HTML
        is stored out of line, so the probe does not read it)."""
        rows = self.conn.execute(
            'SELECT s.issue_id, min(s.created_at COLLATE "C"), '
            "EXISTS (SELECT 1 FROM archive a WHERE a.issue_id = s.issue_id) "
            "FROM sends s WHERE EXISTS (SELECT 1 FROM deliveries d "
            "WHERE d.send_id = s.id AND d.state = 'sent') "
            'GROUP BY s.issue_id ORDER BY s.issue_id COLLATE "C"'
        ).fetchall()
        return [Published(str(r[0]), str(r[1]), bool(r[2])) for r in rows]

    def summaries(self) -> dict[str, Summary]:
        """Every archive row but its HTML, by issue id."""
        rows = self.conn.execute(
            "SELECT issue_id, subject, date, preheader, frozen_at FROM archive"
        ).fetchall()
        return {row[0]: Summary(*row) for row in rows}

    def get(self, issue_id: str) -> ArchivedIssue | None:
        row = self.conn.execute(
            "SELECT issue_id, subject, date, preheader, html, source_file, source_sha256, "
            "frozen_at FROM archive WHERE issue_id = %s",
            (issue_id,),
        ).fetchone()
        if row is None:
            return None
        return ArchivedIssue(
            issue_id=row[0],
            subject=row[1],
            date=row[2],
            preheader=row[3],
            html=row[4],
            source=Source(row[5], row[6]),
            frozen_at=row[7],
        )

    def uses(self, issue_id: str) -> list[SourceUse]:
        """Every earlier use of ``issue_id``: its sends (any list) and its archive row."""
        out = []
        for list_name, file, sha, at in self.conn.execute(
            "SELECT list_name, source_file, source_sha256, created_at FROM sends "
            'WHERE issue_id = %s ORDER BY created_at COLLATE "C", id',
            (issue_id,),
        ):
            source = Source(file, sha) if file is not None and sha is not None else None
            out.append(SourceUse(f"the send to {list_name}", source, at))
        row = self.conn.execute(
            "SELECT source_file, source_sha256, frozen_at FROM archive WHERE issue_id = %s",
            (issue_id,),
        ).fetchone()
        if row is not None:
            out.append(SourceUse("the archive", Source(row[0], row[1]), row[2]))
        return out

    def freeze(self, issue: ArchivedIssue) -> ArchivedIssue:
        """Keep ``issue`` as the archive's copy unless one is kept already (first writer
        wins, committed); return the copy that is kept. Two sends freezing one issue at
        once: the second waits for the first's insert, then keeps the first's copy."""
        self.conn.execute(
            "INSERT INTO archive (issue_id, subject, date, preheader, html, source_file, "
            "source_sha256, frozen_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (issue_id) DO NOTHING",
            (
                issue.issue_id,
                issue.subject,
                issue.date,
                issue.preheader,
                issue.html,
                issue.source.file,
                issue.source.sha256,
                issue.frozen_at or _now(),
            ),
        )
        kept = self.get(issue.issue_id)
        assert kept is not None  # archive rows are never deleted
        return kept

    def record_source(self, send_id: int, source: Source) -> None:
        """Note the file a send was started from; a resume keeps the first one noted."""
        self.conn.execute(
            "UPDATE sends SET source_file = %s, source_sha256 = %s "
            "WHERE id = %s AND source_file IS NULL",
            (source.file, source.sha256, send_id),
        )

    def frozen(self, send_id: int) -> str | None:
        row = self.conn.execute("SELECT frozen FROM sends WHERE id = %s", (send_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def record_frozen(self, send_id: int, fingerprint: str, *, replace: bool = False) -> None:
        self.conn.execute(
            "UPDATE sends SET frozen = %s WHERE id = %s AND (frozen IS NULL OR %s)",
            (fingerprint, send_id, replace),
        )
