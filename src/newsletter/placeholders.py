"""Personalisation stage: fill the per-recipient placeholders of a rendered issue.

Input: text or HTML rendered once per issue, holding placeholders from the
closed set below, and the values for one recipient. Output: the text for that
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


def fill(text: str, values: Mapping[str, str], *, is_html: bool) -> str:
    """Replace every placeholder of the closed set; unknown names are left for checks to catch."""
    for name in ALL:
        if name in text:
            value = values[name]
            text = text.replace(name, html.escape(value, quote=True) if is_html else value)
    return text


def leftovers(text: str) -> list[str]:
    """Placeholders still present, such as a misspelt ``[[UNSUBSCRIBE_ULR]]``."""
    return sorted(set(LEFTOVER.findall(text)))
