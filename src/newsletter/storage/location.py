"""Where the database is: NEWSLETTER_DATABASE read into an SQLite path or a PostgreSQL URL.

Input: the setting's text (a path, ``sqlite:///path`` or
``postgresql://user@host:port/dbname?sslmode=...``) and the password setting.
Output: a :class:`Location`, or ValueError saying what is wrong with the text.
No driver is imported here: settings read it before any database is opened.

The password never sits in the URL: the URL is named in messages and logs, so
a password written into it (``user:secret@``, ``?password=``) is refused, and
the password comes from NEWSLETTER_DATABASE_PASSWORD, or from libpq's own
``PGPASSWORD`` or ``~/.pgpass`` when that is not set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Location", "location_problem", "parse_location"]

# scheme://: two characters at least, so that a Windows drive (C:/, C://) stays a path.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")
# A libpq connection string ("host=db dbname=news ..."), and "postgresql:/db" with one slash.
_KEYWORDS = re.compile(r"(?i)(host|hostaddr|port|dbname|user|password|sslmode|service)\s*=")
_ONE_SLASH = re.compile(r"(?i)(postgres(ql)?|sqlite):/?(?!/)")
PATH_EXAMPLE = "/srv/newsletter/newsletter.sqlite3"
URL_EXAMPLE = "postgresql://newsletter@db.example.org:5432/newsletter"


@dataclass(frozen=True, slots=True)
class Location:
    """One database: an SQLite file (``path``) or a PostgreSQL server (``url``)."""

    kind: Literal["sqlite", "postgresql"]
    path: Path | None = None
    url: str | None = None  # without a password: it may be shown
    # The password, when NEWSLETTER_DATABASE_PASSWORD gives one; never shown.
    password: str | None = field(default=None, repr=False, compare=False)
    # Where the user gave it, as messages name it ("point NEWSLETTER_DATABASE at ...").
    setting: str = field(default="NEWSLETTER_DATABASE", compare=False)

    @classmethod
    def sqlite(cls, path: Path) -> Location:
        return cls("sqlite", path=path)

    @property
    def shown(self) -> str:
        """How messages name it: the file's absolute path, or the URL (no password in it)."""
        if self.path is not None:
            return str(self.path.absolute())
        assert self.url is not None
        return self.url

    def exists(self) -> bool:
        """Whether there is a database to open without creating one: the SQLite file
        exists; a PostgreSQL server is asked when it is opened (True here)."""
        return self.path.exists() if self.path is not None else True

    def with_password(self, password: str | None) -> Location:
        return Location(self.kind, self.path, self.url, password, self.setting)

    def given_as(self, setting: str) -> Location:
        """The same database, named in messages as given by ``setting``."""
        return Location(self.kind, self.path, self.url, self.password, setting)

    def __str__(self) -> str:
        return self.shown


def location_problem(value: str) -> str | None:
    """Why ``value`` cannot be NEWSLETTER_DATABASE, or None."""
    try:
        parse_location(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_location(value: str | Path) -> Location:
    """``value`` as a :class:`Location`; ValueError saying what to write instead."""
    if isinstance(value, Path):
        return Location.sqlite(value)
    text = value.strip()
    if not text:
        raise ValueError(
            f"is empty; set it to the SQLite database file's path, such as {PATH_EXAMPLE}, "
            f"or to a PostgreSQL URL, such as {URL_EXAMPLE}"
        )
    url = _URL.match(text)
    if url is None:
        if _KEYWORDS.match(text):
            # "host=db dbname=news password=..." would be taken for a file's name, and
            # shown in every message: nothing of it is repeated.
            raise ValueError(
                "looks like a libpq keyword=value string; write it as a URL, such as "
                f"{URL_EXAMPLE}, with the password in NEWSLETTER_DATABASE_PASSWORD"
            )
        if _ONE_SLASH.match(text):
            raise ValueError(
                f"looks like a URL with one slash after the scheme; write two, such as "
                f"{URL_EXAMPLE} (or sqlite:/// and the file's path)"
            )
        return Location.sqlite(Path(value))
    # Only the scheme is repeated in errors: the rest may hold a password.
    scheme = url.group(1).lower()
    if scheme == "sqlite":
        rest = text[len("sqlite://") :]
        if not rest.startswith("/") or rest in ("/", ""):
            raise ValueError(
                "is an sqlite:// URL without a file; write sqlite:///relative/path or "
                f"sqlite:////absolute/path (three slashes, then the path), or the path itself, "
                f"such as {PATH_EXAMPLE}"
            )
        return Location.sqlite(Path(unquote(rest[1:])))
    if scheme in ("postgresql", "postgres"):
        return Location("postgresql", url=_checked_postgres(text))
    if scheme.partition("+")[0] in ("postgresql", "postgres"):
        raise ValueError(
            f"is a URL ({scheme}://) naming a driver; write postgresql:// (newsletter "
            f"chooses its driver), such as {URL_EXAMPLE}"
        )
    raise ValueError(
        f"is a URL ({scheme}://) of a database newsletter cannot use; set it to an SQLite "
        f"database file's path, such as {PATH_EXAMPLE}, or to a PostgreSQL URL, such as "
        f"{URL_EXAMPLE}"
    )


def _checked_postgres(text: str) -> str:
    parts = urlsplit(text)
    if parts.password is not None:
        raise ValueError(
            "holds a password (user:password@): the URL is shown in messages; take the "
            "password out of it and set NEWSLETTER_DATABASE_PASSWORD (or use PGPASSWORD "
            "or ~/.pgpass)"
        )
    keys = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if "password" in keys:
        raise ValueError(
            "holds a password (?password=): the URL is shown in messages; take it out and "
            "set NEWSLETTER_DATABASE_PASSWORD (or use PGPASSWORD or ~/.pgpass)"
        )
    if parts.fragment:
        raise ValueError("must not have a #fragment; options go after ? (?sslmode=verify-full)")
    if not parts.path.strip("/"):
        raise ValueError(f"names no database; add it after the host, as in {URL_EXAMPLE}")
    if not text.isascii() or any(c.isspace() for c in text):
        raise ValueError("must be an ASCII URL without spaces (percent-encode other characters)")
    return text
