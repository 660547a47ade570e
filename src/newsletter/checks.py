"""Checking stage: the rendered email → the rules it breaks, as failures and warnings.

Input: the final HTML and text of one message. Output: a :class:`CheckReport`.
Failures stop the build; warnings are printed (and stop it under
``--strict``). The rules are the ones a careful email engineer checks by
hand: size under Gmail's clipping point, nothing remote but links and
images (no web fonts, stylesheets, scripts or tracking pixels), a language
on ``<html>``, alt text on every image, https links only, no template syntax
or placeholder left over, an unsubscribe link in both parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import unescape
from urllib.parse import urlsplit

from newsletter import placeholders
from newsletter.errors import BuildCheckFailed

SIZE_FAIL = 100_000  # Gmail clips the HTML at about 102 KB and hides the rest
SIZE_WARN = 90_000

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
_LEFTOVER = re.compile(r"\{\{|\{%|<mj-|</mj-")


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


_TAG = re.compile(r"<([a-zA-Z][\w:-]*)\b([^>]*)>")
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


def check_message(html: str, text: str, *, unsubscribe_url: str) -> CheckReport:
    """Check one personalised message (HTML and text) against every rule."""
    report = CheckReport(html_bytes=len(html.encode("utf-8")))
    fail, warn = report.failures.append, report.warnings.append

    kb = report.html_bytes / 1000
    if report.html_bytes > SIZE_FAIL:
        fail(
            f"the HTML is {kb:.1f} KB; Gmail clips messages above about 102 KB and hides the "
            f"footer with the unsubscribe link. Keep it under {SIZE_FAIL // 1000} KB: "
            "shorten summaries or move articles to next week"
        )
    elif report.html_bytes > SIZE_WARN:
        warn(f"the HTML is {kb:.1f} KB, close to Gmail's clipping point (about 102 KB)")

    tags = _tags(html)
    html_tags = [a for t, a in tags if t == "html"]
    if not html_tags or not html_tags[0].get("lang"):
        fail("<html> has no lang attribute; set `language` in the society file")
    for tag in sorted({t for t, _ in tags if t in _FORBIDDEN}):
        fail(f"the HTML contains <{tag}>, which mail clients block or strip")
    for tag, attrs in tags:
        for name, value in attrs.items():
            if name.startswith("on"):
                fail(f"<{tag}> has an event handler ({name}); emails carry no scripts")
            elif name in _URL_ATTRS and value and tag not in ("a", "img"):
                urls = (
                    [u.split()[0] for u in value.split(",") if u.strip()]
                    if name == "srcset"
                    else [value]
                )
                for url in urls:
                    if urlsplit(url).scheme not in ("https", "mailto", "cid"):
                        fail(f"<{tag} {name}> points to {url!r}, which is not https")
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            fail("the HTML has a <meta http-equiv=refresh>")
    links = [a.get("href") or "" for t, a in tags if t == "a" and "href" in a]
    for href in (a.get("href") or "" for t, a in tags if t == "link"):
        fail(f"the HTML links to a stylesheet ({href}); put the CSS in the template instead")
    if _REMOTE_CSS.search(html):
        fail(
            "the CSS loads something remote (@import, @font-face or url(http...)); use system fonts"
        )
    for img in (a for t, a in tags if t == "img"):
        src = img.get("src") or ""
        if img.get("alt") is None:
            fail(f"the image {src} has no alt text")
        if urlsplit(src).scheme not in ("https", "cid"):
            fail(f"the image {src!r} is not an https URL")
        for candidate in (img.get("srcset") or "").split(","):
            if candidate.strip() and urlsplit(candidate.split()[0]).scheme != "https":
                fail(f"the image srcset entry {candidate.strip()!r} is not an https URL")
        if _tiny(img.get("width")) or _tiny(img.get("height")):
            fail(f"the image {src} looks like a tracking pixel; the newsletter never tracks opens")
    for href in links:
        if urlsplit(href).scheme not in ("https", "mailto"):
            fail(f"the link {href!r} is not an https:// or mailto: URL")
    if unsubscribe_url not in links:
        fail("the HTML has no unsubscribe link; the footer template must use unsubscribe_url")
    if unsubscribe_url not in text:
        fail("the plain text has no unsubscribe link; the text template must use unsubscribe_url")

    for part, body in (("HTML", html), ("plain text", text)):
        match = _LEFTOVER.search(body)
        if match:
            fail(f"the {part} still contains {match.group(0)!r}: a template tag was not rendered")
        for name in placeholders.leftovers(body):
            fail(f"the {part} contains the unknown placeholder {name}")
    return report
