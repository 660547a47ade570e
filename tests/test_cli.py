"""The real command in a subprocess, in a temporary project folder."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path

from conftest import EXAMPLE, example_data, run_cli

FILES = ["index.html", "index.txt", "issue.mjml", "preview.eml"]


def test_build_writes_the_four_files_and_reports(project: Path) -> None:
    result = run_cli("build", f"issues/{EXAMPLE.name}", cwd=project)
    assert result.returncode == 0, result.stderr
    out = project / "build" / "2020-12-23"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert "built 2020-12-23 into build/2020-12-23/" in result.stdout
    assert "HTML " in result.stdout and "KB of Gmail's ~102 KB" in result.stdout
    assert result.stderr == ""
    msg = email.message_from_bytes((out / "preview.eml").read_bytes(), policy=email.policy.default)
    assert msg["To"] == "Sam Sample <sam.sample@example.org>"
    # nothing but the build folder was left behind
    assert [p.name for p in (project / "build").iterdir()] == ["2020-12-23"]


def test_two_builds_are_byte_identical(project: Path, tmp_path: Path) -> None:
    for out in ("a", "b"):
        result = run_cli(
            "build", f"issues/{EXAMPLE.name}", "--out", str(tmp_path / out), cwd=project
        )
        assert result.returncode == 0, result.stderr
    for name in FILES:
        a = (tmp_path / "a" / "2020-12-23" / name).read_bytes()
        b = (tmp_path / "b" / "2020-12-23" / name).read_bytes()
        assert a == b, name


def test_invalid_issue_exits_1_writes_nothing_and_keeps_the_previous_build(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    good = write_issue(example_data(), name="weekly.yaml")
    assert run_cli("build", str(good), cwd=project).returncode == 0
    before = {n: (project / "build" / "weekly" / n).read_bytes() for n in FILES}

    data = example_data()
    data["articles"][0]["url"] = "http://www.example.org/insecure"
    data["articles"][1]["summary"] = "<script>alert('x')</script>"
    data["articles"][2]["image"] = {"src": "https://www.example.org/i.jpg"}
    data["subjct"] = "typo"
    write_issue(data, name="weekly.yaml")
    result = run_cli("build", "issues/weekly.yaml", cwd=project)
    assert result.returncode == 1
    assert result.stdout == ""
    err = result.stderr
    assert "4 problems found; nothing was written" in err
    assert "issues/weekly.yaml:" in err
    for field in ("articles[0].url", "articles[1].summary", "articles[2].image.alt", "subjct"):
        assert field in err
    assert "Traceback" not in err
    after = {n: (project / "build" / "weekly" / n).read_bytes() for n in FILES}
    assert after == before
    assert sorted(p.name for p in (project / "build").iterdir()) == ["weekly"]


def test_broken_yaml_and_missing_file(project: Path) -> None:
    (project / "issues" / "broken.yaml").write_text("subject: [unclosed\n", encoding="utf-8")
    result = run_cli("build", "issues/broken.yaml", cwd=project)
    assert result.returncode == 1
    assert "issues/broken.yaml:" in result.stderr and "YAML syntax error" in result.stderr
    missing = run_cli("build", "issues/nope.yaml", cwd=project)
    assert missing.returncode == 1 and "issues/nope.yaml: file not found" in missing.stderr
    assert not (project / "build").exists()


def test_missing_template_variable_exits_1_without_output(project: Path) -> None:
    tpl = project / "templates" / "email.txt.j2"
    tpl.write_text(tpl.read_text(encoding="utf-8") + "{{ society.fax }}\n", encoding="utf-8")
    result = run_cli("build", f"issues/{EXAMPLE.name}", cwd=project)
    assert result.returncode == 1
    assert "email.txt.j2:" in result.stderr and "fax" in result.stderr
    assert not (project / "build").exists()


def test_strict_fails_on_warnings(project: Path, write_issue: Callable[..., Path]) -> None:
    data = example_data()
    del data["preheader"]
    path = write_issue(data)
    loose = run_cli("build", str(path), cwd=project)
    assert loose.returncode == 0 and "warning: " in loose.stderr and "preheader" in loose.stderr
    strict = run_cli("build", str(path), "--strict", "--out", "strict-out", cwd=project)
    assert strict.returncode == 1 and "(--strict)" in strict.stderr
    assert not (project / "strict-out" / "test-issue").exists()


def test_outside_a_project_folder_says_what_to_do(tmp_path: Path) -> None:
    issue = tmp_path / "x.yaml"
    issue.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    result = run_cli("build", str(issue), cwd=tmp_path)
    assert result.returncode == 1
    assert "society.yaml" in result.stderr and "NEWSLETTER_SOCIETY_FILE" in result.stderr


def test_settings_errors_are_reported(project: Path) -> None:
    result = run_cli(
        "build",
        f"issues/{EXAMPLE.name}",
        cwd=project,
        env={"NEWSLETTER_PUBLC_URL": "https://x.org"},
    )
    assert result.returncode == 1
    assert "NEWSLETTER_PUBLC_URL: not a known setting; did you mean NEWSLETTER_PUBLIC_URL?" in (
        result.stderr
    )


def test_help_and_version(project: Path) -> None:
    result = run_cli("--help", cwd=project)
    assert result.returncode == 0 and "build" in result.stdout
    assert run_cli("--version", cwd=project).stdout.startswith("newsletter, version ")
