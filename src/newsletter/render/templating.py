"""Templating stage: an issue and the society → MJML source and plain text.

Input: the ``templates/`` folder, a validated :class:`Issue`, the
:class:`Society` and the issue-wide links. Output: the MJML document (Jinja
with autoescape on, so every plain string is escaped and Markdown enters only
through the sanitising ``markdown`` filter) and the text/plain body (a
separate text template, wrapped at 72 columns). Both use ``StrictUndefined``:
a missing variable fails the build with the template's name and line.

The text part carries the issue's text verbatim, so ``</mj-text>`` in a title
is text there, not markup. The text environment marks such sequences in every
value it writes out; anything of the kind left unmarked in the output was
written by the template itself, and is reported against the template.
"""

from __future__ import annotations

import datetime as dt
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from newsletter.errors import ConfigError, TemplateError
from newsletter.models import Issue, Links, Society
from newsletter.render import markdown, merge_fields, placeholders

HTML_TEMPLATE = "email.mjml.j2"
TEXT_TEMPLATE = "email.txt.j2"
TEXT_WIDTH = 72

# What an unrendered template leaves behind: Jinja syntax, or MJML (in the
# HTML, a tag MJML did not know; in the text part, MJML pasted into it).
LEFTOVER = re.compile(r"\{\{|\{%|</?mj-[\w-]*")
# In a value: "{" before "{" or "%", "<" before "mj-" or "/mj-". The mark is
# NUL, which no input can hold: the fields refuse control characters.
_VALUE_LEFTOVER = re.compile(r"\{(?=[{%])|<(?=/?mj-)")
_MARK = "\x00"


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
    html_env = jinja2.Environment(autoescape=True, finalize=_html_value, **common)
    html_env.filters["markdown"] = _markdown_html
    html_env.filters["longdate"] = longdate
    text_env = jinja2.Environment(
        autoescape=False,  # noqa: S701 - text/plain output
        finalize=_mark_value,
        **common,
    )
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

    def merge_field(name: str, fallback: str | None = "") -> str:
        # Raised as Jinja's own error, so that it names the template's file and line.
        if not isinstance(name, str) or not merge_fields.valid_name(name):
            raise jinja2.TemplateRuntimeError(
                f"merge_field({name!r}): a field name is lower-case letters, digits and '_', "
                "starting with a letter, such as 'first_name'"
            )
        text = merge_fields.clean("" if fallback is None else str(fallback))
        if len(str(fallback or "").strip()) > merge_fields.FALLBACK_MAX:
            raise jinja2.TemplateRuntimeError(
                f"merge_field({name!r}, ...): the fallback is longer than "
                f"{merge_fields.FALLBACK_MAX} characters"
            )
        return slots.slot(merge_fields.MergeField(name, text))

    return {
        "issue": issue,
        "society": society,
        "links": links,
        "unsubscribe_url": placeholders.UNSUBSCRIBE_URL,
        "preferences_url": placeholders.PREFERENCES_URL,
        "recipient_email": placeholders.EMAIL,
        "merge_field": merge_field,
    }


def render(
    templates: Templates,
    ctx: dict[str, Any],
    *,
    html_template: str = HTML_TEMPLATE,
    text_template: str = TEXT_TEMPLATE,
) -> tuple[str, str]:
    """(MJML source, plain text) for one issue, or for another mail of the same folder
    whose two templates are named (the signup mails: ``confirm.mjml.j2``...)."""
    mjml = _render(templates, templates.html, html_template, ctx)
    text = _render(templates, templates.text, text_template, ctx)
    made = LEFTOVER.search(text)  # the values' own are marked: this is the template's
    if made:
        where = find_in_templates(templates.folder, text_template, made.group(0))
        raise TemplateError(
            f"{where}: the text part contains {made.group(0)!r} that the template wrote, not "
            "the issue: a template tag was not rendered, or MJML was pasted into the text "
            "template; remove it"
        )
    return mjml, _tidy_text(text.replace(_MARK, ""))


def _html_value(value: Any) -> Markup:
    # Jinja's finalize for the MJML: a plain value is escaped, then what MRML
    # would mangle if it stood in an attribute is written as character
    # references (see markdown.protect_from_mrml). In markup (Markdown's HTML)
    # only the tags' attributes need it.
    if isinstance(value, Markup) and "<" in value:
        return Markup(markdown.protect_attributes_from_mrml(value))  # noqa: S704 - markup
    return Markup(markdown.protect_from_mrml(escape(value)))  # noqa: S704 - escaped


def _mark_value(value: Any) -> str:
    # Jinja's finalize: every value the text template writes out passes here.
    text = str(value)
    return _VALUE_LEFTOVER.sub(r"\g<0>" + _MARK, text) if "{" in text or "<" in text else text


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
        where = _template_frame(exc, templates.folder) or str(templates.folder / name)
        raise TemplateError(
            f"{where}: includes {exc.name!r}, which is not in {templates.folder}"
        ) from None
    except jinja2.TemplateError as exc:  # a filter called wrongly, {% raise %}-like errors
        where = _template_frame(exc, templates.folder) or str(templates.folder / name)
        raise TemplateError(f"{where}: {exc.message or type(exc).__name__}") from None
    except UnicodeDecodeError:
        bad = next(
            (f for f in sorted(templates.folder.glob("*.j2")) if not _is_utf8(f)),
            templates.folder / name,
        )
        raise TemplateError(f"{bad} is not UTF-8 text; save it as UTF-8") from None
    except Exception as exc:
        # Raised while a template ran (a filter given an argument it does not
        # take or a value of the wrong kind, `| longdate` on text, a template
        # that includes itself): the template's mistake, placed at its last line
        # on the way. Raised with no template frame at all, it is a bug.
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if _is_template_frame(f.filename, templates.folder)
        ]
        if not frames:
            raise
        last = frames[-1]
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise TemplateError(
            f"{last.filename}:{last.lineno}: {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + "; fix the template"
        ) from None


def _is_utf8(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


def find_in_templates(folder: Path, name: str, needle: str, *, also: tuple[str, ...] = ()) -> str:
    """``folder/file:line`` of the first line holding ``needle`` in template ``name``, the
    templates it includes, or the files ``also`` names; else ``folder/name``.

    For error messages about what a template wrote, so it is rare: files are
    read again rather than kept."""
    if not needle:
        return str(folder / name)
    wanted = needle.lower()
    place = _first_line(folder, [*_referenced(folder, name), *also], lambda s: wanted in s.lower())
    return f"{place[0]}:{place[1]}" if place else str(folder / name)


def merge_field_place(folder: Path, name: str) -> tuple[str, int | None]:
    """(file, line) of the first ``merge_field("name"...)`` call in the templates (the
    folder and None when there is none), to place a field only a template uses."""
    call = re.compile(r"merge_field\(\s*['\"]" + re.escape(name) + r"['\"]")
    names = [*_referenced(folder, HTML_TEMPLATE), *_referenced(folder, TEXT_TEMPLATE)]
    place = _first_line(folder, list(dict.fromkeys(names)), lambda s: bool(call.search(s)))
    return (str(place[0]), place[1]) if place else (str(folder), None)


def _first_line(
    folder: Path, names: list[str], matches: Callable[[str], bool]
) -> tuple[Path, int] | None:
    """The first (file, line number) among the templates ``names`` whose line ``matches``."""
    for file in names:
        try:
            lines = (folder / file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for number, line in enumerate(lines, 1):
            if matches(line):
                return folder / file, number
    return None


def _referenced(folder: Path, name: str) -> list[str]:
    """``name`` and every template it includes, imports or extends, depth first."""
    from jinja2 import meta

    seen: list[str] = []
    todo = [name]
    env = jinja2.Environment(autoescape=True)  # parses only
    while todo:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.append(current)
        try:
            source = (folder / current).read_text(encoding="utf-8")
            found = meta.find_referenced_templates(env.parse(source))
        except (OSError, UnicodeDecodeError, jinja2.TemplateSyntaxError):
            continue
        todo += [ref for ref in found if ref]
    return seen


def _template_frame(exc: BaseException, folder: Path) -> str | None:
    # Jinja rewrites tracebacks so that template frames carry the template's
    # file name and line: the last such frame is where rendering stopped.
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if _is_template_frame(frame.filename, folder):
            found = f"{frame.filename}:{frame.lineno}"
    return found


def _is_template_frame(filename: str, folder: Path) -> bool:
    return filename.startswith(str(folder.resolve())) or filename.endswith(".j2")


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
