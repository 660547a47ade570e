"""The signup store: pending signups, consent records, the mail they send, and erasure.

Input: a backend's connection (SQLite's or psycopg's: both have ``execute``), its
placeholder, and its write transaction (:meth:`SignupSql._write`, which each backend
gives). Output: :class:`~newsletter.storage.base.Signups`, the same SQL on both
backends (as :mod:`newsletter.storage.feedback_reads`): a signup posted and its
confirmation mail queued in one transaction; a confirmation that puts the address on
its lists, lifts its own opt-outs and suppressions, and writes a consent record per
list, all at once and only once; the outbox that the server's mailer works through
(each mail ``sending`` before its SMTP transaction and its fate after, never sent
twice); rate limits and single-use keys shared by every process on the database;
and a person's data read out (a subject access request) or erased.

Addresses are stored normalised, as everywhere (the domain in ASCII, compared
lower-case). An erased address is kept only as a keyed hash (:func:`erasure_hash`,
with a key the database does not hold), so that no import can add it again.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gzip
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from newsletter.storage.evidence import ERASED_DOMAIN, scan_mentions

__all__ = [
    "ConfirmedSignup",
    "ConsentRecord",
    "Erased",
    "ErasureCheck",
    "ImportConsent",
    "Joined",
    "MailState",
    "NewSignup",
    "OutboxMail",
    "PendingSignup",
    "SignupSql",
    "consent_hash",
    "erasure_hash",
    "erasure_key",
    "erasure_key_check",
]

MailKind = Literal["confirm", "welcome"]
MailState = Literal["pending", "sending", "sent", "rejected", "deferred", "unknown"]
# Rate-limit hits older than this are deleted whatever their bucket (the longest window).
RATE_KEEP = 7 * 86400.0
KEPT_FOREVER = 1e18  # a single-use key's expiry that never comes


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def consent_hash(text: str) -> str:
    """What a consent record references: SHA-256 of the exact text shown, UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def erasure_key(secret_key: bytes) -> bytes:
    """The key of the erasure hashes, derived from the deployment's secret key (never
    stored in the database: a copy of it alone cannot test an address)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"newsletter erasure v1"
    ).derive(secret_key)


def erasure_key_check(key: bytes) -> str:
    """What the database keeps of the erasure key: enough to tell it from another."""
    return hmac.new(key, b"newsletter erasure key check", hashlib.sha256).hexdigest()[:32]


def erasure_hash(key: bytes, email: str) -> str:
    """The keyed hash an erased (normalised) address leaves behind."""
    return hmac.new(key, email.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class ErasureCheck:
    """An import's check against erased addresses: the hashes as the file was read,
    and the key to hash with; :func:`refuse_late_erasures` looks again under the
    write lock, for an erasure made while the file was being read."""

    known: frozenset[str]
    key: bytes

    def __call__(self, email: str) -> bool:
        return erasure_hash(self.key, email) in self.known


def refuse_late_erasures(
    execute: Callable[..., Any], staged: str, placeholder: str, check: ErasureCheck
) -> int:
    """Inside an import's write transaction: drop the staged rows (table ``staged``, a
    backend's constant) of addresses erased since ``check.known`` was read; how many."""
    now = {str(r[0]) for r in execute("SELECT email_hash FROM erasures").fetchall()}
    late = now - check.known
    if not late:
        return 0
    gone = [
        str(email)
        for (email,) in execute(f"SELECT email FROM {staged}").fetchall()  # noqa: S608
        if erasure_hash(check.key, str(email)) in late
    ]
    for email in gone:
        execute(f"DELETE FROM {staged} WHERE email = {placeholder}", (email,))  # noqa: S608
    return len(gone)


@dataclass(frozen=True, slots=True)
class ImportConsent:
    """How an imported list was gathered, as `subscribers import --consent` says it."""

    source: str  # the file's name
    text: str  # how the addresses were gathered, in the importer's words
    at: str  # when it was imported (ISO, UTC)
    actor: str  # who imported it


def import_consent_sql(temp_table: str, placeholder: str) -> tuple[str, str]:
    """The two statements an import runs, before it writes its rows, to record
    ``ImportConsent`` (the text kept once; a record for each staged row the import
    adds to the list, or that has none for it: a member removed and imported again
    joins on this file's word, whatever an older record said), for a backend whose
    staged rows are in ``temp_table``, with its placeholder. Parameters: (sha256, text,
    at) and (list, source, sha256, at, actor, list, list)."""
    keep = (
        "INSERT INTO consent_texts (sha256, text, first_seen) VALUES (?, ?, ?) "
        "ON CONFLICT (sha256) DO NOTHING"
    )
    # temp_table is one of the two backends' constants.
    record = (
        "INSERT INTO consents (email, list_name, method, source, consent_sha256, "  # noqa: S608
        f"confirmed_at, actor) SELECT r.email, ?, 'import', ?, ?, ?, ? FROM {temp_table} r "
        "WHERE NOT EXISTS (SELECT 1 FROM consents c WHERE c.email = r.email AND c.list_name = ?) "
        "OR NOT EXISTS (SELECT 1 FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
        "WHERE u.email = r.email AND m.list_name = ?) ORDER BY r.seq"
    )
    return keep.replace("?", placeholder), record.replace("?", placeholder)


def import_consent_params(
    consent: ImportConsent, list_name: str
) -> tuple[tuple[str, str, str], tuple[str, ...]]:
    digest = consent_hash(consent.text)
    return (digest, consent.text, consent.at), (
        list_name, consent.source, digest, consent.at, consent.actor, list_name, list_name,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class NewSignup:
    """A signup form as posted: who, which lists, what they were shown, from where."""

    email: str
    first_name: str
    lists: tuple[str, ...]
    form: str  # where the form was: "web:/subscribe", or the society's page
    consent_text: str  # exactly as shown next to the button
    posted_at: str  # ISO, UTC
    posted_ip: str | None
    expires_at: str  # when the confirmation link stops working
    nonce: str  # random, in the link's token


@dataclass(frozen=True, slots=True)
class PendingSignup:
    id: int
    nonce: str
    email: str
    first_name: str
    lists: tuple[str, ...]
    form: str
    consent_sha256: str
    posted_at: str
    posted_ip: str | None
    expires_at: str
    confirmed_at: str | None
    confirmed_ip: str | None

    def confirmable(self, nonce: str, now: str) -> bool:
        """Whether a link with ``nonce`` may confirm this signup at ``now``: its own
        nonce (compared in constant time), not confirmed yet, not expired."""
        return (
            hmac.compare_digest(self.nonce.encode(), nonce.encode())
            and self.confirmed_at is None
            and self.expires_at > now
        )


@dataclass(frozen=True, slots=True)
class ConfirmedSignup:
    """What a confirmation did: the lists joined, and what of the person's own it lifted."""

    signup: PendingSignup
    joined: tuple[str, ...]  # lists the address was not getting before
    lifted: tuple[str, ...]  # in words: "the suppression (bounced, since ...)", ...
    welcome_queued: bool


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    id: int
    email: str
    list_name: str
    method: Literal["confirmed", "import", "before"]
    source: str  # the form; the file imported; or where the member came from before
    consent_sha256: str | None
    consent_text: str | None
    signup_id: int | None
    posted_at: str | None
    posted_ip: str | None
    confirmed_at: str
    confirmed_ip: str | None
    lifted: str
    actor: str


@dataclass(frozen=True, slots=True)
class OutboxMail:
    id: int
    kind: MailKind
    signup_id: int
    email: str
    state: MailState
    attempts: int
    created_at: str
    detail: str = ""  # the relay's last reply or the error, once tried
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class Joined:
    """One list an address is on or left: since when, and when it opted out."""

    list_name: str
    added_at: str | None  # None: it opted out of a list it is not a member of
    opted_out_at: str | None


@dataclass(slots=True)
class Erased:
    """What an erasure removed or made anonymous, by table."""

    email_hash: str
    removed: dict[str, int] = field(default_factory=dict)
    anonymised: dict[str, int] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return any(self.removed.values()) or any(self.anonymised.values())


_SIGNUP_COLUMNS = (
    "id, nonce, email, first_name, lists, form, consent_sha256, posted_at, posted_ip, "
    "expires_at, confirmed_at, confirmed_ip"
)
_CONSENT_COLUMNS = (
    "c.id, c.email, c.list_name, c.method, c.source, c.consent_sha256, t.text, c.signup_id, "
    "c.posted_at, c.posted_ip, c.confirmed_at, c.confirmed_ip, c.lifted, c.actor"
)


def _signup(row: Sequence[Any]) -> PendingSignup:
    return PendingSignup(
        int(row[0]), row[1], row[2], row[3], tuple(json.loads(row[4])), row[5], row[6],
        row[7], row[8], row[9], row[10], row[11],
    )  # fmt: skip


def anonymous_address(email_hash: str) -> str:
    """What an erased address becomes in the send log: one per person (counts and
    duplicates stay right), on a domain that can never receive mail (RFC 2606)."""
    return f"erased-{email_hash[:20]}{ERASED_DOMAIN}"


class SignupSql:
    """:class:`~newsletter.storage.base.Signups` in SQL written with ``?``
    placeholders, given to the driver with its own; each backend gives
    :meth:`_write` (its write transaction) and :meth:`_lock` (one writer per name)."""

    conn: Any
    PLACEHOLDER = "?"
    BACKEND_NEUTRAL = True  # each backend's `translated` wraps these (storage.boundary)

    # -- what each backend gives ------------------------------------------------
    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _lock(self, name: str) -> None:
        """Inside :meth:`_write`: wait for any other writer holding ``name``."""

    def _sql(self, sql: str, params: Sequence[Any] = ()) -> Any:
        # No query here holds a literal "?" or "%": the swap is safe for both drivers.
        return self.conn.execute(sql.replace("?", self.PLACEHOLDER), tuple(params))

    # -- signing up -----------------------------------------------------------
    def begin(self, signup: NewSignup, *, limit: int | None = None, since: str = "") -> int | None:
        """Keep a signup as posted (on no list yet), its consent text once per version,
        and queue its confirmation mail, in one transaction; returns its id. With
        ``limit``: None instead, keeping nothing, when the address already has that many
        signups posted since ``since`` (counted under the address's lock, so that posts
        at the same moment cannot all pass)."""
        with self._write():
            self._lock(f"address:{signup.email}")
            if limit is not None and self.mailed_lately(signup.email, since) >= limit:
                return None
            self._keep_text(signup.consent_text, signup.posted_at)
            row = self._sql(
                "INSERT INTO signups (nonce, email, first_name, lists, form, consent_sha256, "
                "posted_at, posted_ip, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (
                    signup.nonce, signup.email, signup.first_name, json.dumps(list(signup.lists)),
                    signup.form, consent_hash(signup.consent_text), signup.posted_at,
                    signup.posted_ip, signup.expires_at,
                ),
            ).fetchone()  # fmt: skip
            signup_id = int(row[0])
            self._queue("confirm", signup_id, signup.email, signup.posted_at)
        return signup_id

    def _keep_text(self, text: str, now: str) -> str:
        digest = consent_hash(text)
        self._sql(
            "INSERT INTO consent_texts (sha256, text, first_seen) VALUES (?, ?, ?) "
            "ON CONFLICT (sha256) DO NOTHING",
            (digest, text, now),
        )
        return digest

    def _queue(self, kind: MailKind, signup_id: int, email: str, now: str) -> None:
        self._sql(
            "INSERT INTO outbox (kind, signup_id, email, state, created_at, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?)",
            (kind, signup_id, email, now, now),
        )

    def signup(self, signup_id: int) -> PendingSignup | None:
        row = self._sql(
            f"SELECT {_SIGNUP_COLUMNS} FROM signups WHERE id = ?",  # noqa: S608 - constants
            (signup_id,),
        ).fetchone()
        return None if row is None else _signup(row)

    def confirm(
        self,
        signup_id: int,
        nonce: str,
        *,
        confirmed_ip: str | None,
        now: str,
        email_hash: str,
        welcome: bool,
    ) -> ConfirmedSignup | None:
        """Confirm a signup once: None for one that does not exist, another nonce, one
        confirmed before or expired (the caller shows them all the same page).

        The address joins each list chosen (its record made if it had none, its first
        name kept if it had one); its own opt-out of those lists is lifted, and so is a
        suppression of any reason (a bounce or complaint too: this is a new, confirmed
        request from the person) and an erasure; one consent record per list says when
        the form was posted and confirmed, from where, the text shown, and what was
        lifted. ``welcome``: queue the welcome mail too. All in one transaction."""
        with self._write():
            self._lock(f"signup:{signup_id}")
            row = self._sql(
                f"SELECT {_SIGNUP_COLUMNS} FROM signups WHERE id = ?",  # noqa: S608 - constants
                (signup_id,),
            ).fetchone()
            if row is None:
                return None
            found = _signup(row)
            if not found.confirmable(nonce, now):
                return None
            self._lock(f"address:{found.email}")
            email = found.email
            lifted: list[str] = []
            suppressed = self._sql(
                "SELECT reason, created_at FROM suppressions WHERE email = ?", (email,)
            ).fetchone()
            # Left since this form was posted (an unsubscribe, a complaint): the person
            # withdrew after asking, and an older link must not undo that.
            left_since = {
                str(r[0])
                for r in self._sql(
                    "SELECT list_name FROM list_optouts WHERE email = ? AND created_at > ?",
                    (email, found.posted_at),
                ).fetchall()
            }
            if left_since & set(found.lists) or (
                suppressed is not None
                and suppressed[0] in ("unsubscribed", "complained")  # theirs, not a bounce
                and str(suppressed[1]) > found.posted_at
            ):
                return None
            actor = f"signup #{signup_id} confirmed"
            if suppressed is not None:
                self._sql("DELETE FROM suppressions WHERE email = ?", (email,))
                self._log(email, "unsuppress", "a confirmed signup of its own", actor, now)
                lifted.append(f"the suppression ({suppressed[0]}, since {suppressed[1]})")
                # The suppression covered every list: the lists not chosen now stay left.
                member_of = self._sql(
                    "SELECT m.list_name FROM list_members m JOIN subscribers u "
                    "ON u.id = m.subscriber_id WHERE u.email = ?",
                    (email,),
                ).fetchall()
                for (other,) in member_of:
                    if other not in found.lists:
                        self._sql(
                            "INSERT INTO list_optouts (list_name, email, created_at) "
                            "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            (other, email, now),
                        )
            erased = self._sql(
                "DELETE FROM erasures WHERE email_hash = ? RETURNING created_at", (email_hash,)
            ).fetchone()
            if erased is not None:
                lifted.append(f"the erasure of {erased[0]}")
            self._sql(
                "INSERT INTO subscribers (email, first_name, last_name, attributes, created_at) "
                "VALUES (?, ?, '', '{}', ?) ON CONFLICT (email) DO UPDATE SET "
                "first_name = CASE WHEN subscribers.first_name = '' THEN excluded.first_name "
                "ELSE subscribers.first_name END",
                (email, found.first_name, now),
            )
            subscriber = self._sql("SELECT id FROM subscribers WHERE email = ?", (email,))
            subscriber_id = int(subscriber.fetchone()[0])
            joined: list[str] = []
            every = list(lifted)
            for list_name in found.lists:
                added = self._sql(
                    "INSERT INTO list_members (list_name, subscriber_id, added_at) "
                    "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (list_name, subscriber_id, now),
                ).rowcount
                opted_out = self._sql(
                    "DELETE FROM list_optouts WHERE list_name = ? AND email = ? "
                    "RETURNING created_at",
                    (list_name, email),
                ).fetchone()
                here = list(lifted)
                if opted_out is not None:
                    here.append(f"the opt-out of {list_name} (since {opted_out[0]})")
                    every.append(here[-1])
                if added or opted_out is not None or suppressed is not None:
                    joined.append(list_name)
                self._sql(
                    "INSERT INTO consents (email, list_name, method, source, consent_sha256, "
                    "signup_id, posted_at, posted_ip, confirmed_at, confirmed_ip, lifted, actor) "
                    "VALUES (?, ?, 'confirmed', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        email, list_name, found.form, found.consent_sha256, signup_id,
                        found.posted_at, found.posted_ip, now, confirmed_ip, "; ".join(here),
                        "web",
                    ),
                )  # fmt: skip
            self._sql(
                "UPDATE signups SET confirmed_at = ?, confirmed_ip = ? WHERE id = ?",
                (now, confirmed_ip, signup_id),
            )
            # The address's other links stop working: this one decided.
            self._sql(
                "UPDATE signups SET expires_at = ? WHERE email = ? AND confirmed_at IS NULL "
                "AND expires_at > ?",
                (now, email, now),
            )
            if welcome:
                self._queue("welcome", signup_id, email, now)
        done = dataclasses.replace(found, confirmed_at=now, confirmed_ip=confirmed_ip)
        return ConfirmedSignup(done, tuple(joined), tuple(every), welcome)

    def _log(self, email: str, action: str, reason: str, actor: str, now: str) -> None:
        self._sql(
            "INSERT INTO suppression_log (email, action, reason, list_name, actor, created_at) "
            "VALUES (?, ?, ?, NULL, ?, ?)",
            (email, action, reason, actor, now),
        )

    def mailed_lately(self, email: str, since: str) -> int:
        """How many signups of ``email`` were posted since ``since`` (ISO): the per-address
        limit on confirmation mail."""
        row = self._sql(
            "SELECT count(*) FROM signups WHERE email = ? AND posted_at >= ?", (email, since)
        ).fetchone()
        return int(row[0])

    def purge_unconfirmed(self, expired_before: str) -> int:
        """Forget signups never confirmed whose link expired before ``expired_before``, and
        their mail: an address a stranger typed is not kept for longer than it is of use
        (a day of signups is all the per-address limit reads)."""
        with self._write():
            self._sql(
                "DELETE FROM outbox WHERE signup_id IN (SELECT id FROM signups "
                "WHERE confirmed_at IS NULL AND expires_at < ?)",
                (expired_before,),
            )
            gone = self._sql(
                "DELETE FROM signups WHERE confirmed_at IS NULL AND expires_at < ? "
                "AND id NOT IN (SELECT signup_id FROM consents WHERE signup_id IS NOT NULL)",
                (expired_before,),
            ).rowcount
        return int(gone)

    # -- consent records --------------------------------------------------------
    def consents(self, email: str) -> list[ConsentRecord]:
        rows = self._sql(
            f"SELECT {_CONSENT_COLUMNS} FROM consents c "  # noqa: S608 - constants
            "LEFT JOIN consent_texts t ON t.sha256 = c.consent_sha256 "
            "WHERE c.email = ? ORDER BY c.id",
            (email,),
        ).fetchall()
        return [ConsentRecord(*r) for r in rows]

    def signups_of(self, email: str) -> list[PendingSignup]:
        rows = self._sql(
            f"SELECT {_SIGNUP_COLUMNS} FROM signups WHERE email = ? ORDER BY id",  # noqa: S608
            (email,),
        ).fetchall()
        return [_signup(r) for r in rows]

    # -- the outbox -------------------------------------------------------------
    def claim_mail(self, now: float) -> OutboxMail | None:
        """The next mail due, marked ``sending`` (and its attempt counted) before its SMTP
        transaction; None when none is due. One claimer gets each."""
        stamp = _now_text()
        with self._write():
            row = self._sql(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, updated_at = ? "
                "WHERE id = (SELECT id FROM outbox WHERE state IN ('pending', 'deferred') "
                "AND (retry_at IS NULL OR retry_at <= ?) ORDER BY id LIMIT 1) "
                "AND state IN ('pending', 'deferred') "
                "RETURNING id, kind, signup_id, email, state, attempts, created_at",
                (stamp, now),
            ).fetchone()
        return None if row is None else OutboxMail(*row)

    def mail_done(
        self, mail_id: int, state: MailState, detail: str, *, retry_at: float | None = None
    ) -> None:
        """A claimed mail's fate, after its SMTP transaction."""
        with self._write():
            self._sql(
                "UPDATE outbox SET state = ?, detail = ?, retry_at = ?, updated_at = ? "
                "WHERE id = ? AND state = 'sending'",
                (state, detail[:1000], retry_at, _now_text(), mail_id),
            )

    def mail_interrupted(self, older_than: str) -> int:
        """Mails left ``sending`` by a process that died before ``older_than`` become
        ``unknown``: perhaps sent, so never sent again."""
        with self._write():
            changed = self._sql(
                "UPDATE outbox SET state = 'unknown', updated_at = ?, "
                "detail = 'the server stopped during its SMTP transaction' "
                "WHERE state = 'sending' AND updated_at < ?",
                (_now_text(), older_than),
            ).rowcount
        return int(changed)

    def outbox(self, email: str | None = None) -> list[OutboxMail]:
        rows = self._sql(
            "SELECT id, kind, signup_id, email, state, attempts, created_at, "
            "coalesce(detail, ''), updated_at FROM outbox "
            "WHERE (? = '' OR email = ?) ORDER BY id",
            (email or "", email or ""),
        ).fetchall()
        return [OutboxMail(*r) for r in rows]

    # -- guards shared by every process -----------------------------------------
    def allow(self, bucket: str, limit: int, window: float, now: float) -> bool:
        """A rate limit: True, and the hit counted, when ``bucket`` had fewer than
        ``limit`` hits in the last ``window`` seconds; False (not counted) otherwise."""
        with self._write():
            self._lock(f"rate:{bucket}")
            self._sql("DELETE FROM rate_hits WHERE at < ?", (now - RATE_KEEP,))
            row = self._sql(
                "SELECT count(*) FROM rate_hits WHERE bucket = ? AND at > ?",
                (bucket, now - window),
            ).fetchone()
            if int(row[0]) >= limit:
                return False
            self._sql("INSERT INTO rate_hits (bucket, at) VALUES (?, ?)", (bucket, now))
        return True

    def use_once(self, kind: str, key: str, expires: float, now: float) -> bool:
        """True the first time ``(kind, key)`` is used; False while an earlier use of it
        has not expired (a replay)."""
        with self._write():
            self._sql("DELETE FROM used_once WHERE expires < ?", (now,))
            inserted = self._sql(
                "INSERT INTO used_once (kind, key, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (kind, key) DO NOTHING",
                (kind, key, expires),
            ).rowcount
        return bool(inserted)

    def was_used(self, kind: str, key: str, now: float) -> bool:
        """Whether ``(kind, key)`` was used and has not expired (nothing is written)."""
        row = self._sql(
            "SELECT 1 FROM used_once WHERE kind = ? AND key = ? AND expires >= ?", (kind, key, now)
        ).fetchone()
        return row is not None

    # -- a person's data --------------------------------------------------------
    def joined(self, email: str) -> tuple[str | None, list[Joined]]:
        """When ``email``'s subscriber record was made (None: there is none), and each
        list it joined or left: when it was added, when it opted out (a subject access
        request gives the dates as well as the states)."""
        row = self._sql("SELECT created_at FROM subscribers WHERE email = ?", (email,)).fetchone()
        rows = self._sql(
            "SELECT m.list_name, m.added_at, o.created_at FROM list_members m "
            "JOIN subscribers u ON u.id = m.subscriber_id LEFT JOIN list_optouts o "
            "ON o.list_name = m.list_name AND o.email = u.email WHERE u.email = ? "
            "UNION ALL SELECT o.list_name, NULL, o.created_at FROM list_optouts o "
            "WHERE o.email = ? AND NOT EXISTS (SELECT 1 FROM list_members m "
            "JOIN subscribers u ON u.id = m.subscriber_id WHERE u.email = o.email "
            "AND m.list_name = o.list_name) ORDER BY 1",
            (email, email),
        ).fetchall()
        return (None if row is None else str(row[0])), [Joined(*r) for r in rows]

    def consent_text(self, sha256: str) -> str | None:
        """The consent text of this hash, as it was shown."""
        row = self._sql("SELECT text FROM consent_texts WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else str(row[0])

    def erased(self, email_hash: str) -> str | None:
        """When the address of this hash was erased, or None."""
        row = self._sql(
            "SELECT created_at FROM erasures WHERE email_hash = ?", (email_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    def erasure_hashes(self) -> Iterator[str]:
        """Every erased address's hash (an import checks its rows against them)."""
        yield from (str(r[0]) for r in self._sql("SELECT email_hash FROM erasures").fetchall())

    def erase(self, email: str, email_hash: str, *, now: str, key_check: str = "") -> Erased:
        """Remove what is stored about ``email`` in one transaction: its subscriber record
        and list memberships, opt-outs, suppression and its log, signups and consent
        records, queued mail; the send log's rows and the feedback kept about it become
        anonymous (kept for the counts, without the address, names, columns, SMTP
        replies or the raw messages). Its keyed hash is kept, so that no import adds it
        again; only a confirmed signup of its own lifts that."""
        done = Erased(email_hash)
        anonymous = anonymous_address(email_hash)
        empty_raw = gzip.compress(b"", mtime=0)
        # Kept messages matched to nobody (or to someone else) that name the address:
        # searched before the transaction, since that reads every kept message, and
        # again inside it for what arrived meanwhile.
        named, scanned = scan_mentions(self._sql, email)
        with self._write():
            self._lock(f"address:{email}")
            steps: list[tuple[str, str, Sequence[Any]]] = [
                ("list_members", "DELETE FROM list_members WHERE subscriber_id IN "
                 "(SELECT id FROM subscribers WHERE email = ?)", (email,)),
                ("subscribers", "DELETE FROM subscribers WHERE email = ?", (email,)),
                ("list_optouts", "DELETE FROM list_optouts WHERE email = ?", (email,)),
                ("suppressions", "DELETE FROM suppressions WHERE email = ?", (email,)),
                ("suppression_log", "DELETE FROM suppression_log WHERE email = ?", (email,)),
                ("consents", "DELETE FROM consents WHERE email = ?", (email,)),
                ("outbox", "DELETE FROM outbox WHERE email = ?", (email,)),
                ("signups", "DELETE FROM signups WHERE email = ?", (email,)),
            ]  # fmt: skip
            for table, sql, params in steps:
                done.removed[table] = int(self._sql(sql, params).rowcount)
            # Not yet sent (a send paused or interrupted): never sent now, to anyone.
            self._sql(
                "UPDATE deliveries SET state = 'suppressed' "
                "WHERE email = ? AND state IN ('pending', 'deferred')",
                (email,),
            )
            done.anonymised["deliveries"] = int(
                self._sql(
                    "UPDATE deliveries SET email = ?, first_name = '', last_name = '', "
                    "attributes = NULL, detail = NULL WHERE email = ?",
                    (anonymous, email),
                ).rowcount
            )
            # About them: matched to them, reporting their address, or about one of their
            # deliveries (now anonymous) while naming someone else.
            done.anonymised["feedback"] = int(
                self._sql(
                    "UPDATE feedback SET email = ?, raw = ?, raw_size = 0, reported = '', "
                    "diagnostic = '', why = '', outcome = 'kept without its message (erased)' "
                    "WHERE (email = ? OR email = ? OR lower(reported) = ? OR EXISTS ("
                    "SELECT 1 FROM deliveries d WHERE d.send_id = feedback.send_id "
                    "AND d.seq = feedback.seq AND d.email = ?)) "
                    # Made anonymous by an erasure before: not counted again.
                    "AND NOT (email = ? AND raw_size = 0 "
                    "AND outcome = 'kept without its message (erased)')",
                    (anonymous, empty_raw, email, anonymous, email, anonymous, anonymous),
                ).rowcount
            )
            more, _ = scan_mentions(self._sql, email, scanned)
            done.anonymised["feedback"] += self._drop_mentions(
                [*named, *more], email, anonymous, empty_raw
            )
            self._sql(
                "INSERT INTO erasures (email_hash, created_at) VALUES (?, ?) "
                "ON CONFLICT (email_hash) DO NOTHING",
                (email_hash, now),
            )
            if key_check:  # which key the hashes are made with: another is noticed
                self._sql(
                    "INSERT INTO used_once (kind, key, expires) VALUES ('erasure-key', ?, ?) "
                    "ON CONFLICT (kind, key) DO NOTHING",
                    (key_check, KEPT_FOREVER),
                )
        return done

    def _drop_mentions(self, ids: Sequence[int], email: str, anonymous: str,
                       empty_raw: bytes) -> int:  # fmt: skip
        """Kept messages that name ``email`` without being matched to it lose the message
        and any field naming it; one matched to nobody becomes the erased person's (then
        anonymous), one matched to someone else stays theirs."""
        wanted = email.lower()
        dropped = 0
        for row_id in ids:
            row = self._sql(
                "SELECT email, reported, diagnostic, why FROM feedback "
                "WHERE id = ? AND raw_size > 0",  # not made anonymous just before
                (row_id,),
            ).fetchone()
            if row is None:
                continue
            owner, reported, diagnostic, why = row
            dropped += 1
            self._sql(
                "UPDATE feedback SET email = ?, raw = ?, raw_size = 0, reported = ?, "
                "diagnostic = ?, why = ?, outcome = 'kept without its message (erased)' "
                "WHERE id = ?",
                (
                    owner or anonymous, empty_raw,
                    *("" if wanted in str(v).lower() else v for v in (reported, diagnostic, why)),
                    row_id,
                ),
            )  # fmt: skip
        return dropped

    def erasure_key_matches(self, key_check: str) -> bool:
        """Whether the erasures were made with the key whose check is ``key_check`` (or
        none were made: any key will do)."""
        rows = self._sql(
            "SELECT key FROM used_once WHERE kind = 'erasure-key'"
        ).fetchall()  # fmt: skip
        return not rows or key_check in {str(r[0]) for r in rows}


def nonce() -> str:
    """A signup's random nonce: 128 bits, URL-safe."""
    import secrets

    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")
