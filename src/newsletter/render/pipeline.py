"""Render pipeline: a loaded issue → :class:`RenderedIssue`, rendered once.

Input: the issue, the society, the templates and the public URL. Output:
:func:`render_issue` runs template, MJML and inline in order and returns the
HTML and text with per-recipient placeholders left in; :func:`web_version`
renders the same issue for the archive: no "view in browser" line, no personal
links. The whole build (load, render, check, compose the preview message) is
:mod:`newsletter.build`, which also uses the delivery stage's composer.
"""

from __future__ import annotations

import datetime as dt

from newsletter.errors import TemplateError
from newsletter.models import Issue, Links, RenderedIssue, Society
from newsletter.render import merge_fields, placeholders
from newsletter.render.inliner import inline_css
from newsletter.render.mjml_compile import compile_mjml
from newsletter.render.templating import (
    HTML_TEMPLATE,
    Templates,
    context,
    render,
)

INLINE_CSS = "inline.css"


def preview_date(issue: Issue) -> dt.datetime:
    """The Date of the preview message: the issue's day at 09:00 UTC, so builds repeat exactly."""
    return dt.datetime.combine(issue.date, dt.time(9, 0), tzinfo=dt.UTC)


def issue_links(issue: Issue, society: Society, public_url: str) -> Links:
    return Links(view_in_browser=f"{public_url}/issues/{issue.id}", website=society.website)


def with_slots(issue: Issue, slots: merge_fields.Slots) -> Issue:
    """The issue with each merge field in its text replaced by its slot (not validated
    again: a slot is not something an editor may write)."""
    return issue.model_copy(
        update={
            "subject": slots.substitute(issue.subject),
            "preheader": None if issue.preheader is None else slots.substitute(issue.preheader),
            "intro": None if issue.intro is None else slots.substitute(issue.intro),
            "articles": [
                a.model_copy(update={"summary": slots.substitute(a.summary)})
                for a in issue.articles
            ],
        }
    )


def render_issue(
    issue: Issue, society: Society, templates: Templates, public_url: str
) -> RenderedIssue:
    """Run the once-per-issue stages: Jinja → MJML → inlined HTML, and the text part."""
    slots = merge_fields.Slots()
    personal = with_slots(issue, slots)
    ctx = context(personal, society, issue_links(issue, society, public_url), slots)
    mjml_source, text = render(templates, ctx)
    return RenderedIssue(
        issue_id=issue.id,
        subject=personal.subject,
        preheader=personal.preheader,
        language=society.language,
        html=_compile(templates, mjml_source),
        text=text,
        # For reading (issue.mjml): each slot shown as the editor wrote its field.
        mjml=placeholders.fill(
            mjml_source, {slot: str(f) for slot, f in slots.table()}, is_html=False
        ),
        merge_fields=slots.table(),
    )


def web_version(issue: Issue, society: Society, templates: Templates, public_url: str) -> str:
    """The issue as the archive shows it: the email's HTML without the "view this email in
    your browser" line (this is the browser view), every personal link made general."""
    # An empty view_in_browser link tells the template to leave that line out.
    slots = merge_fields.Slots()
    ctx = context(
        with_slots(issue, slots), society, Links(view_in_browser="", website=society.website), slots
    )
    mjml_source, _ = render(templates, ctx)
    general = {
        placeholders.UNSUBSCRIBE_URL: f"{public_url}/unsubscribe",
        placeholders.PREFERENCES_URL: f"{public_url}/preferences",
        placeholders.EMAIL: "each subscriber",
        # Nobody in particular reads the archive: each merge field shows its fallback.
        **merge_fields.general(slots.table()),
    }
    return placeholders.fill(_compile(templates, mjml_source), general, is_html=True)


def _compile(templates: Templates, mjml_source: str) -> str:
    compiled = compile_mjml(mjml_source, template=str(templates.folder / HTML_TEMPLATE))
    css_file = templates.folder / INLINE_CSS
    try:
        css = css_file.read_text(encoding="utf-8") if css_file.is_file() else ""
    except UnicodeDecodeError:
        raise TemplateError(f"{css_file} is not UTF-8 text; save it as UTF-8") from None
    return inline_css(compiled, css)
