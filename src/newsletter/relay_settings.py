"""NEWSLETTER_SMTP_RELAYS: several relays, each with its own limits, in one setting.

Input: the setting's text, a JSON list with one object a relay::

    [{"host": "smtp.provider.example", "username": "news", "password": "...",
      "connections": 8, "rate": 20, "weight": 3},
     {"host": "backup.example.net", "port": 465, "security": "tls", "weight": 1}]

Output: typed :class:`RelaySettings`, or every problem at once, each naming the
relay by its index and the field (``[1].port: ...``), never a value (passwords
are in the text).

Why one JSON setting rather than numbered ones (``NEWSLETTER_SMTP_1_HOST``, ...):
each relay's fields stay together, where a person reads and edits them as one;
the list is as long as it needs to be, with no highest number declared anywhere;
and a misspelt field is still an error, per relay (an object's unknown keys are
refused), where every numbered name would have had to be a declared setting for a
typo to be told from it. The ``NEWSLETTER_SMTP_*`` settings keep their meaning as
the one-relay case; the two are not mixed.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
# All the relays' connections together are the send's workers, bounded as
# NEWSLETTER_SEND_CONNECTIONS is.
MAX_CONNECTIONS = 64


class RelaySettings(BaseModel):
    """One relay of NEWSLETTER_SMTP_RELAYS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    connections: int | None = Field(default=None, ge=1, le=MAX_CONNECTIONS)
    rate: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # messages a second
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    ca_file: Path | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not re.fullmatch(r"[^\s\x00-\x1f\x7f]{1,253}", value):
            raise ValueError("is not a host name or address")
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^\x00-\x1f\x7f]{1,200}", value):
            raise ValueError("must be 1 to 200 characters, without control characters")
        return value

    @property
    def port_or_default(self) -> int:
        return self.port or DEFAULT_PORTS[self.security]


FIELDS = ", ".join(RelaySettings.model_fields)
# A list of relays is a few hundred characters; this is a thousand relays.
MAX_TEXT = 200_000


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_relays(text: str, default_connections: int) -> tuple[list[RelaySettings], list[str]]:
    """The relays in ``text`` and the problems with them (each ``[index].field: what``).
    A relay without ``connections`` may have ``default_connections``."""
    example = 'a list of relays such as [{"host": "smtp.example.org", "weight": 2}]'
    if len(text) > MAX_TEXT:
        return [], [f"is {len(text):,} characters long, more than {MAX_TEXT:,}; write {example}"]
    try:
        # NaN and infinities are not JSON (RFC 8259); Python's reader takes them unless
        # told not to, and an infinite weight would take every message.
        raw = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        # The position only: the text holds passwords.
        return [], [
            f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"write {example}"
        ]
    except (ValueError, RecursionError):  # a constant refused, or nesting without end
        return [], [f"is not valid JSON (or nested too deeply); write {example}"]
    if not isinstance(raw, list) or not raw:
        return [], ['must be a JSON list of relays, such as [{"host": "smtp.example.org"}]']
    relays: list[RelaySettings] = []
    problems: list[str] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            problems.append(f'[{index}]: must be an object with a host, such as {{"host": ...}}')
            continue
        try:
            relays.append(RelaySettings.model_validate(item))
        except ValidationError as exc:
            for err in exc.errors(include_url=False, include_input=False):
                where = ".".join(str(part) for part in err["loc"])
                said = _said(err["type"], err["msg"], str(err["loc"][-1]) if err["loc"] else "")
                problems.append(f"[{index}].{where}: {said}")
    if problems:
        return [], problems
    if not any(r.weight > 0 for r in relays):
        problems.append("every relay has weight 0 (a standby): give at least one a weight above 0")
    total = sum(r.connections or default_connections for r in relays)
    if total > MAX_CONNECTIONS:
        problems.append(
            f"the relays' connections add up to {total} (a relay without `connections` has "
            f"NEWSLETTER_SEND_CONNECTIONS, {default_connections}); at most {MAX_CONNECTIONS}"
        )
    seen: dict[tuple[str, int, str | None], int] = {}
    for index, r in enumerate(relays):
        key = (r.host.lower().rstrip("."), r.port_or_default, r.username)
        if key in seen:
            problems.append(
                f"[{index}]: is relay [{seen[key]}] again (the same host, port and username); "
                "list a relay once, with the weight and connections it should have"
            )
        seen.setdefault(key, index)
    return ([], problems) if problems else (relays, [])


def _said(kind: str, message: str, key: str) -> str:
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(key, list(RelaySettings.model_fields), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"is not a known field; {hint}the fields are {FIELDS}"
    if kind == "missing":
        return "is required"
    return message.removeprefix("Value error, ")
