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
"""

from __future__ import annotations

import logging
import re

DOCTYPE = "<!doctype html>"
_STYLE_TAG = re.compile(r"<style\b")
_IGNORE = ' data-premailer="ignore"'


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
    return inlined
