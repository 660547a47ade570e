"""Build pipeline: issue file → rendered issue → files for one sample message.

Input: the paths and values in :class:`BuildInputs`. Output: a
:class:`BuildResult` with everything that goes into ``build/<id>/`` held in
memory, and the checks' verdict. It runs the stages in order (load, template,
MJML, inline, check, compose) and writes nothing: writing is
:mod:`newsletter.render.output`'s job, and happens only once every stage passed.
An id that another file in the issue's folder also claims fails the build
(:mod:`newsletter.render.issue_ids`). :func:`web_version` renders the same issue for
the archive: no "view in browser" line, no personal links.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from newsletter.delivery.message import MessageTemplate, Sender, recipient_values
from newsletter.errors import BuildCheckFailed, TemplateError, ValidationFailed
from newsletter.models import Issue, Links, Recipient, RenderedIssue, Society
from newsletter.render import issue_ids, merge_fields, placeholders
from newsletter.render.checks import CheckReport, Sources, check_message
from newsletter.render.inliner import inline_css
from newsletter.render.loading import Loaded, load_issue, load_society
from newsletter.render.mjml_compile import compile_mjml
from newsletter.render.templating import (
    HTML_TEMPLATE,
    Templates,
    context,
    load_templates,
    merge_field_place,
    render,
)

INLINE_CSS = "inline.css"


@dataclass(frozen=True, slots=True)
class BuildInputs:
    issue_file: Path
    society_file: Path
    templates_dir: Path
    sender: Sender
    preview_recipient: Recipient
    strict: bool = False


@dataclass(frozen=True, slots=True)
class BuildResult:
    rendered: RenderedIssue
    html: str  # the preview recipient's HTML (placeholders filled)
    text: str
    eml: bytes
    report: CheckReport
    issue: Issue
    society: Society
    # Every merge field the issue file and the templates use, with its place.
    merge_uses: tuple[merge_fields.FieldUse, ...] = ()

    @property
    def issue_id(self) -> str:
        return self.rendered.issue_id


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


def _load_both(inputs: BuildInputs) -> tuple[Loaded[Society], Loaded[Issue]]:
    """Load the society and the issue, reporting the problems of both files at once
    (and an id that another issue file in the same folder claims too)."""
    problems = []
    try:
        society = load_society(inputs.society_file)
    except ValidationFailed as exc:
        problems += exc.problems
    try:
        issue = load_issue(inputs.issue_file)
    except ValidationFailed as exc:
        problems += exc.problems
    if inputs.issue_file.is_file():
        problems += issue_ids.clashes(inputs.issue_file)
    if problems:
        raise ValidationFailed(problems)
    return society, issue


def build(inputs: BuildInputs, *, templates: Templates | None = None) -> BuildResult:
    """Everything up to, not including, writing files. Raises on invalid input or failed checks."""
    loaded_society, loaded_issue = _load_both(inputs)
    issue, society = loaded_issue.value, loaded_society.value
    templates = templates or load_templates(inputs.templates_dir)
    rendered = render_issue(issue, society, templates, inputs.sender.public_url)

    values = recipient_values(
        inputs.sender, inputs.preview_recipient, date=preview_date(issue), rendered=rendered
    )
    html = placeholders.fill(rendered.html, values, is_html=True)
    text = placeholders.fill(rendered.text, values, is_html=False)
    report = check_message(
        html,
        text,
        unsubscribe_url=values[placeholders.UNSUBSCRIBE_URL],
        sources=Sources(inputs.issue_file, inputs.society_file, templates.folder),
    )
    report.warnings[:0] = [str(w) for w in loaded_society.warnings + loaded_issue.warnings]
    report.refused_by_send = [
        str(w) for w in loaded_society.refused_by_send + loaded_issue.refused_by_send
    ]
    if report.failures or (inputs.strict and report.warnings):
        extra = [f"(--strict) {w}" for w in report.warnings] if inputs.strict else []
        raise BuildCheckFailed(report.failures + extra)

    eml = MessageTemplate(rendered, inputs.sender).personalise(
        inputs.preview_recipient, date=preview_date(issue)
    )
    return BuildResult(
        rendered=rendered,
        html=html,
        text=text,
        eml=eml,
        report=report,
        issue=issue,
        society=society,
        merge_uses=tuple(loaded_issue.merge_fields)
        + _template_uses(rendered, loaded_issue, templates),
    )


def _template_uses(
    rendered: RenderedIssue, loaded: Loaded[Issue], templates: Templates
) -> tuple[merge_fields.FieldUse, ...]:
    """The merge fields only the templates use (``merge_field(...)``), each placed at the
    first template line that names it (the folder when none can be found)."""
    from_file = {u.field for u in loaded.merge_fields}
    return tuple(
        merge_fields.FieldUse(f, *merge_field_place(templates.folder, f.name), "")
        for _, f in rendered.merge_fields
        if f not in from_file
    )
