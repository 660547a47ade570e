"""Checking stage: the rendered email → the rules it breaks, as failures and warnings.

Input: the final HTML and text of one message. Output: a :class:`CheckReport`.
Failures stop the build; warnings are printed (and stop it under
``--strict``). The rules are the ones a careful email engineer checks by
hand: size under Gmail's clipping point, nothing remote but links and
images (no web fonts, stylesheets, scripts or tracking pixels), a language
on ``<html>``, alt text on every image, https links only, no template syntax
or placeholder left over, an unsubscribe link in both parts.

Every message starts with the file to change: the issue file when the email
is too large, otherwise the template (with the line, when the offending text
is found in it) or the templates folder. Text from the issue cannot break the
other rules: it is escaped or sanitised before it reaches the email, and
validated (https links, no template syntax) when the issue is loaded. MJML
pasted into the text template is reported by the templating stage, which can
tell it from an issue's text that mentions ``</mj-text>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from urllib.parse import urlsplit

from newsletter.errors import BuildCheckFailed
from newsletter.render import placeholders
from newsletter.render.templating import HTML_TEMPLATE, LEFTOVER, TEXT_TEMPLATE, find_in_templates

SIZE_FAIL = 100_000  # Gmail clips the HTML at about 102 KB and hides the rest
SIZE_WARN = 90_000

_CSS = re.compile(r"<style\b[^>]*>(.*?)</style\s*>|\sstyle=\"([^\"]*)\"", re.I | re.S)
_REMOTE_CSS = re.compile(r"@import|@font-face|url\(\s*['\"]?(https?:)?//", re.I)
_ALWAYS = {"html", "a", "img", "link", "meta"}
_INTERESTING = re.compile(
    r"(?i)(?:^|\s)(?:on\w+|href|src|srcset|background|action|formaction|poster|xlink:href|"
    r"data|lowsrc|dynsrc|cite|longdesc)\s*="
)
_FORBIDDEN = {
    "script",
    "iframe",
    "frame",
    "object",
    "embed",
    "applet",
    "form",
    "input",
    "button",
    "textarea",
    "select",
    "base",
    "svg",
    "math",
}
_TEXT_LEFTOVER = re.compile(r"\{\{|\{%")
INLINE_CSS = "inline.css"


@dataclass(frozen=True, slots=True)
class Sources:
    """The files a failure can be blamed on (the defaults when the caller has none)."""

    issue_file: Path | str = "the issue file"
    society_file: Path | str = "the society file"
    templates: Path = Path("templates")

    def html(self, needle: str = "") -> str:
        """Where the HTML template (or a template it includes) writes ``needle``."""
        return find_in_templates(self.templates, HTML_TEMPLATE, needle, also=(INLINE_CSS,))

    def text(self, needle: str = "") -> str:
        return find_in_templates(self.templates, TEXT_TEMPLATE, needle)


@dataclass(slots=True)
class CheckReport:
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    html_bytes: int = 0
    # Warnings a preview may show but no send may carry out (bidi controls).
    refused_by_send: list[str] = field(default_factory=list)


def refuse_unsendable(report: CheckReport) -> None:
    """Raise when the email may be previewed but not sent (every send path calls this)."""
    if report.refused_by_send:
        raise BuildCheckFailed([f"(send) {w}" for w in report.refused_by_send])


# A value may hold ">" (lxml writes one holding "<!-- -->" as it is): read quoted values whole.
_TAG = re.compile(r"""<([a-zA-Z][\w:-]*)\b((?:[^>"']++|"[^"]*+"|'[^']*+')*+)>""")
# Attributes whose value is fetched or followed by a client.
_URL_ATTRS = {
    "href",
    "src",
    "srcset",
    "background",
    "action",
    "formaction",
    "poster",
    "xlink:href",
    "data",
    "lowsrc",
    "dynsrc",
    "cite",
    "longdesc",
}
_ATTR = re.compile(r"""([^\s=/>]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+)))?""")


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every tag the checks care about, with its attributes.

    A regular expression rather than a parser, for speed (a pure-Python
    parser costs ~10 ms on a 90 KB email) and for rigour: it also sees the
    tags inside Outlook's conditional comments, which Outlook does render.
    """
    found: list[tuple[str, dict[str, str | None]]] = []
    for match in _TAG.finditer(html):
        tag, raw_attrs = match.group(1).lower(), match.group(2)
        attrs: dict[str, str | None] = {}
        if tag not in _ALWAYS and not _INTERESTING.search(raw_attrs):
            # Most tags are layout tables: nothing on them is checked.
            found.append((tag, attrs))
            continue
        for attr in _ATTR.finditer(raw_attrs):
            name = attr.group(1).lower()
            raw = next((g for g in attr.group(2, 3, 4) if g is not None), None)
            attrs.setdefault(name, None if raw is None else unescape(raw))
        found.append((tag, attrs))
    return found


def _tiny(size: str | None) -> bool:
    match = re.match(r"\s*(\d+)", size or "")
    return match is not None and int(match.group(1)) <= 2


def check_message(
    html: str, text: str, *, unsubscribe_url: str, sources: Sources | None = None
) -> CheckReport:
    """Check one personalised message (HTML and text) against every rule.

    ``sources`` names the files behind the message, for the messages."""
    src = sources or Sources()
    report = CheckReport(html_bytes=len(html.encode("utf-8")))
    fail, warn = report.failures.append, report.warnings.append

    kb = report.html_bytes / 1000
    if report.html_bytes > SIZE_FAIL:
        fail(
            f"{src.issue_file}: the HTML is {kb:.1f} KB; Gmail clips messages above about "
            "102 KB and hides the footer with the unsubscribe link. Keep it under "
            f"{SIZE_FAIL // 1000} KB: shorten summaries or move articles to next week"
        )
    elif report.html_bytes > SIZE_WARN:
        warn(
            f"{src.issue_file}: the HTML is {kb:.1f} KB, close to Gmail's clipping point "
            "(about 102 KB)"
        )

    tags = _tags(html)
    html_tags = [a for t, a in tags if t == "html"]
    if not html_tags or not html_tags[0].get("lang"):
        fail(
            f"{src.html('<mjml')}: <html> has no lang attribute; keep "
            '<mjml lang="{{ society.language }}"> in the template (the language is '
            f"`language` in {src.society_file})"
        )
    for tag in sorted({t for t, _ in tags if t in _FORBIDDEN}):
        fail(
            f"{src.html('<' + tag)}: the HTML contains <{tag}>, which mail clients block or "
            "strip; remove it from the template"
        )
    for tag, attrs in tags:
        for name, value in attrs.items():
            if name.startswith("on"):
                fail(
                    f"{src.html(name)}: <{tag}> has an event handler ({name}); emails carry "
                    "no scripts"
                )
            elif name in _URL_ATTRS and value and tag not in ("a", "img"):
                urls = (
                    [u.split()[0] for u in value.split(",") if u.strip()]
                    if name == "srcset"
                    else [value]
                )
                for url in urls:
                    if urlsplit(url).scheme not in ("https", "mailto", "cid"):
                        fail(
                            f"{src.html(url)}: <{tag} {name}> points to {url!r}, which is not https"
                        )
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            fail(f"{src.html('refresh')}: the HTML has a <meta http-equiv=refresh>")
    links = [a.get("href") or "" for t, a in tags if t == "a" and "href" in a]
    for href in (a.get("href") or "" for t, a in tags if t == "link"):
        fail(
            f"{src.html(href)}: the HTML links to a stylesheet ({href}); put the CSS in the "
            "template instead"
        )
    # Only CSS can load a stylesheet or a font: text that mentions
    # "info@imports.example.org" is not a rule.
    remote = _REMOTE_CSS.search(" ".join(a + b for a, b in _CSS.findall(html)))
    if remote:
        fail(
            f"{src.html(remote.group(0))}: the CSS loads something remote (@import, @font-face "
            "or url(http...)); use system fonts"
        )
    for img in (a for t, a in tags if t == "img"):
        src_url = img.get("src") or ""
        if img.get("alt") is None:
            fail(f"{src.html(src_url)}: the image {src_url} has no alt text")
        if urlsplit(src_url).scheme not in ("https", "cid"):
            fail(f"{src.html(src_url)}: the image {src_url!r} is not an https URL")
        for candidate in (img.get("srcset") or "").split(","):
            if candidate.strip() and urlsplit(candidate.split()[0]).scheme != "https":
                fail(
                    f"{src.html(candidate.split()[0])}: the image srcset entry "
                    f"{candidate.strip()!r} is not an https URL"
                )
        if _tiny(img.get("width")) or _tiny(img.get("height")):
            fail(
                f"{src.html(src_url)}: the image {src_url} looks like a tracking pixel; the "
                "newsletter never tracks opens"
            )
    for href in links:
        if urlsplit(href).scheme not in ("https", "mailto"):
            fail(f"{src.html(href)}: the link {href!r} is not an https:// or mailto: URL")
    if unsubscribe_url not in links:
        fail(
            f"{src.html()}: the HTML has no unsubscribe link; the footer "
            "template must use unsubscribe_url"
        )
    if unsubscribe_url not in text:
        fail(
            f"{src.text()}: the plain text has no unsubscribe link; the text "
            "template must use unsubscribe_url"
        )

    # In the HTML the issue's text is escaped, so "<mj-" there is a tag MJML did
    # not know. The text part holds that text verbatim: the templating stage
    # reports what its template wrote, and the issue's fields never hold "{{".
    for part, body, pattern, where in (
        ("HTML", html, LEFTOVER, src.html),
        ("plain text", text, _TEXT_LEFTOVER, src.text),
    ):
        match = pattern.search(body)
        if match:
            fail(
                f"{where(match.group(0))}: the {part} still contains {match.group(0)!r}: a "
                "template tag was not rendered"
            )
        for name in placeholders.leftovers(body):
            if name.startswith("merge_field"):
                fail(
                    f"{where('merge_field')}: the {part} holds what is left of a merge field "
                    "that a template changed: apply no filter or slice to merge_field(...)"
                )
            else:
                fail(f"{where(name)}: the {part} contains the unknown placeholder {name}")
    return report
