"""Markdown: what editors write becomes safe HTML and readable plain text."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from newsletter.render import markdown


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


@pytest.mark.parametrize(
    "source",
    [
        "Hi <script>alert(1)</script>",
        '<img src="x" onerror="alert(1)">',
        "[click](javascript:alert(1))",
        "[click](JaVaScRiPt:alert(1))",
        "[data](data:text/html;base64,PHNjcmlwdD4=)",
        "</mj-text></mj-column></mj-section><mj-raw><script>x</script></mj-raw>",
        '<a href="https://example.org" style="position:fixed">x</a>',
        "<style>body{display:none}</style>",
        "<!-- comment --> text",
    ],
)
def test_unsafe_markdown_is_refused_and_would_render_harmlessly(source: str) -> None:
    assert markdown.lint(source), "lint must report it to the editor"
    html = markdown.to_html(source)
    for tag, attrs in elements(html):
        assert tag in markdown.ALLOWED_TAGS
        assert set(attrs) <= {"href", "title"}
        href = attrs.get("href")
        assert href is None or href.startswith(("https:", "mailto:"))
    assert "<mj-" not in html and "</mj-" not in html


def test_allowed_markdown_renders_to_a_narrow_set_of_tags() -> None:
    html = markdown.to_html(
        "Some *em*, **strong**, `code` and [a link](https://example.org/x?a=1&b=2).\n\n"
        "- one\n- two\n\n1. first\n\n> quoted\n\nmail [us](mailto:hello@example.org)"
    )
    assert html == (
        "<p>Some <em>em</em>, <strong>strong</strong>, <code>code</code> and "
        '<a href="https://example.org/x?a=1&amp;b=2">a link</a>.</p>\n'
        "<ul>\n<li>one</li>\n<li>two</li>\n</ul>\n<ol>\n<li>first</li>\n</ol>\n"
        "<blockquote>\n<p>quoted</p>\n</blockquote>\n"
        '<p>mail <a href="mailto:hello@example.org">us</a></p>'
    )
    assert markdown.lint("Some *em* and [a link](https://example.org).") == []


def test_plain_strings_with_markup_characters_are_escaped() -> None:
    html = markdown.to_html("Tom & Jerry say 1 < 2 and AT&T")
    assert html == "<p>Tom &amp; Jerry say 1 &lt; 2 and AT&amp;T</p>"


def test_text_rendering_wraps_and_writes_links_out() -> None:
    text = markdown.to_text(
        "A team reported in [Brain](https://academic.oup.com/brain) that *48 people* took "
        "part in a trial comparing two routes of treatment against a sham procedure.\n\n"
        "- first item that is long enough to need wrapping past the seventy-two column mark\n"
        "- second, see [https://example.org](https://example.org)\n\n"
        "1. one\n2. two\n\nWrite to [us](mailto:hello@example.org).",
        indent="    ",
    )
    assert text == (
        "    A team reported in Brain (https://academic.oup.com/brain) that 48\n"
        "    people took part in a trial comparing two routes of treatment\n"
        "    against a sham procedure.\n"
        "\n"
        "    - first item that is long enough to need wrapping past the\n"
        "      seventy-two column mark\n"
        "    - second, see https://example.org\n"
        "\n"
        "    1. one\n"
        "    2. two\n"
        "\n"
        "    Write to us (hello@example.org)."
    )
    assert all(len(line) <= 72 for line in text.splitlines())


def test_wrap_never_breaks_a_long_url() -> None:
    url = "https://www.example.org/" + "a" * 90
    wrapped = markdown.wrap(f"See {url} for more", width=72)
    assert url in wrapped.splitlines()
