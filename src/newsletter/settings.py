"""Settings: the deployment's configuration, from the environment and ``.env``.

Input: ``NEWSLETTER_*`` environment variables and an optional ``.env`` file in
the current folder (the environment wins). Output: a frozen :class:`Settings`.
Only the CLI reads settings; stages get plain values. Secrets are
``SecretStr`` and never printed. An unknown ``NEWSLETTER_*`` variable is an
error: a misspelt setting must not be silently ignored.
"""

from __future__ import annotations

import difflib
import os
import re
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from newsletter.errors import ConfigError

if TYPE_CHECKING:
    from newsletter.schedule import Schedule
from newsletter.models import https_url

PREFIX = "NEWSLETTER_"
_LIST_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
LIST_NAME_RULE = "1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
# RFC 6376 3.1: a selector is a dot-separated sequence of DNS labels (letters,
# digits, hyphens; no hyphen at either end of a label).
_DNS_LABELS = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
# Used when no secret is configured: good enough to show what a link looks
# like in a preview, refused by anything that sends.
PREVIEW_KEY = b"newsletter-preview-only"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
    )

    society_file: Path = Path("society.yaml")
    templates_dir: Path = Path("templates")
    issues_dir: Path = Path("issues")
    out_dir: Path = Path("build")
    public_url: str = "https://news.example.org"
    from_: str = Field(
        default="MS Research News <news@example.org>",
        validation_alias=AliasChoices("NEWSLETTER_FROM", "from_"),
    )
    reply_to: str | None = None
    unsubscribe_mailto: str | None = None
    list_name: str = "research-news"
    secret_key: SecretStr | None = None
    preview_to: str = "Sam Sample <sam.sample@example.org>"
    bounce_address: str | None = None

    database: Path = Path("newsletter.sqlite3")

    smtp_host: str = "localhost"
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout: float = Field(default=30.0, gt=0)
    smtp_helo_name: str | None = None
    smtp_ca_file: Path | None = None

    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=0, le=65535)

    schedule: str | None = None
    timezone: str = "UTC"
    schedule_lists: str | None = None
    catch_up_hours: float = Field(default=6.0, ge=0, le=72)

    dkim_key_file: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None

    send_connections: int = Field(default=8, ge=1, le=64)
    send_rate: float | None = Field(default=None, gt=0)
    send_per_hour: int | None = Field(default=None, gt=0)
    send_per_day: int | None = Field(default=None, gt=0)
    send_message_timeout: float = Field(default=120.0, gt=0)
    send_max_errors: int = Field(default=25, ge=1)
    send_max_wait: float = Field(default=900.0, ge=0)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        # It goes into List-Unsubscribe raw: ASCII only, nothing that ends a <URI>.
        if not value.isascii() or any(c in value for c in "<>\"' "):
            raise ValueError(
                "must be an ASCII URL without spaces, quotes or < >; "
                "write an international domain in its xn-- form"
            )
        if len(value) > 200:
            raise ValueError(
                "must be at most 200 characters (it is part of every unsubscribe link)"
            )
        return https_url(value).rstrip("/")

    @field_validator("list_name")
    @classmethod
    def _list_name(cls, value: str) -> str:
        problem = list_name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("schedule_lists")
    @classmethod
    def _schedule_lists(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Empty entries are skipped, as scheduled_lists does (a trailing comma is harmless).
        names = [name.strip() for name in value.split(",") if name.strip()]
        problems = [f"{name!r} {problem}" for name in names if (problem := list_name_problem(name))]
        if problems:
            raise ValueError("; ".join(problems))
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"names {', '.join(map(repr, twice))} more than once")
        return value

    @field_validator("dkim_selector")
    @classmethod
    def _dkim_selector(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not _DNS_LABELS.fullmatch(value)):
            raise ValueError(
                f"{value!r} is not a DKIM selector: it must be DNS labels (letters, digits and "
                "hyphens) separated by dots, as in 'news' or 'news.2026' (RFC 6376 3.1)"
            )
        return value

    @field_validator("dkim_domain")
    @classmethod
    def _dkim_domain(cls, value: str | None) -> str | None:
        if value is not None and (
            len(value) > 253 or "." not in value or not _DNS_LABELS.fullmatch(value)
        ):
            raise ValueError(
                f"{value!r} is not a domain name like 'example.org' (letters, digits, hyphens "
                "and dots; write an international domain in its xn-- form)"
            )
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "must be at least 32 characters; make one with "
                'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return value

    @field_validator("from_", "preview_to", "reply_to", "unsubscribe_mailto", "bounce_address")
    @classmethod
    def _mailbox(cls, value: str | None) -> str | None:
        if value is not None:
            _split_mailbox(value)
        return value

    @property
    def sender_name(self) -> str:
        return _split_mailbox(self.from_)[0]

    @property
    def sender_address(self) -> str:
        return _split_mailbox(self.from_)[1]

    @model_validator(mode="after")
    def _dkim_complete(self) -> Settings:
        if (self.dkim_key_file is None) != (self.dkim_selector is None):
            raise ValueError(
                "NEWSLETTER_DKIM_KEY_FILE and NEWSLETTER_DKIM_SELECTOR go together: "
                "set both or neither"
            )
        return self

    @model_validator(mode="after")
    def _schedule_valid(self) -> Settings:
        if self.schedule is not None:
            from newsletter.schedule import parse_schedule

            parse_schedule(self.schedule, self.timezone, self.catch_up_hours)
        return self

    @property
    def parsed_schedule(self) -> Schedule:
        from newsletter.schedule import parse_schedule

        if self.schedule is None:
            raise ConfigError(
                "no schedule is set: set NEWSLETTER_SCHEDULE (for example 'Thu 09:00') and "
                "NEWSLETTER_TIMEZONE (for example 'America/New_York')"
            )
        return parse_schedule(self.schedule, self.timezone, self.catch_up_hours)

    @property
    def scheduled_lists(self) -> list[str]:
        if not self.schedule_lists:
            return [self.list_name]
        return [name.strip() for name in self.schedule_lists.split(",") if name.strip()]

    @property
    def envelope_sender(self) -> str:
        """MAIL FROM: where bounces go; the From address unless NEWSLETTER_BOUNCE_ADDRESS."""
        return (
            _split_mailbox(self.bounce_address)[1] if self.bounce_address else self.sender_address
        )

    @property
    def smtp_port_or_default(self) -> int:
        return self.smtp_port or {"starttls": 587, "tls": 465, "none": 25}[self.smtp_security]

    @property
    def preview_mailbox(self) -> tuple[str, str]:
        return _split_mailbox(self.preview_to)

    @property
    def unsubscribe_address(self) -> str:
        """Where mailto: unsubscribes go; defaults to unsubscribe@ the sender's domain."""
        if self.unsubscribe_mailto:
            return _split_mailbox(self.unsubscribe_mailto)[1]
        return "unsubscribe@" + self.sender_address.rpartition("@")[2]

    @property
    def token_key(self) -> bytes:
        if self.secret_key is None:
            return PREVIEW_KEY
        return self.secret_key.get_secret_value().encode("utf-8")


def list_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a list name (it goes into List-Id and every unsubscribe
    link), or None. The one rule for NEWSLETTER_LIST_NAME, NEWSLETTER_SCHEDULE_LISTS
    and every --list."""
    if _LIST_NAME.fullmatch(name):
        return None
    hint = ""
    fixed = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-._")
    if fixed and _LIST_NAME.fullmatch(fixed) and name.isascii():
        hint = f" (for example {fixed!r})"
    return f"is not a valid list name: it must be {LIST_NAME_RULE}{hint}"


def _split_mailbox(value: str) -> tuple[str, str]:
    if "\r" in value or "\n" in value:
        raise ValueError("must be one line")
    if len(getaddresses([value])) != 1:
        # parseaddr would keep the first and drop the rest without a word.
        raise ValueError(
            f"{value!r} must be one address like 'Name <news@example.org>' (put a name with "
            'a comma in double quotes: "Doe, Jo" <jo@example.org>)'
        )
    name, addr = parseaddr(value)
    local, _, domain = addr.rpartition("@")
    if not local or "." not in domain:
        raise ValueError(f"{value!r} is not an address like 'Name <news@example.org>'")
    if not addr.isascii():
        raise ValueError(f"{addr!r} must be ASCII; write an international domain in its xn-- form")
    if any(c in addr for c in ' <>"(),;:\\[]') or any(ord(c) < 33 for c in name if c != " "):
        # A header is written from these by hand (compose._mailbox): nothing in the
        # address may end or split it.
        raise ValueError(f"{value!r} is not an address like 'Name <news@example.org>'")
    return name, addr


def env_name(field: str) -> str:
    return PREFIX + field.rstrip("_").upper()


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning every problem into one ConfigError that names the variables."""
    # Not settings: switches for tests and rehearsals, read where they are used.
    known = {env_name(f) for f in Settings.model_fields} | {
        "NEWSLETTER_TEST_NOW",
        "NEWSLETTER_TEST_CHROMIUM",
    }
    unknown = sorted(k for k in os.environ if k.startswith(PREFIX) and k not in known)
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"  {key}: not a known setting{hint}")
    try:
        settings = Settings(**overrides)
    except UnicodeDecodeError:
        raise ConfigError("the .env file is not UTF-8 text; save it as UTF-8") from None
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = str(err["loc"][0]) if err["loc"] else ""
            name = loc.upper() if loc.upper().startswith(PREFIX) else env_name(loc)
            msg = str((err.get("ctx") or {}).get("error", err["msg"]))
            if err["type"] == "extra_forbidden":
                msg = "not a known setting (in .env)"
            problems.append(f"  {name}: {msg}" if loc else f"  {msg.removeprefix('Value error, ')}")
        settings = None
    if problems or settings is None:
        raise ConfigError(
            "the settings are not valid (see .env.example for every setting):\n"
            + "\n".join(problems)
        )
    return settings
