"""Hostile text and URLs in issue and society files.

Markup, quotes and odd Unicode in a plain-text field are text: the build
escapes them in the HTML, keeps them verbatim in the text part, and never
fails at the checks for them. A URL holding a character that would end an
attribute (quotes, < >, backslash, whitespace, control characters) is
refused when the file is loaded, with file, line and field. Every attribute
of the final HTML is written name="value". Every message of the build names
the file to change.
"""

from __future__ import annotations

import re
import timeit
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from conftest import EXAMPLE, REPO, build_file, example_data, run_cli
from newsletter.build import BuildResult
from newsletter.errors import BuildCheckFailed, TemplateError, ValidationFailed
from newsletter.models import PREHEADER_MAX, SUBJECT_MAX, TITLE_MAX, Line
from newsletter.render import markdown
from newsletter.render.checks import Sources, check_message
from newsletter.render.inliner import double_quote_attributes
from newsletter.render.loading import load_issue, load_society
from newsletter.render.pipeline import web_version
from newsletter.render.templating import load_templates

# --------------------------------------------------------------------------
# Writing issue files whose every value is on a known line.


def yaml_quote(value: str) -> str:
    """A YAML double-quoted scalar for any string: only printable ASCII is written as itself."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


NEUTRAL = {
    "subject": "Neutral subject",
    "preheader": "Neutral preheader",
    "title": "Neutral title",
    "source": "Neutral source",
    "category": "Neutral category",
    "alt": "Neutral alt",
}
# field -> (path in messages, line in the file written by issue_text)
FIELDS = {
    "subject": ("subject", 1),
    "preheader": ("preheader", 3),
    "title": ("articles[0].title", 6),
    "source": ("articles[0].source", 8),
    "category": ("articles[0].category", 9),
    "alt": ("articles[0].image.alt", 13),
}
LIMITS = {
    "subject": SUBJECT_MAX,
    "preheader": PREHEADER_MAX,
    "title": TITLE_MAX,
    "source": 200,
    "category": 60,
    "alt": 300,
}


def issue_text(values: dict[str, str], **urls: str) -> str:
    v = {**NEUTRAL, **values}
    u = {
        "url": "https://www.example.org/news/1",
        "src": "https://www.example.org/img/1.jpg",
        "intro": "An intro with [a link](https://www.example.org/intro).",
        "summary": "A summary with [a link](https://www.example.org/summary).",
        **urls,
    }
    q = yaml_quote
    return (
        f"subject: {q(v['subject'])}\n"  # 1
        "date: 2020-12-23\n"  # 2
        f"preheader: {q(v['preheader'])}\n"  # 3
        f"intro: {q(u['intro'])}\n"  # 4
        "articles:\n"  # 5
        f"  - title: {q(v['title'])}\n"  # 6
        f"    url: {q(u['url'])}\n"  # 7
        f"    source: {q(v['source'])}\n"  # 8
        f"    category: {q(v['category'])}\n"  # 9
        f"    summary: {q(u['summary'])}\n"  # 10
        "    image:\n"  # 11
        f"      src: {q(u['src'])}\n"  # 12
        f"      alt: {q(v['alt'])}\n"  # 13
        "    published: 2020-12-20\n"  # 14
    )


def society_text(*, website: str, social: str, logo: str) -> str:
    q = yaml_quote
    return (
        'name: "The MS Research Society"\n'  # 1
        'newsletter_name: "MS Research News"\n'  # 2
        'language: "en-GB"\n'  # 3
        f"website: {q(website)}\n"  # 4
        'about: "We fund research."\n'  # 5
        "address:\n"  # 6
        '  - "12 Example Street, London"\n'  # 7
        'registration: "Registered charity no. 1234567"\n'  # 8
        "logo:\n"  # 9
        f"  src: {q(logo)}\n"  # 10
        '  alt: "The society\'s logo"\n'  # 11
        "social:\n"  # 12
        f'  - {{name: "Facebook", url: {q(social)}}}\n'  # 13
    )


# --------------------------------------------------------------------------
# Looking at the HTML.


class _Structure(HTMLParser):
    """Start tags with their attribute names (in order), comments, and all text and values."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.shape: list[tuple[str, ...]] = []
        self.data: list[str] = []
        self.values: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.shape.append((tag, *(name for name, _ in attrs)))
        for name, value in attrs:
            self.values.setdefault(f"{tag}.{name}", []).append(value or "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self.shape.append((f"/{tag}",))

    def handle_comment(self, data: str) -> None:
        self.shape.append(("<!--", data))

    def handle_data(self, data: str) -> None:
        self.data.append(data)


def structure(html: str) -> _Structure:
    parser = _Structure()
    parser.feed(html)
    parser.close()
    return parser


_STYLE = re.compile(r"(<(style|script)\b[^>]*>).*?</\2>", re.S | re.I)
_START_TAG = re.compile(r"""<([a-zA-Z][^\s/>]*)((?:[^>"']|"[^"]*"|'[^']*')*)>""")
_ATTRS_DOUBLE_QUOTED = re.compile(r"""(?:\s+[^\s"'=<>/`]+="[^"<>]*")*\s*/?""")


def badly_quoted(html: str) -> list[str]:
    """Start tags (in comments too) with an attribute not written name="value", or with
    a quote, "<" or ">" inside a value."""
    html = _STYLE.sub(r"\1", html)  # style text is no markup; its start tag is
    return [
        m.group(0)
        for m in _START_TAG.finditer(html)
        if not _ATTRS_DOUBLE_QUOTED.fullmatch(m.group(2))
    ]


def flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------
# The reproduction from the issue.

REPRO = {
    "title": "Title </mj-text><mj-raw><script>x</script></mj-raw>",
    "source": "<b>Brain</b>",
    "category": "</mj-section>",
    "alt": "alt <img src=x> \" ' <!--<b c='d'> &amp;-->",
    "subject": "Hello </mj-text> <b>bold</b> & co",
    "preheader": "Preview </mj-preview><mj-raw>' \" & <!-- -->",
}


@pytest.fixture
def neutral(project: Path) -> BuildResult:
    path = project / "issues" / "neutral.yaml"
    path.write_text(issue_text({}), encoding="utf-8")
    return build_file(path, project)


class Reference:
    """The neutral issue's HTML structure, with a short repr for Hypothesis's reports."""

    def __init__(self, result: BuildResult) -> None:
        self.shape = structure(result.html).shape

    def __repr__(self) -> str:
        return "Reference(neutral issue)"


@pytest.fixture
def reference(neutral: BuildResult) -> Reference:
    return Reference(neutral)


def test_markup_in_plain_text_fields_is_text(project: Path, neutral: BuildResult) -> None:
    """Once "the plain text still contains '</mj-'" with no file or line: now it builds."""
    path = project / "issues" / "hostile.yaml"
    path.write_text(issue_text(REPRO), encoding="utf-8")
    result = build_file(path, project)
    assert result.report.failures == []
    got, want = structure(result.html), structure(neutral.html)
    assert got.shape == want.shape  # the same elements and attributes, in order
    data = flat("".join(got.data))
    for name in ("title", "source", "category", "subject", "preheader"):
        assert flat(REPRO[name]) in data, name
    assert REPRO["alt"] in got.values["img.alt"]
    assert REPRO["subject"] in got.values["div.aria-label"]
    assert "<script" not in result.html and "<mj-" not in result.html
    assert badly_quoted(result.html) == []
    text = flat(result.text)
    for name in ("title", "source", "category", "subject"):
        assert flat(REPRO[name]) in text, name
    assert "\x00" not in result.text and "\x00" not in result.eml.decode()


def test_markup_in_the_society_file_is_text(project: Path) -> None:
    def society(name: str) -> str:
        return (
            society_text(
                website="https://www.example.org",
                social="https://www.facebook.com/example",
                logo="https://www.example.org/logo.png",
            )
            .replace('"The MS Research Society"', yaml_quote(name))
            .replace('"12 Example Street, London"', yaml_quote(name + " street"))
            .replace('"Facebook"', yaml_quote(name[:30] + " page"))
        )

    path = project / "issues" / "plain.yaml"
    path.write_text(issue_text({}), encoding="utf-8")
    (project / "society.yaml").write_text(society("Society"), encoding="utf-8")
    plain = build_file(path, project)
    hostile = "</mj-text><mj-raw><script>x</script></mj-raw> \"q\"\u00a0'a' & \\"
    (project / "society.yaml").write_text(society(hostile), encoding="utf-8")
    result = build_file(path, project)
    got = structure(result.html)
    assert got.shape == structure(plain.html).shape
    assert hostile in "".join(got.data) and hostile[:30] + " page" in "".join(got.data)
    text = flat(result.text)
    assert flat(f"{hostile} street") in text and flat(f"{hostile[:30]} page:") in text
    assert badly_quoted(result.html) == []


def test_markup_in_the_web_version_is_text_and_double_quoted(project: Path) -> None:
    path = project / "issues" / "hostile.yaml"
    path.write_text(issue_text(REPRO), encoding="utf-8")
    web = web_version(
        load_issue(path).value,
        load_society(project / "society.yaml").value,
        load_templates(project / "templates"),
        "https://news.example.org",
    )
    assert badly_quoted(web) == []
    assert REPRO["alt"] in structure(web).values["img.alt"]


def test_markdown_may_show_markup_as_code(project: Path, write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["articles"][0]["summary"] = "Write `</mj-text>` and \\<mj-raw> and &lt;mj-column&gt;."
    result = build_file(write_issue(data), project)
    assert "Write </mj-text> and <mj-raw> and <mj-column>." in flat(result.text)
    assert "<code>&lt;/mj-text&gt;</code>" in result.html and "<mj-" not in result.html


# --------------------------------------------------------------------------
# Property: any text the validators accept builds to the same structure.

_PIECES = [
    "<",
    ">",
    "&",
    '"',
    "'",
    "`",
    "=",
    "/",
    "\\",
    "{",
    "}",
    "%",
    "[",
    "]",
    "</mj-text>",
    "<mj-raw>",
    "</mj-section>",
    "<mj-",
    "<b>",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<!--",
    "-->",
    "<!-->",
    "<!-- <i x='y'> -->",
    "<!--&amp;-->",
    "<![endif]-->",
    "]]>",
    "&amp;",
    "&#34;",
    "&quot;",
    "&lt;",
    "[[",
    "]]",
    "\u202e",
    "\u200f",
    "\u00a0",
    "\ufeff",
    "\U0001f600",
    "\u05d0",
    "x='y'",
    'a="b"',
    "\t",
    " ",
]
# Control characters and line breaks are refused (tested below); everything else goes.
_char = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))
_value = st.lists(
    st.one_of(st.sampled_from(_PIECES), st.text(alphabet=_char, min_size=1, max_size=4)),
    min_size=1,
    max_size=12,
).map("".join)
_LINE: TypeAdapter[str] = TypeAdapter(Line)


def accepted(value: str, limit: int) -> str | None:
    """The value as validation keeps it (stripped), or None when validation refuses it."""
    try:
        kept = _LINE.validate_python(value)
    except ValidationError:
        return None
    if "[[" in kept:
        return None  # merge-field syntax: its own rules (tests/test_merge_fields.py)
    return kept if len(kept) <= limit else None


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(values=st.fixed_dictionaries(dict.fromkeys(NEUTRAL, _value)))
def test_any_accepted_text_builds_to_the_same_structure(
    project: Path, reference: Reference, values: dict[str, str]
) -> None:
    kept = {name: accepted(value, LIMITS[name]) for name, value in values.items()}
    assume(all(v is not None for v in kept.values()))
    path = project / "issues" / "prop.yaml"
    path.write_text(issue_text(values), encoding="utf-8")
    result = build_file(path, project)  # never fails at the checks
    assert result.report.failures == []

    got = structure(result.html)
    assert got.shape == reference.shape
    assert badly_quoted(result.html) == []
    data = flat("".join(got.data))
    for name in ("title", "source", "category", "preheader"):
        assert flat(kept[name] or "") in data, name
    assert kept["alt"] in got.values["img.alt"]
    assert kept["subject"] in got.values["div.aria-label"]

    text = flat(result.text)
    for name in ("subject", "title", "source", "category"):
        assert flat(kept[name] or "") in text, name
    assert "\x00" not in result.text


_POISON = [
    ("\n", "must be a single line"),
    ("\r", "must be a single line"),
    ("\u2028", "must be a single line"),
    ("\x00", "control character U+0000"),
    ("\x1b", "control character U+001B"),
    ("\x7f", "control character U+007F"),
    ("\x9b", "control character U+009B"),
    ("{{", "template syntax"),
    ("{%", "template syntax"),
    ("[[UNSUBSCRIBE_URL]]", "placeholder"),
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(sorted(NEUTRAL)),
    poison=st.sampled_from(_POISON),
    before=st.text(alphabet=st.sampled_from("ab <>&\"'"), min_size=1, max_size=10),
    after=st.text(alphabet=st.sampled_from("ab <>&\"'"), min_size=1, max_size=10),
)
def test_refused_text_is_one_problem_with_file_line_and_field(
    project: Path, field: str, poison: tuple[str, str], before: str, after: str
) -> None:
    value = "x" + before + poison[0] + after + "x"
    path = project / "issues" / "refused.yaml"
    path.write_text(issue_text({field: value}), encoding="utf-8")
    with pytest.raises(ValidationFailed) as info:
        load_issue(path)
    where, line = FIELDS[field]
    (problem,) = info.value.problems  # one mistake, one problem
    assert str(problem).startswith(f"{path}:{line}: {where}: ")
    assert poison[1] in problem.message


_MARKDOWN_PIECES = [
    *_PIECES,
    "\n",
    "\n\n",
    "*",
    "**",
    "`",
    "_",
    "- ",
    "1. ",
    "> ",
    "[x](https://www.example.org/a)",
    '[x](https://www.example.org/a "t \\" \' <!-- -->")',
    "<https://www.example.org/auto>",
    "[ref]\n\n[ref]: https://www.example.org/r",
    "\\",
    "&nbsp;",
    "&#x202e;",
    "`<mj-text>`",
]
_markdown = st.lists(
    st.one_of(st.sampled_from(_MARKDOWN_PIECES), st.text(alphabet=_char, min_size=1, max_size=4)),
    min_size=1,
    max_size=16,
).map("".join)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(intro=_markdown, summary=_markdown)
def test_markdown_that_loads_builds(project: Path, intro: str, summary: str) -> None:
    """Markdown either is refused with file, line and field, or builds: never a placeless
    failure at the checks."""
    path = project / "issues" / "md.yaml"
    path.write_text(issue_text({}, intro=intro, summary=summary), encoding="utf-8")
    try:
        load_issue(path)
    except ValidationFailed as exc:
        assert all(
            p.line is not None and p.field in ("intro", "articles[0].summary") for p in exc.problems
        ), exc
        assume(False)
    result = build_file(path, project)
    assert result.report.failures == []
    assert badly_quoted(result.html) == []
    assert "\x00" not in result.text


def test_over_long_text_is_refused_with_file_line_and_field(project: Path) -> None:
    path = project / "issues" / "long.yaml"
    path.write_text(
        issue_text({name: "<b>" * (LIMITS[name] // 3 + 1) for name in NEUTRAL}), encoding="utf-8"
    )
    with pytest.raises(ValidationFailed) as info:
        load_issue(path)
    found = sorted(str(p) for p in info.value.problems)
    want = sorted(
        f"{path}:{line}: {where}: is {3 * (LIMITS[name] // 3 + 1)} characters; "
        f"the limit is {LIMITS[name]}"
        for name, (where, line) in FIELDS.items()
    )
    assert found == want


def test_refused_text_via_the_cli_names_file_line_and_field(project: Path) -> None:
    (project / "issues" / "bad.yaml").write_text(
        issue_text(
            {
                "subject": "Dear {{ name }}",
                "title": "Two\nlines",
                "alt": "escape \x1b[31m",
                "category": "c" * 61,
            }
        ),
        encoding="utf-8",
    )
    result = run_cli("build", "issues/bad.yaml", cwd=project)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 4 problems found; nothing was written:"
    assert lines[1:] == [
        "  issues/bad.yaml:1: subject: contains '{{', which is template syntax or a "
        "placeholder; remove it",
        "  issues/bad.yaml:6: articles[0].title: must be a single line (no line breaks)",
        "  issues/bad.yaml:9: articles[0].category: is 61 characters; the limit is 60",
        "  issues/bad.yaml:13: articles[0].image.alt: contains the control character "
        "U+001B; remove it",
    ]
    assert not (project / "build").exists()


# --------------------------------------------------------------------------
# Hostile URLs.

# character -> what the message must say
BAD_URL_CHARACTERS = {
    '"': 'a double quote ("), which a URL cannot hold as it is; write it percent-encoded, as %22',
    "'": "an apostrophe ('), which a URL cannot hold as it is; write it percent-encoded, as %27",
    "<": "a less-than sign (<), which a URL cannot hold as it is; write it percent-encoded, as %3C",
    ">": "a greater-than sign (>), which a URL cannot hold as it is; write it percent-encoded, "
    "as %3E",
    "\\": "a backslash (\\), which a URL cannot hold as it is; write it percent-encoded, as %5C",
    " ": "a space, which a URL cannot hold as it is; write it percent-encoded, as %20",
    "\t": "a tab, which a URL cannot hold as it is; write it percent-encoded, as %09",
    "\x01": "U+0001 CONTROL CHARACTER, which a URL cannot hold as it is; write it "
    "percent-encoded, as %01",
}


def _markdown_link(url: str) -> str:
    # <...> lets a link hold spaces; it cannot hold < or > themselves.
    target = url if any(c in url for c in "<>") else f"<{url}>"
    return f"Read [this]({target}) first."


def write_hostile_urls(project: Path, ch: str) -> tuple[Path, Path]:
    def bad(where: str) -> str:
        return f"https://www.example.org/{where}/a{ch}b"

    issue = project / "issues" / "urls.yaml"
    issue.write_text(
        issue_text(
            {},
            url=bad("article"),
            src=bad("image"),
            intro=_markdown_link(bad("intro")),
            summary=_markdown_link(bad("summary")),
        ),
        encoding="utf-8",
    )
    society = project / "society.yaml"
    society.write_text(
        society_text(website=bad("website"), social=bad("social"), logo=bad("logo")),
        encoding="utf-8",
    )
    return issue, society


def expected_url_problems(issue: str, society: str, ch: str) -> list[str]:
    said = BAD_URL_CHARACTERS[ch]
    if ch == "\x01":
        # In Markdown the text's own validation refuses a control character: once.
        md = "contains the control character U+0001; remove it"
        intro = summary = md
    else:
        link = "link {!r} contains " + said
        intro = link.format(f"https://www.example.org/intro/a{ch}b")
        summary = link.format(f"https://www.example.org/summary/a{ch}b")
    return [
        f"{issue}:4: intro: {intro}",
        f"{issue}:7: articles[0].url: contains {said}",
        f"{issue}:10: articles[0].summary: {summary}",
        f"{issue}:12: articles[0].image.src: contains {said}",
        f"{society}:4: website: contains {said}",
        f"{society}:10: logo.src: contains {said}",
        f"{society}:13: social[0].url: contains {said}",
    ]


@pytest.mark.parametrize("ch", list(BAD_URL_CHARACTERS), ids=repr)
def test_hostile_urls_are_refused_in_process(project: Path, ch: str) -> None:
    issue, society = write_hostile_urls(project, ch)
    problems: list[str] = []
    for load, path in ((load_issue, issue), (load_society, society)):
        with pytest.raises(ValidationFailed) as info:
            load(path)
        problems += [str(p) for p in info.value.problems]
    assert sorted(problems) == sorted(expected_url_problems(str(issue), str(society), ch))


@pytest.mark.parametrize("ch", list(BAD_URL_CHARACTERS), ids=repr)
def test_hostile_urls_are_refused_all_at_once_by_the_cli(project: Path, ch: str) -> None:
    write_hostile_urls(project, ch)
    result = run_cli("build", "issues/urls.yaml", cwd=project)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 7 problems found; nothing was written:"
    assert sorted(lines[1:]) == sorted(
        "  " + p for p in expected_url_problems("issues/urls.yaml", "society.yaml", ch)
    )
    assert not (project / "build").exists()


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("[x](https://www.example.org/&quot;)", 'https://www.example.org/"'),
        ('[x](https://www.example.org/\\")', 'https://www.example.org/"'),
        ("[x](https://www.example.org/&#9;)", "https://www.example.org/\t"),
        ("<https://www.example.org/a'b>", "https://www.example.org/a'b"),
        ("[r]\n\n[r]: <https://www.example.org/a b>", "https://www.example.org/a b"),
        ('[x](mailto:a"b@example.org)', 'mailto:a"b@example.org'),
    ],
)
def test_markdown_links_are_checked_as_markdown_reads_them(source: str, shown: str) -> None:
    """Character references and backslash escapes do not sneak a quote past lint."""
    messages = [issue.message for issue in markdown.lint(source)]
    assert len(messages) == 1 and messages[0].startswith(f"link {shown!r} contains ")


def test_well_formed_urls_still_pass() -> None:
    for source in (
        "[x](https://www.example.org/a%22b?q=1&r=2#frag)",
        "[x](https://www.example.org/(a)) and <https://www.example.org/b>",
        "[x](mailto:research@example.org)",
        "[x](https://例え.jp/パス)",
    ):
        assert markdown.lint(source) == [], source


@pytest.mark.parametrize(
    "source",
    ["&#123;&#123; name }}", "\\{\\{ name }}", "{*{* name", "&#123;% if %}", "&#91;&#91;EMAIL]]"],
)
def test_markdown_that_reads_as_template_syntax_is_refused(project: Path, source: str) -> None:
    """What Markdown makes of the text reaches both parts: refused at load, with the line."""
    path = project / "issues" / "md.yaml"
    text = issue_text({}).replace(
        '    summary: "A summary with [a link](https://www.example.org/summary)."\n',
        "    summary: |\n      First paragraph.\n\n      Second " + source + "\n",
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValidationFailed) as info:
        load_issue(path)
    (problem,) = info.value.problems
    assert problem.field == "articles[0].summary"
    assert problem.line == 13 and "Second" in text.splitlines()[12]
    assert "template syntax or a placeholder" in problem.message


# --------------------------------------------------------------------------
# Every attribute double-quoted.


def test_double_quote_attributes_rewrites_only_attributes() -> None:
    cases = {
        """<p a="1" b='x"y'>t c='d' "e"</p>""": """<p a="1" b="x&quot;y">t c='d' "e"</p>""",
        """<img alt='a"b' src="x"/>""": """<img alt="a&quot;b" src="x"/>""",
        "<td nowrap width=600 class=a-b>": '<td nowrap="" width="600" class="a-b">',
        "<style type='text/css'>a[x='1'] { b: c }</style><p x='\"'>": (
            '<style type="text/css">a[x=\'1\'] { b: c }</style><p x="&quot;">'
        ),
        "<!--[if mso]><table width='600' class=\"a\"><tr><td><![endif]-->": (
            '<!--[if mso]><table width="600" class="a"><tr><td><![endif]-->'
        ),
        '<br/><hr /><a href="x" ></a>': '<br/><hr /><a href="x" ></a>',
        # lxml writes a value holding "<!-- -->" as it is: no tag is read inside it
        """<img alt="<!--<b c='d'>-->" src="x"><i a='b'>""": (
            """<img alt="&lt;!--&lt;b c='d'&gt;--&gt;" src="x"><i a="b">"""
        ),
        "a < b <3 <p>x</p>": "a < b <3 <p>x</p>",
        "<v:rect xmlns:v=\"urn\" fill='true'><o:AllowPNG/>": (
            '<v:rect xmlns:v="urn" fill="true"><o:AllowPNG/>'
        ),
    }
    for given_html, want in cases.items():
        assert double_quote_attributes(given_html) == want
        assert double_quote_attributes(want) == want


def test_serialisation_guarantee_holds_for_css_with_quotes(project: Path) -> None:
    """lxml writes style='font-family:"Segoe UI"'; the email gets double quotes throughout."""
    css = project / "templates" / "inline.css"
    css.write_text(
        css.read_text(encoding="utf-8") + "\np { font-family: \"Segoe UI\", 'Helvetica Neue'; }\n",
        encoding="utf-8",
    )
    result = build_file(project / "issues" / EXAMPLE.name, project)
    assert "font-family:&quot;Segoe UI&quot;" in result.html
    assert badly_quoted(result.html) == []


def test_double_quoting_costs_little(neutral: BuildResult) -> None:
    html = (REPO / "tests" / "golden" / "2020-12-23" / "index.html").read_text(encoding="utf-8")
    assert double_quote_attributes(html) == html  # nothing to change: the golden file stands
    seconds = min(timeit.repeat(lambda: double_quote_attributes(html), number=20, repeat=5)) / 20
    assert seconds < 0.002, f"{seconds * 1000:.2f} ms for a {len(html)}-character email"


# --------------------------------------------------------------------------
# Every message names its file.


def _break(project: Path, name: str, old: str, new: str) -> tuple[Path, int]:
    """Replace ``old`` by ``new`` in a template; the line where ``new`` now starts."""
    path = project / "templates" / name
    source = path.read_text(encoding="utf-8")
    assert old in source
    source = source.replace(old, new, 1)
    path.write_text(source, encoding="utf-8")
    return path, source[: source.index(new)].count("\n") + 1


@pytest.mark.parametrize(
    ("name", "old", "new", "said"),
    [
        (
            "footer.mjml.j2",
            "<p>{{ society.registration }}</p>",
            "<p>{{ society.registration }}</p><script>x()</script>",
            "the HTML contains <script>",
        ),
        (
            "footer.mjml.j2",
            "<p>{{ society.registration }}</p>",
            '<p onclick="x()">{{ society.registration }}</p>',
            "<p> has an event handler (onclick)",
        ),
        (
            "footer.mjml.j2",
            '<a href="{{ society.website }}">',
            '<a href="http://www.example.org/">',
            "the link 'http://www.example.org/' is not an https:// or mailto: URL",
        ),
        (
            "email.mjml.j2",
            "<mj-column></mj-column>",
            "<mj-column><mj-frobnicate>x</mj-frobnicate></mj-column>",
            "the HTML still contains '<mj-frobnicate'",
        ),
        (
            "footer.mjml.j2",
            "<p>{{ society.registration }}</p>",
            "<p>{{ society.registration }} [[FIRST_NAME]]</p>",
            "the HTML contains the unknown placeholder [[FIRST_NAME]]",
        ),
        (
            "email.txt.j2",
            "{{ society.registration | wrap }}",
            "{{ society.registration | wrap }} [[FIRST_NAME]]",
            "the plain text contains the unknown placeholder [[FIRST_NAME]]",
        ),
        (
            "email.mjml.j2",
            "@media only screen",
            "@import url(https://fonts.example.com/x.css);\n      @media only screen",
            "the CSS loads something remote",
        ),
        (
            "inline.css",
            "h2 {",
            "h2 { background: url(https://t.example.com/bg.png); }\nh2 {",
            "the CSS loads something remote",
        ),
    ],
)
def test_a_broken_template_is_named_with_its_line(
    project: Path, name: str, old: str, new: str, said: str
) -> None:
    path, line = _break(project, name, old, new)
    with pytest.raises(BuildCheckFailed) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    assert any(
        f == f"{path}:{line}: {said}" or f.startswith(f"{path}:{line}: {said}")
        for f in info.value.failures
    ), info.value.failures


def test_mjml_pasted_into_the_text_template_is_named_with_its_line(project: Path) -> None:
    path, line = _break(project, "email.txt.j2", "Follow us:", "<mj-text>Follow us:</mj-text>")
    with pytest.raises(TemplateError) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    assert str(info.value).startswith(
        f"{path}:{line}: the text part contains '<mj-text' that the template wrote"
    )


def test_an_unsubscribe_link_missing_names_the_template(project: Path) -> None:
    _break(
        project, "footer.mjml.j2", '<a href="{{ unsubscribe_url }}">', '<a href="https://x.org">'
    )
    _break(project, "email.txt.j2", "  {{ unsubscribe_url }}", "  https://x.org")
    with pytest.raises(BuildCheckFailed) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    templates = project / "templates"
    assert f"{templates / 'email.mjml.j2'}: the HTML has no unsubscribe link" in str(info.value)
    assert f"{templates / 'email.txt.j2'}: the plain text has no unsubscribe link" in str(
        info.value
    )


def test_a_too_large_issue_names_the_issue_file(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    from conftest import ten_article_data

    data = ten_article_data()
    data["articles"] = data["articles"] * 3
    path = write_issue(data)
    with pytest.raises(BuildCheckFailed) as info:
        build_file(path, project)
    assert info.value.failures[0].startswith(f"{path}: the HTML is ")


def test_every_check_message_starts_with_a_file(project: Path, neutral: BuildResult) -> None:
    """All the failures check_message can report, each with the file to change first."""
    unsub = re.search(r"https://news\.example\.org/unsubscribe/\S+", neutral.text)
    assert unsub
    url = unsub.group(0)
    broken = (
        neutral.html.replace('<html lang="en-GB"', "<html")
        .replace("</head>", '<link rel="stylesheet" href="https://x.example.com/c.css"></head>')
        .replace('alt="Neutral alt"', 'title="no alt"')
        .replace(url, "https://x.org")
        .replace(
            "</body>",
            '<img src="http://t.example.com/p.gif" width="1" height="1" alt="" '
            'srcset="http://t.example.com/p2.gif 2x">'
            '<a href="http://example.org/x">x</a>{{ oops }} [[FIRST_NAME]]'
            '<div onclick="x()" style="background:url(//t.example.com/p)"></div>'
            '<div background="http://t.example.com/bg.png"></div>'
            '<meta http-equiv="refresh" content="0;url=https://x.org"><svg></svg><script></script>'
            "<!--" + "x" * 100_000 + "--></body>",
        )
    )
    sources = Sources(
        issue_file=project / "issues" / "neutral.yaml",
        society_file=project / "society.yaml",
        templates=project / "templates",
    )
    report = check_message(
        broken, "no link {% x %} [[FIRST_NAME]]", unsubscribe_url=url, sources=sources
    )
    expected = [
        "the HTML is",
        "<html> has no lang attribute",
        "the HTML contains <script>",
        "the HTML contains <svg>",
        "<div> has an event handler (onclick)",
        "<div background> points to 'http://t.example.com/bg.png', which is not https",
        "the HTML has a <meta http-equiv=refresh>",
        "the HTML links to a stylesheet",
        "the CSS loads something remote",
        "has no alt text",
        "is not an https URL",
        "the image srcset entry",
        "looks like a tracking pixel",
        "the link 'http://example.org/x' is not an https:// or mailto: URL",
        "the HTML has no unsubscribe link",
        "the plain text has no unsubscribe link",
        "the HTML still contains '{{'",
        "the plain text still contains '{%'",
        "the HTML contains the unknown placeholder [[FIRST_NAME]]",
        "the plain text contains the unknown placeholder [[FIRST_NAME]]",
    ]
    for said in expected:
        assert any(said in f for f in report.failures), said
    places = (str(sources.issue_file), str(sources.templates) + "/")
    for failure in report.failures:
        assert failure.startswith(places), failure
    assert all(w.startswith(places) for w in report.warnings)
    assert str(sources.society_file) in next(f for f in report.failures if "lang" in f)


def test_every_template_error_names_its_file(project: Path) -> None:
    templates = project / "templates"
    cases: list[tuple[str, str, str, str]] = [
        (
            "email.txt.j2",
            "{{ society.name }}",
            "{{ society.name | wrap(width=3) }}",
            "email.txt.j2:",
        ),
        (
            "footer.mjml.j2",
            "{{ society.registration }}",
            "{% include 'nope.j2' %}",
            "footer.mjml.j2:",
        ),
        ("email.txt.j2", "{{ society.name }}", "{{ society.nope }}", "email.txt.j2:"),
        ("email.txt.j2", "{{ society.name }}", "{% if %}", "email.txt.j2:"),
    ]
    original = {p.name: p.read_text(encoding="utf-8") for p in templates.iterdir()}
    for name, old, new, where in cases:
        for p in templates.iterdir():
            p.write_text(original[p.name], encoding="utf-8")
        _break(project, name, old, new)
        with pytest.raises(TemplateError) as info:
            build_file(project / "issues" / EXAMPLE.name, project)
        assert str(info.value).startswith(str(templates / where)), str(info.value)
    for p in templates.iterdir():
        p.write_text(original[p.name], encoding="utf-8")
    (templates / "footer.mjml.j2").write_bytes(b"caf\xe9\n")
    with pytest.raises(TemplateError) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    assert str(info.value) == f"{templates / 'footer.mjml.j2'} is not UTF-8 text; save it as UTF-8"


# ---------------------------------------------------- found by a second look


@pytest.mark.parametrize(
    "url",
    [
        "https://img.tracker.example/p.gif?who=[[EMAIL]]",
        "https://www.example.org/news/[[first_name]]",
        "https://www.example.org/{{x}}",
    ],
)
def test_no_placeholder_or_merge_field_in_a_url(
    project: Path, write_issue: Callable[..., Path], url: str
) -> None:
    data = example_data()
    data["articles"][0]["image"]["src"] = url
    data["articles"][1]["url"] = url
    with pytest.raises(ValidationFailed) as failed:
        build_file(write_issue(data), project)
    fields = sorted(p.field for p in failed.value.problems)
    assert fields == ["articles[0].image.src", "articles[1].url"], failed.value
    assert all("cannot hold a merge field" in p.message for p in failed.value.problems)


def test_an_address_at_an_imports_domain_is_not_remote_css(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    data = example_data()
    data["articles"][0]["summary"] += "\nWrite to info@imports.example.org, `@font-face`.\n"
    data["articles"][0]["source"] = "news@important.example.org"
    build_file(write_issue(data), project)


def test_an_empty_issue_file_is_one_problem(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    for text in ("", "---\n", "~\n"):
        with pytest.raises(ValidationFailed, match=r"the file (holds nothing|is empty)"):
            build_file(write_issue(text), project)


@pytest.mark.parametrize(
    "line",
    [
        "{{ issue.subject | longdate }}",
        "{{ 5 | wrap }}",
        '{{ "%d" | format("x") }}',
        '{% include "email.txt.j2" %}',
    ],
)
def test_a_template_mistake_inside_a_filter_names_the_template_line(
    project: Path, line: str
) -> None:
    template = project / "templates" / "email.txt.j2"
    template.write_text(line + "\n" + template.read_text("utf-8"), "utf-8")
    with pytest.raises(TemplateError, match=rf"^{re.escape(str(template))}:1: \w+"):
        build_file(project / "issues" / EXAMPLE.name, project)
