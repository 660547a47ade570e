"""Build: issue file → rendered issue → the files of one sample message (``newsletter build``).

Input: the paths and values in :class:`BuildInputs`. Output: a
:class:`BuildResult` with everything that goes into ``build/<id>/`` held in
memory, and the checks' verdict. It runs the stages in order (load, template,
MJML, inline, check: :mod:`newsletter.render`; compose the preview message:
:mod:`newsletter.delivery.message`) and writes nothing: writing is
:mod:`newsletter.render.output`'s job, and happens only once every stage passed.
An id that another file in the issue's folder also claims fails the build
(:mod:`newsletter.render.issue_ids`). It sits above render and delivery because
it uses both; render itself imports no delivery code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from newsletter.delivery.message import MessageTemplate, Sender, recipient_values
from newsletter.errors import BuildCheckFailed, ValidationFailed
from newsletter.models import Issue, Recipient, RenderedIssue, Society
from newsletter.render import issue_ids, merge_fields, placeholders
from newsletter.render.checks import CheckReport, Sources, check_message
from newsletter.render.loading import Loaded, load_issue, load_society
from newsletter.render.pipeline import preview_date, render_issue
from newsletter.render.templating import Templates, load_templates, merge_field_place

__all__ = ["BuildInputs", "BuildResult", "build", "preview_date"]


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
    inputs: BuildInputs | None = None  # what it was built from (a send's fingerprint)

    @property
    def issue_id(self) -> str:
        return self.rendered.issue_id


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
        inputs=inputs,
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
