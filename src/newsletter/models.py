"""Typed models that cross the boundaries between stages.

What people write (an issue file, the society file) is parsed into frozen
pydantic models that forbid unknown keys, so a typo is an error rather than a
silently ignored field. What the pipeline produces (a rendered issue, a
recipient) is a frozen dataclass: it is built by our code, not typed by a
person, and must be cheap to create.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

if TYPE_CHECKING:
    from newsletter.render.merge_fields import MergeField

SUBJECT_MAX = 150
PREHEADER_MAX = 200
TITLE_MAX = 250


_TEMPLATE_SYNTAX = re.compile(r"\{\{|\{%|\[\[[A-Z][A-Z0-9_]*\]\]")


# Invisible characters that change the order in which text is shown. The
# embeddings, overrides and isolates can make a subject or a link's text read
# differently from what it is (the "RLO" trick: "invoice\u202efdp.exe" shows as
# "invoiceexe.pdf"); a research newsletter never needs them. The marks only
# nudge neutral characters such as spaces and digits, and right-to-left
# keyboards type them in Arabic and Hebrew text, where they are left alone.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
BIDI_MARKS = frozenset("\u200e\u200f\u061c")


def bidi_characters(value: str) -> tuple[list[str], list[str]]:
    """The bidi controls in ``value``, and the marks that are there with no right-to-left letter.

    Each list holds every distinct character once, in order of appearance."""
    controls = list(dict.fromkeys(ch for ch in value if ch in BIDI_CONTROLS))
    marks = list(dict.fromkeys(ch for ch in value if ch in BIDI_MARKS))
    if marks and any(
        unicodedata.bidirectional(ch) in ("R", "AL") for ch in value if ch not in BIDI_MARKS
    ):
        marks = []  # right-to-left text: the marks are as typed
    return controls, marks


def visible(text: str) -> str:
    """``text`` safe to print and keep when a stranger wrote it (a remote server's reply,
    a bounce's header): control and format characters (an escape sequence, a bidi
    override) made visible as U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def character_names(chars: list[str]) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE and U+202C POP DIRECTIONAL FORMATTING``."""
    named = [f"U+{ord(ch):04X} {unicodedata.name(ch, 'UNNAMED')}" for ch in chars]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def _no_control_chars(value: str) -> str:
    # CR/LF in a header value would let text inject headers (RFC 5322 2.2);
    # other control characters have no business in a one-line field either.
    for ch in value:
        if ch in "\r\n\u2028\u2029\x85":
            raise ValueError("must be a single line (no line breaks)")
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            raise ValueError(f"contains the control character U+{ord(ch):04X}; remove it")
    return _no_template_syntax(value)


def _text_block(value: str) -> str:
    # Line breaks are fine in Markdown; other control characters (a vertical
    # tab pasted from a word processor, ESC, DEL, C1 codes) break MJML or
    # reach readers as garbage.
    for ch in value:
        if ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            raise ValueError(f"contains the control character U+{ord(ch):04X}; remove it")
    return _no_template_syntax(value)


def _no_template_syntax(value: str) -> str:
    if "\ue000" in value or "\ue001" in value:
        raise ValueError(
            "contains a private-use character (U+E000 or U+E001) that the newsletter uses "
            "for merge fields; remove it"
        )
    match = _TEMPLATE_SYNTAX.search(value)
    if match:
        raise ValueError(
            f"contains {match.group(0)!r}, which is template syntax or a placeholder; remove it"
        )
    return value


def _plain_date(value: object) -> object:
    # YAML hands dates over as text (see yaml_input); a bare number such as 0
    # would otherwise be read as a Unix timestamp.
    if not isinstance(value, str | dt.date):
        raise ValueError("must be a date written as YYYY-MM-DD, for example 2020-12-23")
    return value


# Characters a URL may not hold as they are. Quotes, < and > end an HTML
# attribute or a <URI> in a header; a backslash is read as "/" by browsers
# (WHATWG URL) but not by every mail client, so one link would lead to two
# places; a backtick ended attributes in old Internet Explorer; whitespace and
# control characters split a URL or hide part of it. Each has a
# percent-encoded form that means the same to the server.
_URL_CHARACTER_NAMES = {
    '"': "double quote",
    "'": "apostrophe",
    "<": "less-than sign",
    ">": "greater-than sign",
    "\\": "backslash",
    "`": "backtick",
    " ": "space",
    "\t": "tab",
}


def url_characters(value: str) -> list[str]:
    """The characters of ``value`` that a URL must not hold unencoded, each once, in order."""
    return list(
        dict.fromkeys(
            ch
            for ch in value
            if ch in _URL_CHARACTER_NAMES or ch.isspace() or unicodedata.category(ch) == "Cc"
        )
    )


def url_character_problem(value: str) -> str | None:
    """What to tell the editor about the unencoded characters of a URL (None: there are none).

    For example: ``contains a double quote ("), which a URL cannot hold as it
    is; write it percent-encoded, as %22``."""
    chars = url_characters(value)
    if not chars:
        return None
    names = [_url_character_name(ch) for ch in chars]
    codes = [quote(ch, safe="") for ch in chars]
    if len(chars) == 1:
        return (
            f"contains {names[0]}, which a URL cannot hold as it is; "
            f"write it percent-encoded, as {codes[0]}"
        )
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    how = ", ".join(
        f"{code} for "
        + (f"the {_URL_CHARACTER_NAMES[ch]}" if ch in _URL_CHARACTER_NAMES else f"U+{ord(ch):04X}")
        for code, ch in zip(codes, chars, strict=True)
    )
    return (
        f"contains {listed}, which a URL cannot hold as they are; write them percent-encoded: {how}"
    )


def _url_character_name(ch: str) -> str:
    name = _URL_CHARACTER_NAMES.get(ch)
    if name is None:
        return f"U+{ord(ch):04X} {unicodedata.name(ch, 'CONTROL CHARACTER')}"
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name}" if ch.isspace() else f"{article} {name} ({ch})"


def https_url(value: str) -> str:
    problem = url_character_problem(value)
    if problem:
        raise ValueError(problem)
    # Per-recipient values never go into a URL an editor wrote: a tracker could
    # learn each reader's address, and the link would not be the one checked.
    for syntax in ("[[", "]]", "{{", "{%", "\ue000", "\ue001"):
        if syntax in value:
            raise ValueError(
                f"contains {syntax!r}: a URL cannot hold a merge field, a placeholder or "
                "template syntax; write the address as it is"
            )
    parts = urlsplit(value)
    if parts.scheme.lower() != "https":
        shown = parts.scheme + ":" if parts.scheme else "no scheme"
        raise ValueError(f"must be an https:// URL (got {shown})")
    if not parts.hostname or "." not in parts.hostname:
        raise ValueError("must be an https:// URL with a full host name")
    if len(value) > 2000:
        raise ValueError("is longer than 2000 characters; shorten the URL")
    return value


_LANG_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _language_tag(value: str) -> str:
    if not _LANG_RE.fullmatch(value):
        raise ValueError("must be a language tag such as 'en' or 'en-GB'")
    return value


def _issue_id(value: str) -> str:
    # The id starts every Message-ID (<id.hash@domain>, RFC 5322 dot-atom): two dots
    # in a row, or one at the end, would make it invalid.
    if not _ID_RE.fullmatch(value) or ".." in value or value.endswith("."):
        raise ValueError(
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "with no '..' and no '.' at the end"
        )
    return value


Line = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1), AfterValidator(_no_control_chars)
]
HttpsUrl = Annotated[str, StringConstraints(strip_whitespace=True), AfterValidator(https_url)]
Markdown = Annotated[str, StringConstraints(min_length=1), AfterValidator(_text_block)]
Date = Annotated[dt.date, BeforeValidator(_plain_date)]
LanguageTag = Annotated[str, AfterValidator(_language_tag)]
IssueId = Annotated[str, AfterValidator(_issue_id)]


class _Input(BaseModel):
    """Base for what people write: strict about unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Image(_Input):
    src: HttpsUrl
    alt: Line = Field(max_length=300)
    width: int | None = Field(default=None, ge=16, le=600)


class Article(_Input):
    title: Line = Field(max_length=TITLE_MAX)
    url: HttpsUrl
    summary: Markdown
    image: Image | None = None
    published: Date | None = None
    source: Line | None = Field(default=None, max_length=200)
    category: Line | None = Field(default=None, max_length=60)


class Issue(_Input):
    """One weekly issue, as the editor wrote it in ``issues/<id>.yaml``."""

    id: IssueId
    subject: Line = Field(max_length=SUBJECT_MAX)
    date: Date
    preheader: Line | None = Field(default=None, max_length=PREHEADER_MAX)
    intro: Markdown | None = None
    articles: list[Article] = Field(min_length=1, max_length=50)


class SocialLink(_Input):
    """A "follow us" link to the society's own page on a network (never a share link)."""

    name: Line = Field(max_length=40)
    url: HttpsUrl


def _list_name(value: str) -> str:
    from newsletter.settings import list_name_problem  # settings imports this module

    problem = list_name_problem(value)
    if problem:
        raise ValueError(f"{value!r} {problem}")
    return value


class SignupList(_Input):
    """A list people may join from the public signup page."""

    name: Annotated[str, AfterValidator(_list_name)]
    title: Line = Field(max_length=80)  # what the form calls it: "Research news (weekly)"
    description: Line | None = Field(default=None, max_length=300)


class Signup(_Input):
    """The public signup on ``newsletter serve`` (``/subscribe``): which lists it offers,
    and the consent text shown next to the button (kept with every confirmation,
    exactly as shown)."""

    lists: list[SignupList] = Field(min_length=1, max_length=10)
    consent: Markdown = Field(max_length=2000)
    welcome: bool = False  # a welcome email after confirming (templates/welcome.*)

    @model_validator(mode="after")
    def _lists_differ(self) -> Signup:
        names = [item.name for item in self.lists]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"lists the signup offers twice: {', '.join(twice)}")
        return self


class Society(_Input):
    """Who sends the newsletter: the data behind the footer, kept in ``society.yaml``."""

    name: Line = Field(max_length=120)
    newsletter_name: Line = Field(max_length=80)
    language: LanguageTag = "en"
    website: HttpsUrl
    about: Markdown
    address: list[Line] = Field(min_length=1, max_length=8)
    registration: Line = Field(max_length=200)
    logo: Image | None = None
    social: list[SocialLink] = Field(default_factory=list, max_length=8)
    signup: Signup | None = None  # no public signup page without it


@dataclass(frozen=True, slots=True)
class Recipient:
    """One person a message is addressed to."""

    email: str
    first_name: str = ""
    last_name: str = ""
    # The other columns of the list it came from, as imported (merge fields).
    attributes: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def display_name(self) -> str:
        return " ".join(p for p in (self.first_name, self.last_name) if p)


# Where one recipient of a send stands (the send log's ``deliveries.state``):
# pending → sending → sent | rejected | deferred; ``unknown`` when a run died
# during its transaction; ``suppressed`` when they left after the freeze.
DeliveryState = Literal[
    "pending", "sending", "sent", "rejected", "deferred", "unknown", "suppressed"
]
DELIVERY_STATES: tuple[DeliveryState, ...] = (
    "pending", "sending", "sent", "rejected", "deferred", "unknown", "suppressed",
)  # fmt: skip


# What one SMTP transaction did to a recipient (a transport's answer): the states a
# run records; ``pending``, ``sending`` and ``suppressed`` are the send log's own.
OutcomeState = Literal["sent", "rejected", "deferred", "unknown"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A recipient claimed for one SMTP transaction: its place in the frozen audience
    (``seq``), whom to write to, and how many attempts this one makes (counting it)."""

    seq: int
    recipient: Recipient
    attempts: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient in one SMTP transaction (a transport's answer)."""

    state: OutcomeState
    code: int | None = None
    detail: str = ""
    retry_at: float | None = None  # for deferred: when it may go again (unix time)


@dataclass(frozen=True, slots=True)
class Links:
    """The issue-wide URLs every message carries (per-recipient ones are placeholders)."""

    view_in_browser: str
    website: str


@dataclass(frozen=True, slots=True)
class RenderedIssue:
    """An issue rendered once: HTML and text with per-recipient placeholders left in.

    The placeholders are the closed set in :mod:`newsletter.render.placeholders`;
    filling them is string substitution, never a second run of MJML or the
    inliner.
    """

    issue_id: str
    subject: str
    preheader: str | None
    language: str
    html: str
    text: str
    mjml: str
    warnings: tuple[str, ...] = field(default=())
    # The merge-field slots in html, text and subject, and what each stands for.
    merge_fields: tuple[tuple[str, MergeField], ...] = field(default=())
