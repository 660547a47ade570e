"""The dry run's scratch copy from PostgreSQL holds exactly what the SQLite one holds.

A deployment made by the real CLI (tests/test_db_copy.py builds it: a finished
send, an interrupted one, opt-outs, suppressions) plus a list never sent to is
moved to a fresh PostgreSQL schema with `db copy`; then each case's scratch copy
is made from both backends, compared table by table, and checked against the
rows that case must hold.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from newsletter.storage import open_storage
from newsletter.storage.copy import copy_database
from newsletter.storage.location import parse_location
from smtp_server import Server
from test_db_copy import ISSUE, build_deployment, cli, env_for, write_list

TABLES = (
    "subscribers",
    "list_members",
    "suppressions",
    "list_optouts",
    "sends",
    "deliveries",
    "list_columns",
    "slots",
    "suppression_log",
    "archive",
    "locks",
)
FRESH = [f"reader{i:03d}@example.org" for i in range(25, 30)] + ["fresh@example.org"]


@pytest.fixture(scope="module")
def smtp() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, smtp: Server) -> Path:
    path = build_deployment(tmp_path_factory.mktemp("dry") / "project", smtp)
    project = path.parent
    write_list(project, "fresh", FRESH, cities=True)
    cli(project, env_for(smtp, path), "subscribers", "import", "fresh.csv", "--list", "fresh")
    storage = open_storage(path)
    try:
        storage.subscribers.opt_out("fresh", FRESH[1])
    finally:
        storage.close()
    conn = sqlite3.connect(path)
    with conn:
        # Rows frozen before deliveries kept attributes: the dry run reads the subscriber.
        conn.execute(
            "UPDATE deliveries SET attributes = NULL WHERE seq IN (2, 3) AND send_id = "
            "(SELECT id FROM sends WHERE list_name = 'research-news')"
        )
    conn.close()
    return path


@pytest.fixture
def moved(deployment: Path, postgres_url: str) -> str:
    copy_database(deployment, parse_location(postgres_url))
    return postgres_url


def scratch_rows(where: Path | str, issue_id: str, list_name: str) -> dict[str, list[Any]]:
    """Each table of the dry run's scratch copy made from the database at ``where``."""
    storage = open_storage(where)
    try:
        with storage.scratch_copy(issue_id, list_name) as scratch:
            conn = scratch.conn  # type: ignore[attr-defined]  # the SQLite scratch's own
            return {t: _rows(conn, t) for t in TABLES}
    finally:
        storage.close()


def _rows(conn: sqlite3.Connection, table: str) -> list[Any]:
    cursor = conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608
    names = [d[0] for d in cursor.description]
    out = []
    for row in cursor.fetchall():
        values = dict(zip(names, row, strict=True))
        if isinstance(values.get("attributes"), str):
            values["attributes"] = json.loads(values["attributes"])  # jsonb's text differs
        out.append(values)
    return sorted(out, key=repr)


def source_rows(path: Path, query: str, *params: Any) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(query, params)]
    finally:
        conn.close()


def test_a_list_not_sent_to_copies_its_members_and_the_issues_sends(
    deployment: Path, moved: str
) -> None:
    got = scratch_rows(moved, ISSUE, "fresh")
    assert got == scratch_rows(deployment, ISSUE, "fresh")
    assert sorted(r["email"] for r in got["subscribers"]) == sorted(FRESH)
    assert {r["list_name"] for r in got["list_members"]} == {"fresh"}
    assert len(got["list_members"]) == len(FRESH)
    assert [r["email"] for r in got["list_optouts"]] == [FRESH[1]]
    # every list's send of the issue, with all its deliveries, for the left-out count
    assert sorted(r["list_name"] for r in got["sends"]) == ["other", "research-news"]
    every = source_rows(deployment, "SELECT count(*) FROM deliveries")
    assert len(got["deliveries"]) == every[0] > 0
    assert {r["state"] for r in got["deliveries"]} >= {"sent", "sending", "pending", "deferred"}
    assert len(got["suppressions"]) == len(
        source_rows(deployment, "SELECT email FROM suppressions")
    )
    assert [r["name"] for r in got["list_columns"]] == ["city"]
    assert got["subscribers"][0]["attributes"] in ({"city": None}, {"city": "Lyon"}, {})
    for table in ("slots", "suppression_log", "archive", "locks"):
        assert got[table] == [], table


def test_a_frozen_send_copies_only_the_subscribers_its_old_rows_read(
    deployment: Path, moved: str
) -> None:
    got = scratch_rows(moved, ISSUE, "research-news")
    assert got == scratch_rows(deployment, ISSUE, "research-news")
    without = source_rows(
        deployment,
        "SELECT email FROM deliveries WHERE attributes IS NULL AND send_id = "
        "(SELECT id FROM sends WHERE list_name = 'research-news')",
    )
    assert len(without) == 2
    assert sorted(r["email"] for r in got["subscribers"]) == sorted(without)
    assert got["list_members"] == []
    assert {r["list_name"] for r in got["list_optouts"]} == {"research-news"}
    assert len(got["sends"]) == 2


def test_an_issue_never_sent_copies_the_list_and_no_send(deployment: Path, moved: str) -> None:
    got = scratch_rows(moved, "2031-01-01", "research-news")
    assert got == scratch_rows(deployment, "2031-01-01", "research-news")
    assert got["sends"] == [] and got["deliveries"] == []
    members = source_rows(
        deployment, "SELECT count(*) FROM list_members WHERE list_name = 'research-news'"
    )
    assert (
        len(got["subscribers"]) == len(got["list_members"]) == members[0] == 31
    )  # 30 imported, one joined by a signup


def test_the_real_database_is_not_written(moved: str) -> None:
    import psycopg

    def snapshot() -> list[Any]:
        """Each table's count and a digest of its rows."""
        with psycopg.connect(moved) as conn:
            found = []
            for table in TABLES:
                digest = "md5(string_agg(r::text, '|' ORDER BY r::text))"
                query = f'SELECT count(*), {digest} FROM "{table}" r'  # noqa: S608
                found.append(conn.execute(query).fetchone())
            return found

    before = snapshot()
    scratch_rows(moved, ISSUE, "fresh")
    scratch_rows(moved, ISSUE, "research-news")
    assert snapshot() == before
