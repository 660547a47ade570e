"""Shared fixtures: a temporary project folder and helpers to build issues in it.

Tests run against a copy of the repository's own templates, society file and
example issue, so what they check is what users get.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

from newsletter.build import BuildInputs, BuildResult, build
from newsletter.delivery.message import Sender
from newsletter.models import Recipient
from newsletter.storage import Storage, open_storage

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "issues" / "2020-12-23.yaml"
TEN_ARTICLES = REPO / "tests" / "data" / "ten-articles.yaml"
TEST_KEY = b"test-secret-key"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite tests/golden/ from the current output instead of comparing",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder like the repository: templates/, issues/, society.yaml."""
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    shutil.copytree(REPO / "issues", tmp_path / "issues")
    shutil.copy(REPO / "society.yaml", tmp_path / "society.yaml")
    return tmp_path


def sender() -> Sender:
    return Sender(
        name="MS Research News",
        address="news@example.org",
        list_name="research-news",
        public_url="https://news.example.org",
        token_key=TEST_KEY,
        unsubscribe_mailto="unsubscribe@example.org",
    )


def preview_recipient() -> Recipient:
    return Recipient("sam.sample@example.org", "Sam", "Sample")


def build_file(issue_file: Path, project: Path, **kw: Any) -> BuildResult:
    return build(
        BuildInputs(
            issue_file=issue_file,
            society_file=project / "society.yaml",
            templates_dir=project / "templates",
            sender=sender(),
            preview_recipient=preview_recipient(),
            **kw,
        )
    )


def example_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["date"] = str(data["date"])
    for art in data["articles"]:
        if "published" in art:
            art["published"] = str(art["published"])
    return data


def ten_article_data() -> dict[str, Any]:
    """A heavy but realistic week: ten articles, each with an image and a long summary."""
    data: dict[str, Any] = yaml.safe_load(TEN_ARTICLES.read_text(encoding="utf-8"))
    return data


class _NoAliasDumper(yaml.SafeDumper):
    """Write repeated objects out in full: issue files refuse YAML aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@pytest.fixture
def write_issue(project: Path) -> Callable[..., Path]:
    """Write an issue file (from data or raw text) into the project's issues/ folder."""

    def _write(content: dict[str, Any] | str, name: str = "test-issue.yaml") -> Path:
        path = project / "issues" / name
        text = (
            content
            if isinstance(content, str)
            else yaml.dump(content, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True)
        )
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command, in a subprocess, in a project folder."""
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "newsletter", *args],
        cwd=cwd,
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------- databases


@pytest.fixture
def postgres_url() -> Any:
    """The URL of an empty schema of its own on a PostgreSQL server (see
    tests/postgres_server.py); skipped, with the reason, where there is no server."""
    from postgres_server import fresh_schema, server

    url, why = server()
    if url is None:
        if os.environ.get("NEWSLETTER_TEST_POSTGRES_REQUIRED"):
            pytest.fail(f"PostgreSQL is required here (.ci/run) but {why}")
        pytest.skip(f"PostgreSQL tests need a server: {why}")
    with fresh_schema(url) as fresh:
        yield fresh


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """NEWSLETTER_DATABASE for a new, empty database on each backend in turn: an SQLite
    file's path (not created yet), or a PostgreSQL URL (an empty schema)."""
    if request.param == "sqlite":
        return str(tmp_path / "newsletter.sqlite3")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def any_db(database: str) -> Iterator[Storage]:
    """A new database on each backend in turn, opened (and created) as the CLI opens it."""
    with closing(open_storage(database, create=True)) as storage:
        yield storage
