"""Compile stage: MJML source → responsive HTML, with the Rust MRML engine.

Input: the MJML produced by the templating stage. Output: the HTML document,
still with its ``<style>`` blocks (the inliner comes next). Fonts are switched
off so that MJML never adds Google Fonts links: every open of the email would
otherwise call a third party, which a health charity must not do to readers.
"""

from __future__ import annotations

from newsletter.errors import TemplateError


def compile_mjml(source: str, *, template: str) -> str:
    import mjml  # heavy-ish native module: imported only when building

    try:
        html: str = mjml.mjml2html(source, disable_comments=True, fonts={})
    except ValueError as exc:
        # MRML's messages carry no position; name the template and the usual cause.
        raise TemplateError(
            f"{template}: MJML could not compile the rendered template ({exc}); "
            "look for an mj- tag that is not closed, or closed twice"
        ) from None
    return html
