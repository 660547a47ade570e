"""Storage: the SQLite database that holds subscribers, suppressions and send logs.

Input: a path. Output: an open :class:`sqlite3.Connection` with the schema in
place. Only a caller that means to start a database (``subscribers import``)
creates one; everyone else is refused a missing file with what to do. The
database runs in WAL mode with ``synchronous=FULL``: a committed
send-log row survives a crash of the process or of the machine, which is what
"never send twice" rests on. Every other module reaches the database through
the store classes in :mod:`newsletter.subscribers` and
:mod:`newsletter.send_log`; a PostgreSQL backend would implement the same
methods.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from newsletter.errors import ConfigError

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
)
SCHEMA_VERSION = 1 + len(_MIGRATIONS)


def connect(path: Path, *, create: bool = False, busy_seconds: float = 30.0) -> sqlite3.Connection:
    """Open the database at ``path``; wait up to ``busy_seconds`` for another writer.

    A missing database is refused unless ``create`` is given: a wrong
    NEWSLETTER_DATABASE (or the default relative path, run from another folder)
    would otherwise get a new, empty database, and an opt-out recorded there
    would never reach the real one.
    """
    if not create and not path.exists():
        raise ConfigError(missing_database(path))
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, timeout=busy_seconds)
        else:
            # mode=rw: a file removed since the check above is not made again.
            conn = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=rw",
                isolation_level=None,
                timeout=busy_seconds,
                uri=True,
            )
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(
            f"cannot open the database {path.absolute()}: {exc}; check NEWSLETTER_DATABASE"
        ) from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the database {path} was made by a newer version of newsletter "
                f"(schema {version}); upgrade newsletter"
            )
        if version < SCHEMA_VERSION:
            _migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ConfigError(f"{path} is not a usable newsletter database: {exc}") from None
    return conn


def missing_database(path: Path) -> str:
    """What to say when there is no database at ``path``."""
    return (
        f"there is no database at {path.absolute()} (NEWSLETTER_DATABASE): import subscribers "
        "first (`newsletter subscribers import FILE --list NAME` creates it), or point "
        "NEWSLETTER_DATABASE at the database you use"
    )


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
