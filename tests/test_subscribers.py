"""Importing subscriber CSV files and managing lists and suppressions, on both backends.

The store tests and the CLI tests run once on SQLite and once on PostgreSQL (the
``database`` fixture); what only SQLite has (its query plans) stays SQLite's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from newsletter.audience.csv_import import ParsedRow, read_csv
from newsletter.errors import Problem, ValidationFailed
from newsletter.storage import open_storage
from newsletter.storage.base import MAX_PROBLEMS, Storage, Subscribers
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.subscribers import SubscriberStore


@pytest.fixture
def store(database: str) -> Iterator[Subscribers]:
    """The subscriber store of a new database, on each backend in turn."""
    with closing(open_storage(database, create=True)) as storage:
        yield storage.subscribers


@pytest.fixture
def sqlite_store(tmp_path: Path) -> SubscriberStore:
    return SubscriberStore(connect(tmp_path / "subs.sqlite3", create=True))


@pytest.fixture
def other_database(database: str, tmp_path: Path) -> Iterator[str]:
    """A second new, empty database on the same backend as ``database``."""
    if database.startswith("postgresql"):
        from postgres_server import fresh_schema, server

        url, _why = server()
        assert url is not None  # `database` gave a PostgreSQL URL: there is a server
        with fresh_schema(url) as fresh:
            yield fresh
    else:
        yield str(tmp_path / "other.sqlite3")


@pytest.fixture
def subscribers_of() -> Iterator[Callable[..., Subscribers]]:
    """Opens the subscriber store of an existing database (``busy_seconds`` may be
    given); every one opened is closed at the end of the test."""
    opened: list[Storage] = []

    def open_one(database: str, busy_seconds: float = 30.0) -> Subscribers:
        opened.append(open_storage(database, busy_seconds=busy_seconds))
        return opened[-1].subscribers

    yield open_one
    for storage in opened:
        storage.close()


def execute(database: str, sql: str) -> None:
    """Run a statement (no parameters: the same text on both backends) as another tool
    would have written the database."""
    with closing(open_storage(database)) as storage:
        conn: Any = storage.conn  # type: ignore[attr-defined]  # the backend's own
        conn.execute(sql)
        if hasattr(conn, "commit"):
            conn.commit()


def csv_file(tmp_path: Path, content: bytes, name: str = "subs.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_excel_style_file_bom_semicolons_quotes_crlf(tmp_path: Path, store: Subscribers) -> None:
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
    tmp_path: Path, store: Subscribers
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
    with pytest.raises(ValidationFailed, match="no email column") as refused:
        next(read_csv(no_email))
    assert str(refused.value).startswith("1 problem found; nothing was imported:")
    empty = csv_file(tmp_path, b"", "e.csv")
    with pytest.raises(ValidationFailed, match="the file is empty"):
        next(read_csv(empty))
    with pytest.raises(ValidationFailed, match="cannot read the file"):
        next(read_csv(tmp_path / "missing.csv"))


def test_an_interrupted_import_leaves_the_list_as_it_was(store: Subscribers) -> None:
    store.import_rows("news", [ParsedRow(2, "first@example.org", "", "")], skip_invalid=False)

    def rows_then_crash() -> object:
        for i in range(500):
            yield ParsedRow(i + 2, f"r{i}@example.org", "", "")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.import_rows("news", rows_then_crash(), skip_invalid=False)  # type: ignore[arg-type]
    assert store.count("news") == (1, 0)


def test_suppression_survives_reimport_and_applies_to_every_list(store: Subscribers) -> None:
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


def test_audience_streams_in_batches(store: Subscribers) -> None:
    rows = [ParsedRow(i + 2, f"r{i:05d}@example.org", "", "") for i in range(2500)]
    store.import_rows("news", rows, skip_invalid=False)
    audience = store.audience("news")
    assert next(audience).email == "r00000@example.org"
    assert sum(1 for _ in audience) == 2499


@pytest.mark.parametrize("name", ["AUDIENCE_SQL", "MEMBERS_SQL"])
def test_batches_follow_the_primary_key_without_sorting(
    sqlite_store: SubscriberStore, name: str
) -> None:
    from newsletter.storage.sqlite import subscribers

    query = getattr(subscribers, name)
    params = ("x", 0, 5, '["town"]') if name == "AUDIENCE_SQL" else ("x", 0, 5)
    plan = " ".join(
        str(tuple(r)) for r in sqlite_store.conn.execute("EXPLAIN QUERY PLAN " + query, params)
    )
    assert "TEMP B-TREE" not in plan, plan
    assert "list_name=? AND subscriber_id>?" in plan


# -- absent columns, states, export round trip, unsuppress ------------------------------


def test_absent_columns_keep_stored_values_and_empty_cells_clear_them(
    tmp_path: Path, store: Subscribers
) -> None:
    full = csv_file(
        tmp_path, b"email,first_name,last_name,city,role\nann@example.org,Ann,Lee,Leeds,vol\n"
    )
    store.import_rows("news", read_csv(full), skip_invalid=False)
    # An email-only list for the board: names and attributes stay, on every list.
    board = csv_file(tmp_path, b"Email Address\nANN@example.org\n", "board.csv")
    assert store.import_rows("board", read_csv(board), skip_invalid=False).added == 1
    for name in ("news", "board"):
        [ann] = store.members(name)
        assert (ann.first_name, ann.last_name) == ("Ann", "Lee")
        assert ann.attributes == {"city": "Leeds", "role": "vol"}
    # A present, empty cell clears: the name becomes empty, the attribute goes.
    partial = csv_file(tmp_path, b"email,first_name,city\nann@example.org,,\n", "p.csv")
    assert store.import_rows("news", read_csv(partial), skip_invalid=False).updated == 1
    [ann] = store.members("board")
    assert (ann.first_name, ann.last_name, ann.attributes) == ("", "Lee", {"role": "vol"})
    assert [r.first_name for r in store.audience("news")] == [""]


def test_states_are_counted_and_shown(store: Subscribers) -> None:
    rows = [ParsedRow(i + 2, f"{n}@example.org", n, "") for i, n in enumerate("abcdef")]
    store.import_rows("news", rows, skip_invalid=False)
    store.import_rows("events", rows[:2], skip_invalid=False)
    assert store.opt_out("news", "a@example.org")  # left on the web page
    assert store.suppress("b@example.org", "bounced")
    assert store.suppress("c@example.org", "complained")
    assert store.opt_out("news", "c@example.org")  # both: suppressed wins, counted once
    states = store.states("news")
    assert (states.subscribed, states.opted_out, states.suppressed) == (
        3,
        1,
        {"bounced": 1, "complained": 1},
    )
    assert states.members == 6 == store.count("news")[0]
    assert {m.email: m.state for m in store.members("news")} == {
        "a@example.org": "opted-out",
        "b@example.org": "suppressed",
        "c@example.org": "suppressed",
        "d@example.org": "subscribed",
        "e@example.org": "subscribed",
        "f@example.org": "subscribed",
    }
    assert [m.state for m in store.members("events")] == ["subscribed", "suppressed"]
    assert states.subscribed == sum(1 for _ in store.audience("news"))


def test_imported_states_are_honoured_and_nothing_is_resubscribed(store: Subscribers) -> None:
    rows = [
        ParsedRow(2, "a@example.org", "A", "", {}, "opted-out"),
        ParsedRow(3, "b@example.org", "B", "", {}, "suppressed", "complained"),
        ParsedRow(4, "c@example.org", "C", "", {}),
    ]
    report = store.import_rows("news", rows, skip_invalid=False, actor="cli:test@host")
    assert (report.added, report.opted_out, report.newly_suppressed, report.suppressed) == (
        3,
        1,
        1,
        2,
    )
    assert [r.email for r in store.audience("news")] == ["c@example.org"]
    assert store.suppression_history("b@example.org")[0][1:] == (
        "suppress",
        "complained",
        "news",
        "cli:test@host",
    )
    # The same people as ordinary rows, into the same list: no state is lifted.
    again = [ParsedRow(r.line, r.email, r.first_name, "") for r in rows]
    assert store.import_rows("news", again, skip_invalid=False).suppressed == 2
    assert [r.email for r in store.audience("news")] == ["c@example.org"]


def cli_env(database: str) -> dict[str, str]:
    return {"NEWSLETTER_DATABASE": database}


def test_cli_import_reports_every_bad_line_and_exits_3_when_skipping(
    project: Path, database: str
) -> None:
    env = cli_env(database)
    content = (
        b"Email Address,First Name,Last Name\n"
        + b'ann@example.org,"Ann,Lee\n'  # line 2: stray quote
        + b"".join(b"r%d@example.org,R%d,X\n" % (i, i) for i in range(3, 1001))
        + b"j@example.org,J\xfcrgen,X\n"  # line 1001: a cp1252 byte
        + b"".join(b"r%d@example.org,R%d,X\n" % (i, i) for i in range(1002, 1501))
    )
    (project / "m.csv").write_bytes(content)
    refused = run_cli("subscribers", "import", "m.csv", "--list", "news", cwd=project, env=env)
    assert refused.returncode == 1
    assert "error: m.csv:2: a quote opened on this line is never closed" in refused.stderr
    assert "error: m.csv:1001: byte 0xFC" in refused.stderr
    assert "--encoding cp1252" in refused.stderr
    assert "2 bad row(s); nothing was imported" in refused.stderr
    skipped = run_cli(
        "subscribers", "import", "m.csv", "--list", "news", "--skip-invalid", cwd=project, env=env
    )
    assert skipped.returncode == 3, skipped.stderr
    assert "news: 1,497 added, 0 already on the list (updated)" in skipped.stdout
    assert "2 bad row(s) skipped" in skipped.stdout
    assert "exit status 3" in skipped.stderr
    count = run_cli("subscribers", "count", "--list", "news", cwd=project, env=env)
    assert count.stdout.startswith("news: 1,497 member(s): 1,497 subscribed")
    excel = project / "excel.csv"
    excel.write_bytes("email;First name\r\nj@example.org;Jürgen\r\n".encode("cp1252"))
    ok = run_cli(
        "subscribers", "import", "excel.csv", "--list", "news", "--encoding", "cp1252",
        cwd=project, env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    listed = run_cli("subscribers", "list", "--list", "news", cwd=project, env=env)
    assert "j@example.org  subscribed  Jürgen\n" in listed.stdout
    bogus = run_cli(
        "subscribers", "import", "excel.csv", "--list", "news", "--encoding", "utf-16",
        cwd=project, env=env,
    )  # fmt: skip
    assert bogus.returncode == 2 and "not supported for CSV files" in bogus.stderr
    header = project / "header.csv"
    header.write_bytes(b"email,,,name\n")
    bad_header = run_cli("subscribers", "import", "header.csv", "--list", "news", "--skip-invalid",
                         cwd=project, env=env)  # fmt: skip
    assert bad_header.returncode == 1
    assert "header.csv:1: column 2 has no name" in bad_header.stderr
    assert "header.csv:1: column 3 has no name" in bad_header.stderr
    unknown = run_cli("subscribers", "list", "--list", "nwes", cwd=project, env=env)
    assert unknown.returncode == 1 and "no list named 'nwes' (lists: news)" in unknown.stderr


def test_export_round_trips_states_and_attributes(
    project: Path, database: str, other_database: str, subscribers_of: Callable[..., Subscribers]
) -> None:
    env = cli_env(database)
    (project / "m.csv").write_text(
        "email,first_name,last_name,city,notes\n"
        "ann@example.org,Ann,Lee,Leeds,\n"
        'bob@example.org,Bob,"Smith, Jr.",,"two\nlines"\n'
        "cy@example.org,Cy,,York,\n"
        "dee@example.org,Dee,,,\n",
        encoding="utf-8",
    )
    assert (
        run_cli("subscribers", "import", "m.csv", "--list", "news", cwd=project, env=env).returncode
        == 0
    )
    subscribers_of(database).opt_out("news", "bob@example.org")
    run_cli(
        "subscribers", "unsubscribe", "cy@example.org", "--reason", "bounced", cwd=project, env=env
    )
    out = run_cli("subscribers", "export", "--list", "news", "out.csv", cwd=project, env=env)
    assert out.returncode == 0, out.stderr
    exported = (project / "out.csv").read_text(encoding="utf-8")
    lines = exported.splitlines()
    assert lines[0] == (
        "email,first_name,last_name,city,notes,newsletter_state,newsletter_reason,newsletter_since"
    )
    assert lines[1] == "ann@example.org,Ann,Lee,Leeds,,subscribed,,"
    assert lines[2].startswith('bob@example.org,Bob,"Smith, Jr.",,"two')
    assert 'lines",opted-out,,20' in exported  # the notes cell spans two lines
    assert "cy@example.org,Cy,,York,,suppressed,bounced,20" in exported
    # Into a fresh database, and into another list of the same one.
    for db, list_name in ((other_database, "moved"), (database, "other")):
        again = run_cli(
            "subscribers",
            "import",
            "out.csv",
            "--list",
            list_name,
            cwd=project,
            env=cli_env(db),
        )
        assert again.returncode == 0, again.stderr
        count = run_cli("subscribers", "count", "--list", list_name, cwd=project, env=cli_env(db))
        assert count.stdout.splitlines() == [
            f"{list_name}: 4 member(s): 2 subscribed (will be mailed), 1 opted out of this list, "
            "1 suppressed (1 bounced)",
            # The export's columns came along: the same merge fields.
            f"  merge fields an issue sent to {list_name} can use: [[first_name]], "
            "[[last_name]], [[email]], [[city]], [[notes]]",
        ]
        store = subscribers_of(db)
        assert [r.email for r in store.audience(list_name)] == [
            "ann@example.org",
            "dee@example.org",
        ]
        assert store.attribute_names(list_name) == ["city", "notes"]
        second = run_cli("subscribers", "export", "--list", list_name, cwd=project, env=cli_env(db))
        assert [line.rsplit(",", 1)[0] for line in second.stdout.splitlines()] == [
            line.rsplit(",", 1)[0] for line in lines
        ]


def test_unsuppress(
    project: Path, database: str, subscribers_of: Callable[..., Subscribers]
) -> None:
    import getpass
    import socket

    env = cli_env(database)
    (project / "m.csv").write_text("email\nann@example.org\n", encoding="utf-8")
    for name in ("news", "events", "board"):
        run_cli("subscribers", "import", "m.csv", "--list", name, cwd=project, env=env)
    store = subscribers_of(database)
    store.opt_out("board", "ann@example.org")
    run_cli(
        "subscribers", "unsubscribe", "ann@example.org", "--reason", "bounced", cwd=project, env=env
    )
    assert [r.email for r in store.audience("news")] == []

    def unsuppress(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("subscribers", "unsuppress", *args, cwd=project, env=env)

    assert unsuppress("ann@example.org").returncode == 2  # --reason is required
    for bad in ("", "   ", "fixed\nBcc: x", "x" * 201):
        refused = unsuppress("ann@example.org", "--reason", bad)
        assert refused.returncode == 2 and "--reason" in refused.stderr, bad
    assert unsuppress("not an address", "--reason", "x").returncode == 1
    assert store.suppression("ann@example.org") == "bounced"  # nothing changed so far
    lifted = unsuppress("ANN@Example.ORG", "--reason", "mailbox fixed, she phoned")
    assert lifted.returncode == 0, lifted.stderr
    assert "ann@example.org had been suppressed (bounced) since 20" in lifted.stdout
    assert "mailed by: events, news" in lifted.stdout
    assert "stays opted out of: board" in lifted.stdout
    assert [r.email for r in store.audience("news")] == ["ann@example.org"]
    assert [r.email for r in store.audience("board")] == []
    first, last = store.suppression_history("ann@example.org")
    assert first[1:3] == ("suppress", "bounced") and first[4] == last[4]
    when, action, reason, _, actor = last
    assert (action, reason) == ("unsuppress", "mailbox fixed, she phoned")
    assert actor == f"cli:{getpass.getuser()}@{socket.gethostname()}" and when.startswith("20")
    again = unsuppress("ann@example.org", "--reason", "again")
    assert again.returncode == 1 and "ann@example.org is not suppressed" in again.stderr
    shown = run_cli("subscribers", "show", "ann@example.org", cwd=project, env=env)
    assert "board: opted out" in shown.stdout and "news: member" in shown.stdout
    assert "unsuppress (mailbox fixed, she phoned) by cli:" in shown.stdout


def test_problems_beyond_the_cap_are_counted_not_held(store: Subscribers) -> None:
    yielded = []

    def rows() -> object:
        yield ParsedRow(2, "good@example.org", "", "")
        for line in range(3, MAX_PROBLEMS + 8):  # MAX_PROBLEMS + 5 bad rows
            yielded.append(Problem("big.csv", line, "email", "is empty"))
            if line % 2:  # some rows have two problems
                yielded.append(Problem("big.csv", line, "first_name", "has a control character"))
            yield from yielded[-2 if line % 2 else -1 :]

    report = store.import_rows("news", rows(), skip_invalid=True)  # type: ignore[arg-type]
    assert report.committed and report.added == 1
    assert report.skipped == MAX_PROBLEMS + 5  # rows, each counted once
    assert len(report.problems) == MAX_PROBLEMS
    assert report.problems == yielded[:MAX_PROBLEMS]
    assert report.more_problems == len(yielded) - MAX_PROBLEMS


def test_the_store_refuses_a_reason_that_is_not_one_line(store: Subscribers) -> None:
    store.suppress("ann@example.org", "bounced")
    for bad in ("", "two\nlines", "\u202eevil", "x" * 201):
        with pytest.raises(ValueError):
            store.unsuppress("ann@example.org", reason=bad, actor="web")
    assert store.suppression("ann@example.org") == "bounced"
    assert store.unsuppress("ann@example.org", reason="  fixed  ", actor="web") == "bounced"
    assert store.suppression_history("ann@example.org")[-1][2] == "fixed"


def test_an_export_imported_into_a_fresh_database_exports_the_same(
    project: Path, database: str, other_database: str, subscribers_of: Callable[..., Subscribers]
) -> None:
    # Moving to a new database (or back from another tool) keeps when each
    # person left: that date is the record of their request.
    with closing(open_storage(database, create=True)) as storage:
        rows = [
            ParsedRow(i + 2, f"{n}@example.org", n.upper(), "", {"town": n})
            for i, n in enumerate("abc")
        ]
        storage.subscribers.import_rows("news", rows, skip_invalid=False)
    execute(
        database,
        "INSERT INTO list_optouts VALUES ('news', 'b@example.org', '2025-03-04T05:06:07+00:00')",
    )
    execute(
        database,
        "INSERT INTO suppressions VALUES "
        "('c@example.org', 'complained', 'news', '2024-01-02T03:04:05+00:00')",
    )
    first = run_cli("subscribers", "export", "--list", "news", cwd=project, env=cli_env(database))
    assert first.returncode == 0, first.stderr
    assert "b@example.org,B,,b,opted-out,,2025-03-04T05:06:07+00:00" in first.stdout
    (project / "moved.csv").write_text(first.stdout, encoding="utf-8")
    env = cli_env(other_database)
    done = run_cli("subscribers", "import", "moved.csv", "--list", "news", cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    second = run_cli("subscribers", "export", "--list", "news", cwd=project, env=env)
    assert second.stdout == first.stdout
    # The log says when the import recorded it; the state keeps when it happened.
    [(when, action, reason, _list, _who)] = subscribers_of(other_database).suppression_history(
        "c@example.org"
    )
    assert (action, reason) == ("suppress", "complained") and when > "2026"
    # A time without an offset is UTC; one that is not a time is a problem on its line.
    (project / "odd.csv").write_text(
        "email,newsletter_state,newsletter_since\n"
        "d@example.org,opted-out,2025-03-04 05:06\n"
        "e@example.org,opted-out,last tuesday\n",
        encoding="utf-8",
    )
    odd = run_cli(
        "subscribers", "import", "odd.csv", "--list", "news", "--skip-invalid", cwd=project, env=env
    )
    assert odd.returncode == 3
    assert "odd.csv:3: newsletter_since: 'last tuesday' is not a date and time" in odd.stderr
    listed = run_cli("subscribers", "export", "--list", "news", cwd=project, env=env).stdout
    assert "d@example.org,,,,opted-out,,2025-03-04T05:06:00+00:00" in listed


def test_unsuppressing_a_complaint_warns(project: Path, database: str) -> None:
    env = cli_env(database)
    (project / "m.csv").write_text("email\nann@example.org\nbob@example.org\n", encoding="utf-8")
    run_cli("subscribers", "import", "m.csv", "--list", "news", cwd=project, env=env)
    for email, reason in (("ann@example.org", "complained"), ("bob@example.org", "bounced")):
        run_cli("subscribers", "unsubscribe", email, "--reason", reason, cwd=project, env=env)
    ann = run_cli(
        "subscribers",
        "unsuppress",
        "ann@example.org",
        "--reason",
        "her letter",
        cwd=project,
        env=env,
    )
    assert ann.returncode == 0, ann.stderr
    assert "warning: ann@example.org reported your mail as spam" in ann.stderr
    assert "mailed by: news" in ann.stdout
    bob = run_cli(
        "subscribers", "unsuppress", "bob@example.org", "--reason", "fixed", cwd=project, env=env
    )
    assert bob.returncode == 0 and "warning" not in bob.stderr


def _import_from_fifo(project: Path, env: dict[str, str]) -> tuple[Path, subprocess.Popen[str]]:
    """The real `subscribers import` reading a named pipe: the test decides when rows come."""
    import os
    import sys

    fifo = project / "slow.csv"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "subscribers", "import", str(fifo), "--list", "news"],
        cwd=project,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return fifo, child


def test_an_interrupted_import_imports_nothing_and_says_so(
    project: Path, database: str, subscribers_of: Callable[..., Subscribers]
) -> None:
    import signal
    import time

    env = cli_env(database)
    (project / "first.csv").write_text("email\nold@example.org\n", encoding="utf-8")
    run_cli("subscribers", "import", "first.csv", "--list", "news", cwd=project, env=env)
    fifo, child = _import_from_fifo(project, env)  # a file still being read at Ctrl-C
    with fifo.open("w", encoding="utf-8") as writer:
        writer.write("email,first_name\n")
        writer.write("".join(f"r{i}@example.org,R\n" for i in range(5000)))
        writer.flush()
        time.sleep(3)  # the rows are read, inside the import's transaction
        child.send_signal(signal.SIGINT)
        _out, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert "interrupted: nothing was imported; the lists are as they were" in err
    store = subscribers_of(database, busy_seconds=1)
    assert [m.email for m in store.members("news")] == ["old@example.org"]


def test_an_import_holds_no_lock_while_it_reads(
    project: Path, database: str, subscribers_of: Callable[..., Subscribers]
) -> None:
    # Reading and checking a large file takes most of an import's time; an
    # unsubscribe click meanwhile must not wait for it (the page gives up after
    # 20 s and answers "busy").
    import time

    env = cli_env(database)
    (project / "first.csv").write_text("email\nann@example.org\n", encoding="utf-8")
    run_cli("subscribers", "import", "first.csv", "--list", "news", cwd=project, env=env)
    fifo, child = _import_from_fifo(project, env)
    store = subscribers_of(database, busy_seconds=1)
    with fifo.open("w", encoding="utf-8") as writer:
        writer.write("email,first_name\nann@example.org,Ann\n")
        writer.write("".join(f"r{i}@example.org,R\n" for i in range(5000)))
        writer.flush()
        time.sleep(3)  # the import is reading, the file not finished
        assert store.opt_out("news", "ann@example.org")  # not "database is locked"
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "news: 5,000 added, 1 already on the list (updated)" in out
    assert "1 of them opted out of this list" in out
    assert [m.state for m in store.members("news")][:2] == ["opted-out", "subscribed"]
