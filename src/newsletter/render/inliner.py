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

Every attribute of the result is written ``name="value"``, with ``"``, ``<``
and ``>`` inside a value as ``&quot;``, ``&lt;`` and ``&gt;``, whatever the
value: lxml's serialiser switches to single quotes when a value holds ``"``
(an alt text quoting someone), writes a value holding ``<!-- -->`` unescaped,
and leaves the markup MJML wrote inside Outlook's conditional comments as it
was. :func:`double_quote_attributes` makes that one rule hold everywhere.
"""

from __future__ import annotations

import logging
import re

DOCTYPE = "<!doctype html>"
_STYLE_TAG = re.compile(r"<style\b")
_IGNORE = ' data-premailer="ignore"'
_COMMENT_IN_TEXT = "&lt;!--"

# The final pass reads the document as a run of what is fine (text, comment
# delimiters, style and script elements, start tags whose every attribute is
# name="value" with no quote, < or > inside) up to the next start tag that is
# not. Every repetition is possessive and the match is anchored where the last
# one ended, so the whole document is read once, in the regex engine, and
# Python only sees the rare tag to rewrite. Comments are read through, not
# over: Outlook renders the markup in <!--[if mso]> ... <![endif]-->. Values
# can hold a raw "<" or ">": lxml writes one that contains "<!-- ... -->" as
# it is (server-side includes), so a tag is never looked for inside a value.
_NAME = r"""[^\s"'=<>/`]++"""
_GOOD_ATTRS = rf"""(?:\s++{_NAME}\s*+=\s*+"[^"<>]*+")*+"""
_BAD_TAG = (
    rf"""<(?P<tag>[a-zA-Z][^\s/>"']*+){_GOOD_ATTRS}(?!\s*+/?>)"""
    r"""(?:[^>"']++|"[^"]*+"|'[^']*+')*+>"""
)
# (No capturing group inside the possessive loop: CPython 3.11's re loses track
# of its span there.)
_UP_TO_BAD_TAG = re.compile(
    r"(?:[^<]++"
    r"|<(?![a-zA-Z])"
    rf"""|<(?i:style)\b{_GOOD_ATTRS}\s*+>.*?</(?i:style)\s*+>"""
    rf"""|<(?i:script)\b{_GOOD_ATTRS}\s*+>.*?</(?i:script)\s*+>"""
    rf"""|<[a-zA-Z][^\s/>"']*+{_GOOD_ATTRS}\s*+/?>"""
    rf"|(?!{_BAD_TAG.replace('(?P<tag>', '(?:')})<"  # not a tag at all: text
    rf")*+{_BAD_TAG}",
    re.S,
)
_ATTRIBUTE = re.compile(rf"""({_NAME})(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")
_IN_VALUE = str.maketrans({'"': "&quot;", "<": "&lt;", ">": "&gt;"})


def inline_css(html: str, css: str) -> str:
    from premailer import Premailer  # imports lxml and cssutils: slow, so only here

    # lxml writes an attribute value that holds "<!-- ... -->" as it is, "&"
    # included (for server-side includes): "&amp;" typed in an alt text would
    # reach readers as "&". Such a value comes from text, escaped as "&lt;!--":
    # the sequence is broken with a mark the document does not hold while lxml
    # has it, and mended after.
    mark = ""
    if _COMMENT_IN_TEXT in html:
        mark = "Zq"
        while mark in html:
            mark += "q"
        html = html.replace(_COMMENT_IN_TEXT, f"&lt;!-{mark}-")
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
    if mark:
        inlined = inlined.replace(f"&lt;!-{mark}-", _COMMENT_IN_TEXT)
    if not inlined.lstrip().lower().startswith("<!doctype"):
        inlined = DOCTYPE + "\n" + inlined
    return double_quote_attributes(inlined)


def double_quote_attributes(html: str) -> str:
    """``html`` with every attribute written ``name="value"``, with no ``"``, ``<``
    or ``>`` inside a value.

    A single-quoted value gets double quotes (its ``"`` written ``&quot;``), an
    unquoted one gets quotes, a bare name (``nowrap``) an empty value, and a
    raw ``<`` or ``>`` in a value is escaped. Text, and the text of style and
    script elements, is left alone."""
    out: list[str] = []
    pos = 0
    while (match := _UP_TO_BAD_TAG.match(html, pos)) is not None:
        out += (html[pos : match.start("tag") - 1], _requote(match))  # fine up to its "<"
        pos = match.end()
    if not out:
        return html
    out.append(html[pos:])
    return "".join(out)


def _requote(match: re.Match[str]) -> str:
    tag = match.group("tag")
    start = match.end("tag")
    end = match.end() - (2 if _tag_end(match) == "/>" else 1)
    attrs = []
    for attr in _ATTRIBUTE.finditer(match.string, start, end):
        double, single, bare = attr.group(2, 3, 4)
        value = double if double is not None else single if single is not None else bare
        attrs.append(f' {attr.group(1)}="{(value or "").translate(_IN_VALUE)}"')
    return f"<{tag}{''.join(attrs)}{_tag_end(match)}"


def _tag_end(match: re.Match[str]) -> str:
    return "/>" if match.string.endswith("/>", 0, match.end()) else ">"
