"""Templating stage: an issue and the society → MJML source and plain text.

Input: the ``templates/`` folder, a validated :class:`Issue`, the
:class:`Society` and the issue-wide links. Output: the MJML document (Jinja
with autoescape on, so every plain string is escaped and Markdown enters only
through the sanitising ``markdown`` filter) and the text/plain body (a
separate text template, wrapped at 72 columns). Both use ``StrictUndefined``:
a missing variable fails the build with the template's name and line.
"""

from __future__ import annotations

import datetime as dt
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from newsletter import markdown, merge_fields, placeholders
from newsletter.errors import ConfigError, TemplateError
from newsletter.models import Issue, Links, Society

HTML_TEMPLATE = "email.mjml.j2"
TEXT_TEMPLATE = "email.txt.j2"
TEXT_WIDTH = 72


@dataclass(frozen=True, slots=True)
class Templates:
    """The two Jinja environments over one templates folder; build once, render many."""

    folder: Path
    html: jinja2.Environment
    text: jinja2.Environment


def load_templates(folder: Path) -> Templates:
    for name in (HTML_TEMPLATE, TEXT_TEMPLATE):
        if not (folder / name).is_file():
            raise ConfigError(
                f"template {folder / name} not found; run the command from the project folder "
                "or set NEWSLETTER_TEMPLATES_DIR to the folder that holds the templates"
            )
    loader = jinja2.FileSystemLoader(folder)
    common: dict[str, Any] = {
        "loader": loader,
        "undefined": jinja2.StrictUndefined,
        "trim_blocks": True,
        "lstrip_blocks": True,
        "keep_trailing_newline": True,
        "auto_reload": False,
    }
    # select_autoescape() does not know .mjml files: turn escaping on for all of them.
    html_env = jinja2.Environment(autoescape=True, **common)
    html_env.filters["markdown"] = _markdown_html
    html_env.filters["longdate"] = longdate
    text_env = jinja2.Environment(autoescape=False, **common)  # noqa: S701 - text/plain output
    text_env.filters["markdown"] = _markdown_text
    text_env.filters["wrap"] = _wrap
    text_env.filters["longdate"] = longdate
    text_env.filters["underline"] = _underline
    return Templates(folder, html_env, text_env)


def context(
    issue: Issue, society: Society, links: Links, slots: merge_fields.Slots | None = None
) -> dict[str, Any]:
    """What templates can use; per-recipient values are placeholders filled at send time.

    ``merge_field("first_name", "friend")`` in a template is the template's way
    of writing ``[[first_name|friend]]``: it gives the slot that each recipient's
    value (or the fallback) fills, HTML-escaped in the HTML and as is in the text."""
    slots = slots if slots is not None else merge_fields.Slots()

    def merge_field(name: str, fallback: str = "") -> str:
        if not isinstance(name, str) or not merge_fields.NAME.fullmatch(name):
            raise TemplateError(
                f"merge_field({name!r}): a field name is lower-case letters, digits and '_', "
                "starting with a letter, such as 'first_name'"
            )
        return slots.slot(merge_fields.MergeField(name, merge_fields.clean(str(fallback))))

    return {
        "issue": issue,
        "society": society,
        "links": links,
        "unsubscribe_url": placeholders.UNSUBSCRIBE_URL,
        "preferences_url": placeholders.PREFERENCES_URL,
        "recipient_email": placeholders.EMAIL,
        "merge_field": merge_field,
    }


def render(templates: Templates, ctx: dict[str, Any]) -> tuple[str, str]:
    """(MJML source, plain text) for one issue."""
    mjml = _render(templates, templates.html, HTML_TEMPLATE, ctx)
    text = _render(templates, templates.text, TEXT_TEMPLATE, ctx)
    return mjml, _tidy_text(text)


def _render(templates: Templates, env: jinja2.Environment, name: str, ctx: dict[str, Any]) -> str:
    try:
        return env.get_template(name).render(ctx)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{templates.folder / (exc.name or name)}:{exc.lineno}"
        raise TemplateError(f"{where}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        where = _template_frame(exc, templates.folder) or str(templates.folder / name)
        raise TemplateError(
            f"{where}: {exc.message}; fix the template or add the value it needs"
        ) from None
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(
            f"{templates.folder / name}: includes {exc.name!r}, which is not in {templates.folder}"
        ) from None


def _template_frame(exc: BaseException, folder: Path) -> str | None:
    # Jinja rewrites tracebacks so that template frames carry the template's
    # file name and line: the last such frame is where rendering stopped.
    found = None
    root = str(folder.resolve())
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(root) or frame.filename.endswith(".j2"):
            found = f"{frame.filename}:{frame.lineno}"
    return found


def longdate(value: dt.date) -> str:
    """23 December 2020: unambiguous on both sides of the Atlantic."""
    return f"{value.day} {value:%B %Y}"


def _markdown_html(source: str) -> Markup:
    return Markup(markdown.to_html(source))  # noqa: S704 - sanitised by nh3 in markdown.to_html


def _markdown_text(source: str, indent: int = 0) -> str:
    return markdown.to_text(source, width=TEXT_WIDTH, indent=" " * indent)


def _wrap(text: str, indent: int = 0, first: str | None = None) -> str:
    pad = " " * indent
    return markdown.wrap(
        text, width=TEXT_WIDTH, initial=pad if first is None else first, subsequent=pad
    )


def _underline(text: str, char: str = "=") -> str:
    return f"{text}\n{char * min(len(text), TEXT_WIDTH)}"


def _tidy_text(text: str) -> str:
    # Templates are easier to read with generous spacing; the reader wants at
    # most one blank line in a row and no trailing spaces.
    lines = [line.rstrip() for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"
