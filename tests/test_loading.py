"""Loading and validating issue files: every problem, with file, line and field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import EXAMPLE, REPO, example_data
from newsletter.errors import ValidationFailed
from newsletter.render.loading import load_issue, load_society


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ValidationFailed) as info:
        load_issue(path)
    return [str(p) for p in info.value.problems]


def test_example_issue_loads_with_id_from_file_name() -> None:
    loaded = load_issue(EXAMPLE)
    issue = loaded.value
    assert issue.id == "2020-12-23"
    assert issue.date.isoformat() == "2020-12-23"
    assert len(issue.articles) == 5
    lead = issue.articles[0]
    assert "Phase 2" in lead.title
    assert "Hadassah University Hospital" in lead.summary
    assert "48" in lead.summary
    assert lead.source == "Brain"
    assert lead.published is not None and lead.published.isoformat() == "2020-11-30"
    assert loaded.warnings == []


def test_minimal_form_from_the_contract(write_issue: Callable[..., Path]) -> None:
    path = write_issue(
        'subject: "MS Research News: stem cell therapy shows promise"\n'
        "date: 2020-12-30\n"
        "articles:\n"
        '  - title: "Positive Results Reported"\n'
        "    url: https://www.example.org/news/1\n"
        "    summary: |\n"
        "      A team from Hadassah University Hospital ...\n",
        name="2020-12-30.yaml",
    )
    issue = load_issue(path).value
    assert issue.id == "2020-12-30"
    assert issue.preheader is None and issue.intro is None


def test_society_file_loads() -> None:
    society = load_society(REPO / "society.yaml").value
    assert society.address and society.registration
    assert all(link.url.startswith("https://") for link in society.social)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["articles"][1].update(url="http://example.org/x"),
            "articles[1].url: must be an https:// URL (got http:)",
        ),
        (lambda d: d["articles"][0]["image"].pop("alt"), "articles[0].image.alt: is required"),
        (
            lambda d: d["articles"][0].update(summry="typo"),
            "articles[0].summry: is not a known field; did you mean `summary`?",
        ),
        (
            lambda d: d.update(subjet="typo"),
            "subjet: is not a known field; did you mean `subject`?",
        ),
        (
            lambda d: d["articles"][2].update(summary="Hi <script>alert(1)</script>"),
            "articles[2].summary: contains a <script> tag",
        ),
        (
            lambda d: d["articles"][2].update(summary='<img src=x onerror="alert(1)">'),
            "articles[2].summary: contains raw HTML",
        ),
        (
            lambda d: d["articles"][2].update(summary="[x](javascript:alert(1))"),
            "articles[2].summary: link 'javascript:alert(1)' must be an https:// or mailto: URL",
        ),
        (
            lambda d: d["articles"][2].update(summary="</mj-text></mj-column><mj-raw>x</mj-raw>"),
            "articles[2].summary: contains raw HTML",
        ),
        (
            lambda d: d.update(subject="Line one\nBcc: everyone@example.org"),
            "subject: must be a single line (no line breaks)",
        ),
        (lambda d: d.update(subject="x" * 151), "subject: is 151 characters; the limit is 150"),
        (lambda d: d.update(preheader="p" * 201), "preheader: is 201 characters; the limit is 200"),
        (lambda d: d.update(articles=[]), "articles: needs at least 1 entry"),
        (lambda d: d.update(date="2020-13-01"), "date: must be a date written as YYYY-MM-DD"),
        (lambda d: d["articles"][0].update(title=2020), "articles[0].title: must be text; put"),
        (
            lambda d: d["articles"][0]["image"].update(src="data:image/png;base64,AAAA"),
            "articles[0].image.src: must be an https:// URL",
        ),
        (
            lambda d: d["articles"][3].update(summary="# Heading\n\ntext"),
            "articles[3].summary: headings (#) are not supported here",
        ),
        (
            lambda d: d["articles"][3].update(summary="![pic](https://www.example.org/p.png)"),
            "articles[3].summary: images inside text are not supported",
        ),
    ],
)
def test_invalid_field_is_reported_with_line_and_field(
    write_issue: Callable[..., Path], change: Callable[[dict[str, object]], None], expected: str
) -> None:
    data = example_data()
    change(data)
    path = write_issue(data)
    found = problems_of(path)
    assert len(found) == 1, found
    assert expected in found[0]
    # file:line: prefix, with a real line number
    prefix = found[0].split(": ", 1)[0]
    file, line = prefix.rsplit(":", 1)
    assert file == str(path)
    assert int(line) >= 1


def test_every_problem_is_reported_at_once_with_exact_lines(
    write_issue: Callable[..., Path],
) -> None:
    path = write_issue(
        "subject: ok subject\n"  # 1
        "date: 2020-12-23\n"  # 2
        "colour: blue\n"  # 3  unknown key
        "intro: |\n"  # 4
        "  Hello <b>bold</b>\n"  # 5  raw HTML, on the 2nd line of the block
        "articles:\n"  # 6
        "  - title: A\n"  # 7
        "    url: http://example.org/a\n"  # 8  http
        "    summary: fine\n"  # 9
        "    image: {src: https://example.org/i.jpg}\n"  # 10 missing alt
        "  - title: B\n"  # 11
        "    url: https://example.org/b\n"  # 12
        "    summary: |\n"  # 13
        "      First line.\n"  # 14
        "      [bad](javascript:x)\n"  # 15 bad link
        "    title: again\n"  # 16 duplicate key
    )
    found = problems_of(path)
    f = str(path)
    assert found == [
        f"{f}:3: colour: is not a known field; known fields: id, subject, date, preheader, "
        "intro, articles",
        f"{f}:5: intro: contains raw HTML ('<b>'); write Markdown instead (*em*, **bold**, "
        "[text](url))",
        f"{f}:8: articles[0].url: must be an https:// URL (got http:)",
        f"{f}:10: articles[0].image.alt: is required",
        f"{f}:15: articles[1].summary: link 'javascript:x' must be an https:// or mailto: URL",
        f"{f}:16: articles[1].title: appears twice (first on line 11); keep only one",
    ]


def test_broken_yaml_names_the_line(write_issue: Callable[..., Path]) -> None:
    path = write_issue('subject: "unterminated\ndate: 2020-12-23\narticles: [\n')
    found = problems_of(path)
    assert len(found) == 1
    assert found[0].startswith(f"{path}:")
    assert "YAML syntax error" in found[0]


def test_unquoted_colon_gets_a_hint(write_issue: Callable[..., Path]) -> None:
    path = write_issue("subject: Research: news: today\ndate: 2020-12-23\n")
    (problem,) = problems_of(path)
    assert f"{path}:1:" in problem
    assert "put text that contains ': ' in quotes" in problem


def test_indented_markdown_would_become_code(write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["articles"][0]["summary"] = "Intro line.\n\n        Indented too far.\n"
    (problem,) = problems_of(write_issue(data))
    assert "indented 4 or more spaces" in problem


def test_bad_file_name_as_id_says_what_to_do(write_issue: Callable[..., Path]) -> None:
    path = write_issue(example_data(), name="my issue!.yaml")
    (problem,) = problems_of(path)
    assert "rename the file or add an `id:` field" in problem


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "file not found" in problems_of(tmp_path / "nope.yaml")[0]
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert "the file is empty" in problems_of(empty)[0]
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- a\n- b\n", encoding="utf-8")
    assert "key: value" in problems_of(top_list)[0]


def test_warnings_for_long_subject_and_missing_preheader(write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["subject"] = "A subject line that goes on and on, far past what any phone inbox shows"
    data["subject"] += " in its list"
    del data["preheader"]
    warnings = [str(w) for w in load_issue(write_issue(data)).warnings]
    n = len(data["subject"])
    assert n > 78
    assert any(f"subject: is {n} characters" in w for w in warnings)
    assert any("preheader: is not set" in w for w in warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("subject: &a [*a]\ndate: 2020-12-23\n", ":1: anchors and aliases"),
        ("a: &x [1, 2]\nb: [*x, *x]\n", ":1: anchors and aliases"),
        ("subject: x\ndate: 0\narticles: []\n", "date: must be a date written as YYYY-MM-DD"),
    ],
)
def test_yaml_tricks_are_refused(
    write_issue: Callable[..., Path], text: str, expected: str
) -> None:
    assert any(expected in p for p in problems_of(write_issue(text)))


def test_control_characters_and_template_syntax_are_refused(
    write_issue: Callable[..., Path],
) -> None:
    data = example_data()
    data["articles"][0]["summary"] = "Pasted from a word processor\x0bwith a vertical tab"
    data["articles"][1]["title"] = "Dear {{ name }}"
    data["articles"][2]["title"] = "Win [[UNSUBSCRIBE_URL]]"
    data["articles"][3]["source"] = "Line\u2028separator"
    found = "\n".join(problems_of(write_issue(data)))
    assert "articles[0].summary: contains the control character U+000B" in found
    assert "articles[1].title: contains '{{', which is template syntax" in found
    assert "articles[2].title: contains '[[UNSUBSCRIBE_URL]]'" in found
    assert "articles[3].source: must be a single line" in found


def test_out_of_range_numbers_are_explained(write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["articles"][0]["image"]["width"] = 8
    (problem,) = problems_of(write_issue(data))
    assert "articles[0].image.width: must be at least 16" in problem


def test_a_file_named_after_a_day_must_be_dated_that_day(write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["date"] = "2026-11-26"  # copied from last week, not updated
    path = write_issue(data, name="2026-12-03.yaml")
    (problem,) = problems_of(path)
    line = path.read_text(encoding="utf-8").splitlines().index("date: '2026-11-26'") + 1
    assert problem.startswith(
        f"{path}:{line}: date: is 2026-11-26, but the file is named for 2026-12-03"
    )
    assert "write `date: 2026-12-03`" in problem and "rename the file to 2026-11-26.yaml" in problem
    # other names carry no date: a special issue may be called anything
    assert (
        load_issue(write_issue(data, name="appeal-2026.yaml")).value.date.isoformat()
        == "2026-11-26"
    )
    data["date"] = "2026-12-03"
    assert load_issue(write_issue(data, name="2026-12-03.yaml")).value.id == "2026-12-03"


# --------------------------------------------------- invisible bidi characters

RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: shows the text after it backwards
PDF = "\u202c"  # POP DIRECTIONAL FORMATTING


def test_bidi_controls_warn_with_file_line_field_and_name(write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["subject"] = f"Research news: invoice {RLO}fdp.exe{PDF}"
    data["articles"][1]["title"] = "Trial \u2067results\u2069 in"
    data["articles"][2]["summary"] = (
        f"First line.\n\nSee [our {RLO}etis{PDF}](https://x.example.org/a)."
    )
    path = write_issue(data)
    loaded = load_issue(path)
    text = path.read_text(encoding="utf-8").splitlines()
    warnings = {w.field: w for w in loaded.warnings}
    subject = warnings["subject"]
    assert subject.line == next(i for i, t in enumerate(text) if t.startswith("subject:")) + 1
    assert "U+202E RIGHT-TO-LEFT OVERRIDE and U+202C POP DIRECTIONAL FORMATTING" in subject.message
    assert "`newsletter send` refuses" in subject.message
    assert "U+2067 RIGHT-TO-LEFT ISOLATE" in warnings["articles[1].title"].message
    summary = warnings["articles[2].summary"]
    assert summary.line is not None and "etis" in text[summary.line - 1]  # the very line
    assert {w.field for w in loaded.refused_by_send} == {
        "subject", "articles[1].title", "articles[2].summary",
    }  # fmt: skip


def test_right_to_left_text_itself_is_fine(write_issue: Callable[..., Path]) -> None:
    data = example_data()
    data["articles"][0]["title"] = "Hadassah (הדסה) results, 2020"
    data["articles"][1]["title"] = "نتائج التجربة\u200f 2020"  # a mark in Arabic text: as typed
    data["articles"][2]["source"] = "Brain\u200f"  # a mark with no right-to-left text around
    loaded = load_issue(write_issue(data))
    (warning,) = loaded.warnings
    assert warning.field == "articles[2].source"
    assert (
        "U+200F RIGHT-TO-LEFT MARK" in warning.message
        and "no right-to-left letters" in warning.message
    )
    assert loaded.refused_by_send == []


def test_bidi_in_the_society_file(project: Path) -> None:
    society = project / "society.yaml"
    text = society.read_text(encoding="utf-8")
    society.write_text(text.replace("name: ", f"name: {RLO}", 1), encoding="utf-8")
    loaded = load_society(society)
    (warning,) = loaded.refused_by_send
    assert warning.line == 1 + next(
        i for i, t in enumerate(text.splitlines()) if t.startswith("name: ")
    )


def test_build_strict_and_send_refuse_bidi_controls(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    from conftest import run_cli

    data = example_data()
    data["subject"] = f"Your account {RLO}gnp.exe"
    write_issue(data, name="2020-12-23.yaml")
    built = run_cli("build", "issues/2020-12-23.yaml", cwd=project)
    assert built.returncode == 0, built.stderr
    assert (
        "warning: issues/2020-12-23.yaml:1: subject: contains U+202E RIGHT-TO-LEFT OVERRIDE"
        in built.stderr
    )
    strict = run_cli("build", "--strict", "issues/2020-12-23.yaml", cwd=project)
    assert (
        strict.returncode == 1 and "(--strict) issues/2020-12-23.yaml:1: subject" in strict.stderr
    )
    env = {"NEWSLETTER_DATABASE": str(project / "db.sqlite3")}
    sent = run_cli("send", "issues/2020-12-23.yaml", "--dry-run", cwd=project, env=env)
    assert sent.returncode == 1, sent.stdout + sent.stderr
    assert "(send) issues/2020-12-23.yaml:1: subject: contains U+202E" in sent.stderr
    assert "dry run" not in sent.stdout


def test_bidi_controls_written_as_character_references(write_issue: Callable[..., Path]) -> None:
    """Markdown turns `&#x202E;` into the character itself: the same disguise."""
    data = example_data()
    data["articles"][0]["summary"] = (
        "Line one.\n\nRead [our &#x202E;etis&#8236;](https://x.example.org/a)\n"
    )
    path = write_issue(data)
    (refused,) = load_issue(path).refused_by_send
    assert refused.field == "articles[0].summary"
    assert "U+202E RIGHT-TO-LEFT OVERRIDE and U+202C POP DIRECTIONAL FORMATTING" in refused.message
    assert refused.line is not None
    assert "&#x202E;" in path.read_text(encoding="utf-8").splitlines()[refused.line - 1]


@pytest.mark.parametrize("bad_id", ["news..1", "news.", "-news", "a b"])
def test_ids_that_would_break_a_message_id_are_refused(
    write_issue: Callable[..., Path], bad_id: str
) -> None:
    data = example_data()
    data["id"] = bad_id
    found = problems_of(write_issue(data))
    assert any("id: must be 1-64 letters" in p and "no '..'" in p for p in found), found


def test_a_placeholder_is_refused_wherever_it_is_with_its_line(
    write_issue: Callable[..., Path],
) -> None:
    path = write_issue(
        'subject: "Stem cells"\n'
        "date: 2026-12-03\n"
        "articles:\n"
        '  - title: "A trial"\n'
        "    url: https://www.example.org/news/1\n"
        '    published: "TODO: YYYY-MM-DD"\n'
        "    summary: |\n"
        "      The first paragraph is written.\n"
        "\n"
        "      TODO: the second is not.\n",
        name="2026-12-03.yaml",
    )
    with pytest.raises(ValidationFailed) as info:
        load_issue(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:6: articles[0].published: is still a placeholder ('TODO: YYYY-MM-DD'): write "
        "it in place of the 'TODO:' text, or delete the field (it is optional)",
        f"{path}:10: articles[0].summary: is still a placeholder ('TODO: the second is not.'): "
        "write it in place of the 'TODO:' text",
    ]  # and not also "must be a date": the placeholder says what to do
