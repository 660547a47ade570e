"""Building an issue: golden files, and every rule the email must keep."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, build_file, example_data, ten_article_data
from newsletter.build import BuildResult
from newsletter.errors import BuildCheckFailed, TemplateError
from newsletter.render.checks import SIZE_FAIL, SIZE_WARN, check_message
from newsletter.render.output import write_build

GOLDEN = REPO / "tests" / "golden"


@pytest.fixture
def example(project: Path) -> BuildResult:
    return build_file(project / "issues" / EXAMPLE.name, project)


def test_golden_files(example: BuildResult, tmp_path: Path, update_golden: bool) -> None:
    """The bundled issue builds to exactly the reviewed files (pytest --update-golden)."""
    out = write_build(example, tmp_path / "out")
    golden = GOLDEN / example.issue_id
    names = ["index.html", "index.txt", "issue.mjml", "preview.eml"]
    if update_golden:
        shutil.rmtree(golden, ignore_errors=True)
        golden.mkdir(parents=True)
        for name in names:
            shutil.copy(out / name, golden / name)
    for name in names:
        assert (out / name).read_bytes() == (golden / name).read_bytes(), (
            f"{name} differs from tests/golden; if the change is intended, review it and run "
            "pytest --update-golden"
        )


def test_same_input_gives_identical_output(project: Path, example: BuildResult) -> None:
    again = build_file(project / "issues" / EXAMPLE.name, project)
    assert again.eml == example.eml
    assert again.html == example.html and again.text == example.text
    assert again.rendered.mjml == example.rendered.mjml


def test_layout_is_responsive_and_the_media_rules_keep_important(example: BuildResult) -> None:
    html = example.html
    media = re.findall(r"@media only screen and \(min-width:480px\) \{(.*?)\}\s*\}", html, re.S)
    assert media, "MJML's column widths for wide screens must survive inlining"
    assert re.search(r"\.mj-column-per-34 \{ width:34% !important;", media[0])
    assert re.search(r"\.mj-column-per-100 \{ width:100% !important;", media[0])
    # mobile first: every column is full width unless the wide-screen rule applies
    columns = re.findall(
        r'<div class="mj-outlook-group-fix mj-column-per-\d+" style="([^"]*)"', html
    )
    assert columns and all("width:100%" in style for style in columns)
    # centred fixed-width body on desktop
    assert "margin:0px auto;max-width:600px" in html
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html


def test_template_css_is_inlined_and_doctype_kept(example: BuildResult) -> None:
    html = example.html
    assert html.startswith("<!doctype html>")
    h2 = re.search(r"<h2 style=\"([^\"]*)\">", html)
    assert h2 and "font-size:20px" in h2.group(1) and "color:#1d3b6f" in h2.group(1)
    title_link = re.search(
        r'<h2[^>]*><a href="https://www.example.org/news/[^"]+" style="([^"]*)"', html
    )
    assert title_link and "text-decoration:none" in title_link.group(1)
    assert re.search(r'<p class="meta" style="[^"]*font-size:14px', html)
    # the inlined rules are not repeated in a <style> block
    assert ".meta {" not in html and "h2 {" not in html


def test_nothing_remote_but_links_and_images(example: BuildResult) -> None:
    html = example.html
    assert re.search(r'<html lang="en-GB"', html)
    for banned in ("<link", "@import", "@font-face", "fonts.googleapis", "<script", "<iframe"):
        assert banned not in html.lower()
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) == 2
    for img in imgs:
        assert re.search(r'alt="[^"]+"', img)
        assert 'src="https://www.example.org/' in img
    for leftover in ("{{", "{%", "[[", "<mj-", "</mj-"):
        assert leftover not in html and leftover not in example.text


def test_plain_text_is_a_real_document(example: BuildResult) -> None:
    issue_text = example.text
    flat = " ".join(issue_text.split())
    data = example_data()
    assert data["subject"] in flat
    assert "This is our last issue of 2020" in flat
    for article in data["articles"]:
        assert " ".join(article["title"].split()) in flat
        assert article["url"] in issue_text.splitlines() or f"    {article['url']}" in issue_text
        first_words = " ".join(article["summary"].split()[:6]).replace("**", "")
        assert first_words in flat
    for line in ("12 Example Street", "London N1 2AB", "Registered charity no. 1234567"):
        assert line in flat
    assert "https://news.example.org/unsubscribe/" in issue_text
    assert "https://news.example.org/preferences/" in issue_text
    assert "sam.sample@example.org" in issue_text
    # not an HTML dump
    assert not re.search(r"</?[a-z]+[ >]", issue_text)
    assert "&amp;" not in issue_text and "**" not in issue_text
    for line in issue_text.splitlines():
        assert len(line) <= 72 or " " not in line.strip(), f"line too long: {line!r}"


def test_ten_article_issue_stays_under_gmail_clipping(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    result = build_file(write_issue(ten_article_data()), project)
    assert result.report.html_bytes < SIZE_WARN < SIZE_FAIL < 102_000
    assert len(result.html.encode()) == result.report.html_bytes
    assert result.report.warnings == []


def test_too_large_an_issue_fails_and_writes_nothing(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    data = ten_article_data()
    data["articles"] = data["articles"] * 3
    with pytest.raises(BuildCheckFailed) as info:
        build_file(write_issue(data), project)
    assert "Gmail clips messages above about 102 KB" in str(info.value)


def test_size_thresholds(example: BuildResult) -> None:
    unsub = re.search(r"https://news\.example\.org/unsubscribe/[^\s]+", example.text)
    assert unsub
    base = example.html

    def padded(total: int) -> str:
        pad = total - len(base.encode())
        return base.replace("</body>", "<!--" + "x" * (pad - 7) + "--></body>")

    ok = check_message(padded(SIZE_WARN), example.text, unsubscribe_url=unsub.group(0))
    assert ok.failures == [] and ok.warnings == []
    warn = check_message(padded(SIZE_WARN + 1), example.text, unsubscribe_url=unsub.group(0))
    assert warn.failures == [] and "close to Gmail's clipping point" in warn.warnings[0]
    fail = check_message(padded(SIZE_FAIL + 1), example.text, unsubscribe_url=unsub.group(0))
    assert "Gmail clips" in fail.failures[0]


def test_checks_catch_what_a_template_could_break(example: BuildResult) -> None:
    unsub = re.search(r"https://news\.example\.org/unsubscribe/[^\s]+", example.text)
    assert unsub
    url = unsub.group(0)
    broken = (
        example.html.replace('<html lang="en-GB"', "<html")
        .replace(
            "</head>", '<link rel="stylesheet" href="https://fonts.googleapis.com/css"></head>'
        )
        .replace('alt="Mesenchymal', 'title="Mesenchymal')
        .replace(
            "</body>",
            '<img src="https://t.example.com/p.gif" width="1" height="1" alt="">'
            '<a href="http://example.org/x">x</a>{{ oops }} [[FIRST_NAME]]</body>',
        )
    )
    report = check_message(broken, example.text, unsubscribe_url=url)
    joined = "\n".join(report.failures)
    for expected in (
        "no lang attribute",
        "links to a stylesheet",
        "has no alt text",
        "tracking pixel",
        "'http://example.org/x' is not an https",
        "template tag was not rendered",
        "unknown placeholder [[FIRST_NAME]]",
    ):
        assert expected in joined
    no_unsub = check_message(
        example.html.replace(url, "https://x.org"), "text", unsubscribe_url=url
    )
    assert any("HTML has no unsubscribe link" in f for f in no_unsub.failures)
    assert any("plain text has no unsubscribe link" in f for f in no_unsub.failures)


def test_missing_template_variable_names_template_and_line(project: Path) -> None:
    footer = project / "templates" / "footer.mjml.j2"
    lines = footer.read_text(encoding="utf-8").splitlines()
    lines.insert(7, "          <p>{{ society.charity_number }}</p>")
    footer.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    message = str(info.value)
    assert f"{footer}:8:" in message
    assert "charity_number" in message


def test_template_syntax_error_names_template_and_line(project: Path) -> None:
    text_tpl = project / "templates" / "email.txt.j2"
    text_tpl.write_text("line one\n{% if %}\n", encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    assert f"{text_tpl}:2: template syntax error" in str(info.value)


def test_broken_mjml_is_a_clear_error(project: Path) -> None:
    tpl = project / "templates" / "email.mjml.j2"
    tpl.write_text(tpl.read_text(encoding="utf-8").replace("</mj-body>", "", 1), encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        build_file(project / "issues" / EXAMPLE.name, project)
    assert "MJML could not compile" in str(info.value)


def test_strict_turns_warnings_into_errors(project: Path, write_issue: Callable[..., Path]) -> None:
    data = example_data()
    del data["preheader"]
    path = write_issue(data)
    assert build_file(path, project).report.warnings
    with pytest.raises(BuildCheckFailed) as info:
        build_file(path, project, strict=True)
    assert "(--strict)" in str(info.value) and "preheader" in str(info.value)


def test_checks_catch_scripts_and_remote_fetches_in_attributes(example: BuildResult) -> None:
    unsub = re.search(r"https://news\.example\.org/unsubscribe/[^\s]+", example.text)
    assert unsub
    broken = example.html.replace(
        "</body>",
        '<div onclick="x()">a</div><img src="https://www.example.org/a.png" alt="a" '
        'srcset="http://t.example.com/a.png 2x"><div style="background:url(//t.example.com/p)">'
        '</div><img src="https://t.example.com/p.gif" width="1px" alt="">'
        '<meta http-equiv="refresh" content="0;url=https://x.org"><svg></svg></body>',
    )
    report = check_message(broken, example.text, unsubscribe_url=unsub.group(0))
    joined = "\n".join(report.failures)
    for expected in (
        "event handler (onclick)",
        "srcset entry",
        "loads something remote",
        "tracking pixel",
        "meta http-equiv=refresh",
        "contains <svg>",
    ):
        assert expected in joined


def test_web_version_has_no_view_in_browser_line_and_no_personal_links(project: Path) -> None:
    from newsletter.render.loading import load_issue, load_society
    from newsletter.render.pipeline import web_version
    from newsletter.render.templating import load_templates

    email_html = build_file(project / "issues" / EXAMPLE.name, project).html
    assert "View this email in your browser" in email_html
    web = web_version(
        load_issue(project / "issues" / EXAMPLE.name).value,
        load_society(project / "society.yaml").value,
        load_templates(project / "templates"),
        "https://news.example.org",
    )
    assert "View this email in your browser" not in web
    assert "[[" not in web and "sam.sample" not in web and "/unsubscribe/" not in web
    assert 'href="https://news.example.org/unsubscribe"' in web
    assert "Positive Results Reported" in web
