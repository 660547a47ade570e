"""A person's data: one address → everything stored about it, and its erasure.

Input: an open :class:`~newsletter.storage.base.Storage`, a normalised address and,
to erase, the deployment's erasure key. Output: :class:`PersonData` (what
``subscribers show`` prints and ``subscribers export-person`` writes as JSON, for a
subject access request: the subscriber record and columns, lists and opt-outs, the
suppression and its history, consent records with the text shown, signups, the mail
sent for them, every send and its outcome, and what the mail system said, with the
messages kept); and :func:`erase` (``subscribers erase``), which removes it all but
an anonymous send log and a keyed hash that keeps later imports from adding it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newsletter.audience.csv_import import write_whole
from newsletter.storage.base import Storage
from newsletter.storage.signups import Erased, erasure_hash, erasure_key_check

__all__ = ["FORMAT", "PersonData", "erase", "gather", "write_json"]

# The export's own version: a reader of old exports knows what each field meant.
FORMAT = "newsletter person export 1"


@dataclass(frozen=True, slots=True)
class PersonData:
    email: str
    subscriber: dict[str, Any] | None  # first_name, last_name, columns; None: no record
    lists: list[dict[str, Any]]  # name, state (member / opted out)
    suppression: dict[str, Any] | None  # reason, since, list
    suppression_history: list[dict[str, Any]]
    consents: list[dict[str, Any]]
    signups: list[dict[str, Any]]
    mail: list[dict[str, Any]]  # the confirmation and welcome mails sent for signups
    sends: list[dict[str, Any]]  # each with the name and columns its message was made with
    # bounces, complaints, mailed unsubscribes about them, with the messages; and kept
    # messages matched to nobody that name the address ("matched": false)
    feedback: list[dict[str, Any]]
    erased_at: str | None = None  # when this address was erased (then nothing else is held)
    exported_at: str = field(default="")

    @property
    def empty(self) -> bool:
        return not any(
            (self.subscriber, self.lists, self.suppression, self.suppression_history,
             self.consents, self.signups, self.mail, self.sends, self.feedback, self.erased_at)
        )  # fmt: skip

    @property
    def only_erased(self) -> bool:
        """Erased, and nothing of theirs held since (a later bounce, a mailed request)."""
        return self.erased_at is not None and dataclasses.replace(self, erased_at=None).empty

    def to_json(self) -> str:
        """The export: UTF-8 JSON, keys in a stable order, one field per line."""
        document = {"format": FORMAT, **dataclasses.asdict(self)}
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_json(data: PersonData, path: Path) -> None:
    """The export into ``path``, whole or not at all (OutputError when it cannot be)."""
    write_whole(path, lambda fh: fh.write(data.to_json()))


def gather(storage: Storage, email: str, *, erasure_key: bytes | None = None) -> PersonData:
    """Everything ``storage`` holds about ``email`` (normalised)."""
    people = storage.subscribers
    recipient = people.recipient(email)
    created, joined = storage.signups.joined(email)
    subscriber = None
    if recipient is not None:
        subscriber = {
            "first_name": recipient.first_name,
            "last_name": recipient.last_name,
            "columns": dict(sorted(recipient.attributes.items())),
            "created_at": created,
        }
    info = people.suppression_info(email)
    kept = []
    matched = [(True, item) for item in storage.feedback.about(email)]
    named = [(False, item) for item in storage.feedback.mentioning(email)]
    for about_them, item in sorted(matched + named, key=lambda pair: pair[1].id):
        full = item if item.raw is not None else storage.feedback.get(item.id)
        raw = full.raw if full is not None else None
        kept.append(
            {
                "evidence": item.id, "received_at": item.received_at, "source": item.source,
                # False: matched to nobody (or someone else), but its message names them
                "matched": about_them,
                "kind": item.kind, "action": item.action, "outcome": item.outcome,
                "why": item.why, "send": item.send_id, "reported": item.reported,
                "status": item.status, "diagnostic": item.diagnostic,
                "feedback_type": item.feedback_type, "message_id": item.message_id,
                "message": None if raw is None else raw.decode("utf-8", "replace"),
                "message_cut": item.cut,
            }
        )  # fmt: skip
    erased_at = None
    if erasure_key is not None:
        erased_at = storage.signups.erased(erasure_hash(erasure_key, email))
    return PersonData(
        email=email,
        subscriber=subscriber,
        lists=[
            {
                "list": j.list_name, "state": "opted out" if j.opted_out_at else "member",
                "added_at": j.added_at, "opted_out_at": j.opted_out_at,
            }
            for j in joined
        ],
        suppression=None if info is None else {
            "reason": info.reason, "since": info.since, "list": info.list_name,
        },
        suppression_history=[
            {"at": at, "action": action, "reason": why, "list": list_name, "by": actor}
            for at, action, why, list_name, actor in people.suppression_history(email)
        ],
        consents=[
            {
                "list": c.list_name, "method": c.method, "source": c.source,
                "consent_text": c.consent_text, "consent_sha256": c.consent_sha256,
                "signup": c.signup_id, "posted_at": c.posted_at, "posted_ip": c.posted_ip,
                "confirmed_at": c.confirmed_at, "confirmed_ip": c.confirmed_ip,
                "lifted": c.lifted, "by": c.actor,
            }
            for c in storage.signups.consents(email)
        ],
        signups=[
            {
                "signup": s.id, "first_name": s.first_name, "lists": list(s.lists),
                "form": s.form, "consent_sha256": s.consent_sha256,
                "consent_text": storage.signups.consent_text(s.consent_sha256),
                "posted_at": s.posted_at,
                "posted_ip": s.posted_ip, "expires_at": s.expires_at,
                "confirmed_at": s.confirmed_at, "confirmed_ip": s.confirmed_ip,
            }
            for s in storage.signups.signups_of(email)
        ],
        mail=[
            {
                "kind": m.kind, "signup": m.signup_id, "state": m.state, "attempts": m.attempts,
                "detail": m.detail, "queued_at": m.created_at, "at": m.updated_at,
            }
            for m in storage.signups.outbox(email)
        ],
        sends=[
            {
                "send": d.send_id, "issue": d.issue_id, "list": d.list_name, "state": d.state,
                "attempts": d.attempts, "code": d.code, "detail": d.detail, "at": d.at,
                # what the message was made with, as the send log froze it
                "first_name": d.first_name, "last_name": d.last_name, "columns": d.columns,
            }
            for d in storage.feedback.deliveries_of(email)
        ],
        feedback=kept,
        erased_at=erased_at,
        exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )  # fmt: skip


def erase(storage: Storage, email: str, erasure_key: bytes) -> Erased:
    """Erase ``email`` (normalised): see :meth:`~newsletter.storage.base.Signups.erase`."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return storage.signups.erase(
        email, erasure_hash(erasure_key, email), now=now, key_check=erasure_key_check(erasure_key)
    )
