"""Inlining stage: HTML with a stylesheet → HTML with styles in ``style`` attributes.

Input: the compiled HTML and the template's CSS that must be inlined. Output:
the same document with that CSS moved onto elements (Gmail's apps ignore most
``<style>`` rules), MJML's own ``<style>`` blocks kept as they are (their
``@media`` rules, ``!important`` included, are what make the layout
responsive), and the doctype restored (premailer drops it). No network: the
inliner must never fetch a stylesheet.
"""

from __future__ import annotations

import logging

DOCTYPE = "<!doctype html>"


def inline_css(html: str, css: str) -> str:
    from premailer import Premailer  # imports lxml and cssutils: slow, so only here

    inlined: str = Premailer(
        html,
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
    if not inlined.lstrip().lower().startswith("<!doctype"):
        inlined = DOCTYPE + "\n" + inlined
    return inlined
