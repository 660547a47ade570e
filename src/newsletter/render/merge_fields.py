"""Merge fields: the reader's own values in an issue, written ``[[first_name|friend]]``.

Stage: between loading and templating, and again per recipient when composing.
Input: editor text from the fields that may hold merge fields (``subject``,
``preheader``, ``intro``, article ``summary``), later one recipient. Output:
syntax problems (for the loader, which adds file and line); the text with each
merge field replaced by a slot (a number between two private-use characters,
U+E000 and U+E001), which Markdown, Jinja's filters, MJML and the inliner all
pass through untouched (brackets or letters would not survive: ``[x](url)``
is a link, ``| title`` changes case), with the table of what each
slot stands for; and per recipient the clean value of each slot, which the
composer escapes for the place it goes (HTML, text, Subject header).

A value is cleaned before use: line breaks and tabs become spaces, every other
control character and the bidi embeddings and overrides are removed, and it is
cut to :data:`VALUE_MAX` characters, so a name can neither add a header line
nor push the HTML past Gmail's clipping point.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from newsletter.models import BIDI_CONTROLS, Recipient
from newsletter.render import placeholders

# A letter, then letters, digits or '_'; any script, lower case (see valid_name).
NAME = re.compile(r"[^\W\d_]\w{0,63}")
BUILT_IN = ("first_name", "last_name", "email")
VALUE_MAX = 100  # characters of one value; a longer one is cut
FALLBACK_MAX = 100
FIELDS_ALLOWED = "subject, preheader, intro and article summaries"
SYNTAX = "[[first_name]], or [[first_name|friend]] with the text used when there is no value"

_OPEN = "[["
_CLOSE = "]]"
SLOT, SLOT_OPEN, SLOT_CLOSE = placeholders.SLOT, placeholders.SLOT_OPEN, placeholders.SLOT_CLOSE


@dataclass(frozen=True, slots=True)
class MergeField:
    """One field and the text used when a recipient has no value for it ("" for none)."""

    name: str
    fallback: str = ""

    def __str__(self) -> str:
        return f"[[{self.name}|{self.fallback}]]" if self.fallback else f"[[{self.name}]]"


@dataclass(frozen=True, slots=True)
class FieldUse:
    """Where a merge field is used: the issue file's line and field, or a template."""

    field: MergeField
    file: str
    line: int | None
    path: str  # the field, such as ``articles[2].summary``, or "" in a template


@dataclass(frozen=True, slots=True)
class Found:
    """A merge field in a text, or a syntax problem at ``start`` (then ``field`` is None)."""

    start: int
    end: int
    field: MergeField | None
    problem: str = ""


def scan(text: str) -> list[Found]:
    """Every merge field and every malformed ``[[...]]`` in ``text``, in order."""
    out: list[Found] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) >= 0:
        while text.startswith("[", start + 2):
            start += 1  # "[[[x]]...": the first bracket is the text's (a link's text)
        # A template placeholder ([[UNSUBSCRIBE_URL]]): editor text that holds
        # one is refused by the models.
        upper = placeholders.LEFTOVER.match(text, start)
        if upper:
            pos = upper.end()
            continue
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        end = text.find(_CLOSE, start + 2, line_end)
        if end < 0:
            out.append(
                Found(
                    start,
                    line_end,
                    None,
                    f"has '[[' with no ']]' after it on the same line; a merge field is "
                    f"written {SYNTAX}",
                )
            )
            pos = start + 2
            continue
        end += 2
        out.append(_parse(text, start, end))
        pos = end
    return out


def _parse(text: str, start: int, end: int) -> Found:
    inner = text[start + 2 : end - 2]
    name, bar, fallback = inner.partition("|")
    name, fallback = name.strip(), fallback.strip()
    shown = text[start:end]
    if not name:
        return Found(start, end, None, f"{shown!r} names no field; write {SYNTAX}")
    if not valid_name(name):
        hint = key(name)
        suggestion = f" (did you mean [[{hint}]]?)" if valid_name(hint) else ""
        return Found(
            start,
            end,
            None,
            f"{shown!r}: a field name is lower-case letters, digits and '_', starting with "
            f"a letter{suggestion}",
        )
    if _OPEN in fallback:
        return Found(start, end, None, f"{shown!r}: a merge field cannot hold another one")
    if len(fallback) > FALLBACK_MAX:
        return Found(
            start,
            end,
            None,
            f"the fallback of [[{name}|...]] is {len(fallback)} characters; at most {FALLBACK_MAX}",
        )
    if bar and not fallback:
        return Found(
            start,
            end,
            None,
            f"{shown!r} has '|' but no fallback text after it; write [[{name}]] for none",
        )
    return Found(start, end, MergeField(name, fallback))


def valid_name(name: str) -> bool:
    """Whether ``name`` can be written as a field: ``first_name``, ``straße``, ``town2``."""
    return bool(NAME.fullmatch(name)) and name == name.lower()


@functools.lru_cache(maxsize=1024)
def key(column: str) -> str:
    """The merge-field name of a list's column: ``Member since`` is ``member_since``,
    ``Über-Gruppe`` is ``über_gruppe``."""
    return re.sub(r"[\W_]+", "_", column.strip().lower()).strip("_")


def column_notes(columns: Iterable[str]) -> list[str]:
    """What an import should say about its columns as merge fields: a column whose
    name cannot be written as one, and columns that would share one."""
    notes: list[str] = []
    seen: dict[str, str] = {}
    for column in columns:
        name = key(column)
        if name in BUILT_IN:
            # "First.Name" is not read as the first name (the import knows the usual
            # spellings), and [[first_name]] is the name column, never this one.
            notes.append(
                f"the column {column!r} is kept as an extra column, not as the {name} "
                f"that [[{name}]] shows; name it {name} if it holds that"
            )
            continue
        if not valid_name(name):
            shown = f"[[{name}]] does not start with a letter" if name else "it has no letters"
            notes.append(
                f"the column {column!r} cannot be used as a merge field ({shown}); rename "
                "it if an issue is to use it"
            )
        elif name in seen:
            notes.append(
                f"the columns {seen[name]!r} and {column!r} are both the merge field "
                f"[[{name}]]; an issue cannot tell them apart: rename one"
            )
        else:
            seen[name] = column
    return notes


class Slots:
    """The slots of one issue: each distinct merge field gets one, in order of first use."""

    def __init__(self) -> None:
        self._slots: dict[MergeField, str] = {}

    def slot(self, merge_field: MergeField) -> str:
        found = self._slots.get(merge_field)
        if found is None:
            found = self._slots[merge_field] = f"{SLOT_OPEN}{len(self._slots) + 1}{SLOT_CLOSE}"
        return found

    def substitute(self, text: str) -> str:
        """``text`` with each (well-formed) merge field replaced by its slot."""
        found = [f for f in scan(text) if f.field is not None]
        if not found:
            return text
        out: list[str] = []
        pos = 0
        for f in found:
            assert f.field is not None
            out += [text[pos : f.start], self.slot(f.field)]
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    def table(self) -> tuple[tuple[str, MergeField], ...]:
        return tuple((slot, f) for f, slot in self._slots.items())


# Spaces and the invisible characters a spreadsheet leaves at a cell's ends (a
# byte-order mark, a zero-width space, a word joiner, a soft hyphen): a value of
# nothing else is no value, and its fallback is used.
_INVISIBLE = "\ufeff\u200b\u2060\u00ad"
# Removed wherever they are: the bidi embeddings and overrides (they reorder the
# text around them), and the characters of a merge field's slot.
_DROP = BIDI_CONTROLS | {SLOT_OPEN, SLOT_CLOSE}
_EDGES = re.compile(f"^[\\s{_INVISIBLE}]+|[\\s{_INVISIBLE}]+$")


def clean(value: str) -> str:
    """A value safe for every place it goes: one line, no control characters, capped."""
    value = value[: VALUE_MAX * 4]  # cleaning never needs more; a 10 KB value costs no more
    if value.isascii() and value.isprintable():
        out = value  # almost every name: nothing to do
    else:
        chars: list[str] = []
        for ch in value:
            if ch in "\r\n\t\v\f\x85\u2028\u2029":
                chars.append(" ")
            elif ch in _DROP or unicodedata.category(ch) in ("Cc", "Cs"):
                continue
            else:
                chars.append(ch)
        out = re.sub(r" {2,}", " ", "".join(chars))
    out = _EDGES.sub("", out)
    if len(out) > VALUE_MAX:
        out = out[:VALUE_MAX].rstrip()
    return out


def raw_value(recipient: Recipient, name: str) -> str:
    """The recipient's own value for the field ``name`` ("" when they have none)."""
    if name == "first_name":
        return recipient.first_name
    if name == "last_name":
        return recipient.last_name
    if name == "email":
        return recipient.email
    attributes = recipient.attributes
    if not attributes:
        return ""
    value = attributes.get(name)
    if value is None:
        value = next((v for k, v in attributes.items() if key(k) == name), None)
    return value or ""


def values(
    table: Iterable[tuple[str, MergeField]],
    recipient: Recipient,
    columns: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Slot → the text it becomes for ``recipient`` (unescaped; the composer escapes).

    ``columns`` maps a field to the list's own column (a person imported into two
    lists may carry both ``member since`` and ``member-since``)."""
    out: dict[str, str] = {}
    for slot, merge_field in table:
        column = columns.get(merge_field.name) if columns else None
        if column is not None:
            value = recipient.attributes.get(column) or raw_value(recipient, merge_field.name)
        else:
            value = raw_value(recipient, merge_field.name)
        # An address is checked on import and may be long; never cut it.
        value = value if merge_field.name == "email" else clean(value)
        out[slot] = value or merge_field.fallback
    return out


def general(table: Iterable[tuple[str, MergeField]]) -> dict[str, str]:
    """Slot → what everyone sees where nobody in particular reads (the web archive)."""
    return {slot: f.fallback for slot, f in table}


def fill_general(text: str) -> str:
    """Editor text with each merge field replaced by its fallback (the archive's subject)."""
    slots = Slots()
    substituted = slots.substitute(text)
    return placeholders.fill(substituted, general(slots.table()), is_html=False).strip()


def known_fields(columns: Iterable[str]) -> list[str]:
    """The merge-field names a list offers: the built-in ones and one per column whose
    name can be written as a field."""
    return list(dict.fromkeys([*BUILT_IN, *(k for c in columns if valid_name(k := key(c)))]))


def column_for(name: str, columns: Iterable[str]) -> str | None:
    """The stored column behind the field ``name`` (None for the built-in ones)."""
    if name in BUILT_IN:
        return None
    return next((c for c in columns if key(c) == name), None)
