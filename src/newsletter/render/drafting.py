"""Drafting stage: a day and the issues folder → next week's issue file, to be filled in.

Input: the day the issue is for (given, or the local day of the schedule's next
slot, which the caller finds with :func:`newsletter.schedule.slots.next_day`: render
comes before the schedule), and the issues folder, whose most recent issue gives the society's
usual sections (as many articles, in the same categories, with an image where
that issue had one). Output: a :class:`Draft` (where it goes, its YAML text, how
many placeholders it holds), and :func:`write_draft`, which writes it whole or
not at all and never over an existing file.

Every text an editor has to write is a placeholder holding
:data:`~newsletter.render.loading.PLACEHOLDER` (``TODO:``), which the loader
refuses with its file, line and field: ``build`` and ``send`` cannot take an
unfinished draft. Comments in the file say what to write where.

The file is named for its day and has no ``id:`` line, so its id is the day
(:mod:`newsletter.render.issue_ids`) and its ``date:`` is that day, as the loader
wants of a file named after a day; a day whose id another file already claims is
refused, since the two would share one send log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newsletter.errors import ConfigError, NewsletterError
from newsletter.render.issue_ids import SUFFIXES, claims, issue_files
from newsletter.render.loading import PLACEHOLDER, named_day
from newsletter.render.yaml_input import read_yaml

MAX_ARTICLES = 50  # as models.Issue allows
_GREETING_MAX = 100


class DraftRefused(NewsletterError):
    """A draft cannot be written: its file exists, its day is gone, or its id is taken."""


@dataclass(frozen=True, slots=True)
class Draft:
    path: Path
    day: dt.date
    text: str
    placeholders: int  # how many an editor has to fill in
    articles: int
    modelled_on: Path | None  # the issue whose sections it follows


@dataclass(frozen=True, slots=True)
class IssueDay:
    day: dt.date
    from_schedule: bool  # the schedule's next slot, not a DATE given


def issue_day(
    given: dt.date | None,
    *,
    next_slot: dt.date | None,
    today: dt.date,
    zone: str,
    allow_past: bool,
) -> IssueDay:
    """The day to draft for: ``given``, or ``next_slot``, the local day of the schedule's
    next slot (None without a schedule); ``today`` is the day in the time zone ``zone``.

    A day before today is refused unless ``allow_past``: the schedule never sends a
    past day's issue once its catch-up window is over, so a past DATE is usually a
    typo for next year or next month."""
    if given is None:
        if next_slot is None:
            raise ConfigError(
                "no schedule is set (NEWSLETTER_SCHEDULE), so there is no next slot to "
                f"draft for: give the day, as in `newsletter new {today.isoformat()}`, or "
                "set NEWSLETTER_SCHEDULE (for example 'Thu 09:00') and NEWSLETTER_TIMEZONE"
            )
        return IssueDay(next_slot, True)
    if given < today and not allow_past:
        raise DraftRefused(
            f"{given.isoformat()} is in the past (today is {today.isoformat()} in "
            f"{zone}); give a later day, or add --past to draft it all the same"
        )
    return IssueDay(given, False)


def plan_draft(folder: Path, day: dt.date) -> Draft:
    """The draft for ``day`` in ``folder``, following the folder's most recent issue.

    Raises DraftRefused when the file exists or another file claims the day's id,
    ConfigError when there is no such folder."""
    if not folder.is_dir():
        raise ConfigError(
            f"there is no issues folder at {folder} (NEWSLETTER_ISSUES_DIR): run the command "
            "from the project folder (the one with society.yaml, templates/ and issues/), or "
            "point NEWSLETTER_ISSUES_DIR at the folder that holds the issue files"
        )
    name = day.isoformat()
    path = folder / f"{name}.yaml"
    for existing in (folder / f"{name}{suffix}" for suffix in SUFFIXES):
        if existing.exists() or existing.is_symlink():
            raise DraftRefused(
                f"{existing} already exists; it was left as it is. Edit it, or delete it "
                "first to start again from a new draft"
            )
    for claim in claims(folder):
        if claim.issue_id == name:
            at = f":{claim.line}" if claim.line is not None else ""
            raise DraftRefused(
                f"{claim.file}{at} already claims the id {name!r} ({claim.how()}), which a "
                f"draft named {path.name} would have too, and the send log and the archive "
                "know an issue by its id: change that file's `id:`, or give another day"
            )
    model = _most_recent(folder, day)
    articles = model.articles if model is not None else [{}]
    text, count = _text(day, model)
    return Draft(path, day, text, count, len(articles), model.path if model else None)


def write_draft(draft: Draft) -> None:
    """Write the draft's file whole or not at all, never over a file (even one that
    appeared since :func:`plan_draft` looked): written beside it, then linked into
    place, which fails rather than replace what is there."""
    partial = draft.path.with_name(f".{draft.path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="\n") as fh:
            fh.write(draft.text)
        try:
            os.link(partial, draft.path)
        except FileExistsError:
            raise DraftRefused(f"{draft.path} already exists; it was left as it is") from None
    except OSError as exc:
        raise DraftRefused(
            f"cannot write {draft.path}: {exc.strerror or exc}; nothing was written"
        ) from None
    finally:
        partial.unlink(missing_ok=True)


# ----------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class _Model:
    path: Path
    data: Mapping[str, Any]
    articles: Sequence[Mapping[str, Any]]


def _most_recent(folder: Path, day: dt.date) -> _Model | None:
    """The issue with the latest date before ``day`` (else the latest of all), read as
    plain YAML: an unfinished or invalid file still shows its sections."""
    found: list[tuple[dt.date, Path, _Model]] = []
    for path in issue_files(folder):
        doc = read_yaml(path)
        data = doc.data
        if not isinstance(data, dict) or not isinstance(data.get("articles"), list):
            continue
        articles = [a for a in data["articles"] if isinstance(a, dict)][:MAX_ARTICLES]
        when = _date_of(data.get("date")) or named_day(path)
        if not articles or when is None:
            continue
        found.append((when, path, _Model(path, data, articles)))
    if not found:
        return None
    before = [entry for entry in found if entry[0] < day]
    return max(before or found, key=lambda entry: (entry[0], entry[1]))[2]


def _date_of(value: object) -> dt.date | None:
    try:
        return dt.date.fromisoformat(str(value).strip()) if value is not None else None
    except ValueError:
        return None


# ------------------------------------------------------------------ the text


def _quoted(text: str) -> str:
    # A JSON string is a YAML double-quoted scalar: whatever last week's category
    # holds, it reads back as the same text.
    return json.dumps(text, ensure_ascii=False)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.placeholders = 0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def todo(self, what: str) -> str:
        """A placeholder asking for ``what``, quoted for YAML."""
        self.placeholders += 1
        return _quoted(f"{PLACEHOLDER} {what}")


def _text(day: dt.date, model: _Model | None) -> tuple[str, int]:
    out = _Writer()
    long_day = f"{day:%A} {day.day} {day:%B %Y}"
    source = f",\n# on the sections of {model.path}" if model else ""
    out.add(
        f"# The issue for {long_day}, drafted by `newsletter new`{source}.",
        f"# Replace every {PLACEHOLDER!r} text below: `newsletter build` and `newsletter send`",
        "# refuse this file, naming each one with its line, until none is left. Text in",
        "# quotes stays on one line; text under `|` is Markdown. See README.md for every field.",
        f"# The id of this issue is the file name: {day.isoformat()}.",
        f"subject: {out.todo('the subject line, at most 78 characters')}",
        f"date: {day.isoformat()}",
        "# The inbox's preview of the email, beside the subject: one line, at most 140",
        "# characters.",
        f"preheader: {out.todo('one line on what this issue brings')}",
        "# Markdown. Merge fields are filled for each reader: [[first_name|friend]].",
        "intro: |",
    )
    greeting = _greeting(model.data.get("intro")) if model else None
    if greeting:
        out.add(f"  {greeting}", "")
    out.add(
        f"  {PLACEHOLDER} a few sentences on this week's news.",
        "",
        "articles:",
    )
    out.placeholders += 1
    articles = model.articles if model else [{}]
    for n, article in enumerate(articles, 1):
        _article(out, n, len(articles), article)
    return "\n".join(out.lines).rstrip("\n") + "\n", out.placeholders


def _greeting(intro: object) -> str | None:
    """The first paragraph of last week's intro when it is one short line ending in a
    comma ("Dear [[first_name|friend]],"): the society's usual greeting."""
    if not isinstance(intro, str):
        return None
    first = intro.strip().split("\n\n", 1)[0].strip()
    if "\n" in first or len(first) > _GREETING_MAX or not first.endswith(","):
        return None
    return None if PLACEHOLDER in first else first


def _text_of(value: object) -> str | None:
    """Last week's text for an optional field, if it has one and it is no placeholder."""
    if not isinstance(value, str) or not value.strip() or PLACEHOLDER in value:
        return None
    return value.strip()


def _article(out: _Writer, n: int, total: int, article: Mapping[str, Any]) -> None:
    out.add(f"  # Article {n} of {total}.")
    out.add(
        f"  - title: {out.todo('the headline, as on the article page')}",
        f"    url: {out.todo('the https:// link to the article')}",
    )
    # Optional fields are comments, with last week's value as a hint where it is one
    # worth keeping (the section) or a placeholder: uncommented as it stands, a
    # placeholder is refused, never sent.
    category = _text_of(article.get("category"))
    if category is not None:
        out.add(f"    category: {_quoted(category)}  # optional: the section it is in")
    else:
        out.add(f"    # category: {_quoted(PLACEHOLDER + ' the section')}  # optional")
    source = _text_of(article.get("source"))
    hint = _quoted(source) if source is not None else _quoted(f"{PLACEHOLDER} who published it")
    out.add(f"    # source: {hint}  # optional: who published it")
    out.add(f"    # published: {_quoted(PLACEHOLDER + ' YYYY-MM-DD')}  # optional: its day")
    if isinstance(article.get("image"), dict):
        out.add(
            "    # A picture, as the last issue had here; delete these three lines for none.",
            "    image:",
            f"      src: {out.todo('the https:// link to the picture')}",
            f"      alt: {out.todo('what the picture shows, for those who cannot see it')}",
        )
    out.add(
        "    summary: |",
        f"      {PLACEHOLDER} what it found and why it matters to our readers, in Markdown.",
        "",
    )
    out.placeholders += 1
