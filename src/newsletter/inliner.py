"""Inlining stage: HTML with a stylesheet → HTML with styles in ``style`` attributes.

Input: the compiled HTML and the template's CSS that must be inlined. Output:
the same document with that CSS moved onto elements (Gmail's apps ignore most
``<style>`` rules), and the doctype restored (premailer drops it). No network:
the inliner must never fetch a stylesheet.

The ``<style>`` blocks already in the document (MJML's resets, its ``@media``
column widths with their ``!important``, the template's ``mj-style``) are
kept exactly as they are and not inlined: MJML already writes every style its
layout needs inline, and the head rules only refine it where ``<style>`` is
supported. Inlining them too repeated ``border-collapse`` and friends on
every cell: 17 KB more on a ten-article issue (nearer Gmail's clipping) and
twice the inlining time.

Every attribute of the result is written ``name="value"``, with ``"`` inside
a value as ``&quot;``, whatever the value: lxml's serialiser switches to
single quotes when a value holds ``"`` (an alt text quoting someone), and
leaves the markup MJML wrote inside Outlook's conditional comments as it
was. :func:`double_quote_attributes` makes that one rule hold everywhere.
"""

from __future__ import annotations

import logging
import re

DOCTYPE = "<!doctype html>"
_STYLE_TAG = re.compile(r"<style\b")
_IGNORE = ' data-premailer="ignore"'

# A start tag with an attribute that is not written name="value", or a style
# or script element, whose text is not markup and is passed over whole. The
# well-written attributes are matched possessively, so a tag that is fine
# fails at once and the scan costs about as much as a search for "<". It runs
# inside comments too: Outlook reads the markup in <!--[if mso]> ... <![endif]-->.
# A raw "<" appears nowhere else, since the serialiser escapes it in text and
# in attribute values.
_NAME = r"""[^\s"'=<>/`]++"""
_NEEDS_QUOTES = re.compile(
    r"<(?:(?P<raw>style|script)\b[^>]*+>.*?</(?P=raw)\s*+>"
    rf"""|(?P<tag>[a-zA-Z][^\s/>]*+)(?:\s++{_NAME}\s*+=\s*+"[^"]*+")*+(?!\s*+/?>)"""
    r"""(?P<attrs>(?:[^>"']++|"[^"]*+"|'[^']*+')*+)>)""",
    re.S | re.I,
)
_ATTRIBUTE = re.compile(rf"""({_NAME})(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")


def inline_css(html: str, css: str) -> str:
    from premailer import Premailer  # imports lxml and cssutils: slow, so only here

    inlined: str = Premailer(
        _STYLE_TAG.sub("<style" + _IGNORE, html),
        css_text=css,
        keep_style_tags=True,
        strip_important=False,
        allow_network=False,
        disable_validation=True,
        disable_leftover_css=True,
        remove_unset_properties=True,
        # True runs a validating cssutils parse of every <img> style (about 5 ms
        # each) to copy CSS floats to align=; the templates never float images.
        align_floating_images=False,
        cssutils_logging_level=logging.CRITICAL,
    ).transform()
    inlined = inlined.replace(_IGNORE, "")
    if not inlined.lstrip().lower().startswith("<!doctype"):
        inlined = DOCTYPE + "\n" + inlined
    return double_quote_attributes(inlined)


def double_quote_attributes(html: str) -> str:
    """``html`` with every attribute written ``name="value"`` and no ``"`` inside a value.

    A single-quoted value gets double quotes (its ``"`` written ``&quot;``), an
    unquoted one gets quotes, a bare name (``nowrap``) an empty value. Style
    and script text is left alone."""
    return _NEEDS_QUOTES.sub(_requote, html)


def _requote(match: re.Match[str]) -> str:
    tag = match.group("tag")
    if tag is None:
        return _requote_start(match.group(0))  # a style or script element
    attrs = []
    for attr in _ATTRIBUTE.finditer(match.group(0), match.start("tag") - match.start() + len(tag)):
        double, single, bare = attr.group(2, 3, 4)
        value = double if double is not None else (single or bare or "").replace('"', "&quot;")
        attrs.append(f' {attr.group(1)}="{value}"')
    end = "/>" if match.group(0).endswith("/>") else ">"
    return f"<{tag}{''.join(attrs)}{end}"


def _requote_start(element: str) -> str:
    # Only the start tag of a style or script element is markup.
    start_end = element.index(">") + 1
    start = _NEEDS_QUOTES.sub(_requote, element[:start_end])
    return start + element[start_end:]
