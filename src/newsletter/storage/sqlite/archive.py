"""SQLite archive: the sent issues, and where each send's issue came from.

Input: an open database connection. Output: the rows of the ``archive``
table (the web version of each issue as its first send froze it, with the
source file and its SHA-256) and the ``source_file`` / ``source_sha256`` of
each send. The archive is written once per issue, by the first send that
gets there (``INSERT OR IGNORE``): editing a file after it was sent never
rewrites what the archive shows. The web pages only read; a PostgreSQL
backend implements the same methods (:class:`newsletter.storage.base.IssueArchive`).
"""

from __future__ import annotations

import datetime as dt
import sqlite3

from newsletter.storage.base import ArchivedIssue, Published, Source, SourceUse, Summary
from newsletter.storage.sqlite.connection import translated

__all__ = ["ArchiveStore", "ArchivedIssue", "Published", "Source", "SourceUse", "Summary"]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@translated
class ArchiveStore:
    """The archive on SQLite (:class:`newsletter.storage.base.IssueArchive`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._published: tuple[tuple[int, int], list[Published]] | None = None

    def published(self) -> list[Published]:
        """Every issue delivered to someone, in issue-id order: also the archive's version.

        Sent means delivered: a send that was only frozen, or whose every message
        was refused, is not published. It is asked on every request, so it is
        kept until a connection commits a change (``PRAGMA data_version``); even
        then it is one indexed probe per send and a scan of the archive's keys
        (never a lookup of a row by key: the HTML makes rows long, and a lookup
        reads a whole row)."""
        # data_version moves when another connection commits; total_changes when
        # this one writes (PRAGMA data_version does not count our own commits).
        version = (
            self.conn.execute("PRAGMA data_version").fetchone()[0],
            self.conn.total_changes,
        )
        if self._published is not None and self._published[0] == version:
            return self._published[1]
        archived = {row[0] for row in self.conn.execute("SELECT issue_id FROM archive")}
        rows = self.conn.execute(
            "SELECT issue_id, min(created_at) FROM sends s WHERE EXISTS (SELECT 1 FROM "
            "deliveries d WHERE d.send_id = s.id AND d.state = 'sent') "
            "GROUP BY issue_id ORDER BY issue_id"
        ).fetchall()
        found = [Published(row[0], row[1], row[0] in archived) for row in rows]
        self._published = (version, found)
        return found

    def summaries(self) -> dict[str, Summary]:
        """Every archive row but its HTML, by issue id."""
        rows = self.conn.execute(
            "SELECT issue_id, subject, date, preheader, frozen_at FROM archive"
        ).fetchall()
        return {row[0]: Summary(*row) for row in rows}

    def get(self, issue_id: str) -> ArchivedIssue | None:
        row = self.conn.execute(
            "SELECT issue_id, subject, date, preheader, html, source_file, source_sha256, "
            "frozen_at FROM archive WHERE issue_id = ?",
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
            "WHERE issue_id = ? ORDER BY created_at",
            (issue_id,),
        ):
            source = Source(file, sha) if file is not None and sha is not None else None
            out.append(SourceUse(f"the send to {list_name}", source, at))
        row = self.conn.execute(
            "SELECT source_file, source_sha256, frozen_at FROM archive WHERE issue_id = ?",
            (issue_id,),
        ).fetchone()
        if row is not None:
            out.append(SourceUse("the archive", Source(row[0], row[1]), row[2]))
        return out

    def freeze(self, issue: ArchivedIssue) -> ArchivedIssue:
        """Keep ``issue`` as the archive's copy unless one is kept already (first writer
        wins); return the copy that is kept."""
        self.conn.execute(
            "INSERT OR IGNORE INTO archive (issue_id, subject, date, preheader, html, "
            "source_file, source_sha256, frozen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        assert kept is not None
        return kept

    def record_source(self, send_id: int, source: Source) -> None:
        """Note the file a send was started from; a resume keeps the first one noted."""
        self.conn.execute(
            "UPDATE sends SET source_file = ?, source_sha256 = ? "
            "WHERE id = ? AND source_file IS NULL",
            (source.file, source.sha256, send_id),
        )

    def frozen(self, send_id: int) -> str | None:
        row = self.conn.execute("SELECT frozen FROM sends WHERE id = ?", (send_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def record_frozen(self, send_id: int, fingerprint: str, *, replace: bool = False) -> None:
        self.conn.execute(
            "UPDATE sends SET frozen = ? WHERE id = ? AND (frozen IS NULL OR ?)",
            (fingerprint, send_id, replace),
        )
