"""SQLite connection: opens the one database file, migrates its schema, names its errors.

Input: a path. Output: an open :class:`sqlite3.Connection` with the schema in
place (migrated under the write lock when it is older), and :func:`translated`,
which turns SQLite's errors at every store's boundary into
:class:`newsletter.errors.StorageBusy` or
:class:`newsletter.errors.StorageUnavailable`. Only a caller that means to start
a database (``subscribers import``) creates one; everyone else is refused a
missing file with what to do. The database runs in WAL mode with
``synchronous=FULL``: a committed send-log row survives a crash of the process
or of the machine, which is what "never send twice" rests on. Every other
module reaches the database through the stores of
:class:`newsletter.storage.sqlite.storage.SqliteStorage`; a PostgreSQL backend
implements the same Protocols (:mod:`newsletter.storage.base`).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from newsletter.errors import ConfigError, StorageBusy, StorageError, StorageUnavailable
from newsletter.storage.boundary import translate_class

T = TypeVar("T")


class Connection(sqlite3.Connection):
    """An SQLite connection that knows the database it stands for, to name it in errors
    (a dry run's scratch copy names the real database, which the user knows)."""

    db_path: Path | None = None
    # (st_dev, st_ino) of the file at db_path when it was opened: a file removed or
    # replaced since (a backup moved over it) is told apart by a stat, see identity().
    db_identity: tuple[int, int] | None = None


# The base schema is version 1; each later version is one entry in _MIGRATIONS,
# applied in order inside one write transaction, so two processes opening an
# old database at once cannot both migrate it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscribers (
    id          INTEGER PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,          -- normalised: domain in ASCII, compared lower-case
    first_name  TEXT NOT NULL DEFAULT '',
    last_name   TEXT NOT NULL DEFAULT '',
    attributes  TEXT NOT NULL DEFAULT '{}',    -- JSON object of the other CSV columns
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS list_members (
    list_name      TEXT NOT NULL,
    subscriber_id  INTEGER NOT NULL REFERENCES subscribers(id) ON DELETE CASCADE,
    added_at       TEXT NOT NULL,
    PRIMARY KEY (list_name, subscriber_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS list_members_by_subscriber ON list_members(subscriber_id);
CREATE TABLE IF NOT EXISTS suppressions (
    email       TEXT PRIMARY KEY,              -- same normalisation as subscribers.email
    reason      TEXT NOT NULL CHECK (reason IN ('unsubscribed', 'bounced', 'complained')),
    list_name   TEXT,                          -- where the request came from, for the record
    created_at  TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS list_optouts (
    list_name   TEXT NOT NULL,
    email       TEXT NOT NULL,                 -- left this list (one-click or the web page)
    created_at  TEXT NOT NULL,
    PRIMARY KEY (list_name, email)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sends (
    id          INTEGER PRIMARY KEY,
    issue_id    TEXT NOT NULL,
    list_name   TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    audience    INTEGER NOT NULL,
    suppressed  INTEGER NOT NULL,
    UNIQUE (issue_id, list_name)
);
CREATE TABLE IF NOT EXISTS deliveries (
    send_id     INTEGER NOT NULL REFERENCES sends(id),
    seq         INTEGER NOT NULL,              -- order in the frozen audience
    email       TEXT NOT NULL,
    first_name  TEXT NOT NULL,
    last_name   TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN
                  ('pending', 'sending', 'sent', 'rejected', 'deferred', 'unknown', 'suppressed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    retry_at    REAL,                          -- unix time a deferred one may go again
    code        INTEGER,                       -- last SMTP reply code
    detail      TEXT,                          -- last SMTP reply or error
    updated_at  TEXT,
    PRIMARY KEY (send_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries(send_id, state, seq);
CREATE INDEX IF NOT EXISTS deliveries_retry ON deliveries(send_id, state, retry_at);
CREATE INDEX IF NOT EXISTS deliveries_sent_at ON deliveries(state, updated_at);
CREATE TABLE IF NOT EXISTS slots (
    key         TEXT PRIMARY KEY,              -- the slot's instant, UTC, e.g. 2026-12-03T14:00Z
    local_day   TEXT NOT NULL,
    issue_id    TEXT,
    state       TEXT NOT NULL CHECK (state IN
                  ('sending', 'done', 'incomplete', 'missed', 'expired', 'no-issue', 'failed')),
    detail      TEXT NOT NULL DEFAULT '',
    updated_at  TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (
    name        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires     REAL NOT NULL                  -- unix time: a crashed owner's lease runs out
) WITHOUT ROWID;
"""

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 2: who suppressed or lifted a suppression, and why; where each send came
    # from; the archive as it was sent; recipients left out of a send because
    # another list's send of the same issue reached them.
    (
        "CREATE TABLE suppression_log ("
        " id INTEGER PRIMARY KEY,"
        " email TEXT NOT NULL,"
        " action TEXT NOT NULL CHECK (action IN ('suppress', 'unsuppress')),"
        " reason TEXT NOT NULL,"  # the suppression reason, or the text given to lift it
        " list_name TEXT,"
        " actor TEXT NOT NULL,"  # who did it: 'cli:user@host', 'web', ...
        " created_at TEXT NOT NULL)",
        "CREATE INDEX suppression_log_by_email ON suppression_log(email, id)",
        "ALTER TABLE sends ADD COLUMN source_file TEXT",  # the issue file, as given
        "ALTER TABLE sends ADD COLUMN source_sha256 TEXT",  # of that file's bytes
        "ALTER TABLE sends ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE archive ("
        " issue_id TEXT PRIMARY KEY,"
        " subject TEXT NOT NULL,"
        " date TEXT NOT NULL,"
        " preheader TEXT NOT NULL DEFAULT '',"
        " html TEXT NOT NULL,"  # the web version, rendered when the first send froze
        " source_file TEXT NOT NULL,"
        " source_sha256 TEXT NOT NULL,"
        " frozen_at TEXT NOT NULL"
        ") WITHOUT ROWID",
        "ALTER TABLE locks ADD COLUMN since REAL",  # when the holder took it (unix time)
        # Suppressions made before the log existed get their entry, so that an
        # address's history starts with its suppression, not with its lifting.
        "INSERT INTO suppression_log (email, action, reason, list_name, actor, created_at) "
        "SELECT email, 'suppress', reason, list_name, 'unrecorded (before the log)', created_at "
        "FROM suppressions ORDER BY created_at, email",
        # Version 1 stored a column without a name (a trailing comma) as an
        # attribute named "": an export would have a header cell without a name,
        # which no import takes. Empty ones go; a value is kept, named.
        "UPDATE subscribers SET attributes = json_remove(CASE "
        "WHEN trim(json_extract(attributes, '$.\"\"')) = '' THEN attributes "
        "ELSE json_set(attributes, '$.\"unnamed column\"', json_extract(attributes, '$.\"\"')) "
        "END, '$.\"\"') WHERE json_type(attributes, '$.\"\"') IS NOT NULL",
    ),
    # 3: merge fields. Each frozen recipient keeps its other columns with its
    # names (NULL in rows frozen before: those are read from the subscriber);
    # and each list knows the columns it was imported with, empty ones included,
    # so a send can tell a misspelt field from a column nobody filled in.
    (
        "ALTER TABLE deliveries ADD COLUMN attributes TEXT",
        "CREATE TABLE list_columns ("
        " list_name TEXT NOT NULL,"
        " name TEXT NOT NULL,"  # as the import stores it: the header cell, lower-case
        " added_at TEXT NOT NULL,"
        " PRIMARY KEY (list_name, name)"
        ") WITHOUT ROWID",
        "INSERT INTO list_columns (list_name, name, added_at) "
        "SELECT DISTINCT m.list_name, j.key, min(m.added_at) FROM list_members m "
        "JOIN subscribers u ON u.id = m.subscriber_id, json_each(u.attributes) j "
        "GROUP BY m.list_name, j.key",
    ),
    # 4: as PostgreSQL's first version: which run's lease claimed each recipient
    # (a shared send judges rows of dead processes by it), and each lease's last
    # renewal (its heartbeat, shown by `status`).
    (
        "ALTER TABLE deliveries ADD COLUMN claimed_by TEXT",
        "ALTER TABLE locks ADD COLUMN renewed REAL",
    ),
    # 5: what the mail system said back (bounces, complaints, mailed unsubscribes),
    # each message kept as evidence with the decision it led to.
    (
        "CREATE TABLE feedback ("
        " id INTEGER PRIMARY KEY,"
        " digest TEXT NOT NULL UNIQUE,"  # SHA-256 of the raw message: recorded once
        " received_at TEXT NOT NULL,"
        " source TEXT NOT NULL,"  # pipe, file, imap:FOLDER, smtp, webhook:PROVIDER
        " kind TEXT NOT NULL,"  # hard, soft, complaint, auto_reply, not_bounce, unknown, ...
        " action TEXT NOT NULL"
        " CHECK (action IN ('suppress', 'soft', 'unsubscribe', 'note', 'review')),"
        " outcome TEXT NOT NULL,"  # what recording it did, in words
        " why TEXT NOT NULL DEFAULT '',"
        " email TEXT,"  # whom it is about, once matched to a delivery
        " send_id INTEGER REFERENCES sends(id),"
        " seq INTEGER,"
        " reported TEXT NOT NULL DEFAULT '',"
        " status TEXT NOT NULL DEFAULT '',"
        " diagnostic TEXT NOT NULL DEFAULT '',"
        " feedback_type TEXT NOT NULL DEFAULT '',"
        " message_id TEXT NOT NULL DEFAULT '',"
        " raw BLOB NOT NULL,"  # gzip of its first RAW_KEEP bytes
        " raw_size INTEGER NOT NULL)",
        "CREATE INDEX feedback_by_email ON feedback(email, received_at)",
        "CREATE INDEX feedback_by_send ON feedback(send_id, kind, seq)",
        "CREATE INDEX feedback_by_action ON feedback(action, id)",
        # How far `bounces fetch` has read each IMAP folder: what it left there (not
        # understood, for review) is not read again at every fetch.
        "CREATE TABLE mailbox_marks ("
        " mailbox TEXT PRIMARY KEY,"  # imap://user@host:port/folder
        " uidvalidity INTEGER NOT NULL,"
        " last_uid INTEGER NOT NULL,"
        " updated_at TEXT NOT NULL)",
        # A send that paused itself (its bounce or complaint rate): why, until a
        # person resumes it; the schedule leaves it alone meanwhile.
        "ALTER TABLE sends ADD COLUMN paused TEXT",
        # Every delivery to an address: `subscribers show`, and the provider events
        # that name no delivery of ours but their recipient (the latest one to it).
        "CREATE INDEX deliveries_by_email ON deliveries(email, send_id)",
    ),
    # 6: joining the list (storage.signups): signups waiting for their confirmation,
    # consent records and the texts they refer to, the mail the server sends for
    # them, rate limits and single-use keys, and the hashes erasures leave behind.
    # Every member from before gets a record saying so.
    (
        "CREATE TABLE consent_texts ("
        " sha256 TEXT PRIMARY KEY,"  # of the text, UTF-8
        " text TEXT NOT NULL,"
        " first_seen TEXT NOT NULL"
        ") WITHOUT ROWID",
        "CREATE TABLE signups ("
        " id INTEGER PRIMARY KEY,"
        " nonce TEXT NOT NULL,"  # random; the link's token is signed over id and nonce
        " email TEXT NOT NULL,"
        " first_name TEXT NOT NULL DEFAULT '',"
        " lists TEXT NOT NULL,"  # JSON array of list names
        " form TEXT NOT NULL,"  # where it was posted from
        " consent_sha256 TEXT NOT NULL REFERENCES consent_texts(sha256),"
        " posted_at TEXT NOT NULL,"
        " posted_ip TEXT,"
        " expires_at TEXT NOT NULL,"
        " confirmed_at TEXT,"
        " confirmed_ip TEXT)",
        "CREATE INDEX signups_by_email ON signups(email, posted_at)",
        "CREATE TABLE consents ("
        " id INTEGER PRIMARY KEY,"
        " email TEXT NOT NULL,"
        " list_name TEXT NOT NULL,"
        " method TEXT NOT NULL CHECK (method IN ('confirmed', 'import', 'before')),"
        " source TEXT NOT NULL,"  # the form, the file imported, or 'before'
        " consent_sha256 TEXT REFERENCES consent_texts(sha256),"
        " signup_id INTEGER REFERENCES signups(id),"
        " posted_at TEXT,"
        " posted_ip TEXT,"
        " confirmed_at TEXT NOT NULL,"  # an import's time, for an import
        " confirmed_ip TEXT,"
        " lifted TEXT NOT NULL DEFAULT '',"  # the opt-outs and suppressions it lifted
        " actor TEXT NOT NULL DEFAULT '')",
        "CREATE INDEX consents_by_email ON consents(email, list_name)",
        "CREATE TABLE outbox ("
        " id INTEGER PRIMARY KEY,"
        " kind TEXT NOT NULL CHECK (kind IN ('confirm', 'welcome')),"
        " signup_id INTEGER NOT NULL REFERENCES signups(id),"
        " email TEXT NOT NULL,"
        " state TEXT NOT NULL CHECK (state IN"
        "  ('pending', 'sending', 'sent', 'rejected', 'deferred', 'unknown')),"
        " attempts INTEGER NOT NULL DEFAULT 0,"
        " retry_at REAL,"
        " detail TEXT,"
        " created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)",
        "CREATE INDEX outbox_by_state ON outbox(state, id)",
        "CREATE INDEX outbox_by_email ON outbox(email)",
        "CREATE TABLE rate_hits (bucket TEXT NOT NULL, at REAL NOT NULL)",
        "CREATE INDEX rate_hits_by_bucket ON rate_hits(bucket, at)",
        "CREATE INDEX rate_hits_by_at ON rate_hits(at)",
        "CREATE TABLE used_once ("
        " kind TEXT NOT NULL,"
        " key TEXT NOT NULL,"
        " expires REAL NOT NULL,"
        " PRIMARY KEY (kind, key)"
        ") WITHOUT ROWID",
        "CREATE INDEX used_once_by_expiry ON used_once(expires)",
        "CREATE TABLE erasures ("
        " email_hash TEXT PRIMARY KEY,"  # keyed: storage.signups.erasure_hash
        " created_at TEXT NOT NULL"
        ") WITHOUT ROWID",
        "INSERT INTO consents (email, list_name, method, source, confirmed_at, actor) "
        "SELECT u.email, m.list_name, 'before', 'on the list before consent was recorded', "
        "m.added_at, 'schema 6' FROM list_members m JOIN subscribers u ON u.id = m.subscriber_id "
        "ORDER BY m.added_at, u.id",
    ),
    # 7: what each send froze (delivery.fingerprint, JSON): a resume after the issue,
    # the footer or the templates changed is refused unless a person accepts it.
    ("ALTER TABLE sends ADD COLUMN frozen TEXT",),
)
SCHEMA_VERSION = 1 + len(_MIGRATIONS)
_TABLES = frozenset(
    {"subscribers", "list_members", "suppressions", "list_optouts", "sends", "deliveries"}
    | {"slots", "locks", "suppression_log", "archive", "list_columns", "feedback"}
    | {"mailbox_marks", "consent_texts", "signups", "consents", "outbox", "rate_hits"}
    | {"used_once", "erasures"}
)


def connect(path: Path, *, create: bool = False, busy_seconds: float = 30.0) -> Connection:
    """Open the database at ``path`` (see :func:`open_connection`)."""
    return open_connection(path, create=create, busy_seconds=busy_seconds)[0]


def open_connection(
    path: Path, *, create: bool = False, busy_seconds: float = 30.0, check_first: bool = False
) -> tuple[Connection, int]:
    """Open the database at ``path``; wait up to ``busy_seconds`` for another writer.

    A missing database is refused unless ``create`` is given: a wrong
    NEWSLETTER_DATABASE (or the default relative path, run from another folder)
    would otherwise get a new, empty database, and an opt-out recorded there
    would never reach the real one. For the same reason an empty file (or an
    SQLite database without tables) is only made a newsletter database by a
    caller that may create one, and another program's database never is.
    Nothing is written to a file before it is known to be ours; with
    ``check_first`` (``db migrate``) nor before every page was read intact
    (:func:`check_intact`), so a damaged file keeps its schema. Returns the
    connection and the schema version the file had before it was migrated.
    """
    if path.is_dir():
        raise ConfigError(
            f"the database {path.absolute()} (NEWSLETTER_DATABASE) is a folder; set "
            f"NEWSLETTER_DATABASE to the database file, such as {path / 'newsletter.sqlite3'}"
        )
    if not create and not path.exists():
        raise ConfigError(missing_database(path))
    # Taken before the file is opened: a file replaced in between is then found
    # replaced at the first check (and reopened), never taken for the one we hold.
    opened = identity(path)
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path,
                isolation_level=None,
                timeout=busy_seconds,
                check_same_thread=False,
                factory=Connection,
            )
        else:
            # mode=rw: a file removed since the check above is not made again.
            conn = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=rw",
                isolation_level=None,
                timeout=busy_seconds,
                uri=True,
                # One thread at a time uses a store, but not always the one that
                # opened it: a send hands its log to a database thread.
                check_same_thread=False,
                factory=Connection,
            )
    except (OSError, sqlite3.Error) as exc:
        raise StorageUnavailable(
            f"cannot open the database {path.absolute()} (NEWSLETTER_DATABASE): "
            f"{getattr(exc, 'strerror', None) or exc}; check the path and its permissions"
        ) from None
    assert isinstance(conn, Connection)
    conn.db_path = path
    conn.db_identity = opened or identity(path)  # created now: the file connect made
    conn.row_factory = sqlite3.Row
    try:
        # Read before anything is written: WAL mode alone would write a header.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            _check_unversioned(conn, path, create)
        if check_first:
            check_intact(conn, path)
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{_named(path)} was made by a newer version of newsletter (schema "
                f"{version}; this one knows schema {SCHEMA_VERSION}): upgrade newsletter to "
                "use it, or point NEWSLETTER_DATABASE at the database this version made"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        if version < SCHEMA_VERSION:
            _migrate(conn)
        missing = _TABLES - {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if missing:
            # A table dropped by hand or by a damaged copy: every command would
            # fail on its first query with SQLite's own words.
            raise ConfigError(
                f"cannot use {_named(path)}: it lacks the table(s) {', '.join(sorted(missing))}"
                "; it was damaged or edited by hand: restore it from a backup"
            )
    except sqlite3.Error as exc:
        conn.close()
        message = f"cannot use {_named(path)}: {sqlite_problem(exc)}"
        kind = _primary(exc)
        if kind in _BUSY:
            raise StorageBusy(message) from None
        if kind in _ENVIRONMENT:
            raise StorageUnavailable(message) from None
        raise ConfigError(message) from None
    except BaseException:
        conn.close()
        raise
    return conn, version


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None when there is none."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def missing_database(path: Path) -> str:
    """What to say when there is no database at ``path``."""
    return (
        f"there is no database at {path.absolute()} (NEWSLETTER_DATABASE): import subscribers "
        "first (`newsletter subscribers import FILE --list NAME` creates it), or point "
        "NEWSLETTER_DATABASE at the database you use"
    )


def _check_unversioned(conn: sqlite3.Connection, path: Path, create: bool) -> None:
    """Refuse a file newsletter did not make, unless it is empty and ``create`` is given."""
    names = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    if names and names <= _BASE_TABLES:
        return  # ours, from before the version was recorded: _migrate completes it
    if names:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"{path.absolute()} (NEWSLETTER_DATABASE) is an SQLite database of another "
            f"program (its tables: {shown}), not a newsletter database; point "
            "NEWSLETTER_DATABASE at the newsletter database, or at a new file"
        )
    if not create:
        what = "an empty file" if path.stat().st_size == 0 else "an SQLite database with no tables"
        raise ConfigError(
            f"{path.absolute()} (NEWSLETTER_DATABASE) is {what}, not a newsletter database: "
            "import subscribers first (`newsletter subscribers import FILE --list NAME` makes "
            "it one), or point NEWSLETTER_DATABASE at the database you use"
        )


def sqlite_problem(exc: sqlite3.Error) -> str:
    """What a failure of SQLite says about the database file, and what to do."""
    kind = _primary(exc)
    if kind in ("NOTADB", "CORRUPT"):
        return _not_intact(str(exc))
    if kind in ("READONLY", "PERM", "CANTOPEN"):
        return (
            f"{exc}; the file and its folder must be writable by this user (SQLite keeps "
            "-wal and -shm files next to it)"
        )
    if kind in ("BUSY", "LOCKED"):
        return f"{exc}: another program holds it; try again when it is done"
    if kind == "FULL":
        return f"{exc}; free some space on its disk"
    return str(exc)


def _not_intact(said: str) -> str:
    return (
        f"it is not an intact SQLite database ({said}); point NEWSLETTER_DATABASE at the "
        "newsletter database, or restore it from a backup"
    )


def check_intact(conn: sqlite3.Connection, path: Path) -> None:
    """Read every page (``PRAGMA quick_check``); StorageUnavailable if one is damaged."""
    with errors_named(path):
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(1)")]
    if found != ["ok"]:
        raise StorageUnavailable(
            f"cannot use {_named(path)}: {_not_intact('database disk image is malformed')}"
        )


def environment_problem(exc: sqlite3.Error, path: Path | None = None) -> str | None:
    """The message for an SQLite failure caused by the file or the machine (damage,
    permissions, a full disk, another program's lock), or None for a bug in a query."""
    if _primary(exc) not in _ENVIRONMENT:
        return None
    return f"cannot use {_named(path)}: {sqlite_problem(exc)}"


def storage_error(exc: sqlite3.Error, path: Path | None) -> StorageError | None:
    """Our error for an SQLite failure caused by the file or the machine, or None for a
    bug in a query (which keeps its own exception and traceback)."""
    message = environment_problem(exc, path)
    if message is None:
        return None
    return StorageBusy(message) if _primary(exc) in _BUSY else StorageUnavailable(message)


@contextlib.contextmanager
def errors_named(path: Path | None) -> Iterator[None]:
    """Inside: SQLite's errors leave as :class:`StorageError` naming ``path`` (for code
    that is no store method, such as the dry run's copy)."""
    try:
        yield
    except sqlite3.Error as exc:
        ours = storage_error(exc, path)
        if ours is None:
            raise
        raise ours from exc


def translated(cls: type[T]) -> type[T]:
    """Wrap every public method of a store class so that SQLite's errors leave it as
    :class:`StorageError` (see :func:`storage_error`); generators are wrapped too."""
    return translate_class(cls, sqlite3.Error, _convert)


def _where(store: object) -> Path | None:
    """The database a store works on: its own path, or its connection's."""
    found = getattr(store, "db_path", None)
    if found is None:
        found = getattr(getattr(store, "conn", None), "db_path", None)
    return found if isinstance(found, Path) else None


def _convert(exc: sqlite3.Error, store: object) -> StorageError | None:
    return storage_error(exc, _where(store))


def _named(path: Path | None) -> str:
    where = f" {path.absolute()}" if path is not None else ""
    return f"the database{where} (NEWSLETTER_DATABASE)"


def _primary(exc: sqlite3.Error) -> str:
    """SQLite's primary result code, without its prefix: SQLITE_IOERR_SHORT_READ is IOERR."""
    name: str = getattr(exc, "sqlite_errorname", None) or ""
    return name.removeprefix("SQLITE_").split("_")[0]


# The primary result codes that the file or the machine causes; SQLITE_ERROR
# (a wrong query, a missing column) is a bug and keeps its traceback.
_ENVIRONMENT = frozenset(
    {"NOTADB", "CORRUPT", "READONLY", "PERM", "CANTOPEN", "BUSY", "LOCKED", "FULL", "IOERR"}
)
_BUSY = frozenset({"BUSY", "LOCKED"})
_BASE_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            version = 1
        for target, statements in enumerate(_MIGRATIONS[version - 1 :], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            version = target
        conn.execute(f"PRAGMA user_version={version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
