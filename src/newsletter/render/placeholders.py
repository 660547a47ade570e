"""Personalisation stage: fill the per-recipient placeholders of a rendered issue.

Input: text or HTML rendered once per issue, holding placeholders from the
closed set below (and the merge-field slots of :mod:`newsletter.render.merge_fields`),
and the values for one recipient. Output: the text for that
recipient. The placeholders are not Jinja syntax, so the template engine,
MJML and the inliner pass them through untouched; values are HTML-escaped
before they go into HTML.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

UNSUBSCRIBE_URL = "[[UNSUBSCRIBE_URL]]"
PREFERENCES_URL = "[[PREFERENCES_URL]]"
EMAIL = "[[EMAIL]]"

ALL = (UNSUBSCRIBE_URL, PREFERENCES_URL, EMAIL)
LEFTOVER = re.compile(r"\[\[[A-Z][A-Z0-9_]*\]\]")
# A merge field's slot (newsletter.render.merge_fields): a number between two
# private-use characters, which nothing between the template and the message
# changes; editor text may not hold them (models).
SLOT_OPEN, SLOT_CLOSE = "\ue000", "\ue001"
SLOT = re.compile(SLOT_OPEN + "[1-9][0-9]*" + SLOT_CLOSE)
_ANY = re.compile(LEFTOVER.pattern + "|" + SLOT.pattern)


def fill(text: str, values: Mapping[str, str], *, is_html: bool) -> str:
    """Replace every placeholder ``values`` has a value for (the closed set and the issue's
    merge-field slots); unknown names are left for checks to catch."""

    # One pass: a value that looks like a placeholder ("[[EMAIL]]" as someone's
    # name) is text, never filled in turn.
    def value(match: re.Match[str]) -> str:
        found = values.get(match.group(0))
        if found is None:
            return match.group(0)
        return html.escape(found, quote=True) if is_html else found

    return _ANY.sub(value, text)


def leftovers(text: str) -> list[str]:
    """Placeholders still present, such as a misspelt ``[[UNSUBSCRIBE_ULR]]``, and what is
    left of a merge field's slot that a template changed (a filter or a slice applied to
    ``merge_field()``), shown as ``merge_field(...)``."""
    found = set(LEFTOVER.findall(text))
    if SLOT_OPEN in text or SLOT_CLOSE in text:
        found.add("merge_field(...) changed by a filter or a slice")
    return sorted(found)
