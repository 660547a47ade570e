"""PostgreSQL feedback store: bounces, complaints and mailed unsubscribes, with evidence.

Input: an autocommit psycopg connection, :class:`~newsletter.storage.evidence.Evidence`
and the soft-bounce policy. Output: what :mod:`newsletter.storage.sqlite.feedback`
gives (the reference), on the server. The evidence and the suppression it makes
are one transaction; processes recording feedback about one address take turns
on an advisory lock named after it (and the schema), so that two soft bounces
counted at once on two hosts both see each other; the same message recorded by
two at once is kept once (the digest is unique).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from newsletter.storage.evidence import (
    INSERT_COLUMNS,
    Evidence,
    Recorded,
    SoftBounces,
    already,
    insert_values,
    planned,
    window_start,
)
from newsletter.storage.feedback_reads import FeedbackReads
from newsletter.storage.location import Location
from newsletter.storage.postgres.connection import translated
from newsletter.storage.postgres.subscribers import PgSubscribers

__all__ = ["PgFeedback"]


@translated
class PgFeedback(FeedbackReads):
    """Feedback on PostgreSQL (:class:`newsletter.storage.base.FeedbackStore`)."""

    PLACEHOLDER = "%s"

    def __init__(
        self, conn: psycopg.Connection[Any], location: Location, subscribers: PgSubscribers
    ) -> None:
        self.conn = conn
        self.location = location
        self.subscribers = subscribers

    def record(self, evidence: Evidence, soft: SoftBounces, *, now: str | None = None) -> Recorded:
        received = now or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.conn.transaction():
            if evidence.email:
                self.conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended("
                    "'newsletter feedback:' || current_schema() || ':' || %s, 0))",
                    (evidence.email,),
                )
            before = self._before(evidence.digest)
            if before is not None:
                return before
            since = window_start(received, soft)
            plan = planned(evidence, lambda: self._soft_sends(evidence, since), soft)
            row = self.conn.execute(
                f"INSERT INTO feedback ({INSERT_COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (digest) DO NOTHING RETURNING id",
                insert_values(evidence, received, plan.outcome),
            ).fetchone()
            if row is None:  # another process kept the same message a moment ago
                found = self._before(evidence.digest)
                assert found is not None
                return found
            evidence_id = int(row[0])
            made = False
            if plan.suppress is not None:
                assert evidence.email
                # A savepoint inside this transaction: both commit, or neither.
                made = self.subscribers.suppress(
                    evidence.email,
                    plan.suppress,
                    actor=f"feedback #{evidence_id} ({evidence.source})",
                )
            left = [n for n in plan.leave if self.subscribers.opt_out(n, evidence.email or "")]
            if plan.suppress is not None or plan.leave:
                self.conn.execute(
                    "UPDATE feedback SET outcome = %s WHERE id = %s",
                    (plan.done(made, left), evidence_id),
                )
        return Recorded(
            evidence_id, True, plan.done(made, left), plan.suppress if made else None,
            evidence.action,
        )  # fmt: skip

    def _before(self, digest: str) -> Recorded | None:
        row = self.conn.execute(
            "SELECT id, outcome, action FROM feedback WHERE digest = %s", (digest,)
        ).fetchone()
        if row is None:
            return None
        return Recorded(int(row[0]), False, already(str(row[1])), action=row[2])

    def _soft_sends(self, evidence: Evidence, since: str) -> int:
        row = self.conn.execute(
            "SELECT count(DISTINCT send_id) FROM (SELECT send_id FROM feedback "
            "WHERE email = %s AND action = 'soft' AND received_at >= %s "
            "UNION SELECT %s::bigint) counted",
            (evidence.email, since, evidence.send_id),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def resolve(self, evidence_id: int, outcome: str) -> bool:
        with self.conn.transaction():
            changed = self.conn.execute(
                "UPDATE feedback SET action = 'note', outcome = %s "
                "WHERE id = %s AND action = 'review'",
                (outcome, evidence_id),
            ).rowcount
        return bool(changed)

    def set_mailbox_mark(self, mailbox: str, uidvalidity: int, last_uid: int) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.conn.transaction():
            self.conn.execute(
                "INSERT INTO mailbox_marks (mailbox, uidvalidity, last_uid, updated_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (mailbox) DO UPDATE SET "
                "uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, "
                "updated_at = excluded.updated_at",
                (mailbox, uidvalidity, last_uid, now),
            )
