"""Settings: the deployment's configuration, from the environment and ``.env``.

Input: ``NEWSLETTER_*`` environment variables and an optional ``.env`` file in
the current folder (the environment wins). Output: a frozen :class:`Settings`.
Only the CLI reads settings; stages get plain values. Secrets are
``SecretStr`` and never printed. An unknown ``NEWSLETTER_*`` variable is an
error: a misspelt setting must not be silently ignored.

``.env`` is often shared with other tools (Docker Compose, a database), so it
is read here rather than by pydantic-settings, which refuses every key it
does not know: keys without the ``NEWSLETTER_`` prefix belong to others and
are ignored, and problems with ours are reported with the file's line.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from dotenv.main import resolve_variables
from dotenv.parser import parse_stream
from pydantic import (
    AliasChoices,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from newsletter.errors import ConfigError

if TYPE_CHECKING:
    from newsletter.schedule.slots import Schedule
from newsletter.models import bidi_characters, character_names, https_url
from newsletter.relay_settings import RelaySettings, parse_relays
from newsletter.storage.evidence import SoftBounces
from newsletter.storage.location import Location, location_problem, parse_location
from newsletter.verp import Verp

PREFIX = "NEWSLETTER_"
# The name is the first label of List-Id (RFC 2919: a dot-atom), so a dot may
# neither end it nor follow another dot: "news." gives <news..example.org>.
_LIST_NAME = re.compile(r"(?=.{1,64}\Z)[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9_-]+)*")
LIST_NAME_RULE = (
    "1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "with no '.' at the end or next to another '.'"
)
# RFC 6376 3.1: a selector is a dot-separated sequence of DNS labels (letters,
# digits, hyphens; no hyphen at either end of a label).
_DNS_LABELS = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
# arn:<partition>:sns:<region>:<account>:<topic> (a FIFO topic ends in .fifo).
_SNS_TOPIC = re.compile(
    r"arn:aws(?:-cn|-us-gov)?:sns:[a-z0-9-]{1,30}:[0-9]{12}:[A-Za-z0-9_.-]{1,256}", re.ASCII
)
# Used when no secret is configured: good enough to show what a link looks
# like in a preview, refused by anything that sends.
PREVIEW_KEY = b"newsletter-preview-only"


def _location(value: object) -> Location:
    # Before any Path(): Path() would fold "postgresql://h/db" into the relative
    # path postgresql:/h/db, and an import would make that folder.
    if isinstance(value, Location):
        return value
    if isinstance(value, str | Path):
        return parse_location(value)
    raise ValueError("must be a path or a database URL")


def duration_seconds(text: str) -> float | None:
    """``900s``, ``30m``, ``2h`` or a plain number of seconds, as seconds (at most a day);
    None when it is none of these."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if found is None:
        return None
    seconds = float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[found.group(2)]
    return seconds if 0 < seconds <= 86400 else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=None,  # read by load_settings: see the module docstring
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

    # A path or sqlite:///path (SQLite), or postgresql://user@host:port/dbname.
    database: Annotated[Location, PlainValidator(_location), PlainSerializer(str), NoDecode] = (
        Location.sqlite(Path("newsletter.sqlite3"))
    )
    database_password: SecretStr | None = None  # PostgreSQL; else PGPASSWORD or ~/.pgpass
    # How long a lease (a send's process, the schedule) lives without renewal.
    lease_seconds: float = Field(default=120.0, ge=1, le=3600)

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
    # The proxies whose X-Forwarded-For `serve` believes (comma-separated addresses or
    # networks, or * for any): the signup's consent record and rate limits use the
    # visitor's address, which only the proxy in front knows.
    trusted_proxies: str = "127.0.0.1"
    # The public signup (/subscribe; its lists and consent text are in society.yaml).
    signup_confirm_hours: float = Field(default=48.0, gt=0, le=24 * 30)
    signup_ip_limit: int = Field(default=10, ge=1, le=100_000)  # signups an hour per address
    signup_address_limit: int = Field(default=3, ge=1, le=100)  # mails a day to one address
    # "work": every signup solves a proof of work (needs JavaScript); "work-or-wait":
    # without JavaScript, a form that waited a few seconds since it was shown will do.
    signup_challenge: Literal["work", "work-or-wait"] = "work-or-wait"

    timezone: str = "UTC"
    catch_up_hours: float = Field(default=6.0, gt=0, le=72)  # 0 would never send
    schedule: str | None = None  # after the two its check reads
    schedule_lists: str | None = None

    dkim_key_file: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None

    # A real send first goes to these addresses (comma-separated; outside the send log,
    # as `send --to`), then waits CANARY_WAIT ("30m", "2h", "900s"; unset: until a
    # person runs `send ... --go`) before the rest of the list.
    canary_to: str | None = None
    canary_wait: str | None = None

    send_connections: int = Field(default=8, ge=1, le=64)
    send_rate: float | None = Field(default=None, gt=0)
    send_per_hour: int | None = Field(default=None, gt=0)
    send_per_day: int | None = Field(default=None, gt=0)
    send_message_timeout: float = Field(default=120.0, gt=0)
    send_max_errors: int = Field(default=25, ge=1)
    send_max_wait: float = Field(default=900.0, ge=0)
    # Several relays, each with its own limits: a JSON list (relay_settings says why),
    # secret as a whole since it holds passwords. After send_connections, its default.
    smtp_relays: SecretStr | None = None

    # Soft bounces (a full mailbox, a server down) the MTA gave up on: this many
    # sends with one, within this many days, suppress the address (``bounced``).
    # For a weekly newsletter, three weeks in a row.
    soft_bounce_limit: int = Field(default=3, ge=1, le=100)
    soft_bounce_days: float = Field(default=30.0, gt=0, le=365)
    # A send pauses itself when this run's hard bounces pass this fraction, or its spam
    # complaints this one, of what it sent (counted as at least SAMPLE messages). The
    # defaults: 5% of the first 1,000; 0.3%, Gmail's and Yahoo's ceiling for bulk senders.
    send_pause_hard_bounces: float = Field(default=0.05, gt=0, le=1)
    send_pause_complaints: float = Field(default=0.003, gt=0, le=1)
    send_pause_sample: int = Field(default=1000, ge=1)

    # The bounce mailbox, read over IMAP by `bounces fetch`.
    bounce_imap_host: str | None = None
    bounce_imap_port: int | None = Field(default=None, ge=1, le=65535)
    bounce_imap_security: Literal["tls", "starttls", "none"] = "tls"
    bounce_imap_username: str | None = None
    bounce_imap_password: SecretStr | None = None
    bounce_imap_folder: str = "INBOX"
    bounce_imap_processed_folder: str = "Processed"
    bounce_imap_ca_file: Path | None = None
    # Mail to the List-Unsubscribe mailto: address, where it lands in a mailbox of its
    # own (another folder, or another account): each setting left unset is the bounce
    # mailbox's. None set: that mail comes to the bounce mailbox.
    unsubscribe_imap_host: str | None = None
    unsubscribe_imap_port: int | None = Field(default=None, ge=1, le=65535)
    unsubscribe_imap_security: Literal["tls", "starttls", "none"] | None = None
    unsubscribe_imap_username: str | None = None
    unsubscribe_imap_password: SecretStr | None = None
    unsubscribe_imap_folder: str | None = None
    unsubscribe_imap_processed_folder: str | None = None
    unsubscribe_imap_ca_file: Path | None = None

    # Providers' webhooks on `newsletter serve` (/webhooks/...); each is off until set.
    webhook_ses_topics: str | None = None  # SNS topic ARNs, comma-separated
    webhook_mailgun_key: SecretStr | None = None  # Mailgun's webhook signing key
    webhook_sendgrid_key: str | None = None  # SendGrid's verification key (public)
    webhook_postmark_user: str | None = None
    webhook_postmark_password: SecretStr | None = None

    # The DNS server `newsletter doctor` asks, as host:port (an IP address; an IPv6
    # one in brackets, [2001:db8::53]:53; the port defaults to 53). Unset: the
    # system's resolver (/etc/resolv.conf).
    dns_resolver: str | None = None

    @field_validator("dns_resolver")
    @classmethod
    def _dns_resolver(cls, value: str | None) -> str | None:
        if value is not None:
            parse_resolver(value)
        return value

    @property
    def dns_resolver_address(self) -> tuple[str, int] | None:
        """NEWSLETTER_DNS_RESOLVER as (address, port), or None for the system's resolver."""
        return None if self.dns_resolver is None else parse_resolver(self.dns_resolver)

    @field_validator("smtp_relays")
    @classmethod
    def _smtp_relays(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            connections = info.data.get("send_connections", 8)
            _, problems = parse_relays(value.get_secret_value(), connections)
            if problems:
                raise ValueError("\n".join(problems))  # one line each (load_settings)
        return value

    @model_validator(mode="after")
    def _one_kind_of_relay(self) -> Settings:
        if self.smtp_relays is not None:
            mixed = [env_name(f) for f in _ONE_RELAY if f in self.model_fields_set]
            if mixed:
                raise ValueError(
                    f"NEWSLETTER_SMTP_RELAYS is set, and so {'are' if len(mixed) > 1 else 'is'} "
                    f"{', '.join(mixed)}, which NEWSLETTER_SMTP_RELAYS replaces: put that relay "
                    "in the list (host, port, security, username, password) and unset "
                    f"{'them' if len(mixed) > 1 else 'it'}, or unset NEWSLETTER_SMTP_RELAYS"
                )
        return self

    @property
    def relays(self) -> list[RelaySettings]:
        """NEWSLETTER_SMTP_RELAYS, parsed; empty when the NEWSLETTER_SMTP_* relay is the one."""
        if self.smtp_relays is None:
            return []
        return parse_relays(self.smtp_relays.get_secret_value(), self.send_connections)[0]

    @field_validator("webhook_ses_topics")
    @classmethod
    def _ses_topics(cls, value: str | None) -> str | None:
        if value is None:
            return None
        topics = [t.strip() for t in value.split(",") if t.strip()]
        if not topics:
            raise ValueError("names no topic; give SNS topic ARNs, or leave it unset")
        bad = [t for t in topics if not _SNS_TOPIC.fullmatch(t)]
        if bad:
            raise ValueError(
                f"{bad[0]!r} is not an SNS topic ARN like "
                "'arn:aws:sns:eu-west-1:123456789012:ses-bounces'"
            )
        return value

    @field_validator("webhook_mailgun_key")
    @classmethod
    def _mailgun_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"[!-~]{16,200}", value.get_secret_value()):
            raise ValueError(
                "must be Mailgun's HTTP webhook signing key (16-200 characters, no spaces), "
                "from its Webhooks settings page"
            )
        return value

    @field_validator("webhook_sendgrid_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        if value is not None:
            from newsletter.bounces.signatures import load_sendgrid_key

            load_sendgrid_key(value)
        return value

    @field_validator("webhook_postmark_user")
    @classmethod
    def _postmark_user(cls, value: str | None) -> str | None:
        # Basic auth's user name ends at the first colon.
        if value is not None and not re.fullmatch(r"[!-9;-~]{1,100}", value):
            raise ValueError("must be 1-100 printable ASCII characters, without ':' or spaces")
        return value

    @field_validator("webhook_postmark_password")
    @classmethod
    def _postmark_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"[!-~]{16,200}", value.get_secret_value()):
            raise ValueError(
                "must be 16-200 printable ASCII characters without spaces; make one with "
                'python3 -c "import secrets; print(secrets.token_urlsafe(24))"'
            )
        return value

    @model_validator(mode="after")
    def _postmark_complete(self) -> Settings:
        if (self.webhook_postmark_user is None) != (self.webhook_postmark_password is None):
            raise ValueError(
                "NEWSLETTER_WEBHOOK_POSTMARK_USER and NEWSLETTER_WEBHOOK_POSTMARK_PASSWORD go "
                "together: set both or neither"
            )
        return self

    @property
    def ses_topics(self) -> frozenset[str]:
        return frozenset(t.strip() for t in (self.webhook_ses_topics or "").split(",") if t.strip())

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
        # Every link is this base plus a path: a query, a fragment or a login in
        # it would end up in the middle of each link and break them all.
        parts = urlsplit(value)
        if parts.query or parts.fragment or "?" in value or "#" in value:
            raise ValueError("must be a base URL without ?query or #fragment")
        if "@" in parts.netloc:
            raise ValueError("must not carry a user name or password")
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
        if not names and value.strip():
            # "," or ", ," would make every slot "sent" to no list at all, exit 0.
            raise ValueError(
                f"{value!r} names no list; name the lists (a,b), or leave it unset to send "
                "to NEWSLETTER_LIST_NAME"
            )
        problems = [f"{name!r} {problem}" for name in names if (problem := list_name_problem(name))]
        if problems:
            raise ValueError("; ".join(problems))
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"names {', '.join(map(repr, twice))} more than once")
        return value

    @field_validator("smtp_helo_name")
    @classmethod
    def _helo_name(cls, value: str | None) -> str | None:
        # Sent as is after EHLO: a line break would start a command of its own.
        if value is not None and not (
            (len(value) <= 253 and _DNS_LABELS.fullmatch(value))
            or re.fullmatch(r"\[(?:IPv6:)?[0-9A-Fa-f:.]{2,45}\]", value)
        ):
            raise ValueError(
                f"{value!r} is not a host name like 'mail.example.org' (or an address "
                "literal like '[192.0.2.1]')"
            )
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        import ipaddress

        items = [v.strip() for v in value.split(",") if v.strip()]
        for item in items:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (like 10.0.0.0/8); give the "
                    "addresses of the proxies in front of `serve`, comma-separated"
                ) from None
        return ",".join(items)

    @field_validator("canary_to")
    @classmethod
    def _canary_to(cls, value: str | None) -> str | None:
        from newsletter.audience.csv_import import normalise_address

        if value is None or not value.strip():
            return None
        addresses, bad = [], []
        for item in (part.strip() for part in value.split(",")):
            try:
                addresses.append(normalise_address(item))
            except ValueError as exc:
                bad.append(f"{item!r} ({exc})")
        if bad:
            raise ValueError(
                f"not an email address: {'; '.join(bad)}; give the canary's addresses, "
                "comma-separated"
            )
        return ",".join(dict.fromkeys(addresses))

    @field_validator("canary_wait")
    @classmethod
    def _canary_wait(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if duration_seconds(value) is None:
            raise ValueError(
                f"{value!r} is not a wait like 900s, 30m or 2h (at most 24h); leave it unset "
                "to wait for `newsletter send ... --go`"
            )
        return value.strip()

    @property
    def canary(self) -> tuple[str, ...]:
        """The canary's addresses (NEWSLETTER_CANARY_TO), normalised."""
        return tuple(self.canary_to.split(",")) if self.canary_to else ()

    @property
    def canary_wait_seconds(self) -> float | None:
        """How long a send waits after its canary; None: until `send --go`."""
        return None if self.canary_wait is None else duration_seconds(self.canary_wait)

    @field_validator("smtp_host", "bounce_imap_host", "unsubscribe_imap_host")
    @classmethod
    def _smtp_host(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^\s\x00-\x1f\x7f]{1,253}", value):
            raise ValueError(f"{value!r} is not a host name or address")
        return value

    @field_validator(
        "bounce_imap_folder",
        "bounce_imap_processed_folder",
        "unsubscribe_imap_folder",
        "unsubscribe_imap_processed_folder",
    )
    @classmethod
    def _imap_folder(cls, value: str | None) -> str | None:
        from newsletter.bounces.mailbox import folder_problem

        if value is None:
            return None
        problem = folder_problem(value)
        if problem:
            raise ValueError(f"{value!r} {problem}")
        return value

    @field_validator("bounce_imap_username", "unsubscribe_imap_username")
    @classmethod
    def _imap_username(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^\x00-\x1f\x7f]{1,200}", value):
            raise ValueError("must be 1 to 200 characters, without control characters")
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
    def database_location(self) -> Location:
        """NEWSLETTER_DATABASE with NEWSLETTER_DATABASE_PASSWORD, for opening it."""
        secret = self.database_password
        return self.database.with_password(None if secret is None else secret.get_secret_value())

    @property
    def sender_name(self) -> str:
        return _split_mailbox(self.from_)[0]

    @property
    def sender_address(self) -> str:
        return _split_mailbox(self.from_)[1]

    @model_validator(mode="after")
    def _imap_folders_differ(self) -> Settings:
        mailboxes = [("BOUNCE", self.bounce_imap_folder, self.bounce_imap_processed_folder)]
        if self.unsubscribe_mailbox_set:
            mailboxes.append(("UNSUBSCRIBE", *self._unsubscribe_folders))
        for which, read, moved in mailboxes:
            # INBOX is INBOX in any case (RFC 3501 5.1): "inbox" would move mail into itself.
            if _same_folder(read, moved):
                raise ValueError(
                    f"NEWSLETTER_{which}_IMAP_FOLDER and NEWSLETTER_{which}_IMAP_PROCESSED_FOLDER "
                    f"are both {read!r}: processed mail is moved out of the folder that is "
                    "read, so they must differ"
                )
        if self.unsubscribe_mailbox_set and self._same_account:
            read, moved = self._unsubscribe_folders
            # One login's folders: neither mailbox may read what the other reads, or
            # the folder the other moves its processed mail into (both may move into one).
            clashes = (
                (read, self.bounce_imap_folder, f"reads {read!r}, as the bounce mailbox does"),
                (read, self.bounce_imap_processed_folder,
                 f"reads {read!r}, where the bounce mailbox moves what it processed"),
                (moved, self.bounce_imap_folder,
                 f"moves what it processed into {moved!r}, which the bounce mailbox reads"),
            )  # fmt: skip
            for mine, theirs, what in clashes:
                if _same_folder(mine, theirs):
                    raise ValueError(
                        f"the unsubscribe mailbox (NEWSLETTER_UNSUBSCRIBE_IMAP_*) {what} on "
                        "the same login: give NEWSLETTER_UNSUBSCRIBE_IMAP_FOLDER (and "
                        "_PROCESSED_FOLDER) folders of their own, or unset "
                        "NEWSLETTER_UNSUBSCRIBE_IMAP_* to read that mail with the bounces"
                    )
        return self

    @property
    def unsubscribe_mailbox_set(self) -> bool:
        """Whether mail to the unsubscribe address has a mailbox of its own to read."""
        return any(
            getattr(self, name) is not None
            for name in type(self).model_fields
            if name.startswith("unsubscribe_imap_")
        )

    @property
    def _unsubscribe_folders(self) -> tuple[str, str]:
        return (
            self.unsubscribe_imap_folder or self.bounce_imap_folder,
            self.unsubscribe_imap_processed_folder or self.bounce_imap_processed_folder,
        )

    @property
    def _same_account(self) -> bool:
        """Whether the unsubscribe mailbox is on the bounce mailbox's login (the same
        server, port as it will be used, and user; a host's case and final dot aside)."""
        from newsletter.bounces.mailbox import DEFAULT_PORTS as defaults

        bounce_port = self.bounce_imap_port or defaults[self.bounce_imap_security]
        security = self.unsubscribe_imap_security or self.bounce_imap_security
        own_port = self.unsubscribe_imap_port or (
            self.bounce_imap_port if security == self.bounce_imap_security else None
        ) or defaults[security]  # fmt: skip
        host = (self.unsubscribe_imap_host or self.bounce_imap_host or "").lower().rstrip(".")
        return (
            host == (self.bounce_imap_host or "").lower().rstrip(".")
            and (self.unsubscribe_imap_username or self.bounce_imap_username)
            == self.bounce_imap_username
            and own_port == bounce_port
        )

    @model_validator(mode="after")
    def _dkim_complete(self) -> Settings:
        if (self.dkim_key_file is None) != (self.dkim_selector is None):
            raise ValueError(
                "NEWSLETTER_DKIM_KEY_FILE and NEWSLETTER_DKIM_SELECTOR go together: "
                "set both or neither"
            )
        return self

    @field_validator("from_", "reply_to", "preview_to")
    @classmethod
    def _no_bidi_controls(cls, value: str | None) -> str | None:
        # A display name is what inboxes show first: the place to disguise a sender.
        found = bidi_characters(value or "")[0]
        if found:
            raise ValueError(
                f"contains {character_names(found)}, which can disguise the name shown; remove it"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from newsletter.schedule.slots import time_zone

        return time_zone(value.strip()).key

    @field_validator("schedule")
    @classmethod
    def _schedule_valid(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field check, not a model one, so that it is reported under its own
        # name and alongside every other problem.
        zone, hours = info.data.get("timezone"), info.data.get("catch_up_hours")
        if value is not None and zone is not None and hours is not None:
            from newsletter.schedule.slots import parse_schedule

            parse_schedule(value, zone, hours)
        return value

    @property
    def parsed_schedule(self) -> Schedule:
        from newsletter.schedule.slots import parse_schedule

        if self.schedule is None:
            raise ConfigError(
                "no schedule is set: set NEWSLETTER_SCHEDULE (for example 'Thu 09:00') and "
                "NEWSLETTER_TIMEZONE (for example 'America/New_York')"
            )
        return parse_schedule(self.schedule, self.timezone, self.catch_up_hours)

    @property
    def scheduled_lists(self) -> list[str]:
        names = [name.strip() for name in (self.schedule_lists or "").split(",")]
        return [name for name in names if name] or [self.list_name]

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
    def verp(self) -> Verp | None:
        """Envelope senders naming each delivery, under NEWSLETTER_BOUNCE_ADDRESS (none
        without one, or without NEWSLETTER_SECRET_KEY, which every real send needs)."""
        if not self.bounce_address or self.secret_key is None:
            return None  # without the secret, tokens would be signed with a public key
        return Verp(_split_mailbox(self.bounce_address)[1], self.token_key)

    @property
    def unsubscribe_token_key(self) -> bytes | None:
        """The key a mailed unsubscribe's token is checked with: none without
        NEWSLETTER_SECRET_KEY, never the preview key, with which anyone can make one."""
        return self.token_key if self.secret_key is not None else None

    @property
    def soft_bounces(self) -> SoftBounces:
        return SoftBounces(self.soft_bounce_limit, self.soft_bounce_days)

    @property
    def erasure_key(self) -> bytes | None:
        """The key of erased addresses' hashes; None without NEWSLETTER_SECRET_KEY (a
        preview key would make them testable by anyone)."""
        if self.secret_key is None:
            return None
        from newsletter.storage.signups import erasure_key

        return erasure_key(self.token_key)

    @property
    def token_key(self) -> bytes:
        if self.secret_key is None:
            return PREVIEW_KEY
        return self.secret_key.get_secret_value().encode("utf-8")


# The one relay's own settings, which NEWSLETTER_SMTP_RELAYS replaces (the timeout, the
# EHLO name and the CA file are every relay's).
_ONE_RELAY = ("smtp_host", "smtp_port", "smtp_security", "smtp_username", "smtp_password")


def _same_folder(a: str, b: str) -> bool:
    return a == b or (a.upper() == "INBOX" and b.upper() == "INBOX")


def list_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a list name (it goes into List-Id and every unsubscribe
    link), or None. The one rule for NEWSLETTER_LIST_NAME, NEWSLETTER_SCHEDULE_LISTS
    and every --list."""
    if _LIST_NAME.fullmatch(name):
        return None
    hint = ""
    fixed = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-._")
    fixed = re.sub(r"\.{2,}", ".", fixed)
    if fixed and _LIST_NAME.fullmatch(fixed) and name.isascii():
        hint = f" (for example {fixed!r})"
    return f"is not a valid list name: it must be {LIST_NAME_RULE}{hint}"


def parse_resolver(value: str) -> tuple[str, int]:
    """``host:port`` (or ``host``, ``[v6]:port``, ``[v6]``) as (IP address, port), or
    ValueError: the resolver is asked by its address (a name would need a resolver)."""
    import ipaddress

    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            host = ""
        port = rest[1:] if rest else "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a resolver's address: give an IP address and port like "
            "127.0.0.1:53 (an IPv6 address in brackets: [2001:db8::53]:53)"
        ) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return str(address), int(port)


def database_problem(value: str) -> str | None:
    """Why ``value`` cannot be NEWSLETTER_DATABASE, or None (see storage.location)."""
    return location_problem(value)


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


ENV_FILE = Path(".env")
DOTENV_MAX = 1024 * 1024
# Not settings: switches for tests and rehearsals, read from the environment
# where they are used.
ENVIRONMENT_ONLY = frozenset(
    {
        "NEWSLETTER_TEST_NOW",
        "NEWSLETTER_TEST_CHROMIUM",
        "NEWSLETTER_TEST_POSTGRES_URL",
        "NEWSLETTER_TEST_POSTGRES_REQUIRED",
        "NEWSLETTER_TEST_DOVECOT_REQUIRED",
        "NEWSLETTER_TEST_POSTFIX_REQUIRED",
        "NEWSLETTER_TEST_DKIM_VERIFIER_REQUIRED",
    }
)
_OURS = re.compile(r"\s*(?:export\s+)?['\"]?newsletter_", re.IGNORECASE)
_SINGLE_QUOTED = re.compile(r"(?:export\s+)?(?:'[^']+'|[^=#\s]+)\s*=\s*'")
_SWALLOWED = re.compile(r"\n\s*(?:export\s+)?(newsletter_\w*)\s*=", re.IGNORECASE)


class _Entry(NamedTuple):
    value: str | None  # None: a key with no `=`
    line: int


def read_dotenv(path: Path) -> tuple[dict[str, _Entry], list[str]]:
    """Our keys in a .env file (upper-cased, with their lines) and the problems with them.

    The syntax is python-dotenv's, as Docker Compose writes it: comments,
    ``export KEY=...``, single or double quotes, ``${OTHER}`` expanded from the
    file and the environment. Lines that are not ours are never reported.
    """
    if not path.exists() and not path.is_symlink():
        return {}, []
    try:
        with path.open("rb") as file:
            raw = file.read(DOTENV_MAX + 1)  # bounded: a link to /dev/zero must not hang
    except OSError as exc:
        return {}, [f"{path}: cannot be read ({exc.strerror or exc}); fix or remove it"]
    if len(raw) > DOTENV_MAX:
        return {}, [f"{path}: is larger than {DOTENV_MAX // 1024} KB; is it the right file?"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return {}, [f"{path}:{line}: is not UTF-8 text (byte {exc.start}); save it as UTF-8"]
    problems: list[str] = []
    pairs: list[tuple[str, str | None]] = []
    literal: dict[str, str | None] = {}
    lines: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        # the statement itself, after any blank lines before it
        body = binding.original.string.lstrip()
        leading = binding.original.string[: len(binding.original.string) - len(body)]
        line = binding.original.line + len(re.findall(r"\r\n|\n|\r", leading))
        # A quote left open runs on to the next one, taking our lines with it.
        swallowed = _SWALLOWED.search(body if binding.error else binding.value or "")
        if swallowed:
            problems.append(
                f"{path}:{line}: a quote opened on this line runs over several lines and "
                f"takes in {swallowed.group(1)}; check the quotes on this line"
            )
        elif binding.error and _OURS.match(body):
            problems.append(f"{path}:{line}: cannot be read as KEY=VALUE; check its quotes")
        if binding.error or binding.key is None:
            continue  # a comment, a blank line, or someone else's broken line
        pairs.append((binding.key, binding.value))
        if _SINGLE_QUOTED.match(body):
            literal[binding.key] = binding.value
        lines[binding.key] = line
    # ${NAME} is expanded, except in single quotes: Docker Compose's rule, and
    # the one way to write a password that contains "${".
    values = {**resolve_variables(pairs, override=True), **literal}
    ours = {
        key.upper(): _Entry(value, lines[key])
        for key, value in values.items()
        if key.upper().startswith(PREFIX)
    }
    return ours, problems


def _field_for(name: str) -> str:
    by_env = {env_name(f): f for f in Settings.model_fields}
    return by_env[name]


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning every problem into one ConfigError that names the variables."""
    known = {env_name(f) for f in Settings.model_fields} | ENVIRONMENT_ONLY
    # pydantic-settings matches names without regard to case, so do we.
    in_environment = {k.upper() for k in os.environ}
    problems = [
        _unknown(key.upper(), known)
        for key in sorted(os.environ)
        if key.upper().startswith(PREFIX) and key.upper() not in known
    ]
    entries, file_problems = read_dotenv(ENV_FILE)
    problems += file_problems
    from_file: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, entry in entries.items():
        here = f"{ENV_FILE}:{entry.line}: "
        if key not in known:
            problems.append(here + _unknown(key, known))
        elif key in ENVIRONMENT_ONLY:
            problems.append(f"{here}{key}: is read from the environment only, not from .env")
        elif entry.value is None:
            problems.append(f"{here}{key}: has no value; write {key}=VALUE")
        elif key not in in_environment:  # the environment wins
            from_file[_field_for(key)] = entry.value
            where[key] = here
    try:
        settings = Settings(**{**from_file, **overrides})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = str(err["loc"][0]) if err["loc"] else ""
            name = loc.upper() if loc.upper().startswith(PREFIX) else env_name(loc)
            msg = str((err.get("ctx") or {}).get("error", err["msg"]))
            if not loc:
                problems.append(msg.removeprefix("Value error, "))
                continue
            # A setting with several problems (NEWSLETTER_SMTP_RELAYS) gives one line each;
            # "[1].port: ..." names a relay of the list, right after the setting's name.
            for line in msg.split("\n"):
                problems.append(
                    f"{where.get(name, '')}{name}{'' if line.startswith('[') else ': '}{line}"
                )
        settings = None
    if problems or settings is None:
        raise ConfigError(
            "the settings are not valid (see .env.example for every setting):\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    return settings


def _unknown(key: str, known: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{key}: not a known setting{hint}"
