"""Markup stage: the Markdown that editors write → safe HTML and plain text.

Input: a Markdown string (an article summary, the intro, the society's
"about"). Output: an HTML fragment that cannot escape its place in the layout
(rendered by markdown-it-py with raw HTML off, then cleaned by nh3 down to a
few inline and block tags and https/mailto links), or plain text wrapped for
the text/plain part. :func:`lint` finds what an editor should be told about
instead of silently dropping it: raw HTML, non-https links, links with
characters a URL cannot hold unencoded (quotes, ``<``, ``>``, backslashes,
whitespace), images, headings, lines indented so far that Markdown would show
them as code, and text that turns into template syntax only once Markdown has
read it (``&#123;&#123;`` or ``\\{\\{`` becomes ``{{``).
"""

from __future__ import annotations

import functools
import re
import textwrap
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token

from newsletter.models import _TEMPLATE_SYNTAX, url_character_problem, url_characters

# Two parsers: one that keeps raw HTML and every link so that lint can point
# at them, and the one that renders, which never passes HTML through.
_lint_md = MarkdownIt("commonmark", {"html": True})
_lint_md.validateLink = lambda url: True  # type: ignore[method-assign]
# Lint sees each link as written (after entities and backslash escapes), not
# percent-encoded as the renderer writes it: a quote the editor typed is there
# to report.
_lint_md.normalizeLink = lambda url: url  # type: ignore[method-assign]
_render_md = MarkdownIt("commonmark", {"html": False})

ALLOWED_TAGS = {"p", "a", "em", "strong", "code", "br", "ul", "ol", "li", "blockquote"}
ALLOWED_SCHEMES = {"https", "mailto"}


@dataclass(frozen=True, slots=True)
class MarkdownIssue:
    """A problem in a Markdown text; ``line`` counts from 0 within the text."""

    line: int
    message: str
    needle: str = ""  # text to look for from ``line`` on, to find the exact line


def lint(source: str) -> list[MarkdownIssue]:
    """Everything in ``source`` that would not survive rendering as the editor meant it."""
    found: list[MarkdownIssue] = []
    for tok in _lint_md.parse(source):
        line = tok.map[0] if tok.map else 0
        if tok.type == "html_block":
            found.append(MarkdownIssue(line, _html_message(tok.content)))
        elif tok.type == "code_block":
            found.append(
                MarkdownIssue(
                    line,
                    "a line is indented 4 or more spaces, so Markdown would show it as code; "
                    "remove the extra indentation",
                )
            )
        elif tok.type == "fence":
            found.append(MarkdownIssue(line, "code blocks (```) are not supported in the email"))
        elif tok.type == "heading_open":
            found.append(
                MarkdownIssue(line, "headings (#) are not supported here; use **bold** text")
            )
        elif tok.type == "hr":
            found.append(MarkdownIssue(line, "horizontal rules (---) are not supported here"))
        elif tok.type == "inline":
            found.extend(
                MarkdownIssue(line, msg, needle)
                for msg, needle in _lint_inline(tok.children or [], source)
            )
    found.extend(_made_template_syntax(source))
    return found


def _made_template_syntax(source: str) -> list[MarkdownIssue]:
    """Template syntax that appears only in the rendered text, which both parts of the
    email would carry: the final checks would then fail without saying where.

    The fields' validation refuses the syntax as written (the same pattern);
    here it is looked for in what Markdown makes of the text, where character
    references, backslash escapes and formatting (``{*{*``) can put it together."""
    found: list[MarkdownIssue] = []
    for tok in _tokens(source):
        if tok.type != "inline":
            continue
        children = tok.children or []
        titles = [str(c.attrs.get("title", "")) for c in children if c.type == "link_open"]
        for text in (_inline_text(children), *titles):
            match = _TEMPLATE_SYNTAX.search(text)
            if match:
                found.append(
                    MarkdownIssue(
                        tok.map[0] if tok.map else 0,
                        f"reads as {match.group(0)!r} once Markdown has turned character "
                        "references (&#123;), backslash escapes or formatting into text; "
                        "that is template syntax or a placeholder: remove it",
                    )
                )
                break
    return found


def _html_message(content: str) -> str:
    snippet = content.strip().splitlines()[0][:40] if content.strip() else content
    if "<script" in content.lower():
        return f"contains a <script> tag ({snippet!r}); scripts are never allowed in an email"
    return f"contains raw HTML ({snippet!r}); write Markdown instead (*em*, **bold**, [text](url))"


def _lint_inline(children: list[Token], source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for child in children:
        if child.type == "html_inline":
            if child.content.startswith("</"):
                continue  # the opening tag has been reported already
            out.append((_html_message(child.content), child.content))
        elif child.type == "image":
            src = str(child.attrs.get("src", ""))
            out.append(
                ("images inside text are not supported; use the article's `image` field", src)
            )
        elif child.type == "link_open":
            href = str(child.attrs.get("href", ""))
            scheme = urlsplit(href).scheme.lower()
            shown = href if len(href) <= 60 else href[:57] + "..."
            if "[[" in href or "%5B%5B" in href.upper():
                # Markdown percent-encodes the brackets of a target it keeps.
                out.append(
                    (
                        "a merge field ([[...]]) may not sit inside a link's target: every "
                        "reader's link must go where the editor checked it goes; put the "
                        "field in the link's text",
                        unquote(href),  # as the editor typed it, to find its line
                    )
                )
            elif scheme not in ALLOWED_SCHEMES:
                out.append((f"link {shown!r} must be an https:// or mailto: URL", href))
            elif _link_characters(href, source):
                problem = url_character_problem("".join(_link_characters(href, source)))
                out.append((f"link {shown!r} {problem}", href))
    return out


def _link_characters(href: str, source: str) -> list[str]:
    """The characters a link must not hold unencoded, less the control characters typed
    as such: the text's own validation refuses those already (one mistake, one problem)."""
    return [
        ch
        for ch in url_characters(href)
        if ch in "\t\n" or unicodedata.category(ch) != "Cc" or ch not in source
    ]


@functools.lru_cache(maxsize=256)
def _tokens(source: str) -> tuple[Token, ...]:
    # Each text is rendered twice (HTML and plain text); parse it once. The
    # renderers only read the tokens.
    return tuple(_render_md.parse(source))


def to_html(source: str) -> str:
    """Render and sanitise; the result is safe to mark as such in a template."""
    raw = _render_md.renderer.render(list(_tokens(source)), _render_md.options, {})
    clean = nh3.clean(
        raw,
        tags=ALLOWED_TAGS,
        attributes={"a": {"href", "title"}},
        url_schemes=ALLOWED_SCHEMES,
        link_rel=None,
        strip_comments=True,
    ).strip()
    return protect_attributes_from_mrml(clean)


_START_TAG = re.compile(r"""<[a-zA-Z](?:[^>"']|"[^"]*"|'[^']*')*>""")
_MANGLED = re.compile(r"[\\\n\r\t]|[^\x00-\x7f]")


def protect_attributes_from_mrml(html: str) -> str:
    """:func:`protect_from_mrml` for the start tags of ``html`` only: text between
    tags passes MRML untouched, and may be long."""
    return _START_TAG.sub(lambda m: protect_from_mrml(m.group(0)), html) if "<" in html else html


def protect_from_mrml(html: str) -> str:
    """``html`` with what MRML mangles in attribute values written as character references.

    MRML (the MJML compiler) writes attribute values with Rust's debug
    escaping: a backslash comes out doubled, a line break as the letters
    ``\\n``, and a no-break space, a bidi mark or an accent typed as a
    combining mark as ``\\u{a0}``. References pass through it untouched and the
    inliner's parser turns them back into the characters. Letters, digits,
    punctuation and symbols of any script are left as they are."""
    if html.isascii() and not _MANGLED.search(html):
        return html
    return _MANGLED.sub(_reference, html)


def _reference(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch.isascii() or unicodedata.category(ch)[0] in "MZC":
        return f"&#{ord(ch)};"
    return ch


def to_text(source: str, *, width: int = 72, indent: str = "") -> str:
    """Render Markdown as wrapped plain text: paragraphs, lists, links as ``text (url)``."""
    blocks: list[tuple[str, bool]] = []  # (text, is an item of a tight list)
    tight = new_list = False
    lists: list[list[int]] = []  # one [counter] per open list; -1 marks a bullet list
    quote = 0
    marker: str | None = None
    for tok in _tokens(source):
        if tok.type == "bullet_list_open":
            lists.append([-1])
            new_list = True
        elif tok.type == "ordered_list_open":
            lists.append([int(tok.attrs.get("start", 1) or 1)])
            new_list = True
        elif tok.type in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif tok.type == "list_item_open":
            counter = lists[-1]
            if counter[0] < 0:
                marker = "- "
            else:
                marker = f"{counter[0]}. "
                counter[0] += 1
        elif tok.type == "paragraph_open":
            # markdown-it hides the <p> of items in a tight list: no blank line between them.
            tight = tok.hidden
        elif tok.type == "blockquote_open":
            quote += 1
        elif tok.type == "blockquote_close":
            quote -= 1
        elif tok.type == "inline":
            nest = "  " * max(len(lists) - 1, 0)
            lead = indent + "> " * quote + nest
            first = lead + (marker or "")
            rest = lead + " " * len(marker or "")
            text = _inline_text(tok.children or [])
            wrapped = [
                wrap(line, width=width, initial=first if i == 0 else rest, subsequent=rest)
                for i, line in enumerate(text.split("\n"))
            ]
            blocks.append(("\n".join(wrapped), tight and not new_list))
            marker = None
            tight = new_list = False
    out: list[str] = []
    for i, (text, is_tight) in enumerate(blocks):
        if i:
            out.append("\n" if is_tight else "\n\n")
        out.append(text)
    return "".join(out)


def _inline_text(children: list[Token]) -> str:
    parts: list[str] = []
    href_stack: list[tuple[str, int]] = []
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        elif child.type == "link_open":
            href_stack.append((str(child.attrs.get("href", "")), len(parts)))
        elif child.type == "link_close" and href_stack:
            href, start = href_stack.pop()
            label = "".join(parts[start:]).strip()
            shown = href.removeprefix("mailto:")
            if label not in (href, shown):
                parts.append(f" ({shown})")
    return "".join(parts)


def wrap(text: str, *, width: int = 72, initial: str = "", subsequent: str = "") -> str:
    """Wrap one paragraph without ever breaking a URL or a hyphenated word."""
    return (
        textwrap.fill(
            " ".join(text.split()),
            width=width,
            initial_indent=initial,
            subsequent_indent=subsequent,
            break_long_words=False,
            break_on_hyphens=False,
        )
        or initial.rstrip()
    )
