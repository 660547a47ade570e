"""Importing subscriber CSV files and managing lists and suppressions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from newsletter.csv_import import ParsedRow, read_csv
from newsletter.database import connect
from newsletter.errors import Problem, ValidationFailed
from newsletter.subscribers import SubscriberStore


@pytest.fixture
def store(tmp_path: Path) -> SubscriberStore:
    return SubscriberStore(connect(tmp_path / "subs.sqlite3"))


def csv_file(tmp_path: Path, content: bytes, name: str = "subs.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_excel_style_file_bom_semicolons_quotes_crlf(
    tmp_path: Path, store: SubscriberStore
) -> None:
    path = csv_file(
        tmp_path,
        "\ufeffE-mail;First name;Last name;City\r\n"
        'Ann@Example.ORG;Ann;"Lee; of Leeds";"Leeds"\r\n'
        '"bob@b\u00fccher.de";"Bob, Jr.";"Smith ""Smithy""";Bath\r\n'
        "ann@example.org;Annie;Lee;York\r\n"
        "\r\n".encode(),
    )
    rows = list(read_csv(path))
    assert all(isinstance(r, ParsedRow) for r in rows)
    report = store.import_rows("news", rows, skip_invalid=False)
    assert (report.added, report.duplicates, report.problems) == (2, 1, [])
    members = {m.email: m for m in store.members("news")}
    assert set(members) == {"ann@example.org", "bob@xn--bcher-kva.de"}
    assert members["ann@example.org"].last_name == "Lee; of Leeds"
    assert members["ann@example.org"].attributes == {"city": "Leeds"}
    assert members["bob@xn--bcher-kva.de"].first_name == "Bob, Jr."
    assert members["bob@xn--bcher-kva.de"].last_name == 'Smith "Smithy"'


def test_every_bad_row_is_reported_and_nothing_is_imported(
    tmp_path: Path, store: SubscriberStore
) -> None:
    path = csv_file(
        tmp_path,
        b"email,first_name\n"
        b"good@example.org,Good\n"
        b"not-an-address,Bad\n"  # line 3
        b",Nobody\n"  # line 4
        b'"evil@example.org\nBcc: x@example.org",Evil\n'  # line 5; line 6 read on its own
        b"tab@example.org,Tab\x07bell\n"  # line 7
        b"zo\xc3\xab@example.org,Zoe\n"  # line 8: needs SMTPUTF8
        b"extra@example.org,Extra,field\n",  # line 9
    )
    rows = list(read_csv(path))
    problems = [r for r in rows if isinstance(r, Problem)]
    lines = [p.line for p in problems]
    assert lines == [3, 4, 5, 6, 7, 8, 9]
    text = "\n".join(str(p) for p in problems)
    assert f"{path}:3: email: 'not-an-address' is not a valid address" in text
    assert f"{path}:4: email: is empty" in text
    assert f"{path}:7: first_name: contains a line break or a control character" in text
    report = store.import_rows("news", rows, skip_invalid=False)
    assert not report.committed and store.count("news") == (0, 0)
    skipped = store.import_rows("news", list(read_csv(path)), skip_invalid=True)
    assert skipped.committed and skipped.added == 1 and len(skipped.problems) == 7
    assert [m.email for m in store.members("news")] == ["good@example.org"]


def test_files_that_are_not_subscriber_lists(tmp_path: Path) -> None:
    latin1 = csv_file(tmp_path, "email\nj\u00fcrgen@example.org\n".encode("latin-1"), "l.csv")
    assert "is not utf-8 text" in str(next(read_csv(latin1)))
    no_email = csv_file(tmp_path, b"name,address\nAnn,ann@example.org\n", "n.csv")
    with pytest.raises(ValidationFailed, match="no email column"):
        next(read_csv(no_email))
    empty = csv_file(tmp_path, b"", "e.csv")
    with pytest.raises(ValidationFailed, match="the file is empty"):
        next(read_csv(empty))
    with pytest.raises(ValidationFailed, match="cannot read the file"):
        next(read_csv(tmp_path / "missing.csv"))


def test_an_interrupted_import_leaves_the_list_as_it_was(store: SubscriberStore) -> None:
    store.import_rows("news", [ParsedRow(2, "first@example.org", "", "")], skip_invalid=False)

    def rows_then_crash() -> object:
        for i in range(500):
            yield ParsedRow(i + 2, f"r{i}@example.org", "", "")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.import_rows("news", rows_then_crash(), skip_invalid=False)  # type: ignore[arg-type]
    assert store.count("news") == (1, 0)


def test_suppression_survives_reimport_and_applies_to_every_list(store: SubscriberStore) -> None:
    rows = [ParsedRow(2, "ann@example.org", "Ann", ""), ParsedRow(3, "bob@example.org", "", "")]
    store.import_rows("news", rows, skip_invalid=False)
    assert store.suppress("ann@example.org", "bounced")
    assert not store.suppress("ann@example.org", "unsubscribed")  # already suppressed
    report = store.import_rows("events", rows, skip_invalid=False)
    assert report.suppressed == 1
    for name in ("news", "events"):
        assert [r.email for r in store.audience(name)] == ["bob@example.org"]
        assert store.count(name) == (2, 1)
    assert store.remove("news", ["bob@example.org", "nobody@example.org"]) == 1
    assert [r.email for r in store.audience("events")] == ["bob@example.org"]


def test_audience_streams_in_batches(tmp_path: Path) -> None:
    conn: sqlite3.Connection = connect(tmp_path / "big.sqlite3")
    store = SubscriberStore(conn)
    rows = [ParsedRow(i + 2, f"r{i:05d}@example.org", "", "") for i in range(2500)]
    store.import_rows("news", rows, skip_invalid=False)
    audience = store.audience("news")
    assert next(audience).email == "r00000@example.org"
    assert sum(1 for _ in audience) == 2499


@pytest.mark.parametrize("name", ["AUDIENCE_SQL", "MEMBERS_SQL"])
def test_batches_follow_the_primary_key_without_sorting(store: SubscriberStore, name: str) -> None:
    from newsletter import subscribers

    query = getattr(subscribers, name)
    plan = " ".join(
        str(tuple(r)) for r in store.conn.execute("EXPLAIN QUERY PLAN " + query, ("x", 0, 5))
    )
    assert "TEMP B-TREE" not in plan, plan
    assert "list_name=? AND subscriber_id>?" in plan
