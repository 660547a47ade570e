"""Loading stage: an issue file or the society file → a validated, frozen model.

Input: a path to YAML. Output: :class:`Loaded` holding an :class:`Issue` or a
:class:`Society` and the warnings worth showing. Every problem in the file is
collected (YAML syntax, duplicate keys, unknown or missing fields, bad URLs,
unsafe Markdown, placeholders a draft left unfilled) and raised together as
one :class:`ValidationFailed`, each naming file, line and field, so an editor
fixes them in one pass.
"""

from __future__ import annotations

import datetime as dt
import difflib
import html
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from newsletter.errors import ConfigError, Problem, ValidationFailed
from newsletter.models import Issue, Society, bidi_characters, character_names
from newsletter.render import markdown, merge_fields
from newsletter.render.yaml_input import PathKey, YamlDocument, format_path, read_yaml

M = TypeVar("M", bound=BaseModel)

# What a draft from `newsletter new` (render.drafting) holds wherever an editor has
# to write something. Any text of an issue holding it is refused, so that an
# unfinished draft cannot be built or sent.
PLACEHOLDER = "TODO:"
# Fields an editor may delete rather than fill in.
_OPTIONAL = frozenset({"preheader", "intro", "source", "category", "published"})

SUBJECT_WARN = 78  # most inboxes cut a subject off well before this on a phone
PREHEADER_WARN = 140


@dataclass(frozen=True, slots=True)
class Loaded(Generic[M]):
    value: M
    warnings: list[Problem] = field(default_factory=list)
    # Warnings a build may pass (to preview the text) but a send refuses: bidi
    # controls that could disguise what the email says. Also in ``warnings``.
    refused_by_send: list[Problem] = field(default_factory=list)
    # Every merge field the file uses, with its place (a send checks them against the list).
    merge_fields: list[merge_fields.FieldUse] = field(default_factory=list)


_DAY_NAME = re.compile(r"\d{4}-\d{2}-\d{2}")


def named_day(path: Path) -> dt.date | None:
    """The day a file is named for (``2026-12-03.yaml``), or None for any other name."""
    if path.suffix not in (".yaml", ".yml") or not _DAY_NAME.fullmatch(path.stem):
        return None
    try:
        return dt.date.fromisoformat(path.stem)
    except ValueError:
        return None


def load_issue(path: Path) -> Loaded[Issue]:
    """Read and validate one issue; the id defaults to the file name without ``.yaml``.

    A file named for a day (``2026-12-03.yaml``) must carry that day in
    ``date:``: the schedule sends it on the day of its name, so last week's
    file copied without updating its date is refused, not sent under the
    wrong date or skipped.
    """
    doc = read_yaml(path)
    if isinstance(doc.data, dict) and "id" not in doc.data:
        doc.data["id"] = path.stem
    issue, problems = _check(doc, Issue)
    problems += _name_and_date(doc, path)
    problems += _lint_markdown(doc, _issue_markdown_paths(doc.data))
    uses, merge_problems = _merge_fields(doc, allowed=True)
    problems += merge_problems
    unfilled = placeholders(doc)
    if unfilled:
        # "TODO: its https:// link" is also not a URL, but the one thing to say
        # about it is that it was never filled in.
        fields = {p.field for p in unfilled}
        problems = [p for p in problems if p.field not in fields] + unfilled
    if problems or issue is None:
        raise ValidationFailed(_sorted(problems))
    refused, marks = _bidi_warnings(doc)
    return Loaded(issue, _sorted(_issue_warnings(issue, doc) + refused + marks), refused, uses)


def load_society(path: Path) -> Loaded[Society]:
    """Read and validate the society file that the footer is made from."""
    if not path.is_file():
        raise ConfigError(
            f"the society file {path} was not found; run the command from the project folder "
            "(the one with society.yaml, templates/ and issues/) or set NEWSLETTER_SOCIETY_FILE"
        )
    doc = read_yaml(path)
    society, problems = _check(doc, Society)
    problems += _lint_markdown(doc, [("about",)])
    problems += _merge_fields(doc, allowed=False)[1]
    if problems or society is None:
        raise ValidationFailed(_sorted(problems))
    refused, marks = _bidi_warnings(doc)
    return Loaded(society, _sorted(refused + marks), refused)


def _bidi_warnings(doc: YamlDocument) -> tuple[list[Problem], list[Problem]]:
    """Warnings for bidi controls (a send refuses them) and for marks out of place."""
    controls: list[Problem] = []
    marks: list[Problem] = []
    for path, value in _strings(doc.data, ()):
        # Markdown turns &#x202E; into the character itself.
        found, stray = bidi_characters(html.unescape(value))
        if found:
            controls.append(
                Problem(
                    doc.file,
                    _line_of_char(doc, path, value, found[0]),
                    format_path(path),
                    f"contains {character_names(found)}, invisible and able to show the text "
                    "around it in another order (it can disguise what a subject or a link "
                    "says); remove it. `newsletter send` refuses it",
                )
            )
        if stray:
            marks.append(
                Problem(
                    doc.file,
                    _line_of_char(doc, path, value, stray[0]),
                    format_path(path),
                    f"contains {character_names(stray)}, an invisible character, in text with no "
                    "right-to-left letters, where it has no use but to move digits and "
                    "spaces around; remove it",
                )
            )
    return controls, marks


def placeholders(doc: YamlDocument) -> list[Problem]:
    """A problem for every text that still holds :data:`PLACEHOLDER`, at its own line."""
    out: list[Problem] = []
    for path, value in _strings(doc.data, ()):
        at = value.find(PLACEHOLDER)
        if at < 0:
            continue
        shown = value[at:].split("\n", 1)[0].strip()
        if len(shown) > 60:
            shown = shown[:57] + "..."
        if "image" in path:
            optional = ", or delete the whole `image:` (it is optional)"
        elif path[-1] in _OPTIONAL:
            optional = ", or delete the field (it is optional)"
        else:
            optional = ""
        out.append(
            Problem(
                doc.file,
                _line_in_value(doc, path, value, at),
                format_path(path),
                f"is still a placeholder ({shown!r}): write it in place of the "
                f"{PLACEHOLDER!r} text{optional}",
            )
        )
    return out


def _line_in_value(doc: YamlDocument, path: PathKey, value: str, offset: int) -> int | None:
    """The line of ``offset`` in the value at ``path``: exact in a literal block (``|``),
    where lines map one to one; else the value's first line."""
    loc = doc.locations.get(path)
    if loc is None:
        return doc.line_of(path)
    if loc.style == "|":
        return loc.value_line + 1 + value.count("\n", 0, offset)
    return loc.value_line


def _may_personalise(path: PathKey) -> bool:
    """The fields that may hold merge fields: subject, preheader, intro, article summaries."""
    return path in (("subject",), ("preheader",), ("intro",)) or (
        len(path) == 3 and path[0] == "articles" and path[2] == "summary"
    )


def _merge_fields(
    doc: YamlDocument, *, allowed: bool
) -> tuple[list[merge_fields.FieldUse], list[Problem]]:
    """The merge fields of a file with their places, and every problem with them."""
    uses: list[merge_fields.FieldUse] = []
    problems: list[Problem] = []
    for path, value in _strings(doc.data, ()):
        if "[[" not in value:
            continue
        where = format_path(path)
        for found in merge_fields.scan(value):
            line = _line_of_offset(doc, path, value, found.start)
            if not (allowed and _may_personalise(path)):
                if found.field is None or path[-1] in ("url", "src", "website"):
                    # "[[citation needed]]" in a title is text, not a field; a URL's
                    # own check refuses any "[[" in it.
                    continue
                shown = value[found.start : found.end]
                problems.append(
                    Problem(
                        doc.file,
                        line,
                        where,
                        f"has {shown!r}: merge fields are allowed only in "
                        f"{merge_fields.FIELDS_ALLOWED}"
                        + ("" if allowed else " of an issue, not in the society file"),
                    )
                )
            elif found.field is None:
                problems.append(Problem(doc.file, line, where, found.problem))
            else:
                uses.append(merge_fields.FieldUse(found.field, doc.file, line, where))
    return uses, problems


def _line_of_offset(doc: YamlDocument, path: PathKey, value: str, offset: int) -> int | None:
    """The line of the merge field (or stray ``[[``) at ``offset`` in the value at ``path``."""
    loc = doc.locations.get(path)
    if loc is None:
        return None
    if loc.style == "|":  # literal: lines map one to one
        return loc.value_line + 1 + value.count("\n", 0, offset)
    # Folded, quoted or plain: lines are joined, so find the field itself in the
    # file from the value's first line on, counting the same text before it.
    end = value.find("]]", offset)
    needle = value[offset : end + 2] if 0 <= end < offset + 200 else value[offset : offset + 2]
    needle = needle.split("\n", 1)[0]
    before = value.count(needle, 0, offset)
    try:
        lines = Path(doc.file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return loc.value_line
    for i in range(loc.value_line - 1, len(lines)):
        seen = lines[i].count(needle)
        if seen > before:
            return i + 1
        before -= seen
    return loc.value_line


def _strings(data: Any, path: PathKey) -> Iterable[tuple[PathKey, str]]:
    if isinstance(data, str):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(value, (*path, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, (*path, i))


def _line_of_char(doc: YamlDocument, path: PathKey, value: str, char: str) -> int | None:
    """The line the character is on: the value's first line, or the one after it that has it.

    Rare (only when there is something to report), so the file is read again
    rather than kept: folded and quoted scalars do not map lines one to one."""
    start = doc.line_of(path)
    if start is None:
        return None
    try:
        lines = Path(doc.file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return start
    # Written as itself, or as an HTML character reference (&#x202E; or &#8238;).
    forms = (char, f"&#x{ord(char):x};", f"&#{ord(char)};")
    return next(
        (
            i + 1
            for i in range(start - 1, len(lines))
            if any(form in lines[i].lower() for form in forms)
        ),
        start,
    )


def _name_and_date(doc: YamlDocument, path: Path) -> list[Problem]:
    day = named_day(path)
    raw = doc.data.get("date") if isinstance(doc.data, dict) else None
    if day is None or not isinstance(raw, str):
        return []
    try:
        date = dt.date.fromisoformat(raw.strip())
    except ValueError:
        return []  # reported as a bad date by validation
    if date == day:
        return []
    return [
        Problem(
            doc.file,
            doc.line_of(("date",)),
            "date",
            f"is {date}, but the file is named for {day}; an issue file named after a day "
            f"must be dated that day: write `date: {day}` (or, if the issue is for {date}, "
            f"rename the file to {date}{path.suffix})",
        )
    ]


def _check(doc: YamlDocument, model: type[M]) -> tuple[M | None, list[Problem]]:
    """The validated model (None if invalid) and every problem found."""
    problems = list(doc.problems)
    if doc.data is None:
        if not problems:  # an empty file, or one holding only `---` or `~`
            problems.append(
                Problem(doc.file, 1, "", "the file holds nothing; write its `key: value` fields")
            )
        return None, problems
    if not isinstance(doc.data, dict):
        problems.append(
            Problem(doc.file, 1, "", "must be a set of `key: value` fields at the top level")
        )
        return None, problems
    try:
        value = model.model_validate(doc.data)
    except ValidationError as exc:
        problems.extend(_translate(exc, doc, model))
        return None, problems
    return (None if problems else value), problems


def _translate(exc: ValidationError, doc: YamlDocument, model: type[BaseModel]) -> list[Problem]:
    out: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc: PathKey = tuple(err["loc"])
        kind = err["type"]
        is_key = kind == "extra_forbidden"
        line = doc.line_of(loc, key=is_key)
        message = _message(err, model, loc)
        if loc == ("id",) and ("id",) not in doc.locations:
            message = (
                f"the file name gives the id {err['input']!r}, which {message}; "
                "rename the file or add an `id:` field"
            )
        out.append(Problem(doc.file, line, format_path(loc), message))
    return out


def _message(err: Any, model: type[BaseModel], loc: PathKey) -> str:
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        known = _field_names(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else f"; known fields: {', '.join(known)}"
        return "is not a known field" + hint
    if kind == "string_type":
        return "must be text; put the value in quotes"
    if kind in ("string_too_long", "too_long") and isinstance(err["input"], str):
        return f"is {len(err['input'])} characters; the limit is {ctx.get('max_length')}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"needs at least {n} {'entry' if n == 1 else 'entries'}"
    if kind == "too_long":
        return f"has more than the {ctx.get('max_length')} entries allowed"
    if kind in ("greater_than_equal", "greater_than"):
        return f"must be at least {ctx.get('ge', ctx.get('gt'))}"
    if kind in ("less_than_equal", "less_than"):
        return f"must be at most {ctx.get('le', ctx.get('lt'))}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind.startswith("date_"):
        return "must be a date written as YYYY-MM-DD, for example 2020-12-23"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a set of `key: value` fields"
    if kind == "list_type":
        return "must be a list (each entry on its own line starting with `- `)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


def _field_names(model: type[BaseModel], loc: PathKey) -> list[str]:
    """Names of the fields of the model found at ``loc`` inside ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(part)
        if info is None:
            return []
        current = _inner_model(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    """Unwrap ``X | None`` and ``list[X]`` down to X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _inner_model(arg)
    return annotation


def _issue_markdown_paths(data: Any) -> list[PathKey]:
    paths: list[PathKey] = [("intro",)]
    if isinstance(data, dict) and isinstance(data.get("articles"), list):
        paths += [("articles", i, "summary") for i in range(len(data["articles"]))]
    return paths


def _lint_markdown(doc: YamlDocument, paths: Iterable[PathKey]) -> list[Problem]:
    out: list[Problem] = []
    for path in paths:
        value = _get(doc.data, path)
        if not isinstance(value, str):
            continue
        loc = doc.locations.get(path)
        lines = value.split("\n")
        for issue in markdown.lint(value):
            line = None
            if loc is not None:
                line = loc.value_line
                if loc.style == "|":  # literal: lines map one to one
                    at = issue.line
                    if issue.needle:
                        at = next(
                            (i for i in range(issue.line, len(lines)) if issue.needle in lines[i]),
                            issue.line,
                        )
                    line += 1 + at
            out.append(Problem(doc.file, line, format_path(path), issue.message))
    return out


def _get(data: Any, path: PathKey) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _issue_warnings(issue: Issue, doc: YamlDocument) -> list[Problem]:
    warn: list[Problem] = []
    if len(issue.subject) > SUBJECT_WARN:
        warn.append(
            Problem(
                doc.file,
                doc.line_of(("subject",)),
                "subject",
                f"is {len(issue.subject)} characters; phones show about {SUBJECT_WARN} at most",
            )
        )
    if issue.preheader is None:
        warn.append(
            Problem(
                doc.file,
                None,
                "preheader",
                "is not set; inboxes will preview the first words of the email instead",
            )
        )
    elif len(issue.preheader) > PREHEADER_WARN:
        warn.append(
            Problem(
                doc.file,
                doc.line_of(("preheader",)),
                "preheader",
                f"is {len(issue.preheader)} characters; inboxes show about {PREHEADER_WARN}",
            )
        )
    return warn


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line or 0))
