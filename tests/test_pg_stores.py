"""The PostgreSQL subscriber, archive and slot stores answer as the SQLite ones do.

One scenario of calls (imports with states, duplicates and bad rows, suppressions,
opt-outs, the preferences form, the archive, schedule slots) runs on a new SQLite
file and on a new PostgreSQL schema, and every answer is compared: values, errors
and order (also on a database whose collation is English, where names sort
differently from SQLite's byte order unless the queries say otherwise). Then
what only PostgreSQL has: sessions at once, and large imports.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from newsletter.audience.csv_import import ParsedRow
from newsletter.errors import Problem
from newsletter.storage import open_storage
from newsletter.storage.base import ArchivedIssue, Source, Storage

# Times the stores write now (created_at, frozen_at, ...): equal in substance on both
# backends but not to the second, so they are compared as "a time of this run".
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?\+00:00")


def _masked(text: str, started: dt.datetime) -> str:
    def mask(match: re.Match[str]) -> str:
        when = dt.datetime.fromisoformat(match.group(0))
        return "<now>" if when >= started - dt.timedelta(seconds=2) else match.group(0)

    return _TIME.sub(mask, text)


def _in_key_order(result: object) -> object:
    """``result`` with each record's attributes in key order: SQLite's JSON keeps the
    order they were written in, jsonb its own; both are the same mapping, and nothing
    reads attributes but by name."""
    if isinstance(result, list):
        return [_in_key_order(item) for item in result]
    attributes = getattr(result, "attributes", None)
    if dataclasses.is_dataclass(result) and isinstance(attributes, dict):
        return dataclasses.replace(result, attributes=dict(sorted(attributes.items())))  # type: ignore[type-var]
    return result


@dataclass(frozen=True)
class Slot:
    key: str
    local_day: dt.date


def sql(storage: Storage, statement: str, params: tuple[object, ...] = ()) -> Any:
    """A statement on the storage's own connection (``?`` for parameters), as a send
    would have written its rows (the send log is not these stores')."""
    from newsletter.storage.postgres import PostgresStorage

    conn: Any = storage.conn  # type: ignore[attr-defined]  # the backend's own
    if isinstance(storage, PostgresStorage):
        statement = statement.replace("?", "%s")
    return conn.execute(statement, params)


def scenario(storage: Storage) -> list[str]:
    """Every answer of one sequence of calls, as text, in order."""
    subs, archive, slots = storage.subscribers, storage.archive, storage.slots
    said: list[str] = []

    def note(what: str, call: Callable[[], object]) -> None:
        try:
            result = call()
            if isinstance(result, Iterator):
                result = list(result)
            result = _in_key_order(result)
        except Exception as exc:  # noqa: BLE001 - the error is the answer compared
            result = f"raised {type(exc).__name__}: {exc}"
        said.append(f"{what}: {result!r}")

    # Names whose order differs between byte order and a locale's (en_US puts
    # "alpha" before "Zeta" and ignores "_").
    rows: list[ParsedRow | Problem] = [
        ParsedRow(2, "ann@example.org", "Ann", "Lee", {"zeta": "z", "Town": "Leeds", "_x": ""}),
        ParsedRow(3, "bob@example.org", "Bob", None, {"zeta": "", "Town": "Bath"}),
        ParsedRow(4, "ann@example.org", "Annie", "Dup", {}),  # the same address again
        Problem("m.csv", 5, "email", "is empty"),
        Problem("m.csv", 5, "first_name", "has a control character"),
        ParsedRow(
            6, "cy@example.org", "Cy", "", {}, "opted-out", None, "2025-03-04T05:06:07+00:00"
        ),
        ParsedRow(7, "dee@example.org", "Dee", "", {}, "suppressed", "bounced", None),
        ParsedRow(8, "eve@example.org", "", "", {"Town": "York"}),
    ]
    note("refused", lambda: subs.import_rows("news", rows, skip_invalid=False))
    note("lists after refusal", subs.lists)
    note("skipping", lambda: subs.import_rows("news", rows, skip_invalid=True, actor="cli:t"))
    again = [r for r in rows if isinstance(r, ParsedRow)]
    note("again", lambda: subs.import_rows("news", again, skip_invalid=True))
    partial = [ParsedRow(2, "ann@example.org", "", None, {"Town": "", "éclair": "yes"})]
    note("partial", lambda: subs.import_rows("Events", partial, skip_invalid=False))
    note("alpha", lambda: subs.import_rows("alpha", again[:2], skip_invalid=False))
    for name in ("news", "Events", "alpha", "nobody"):
        note(f"count {name}", lambda name=name: subs.count(name))
        note(f"states {name}", lambda name=name: subs.states(name))
        note(f"attribute_names {name}", lambda name=name: subs.attribute_names(name))
        note(f"columns {name}", lambda name=name: subs.columns(name))
        note(f"members {name}", lambda name=name: subs.members(name))
        note(f"audience {name}", lambda name=name: subs.audience(name))
        note(f"audience+ {name}", lambda name=name: subs.audience(name, ["Town", "zeta", "no"]))
    note("lists", subs.lists)
    for email in ("ann@example.org", "dee@example.org", "nobody@example.org"):
        note(f"recipient {email}", lambda email=email: subs.recipient(email))
        note(f"lists_of {email}", lambda email=email: subs.lists_of(email))
        note(f"suppression_info {email}", lambda email=email: subs.suppression_info(email))
    note("suppress bad", lambda: subs.suppress("ann@example.org", "annoyed"))
    for reason in ("unsubscribed", "unsubscribed", "bounced", "unsubscribed", "complained"):
        note(f"suppress {reason}", lambda r=reason: subs.suppress("bob@example.org", r, actor=r))
    note("suppression", lambda: subs.suppression("bob@example.org"))
    note("unsuppress bad", lambda: subs.unsuppress("bob@example.org", reason="a\nb", actor="x"))
    note("unsuppress", lambda: subs.unsuppress("bob@example.org", reason=" ok ", actor="x"))
    note("unsuppress again", lambda: subs.unsuppress("bob@example.org", reason="ok", actor="x"))
    note("history", lambda: subs.suppression_history("bob@example.org"))
    note("history dee", lambda: subs.suppression_history("dee@example.org"))
    note("opt_out", lambda: subs.opt_out("news", "eve@example.org"))
    note("opt_out again", lambda: subs.opt_out("news", "eve@example.org"))
    note("opt_in", lambda: subs.opt_in("news", "cy@example.org"))
    note("opt_in again", lambda: subs.opt_in("news", "cy@example.org"))
    # The preferences form: leave every list, come back to one, and a bounce stays.
    note("choose none", lambda: subs.choose_lists("ann@example.org", [], actor="web"))
    note("lists_of ann", lambda: subs.lists_of("ann@example.org"))
    note("choose one", lambda: subs.choose_lists("ann@example.org", {"alpha"}, actor="web"))
    note("lists_of ann after", lambda: subs.lists_of("ann@example.org"))
    note("choose dee", lambda: subs.choose_lists("dee@example.org", ["news"], actor="web"))
    note("choose stranger", lambda: subs.choose_lists("x@example.org", [], actor="web"))
    note("history ann", lambda: subs.suppression_history("ann@example.org"))
    note("remove", lambda: subs.remove("news", iter(["eve@example.org", "eve@example.org", "z@x"])))
    note("members news", lambda: subs.members("news"))
    note("states news", lambda: subs.states("news"))

    # The archive: what was delivered, first writer wins, where each send came from.
    note("published empty", archive.published)
    for issue_id, state in (
        ("2020-12-30", "sent"),
        ("2020-12-23", "sent"),
        ("2021-01-06", "rejected"),
    ):
        send_id = sql(
            storage,
            "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
            "VALUES (?, 'news', ?, 1, 0) RETURNING id",
            (issue_id, f"{issue_id}T14:00:00+00:00"),
        ).fetchone()[0]
        sql(
            storage,
            "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
            "VALUES (?, 0, 'ann@example.org', '', '', ?)",
            (send_id, state),
        )
        note(
            f"record_source {issue_id}",
            lambda s=send_id: archive.record_source(s, Source("a", "1")),
        )
        note("record_source again", lambda s=send_id: archive.record_source(s, Source("b", "2")))
    issue = ArchivedIssue(
        "2020-12-23", "Subject", "2020-12-23", "pre", "<p>x</p>", Source("f", "0")
    )
    note("freeze", lambda: archive.freeze(issue))
    note(
        "freeze again",
        lambda: archive.freeze(
            ArchivedIssue(
                "2020-12-23",
                "Other",
                "2020-12-24",
                "",
                "",
                Source("g", "1"),
                "2020-12-24T00:00:00+00:00",
            )
        ),
    )
    note("get", lambda: archive.get("2020-12-23"))
    note("get missing", lambda: archive.get("1999-01-01"))
    note("summaries", archive.summaries)
    note("published", archive.published)
    note("uses", lambda: archive.uses("2020-12-23"))
    note("uses unknown", lambda: archive.uses("nothing"))

    # Schedule slots: an issue id once set is kept, details are cut, states checked.
    first, second = (
        Slot("2026-12-03T14:00Z", dt.date(2026, 12, 3)),
        Slot("2026-12-10T14:00Z", dt.date(2026, 12, 10)),
    )
    note("slot none", lambda: slots.state(first))
    note("slot set", lambda: slots.set(first, "sending", "2026-12-03", "started"))
    note("slot keep id", lambda: slots.set(first, "done", None, "x" * 3000))
    note("slot bad", lambda: slots.set(second, "exploded"))  # type: ignore[arg-type]
    note("slot second", lambda: slots.set(second, "missed"))
    note("slot state", lambda: slots.state(first))
    note("recent", slots.recent)
    note("recent 1", lambda: slots.recent(1))
    return said


@pytest.fixture
def english_collation_url(postgres_url: str) -> Iterator[str]:
    """A database of its own whose text sorts as English does (ICU en-US: case and
    punctuation are ignored first), as a server installed with an English locale has."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from postgres_server import server

    base, _why = server()
    assert base is not None
    name = "t_en_" + uuid.uuid4().hex[:12]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' "  # our own name
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
        english = conn.execute(
            "SELECT 'alpha' < 'Zeta' COLLATE \"en-US-x-icu\", '_x' > 'Town' COLLATE \"en-US-x-icu\""
        ).fetchone()
        assert english == (True, False)  # the order differs from bytes (and SQLite)
    try:
        yield urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("collation", ["server default", "English"])
def test_both_backends_answer_alike(
    tmp_path: Path, request: pytest.FixtureRequest, collation: str
) -> None:
    url = request.getfixturevalue(
        "postgres_url" if collation == "server default" else "english_collation_url"
    )
    started = dt.datetime.now(dt.UTC)
    answers = []
    for where in (str(tmp_path / "reference.sqlite3"), url):
        with closing(open_storage(where, create=True)) as storage:
            answers.append([_masked(line, started) for line in scenario(storage)])
    sqlite_said, postgres_said = answers
    assert len(sqlite_said) == len(postgres_said)
    for reference, ours in zip(sqlite_said, postgres_said, strict=True):
        assert ours == reference
    # The scenario did reach what it means to compare.
    assert any("raised ValueError" in line for line in sqlite_said)
    assert any(line.startswith("members news: [Member(") for line in sqlite_said)


# ---------------------------------------------------------------- PostgreSQL only


def _until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _waiting(monitor: Any, table: str) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND application_name = 'newsletter' AND query LIKE %s",
        (f"%{table}%",),
    ).fetchone()
    return int(row[0])


def test_a_complaint_recorded_while_the_preferences_form_is_saved_stays(
    postgres_url: str,
) -> None:
    """Someone ticks a list on the preferences page (that lifts an ``unsubscribed``
    suppression) while the feedback reader records their complaint: the form waits for
    the complaint and keeps it, it does not delete the row it read as ``unsubscribed``."""
    import psycopg

    with (
        closing(open_storage(postgres_url, create=True)) as web,
        closing(open_storage(postgres_url)) as feedback,
        closing(psycopg.connect(postgres_url)) as holder,
        closing(psycopg.connect(postgres_url, autocommit=True)) as monitor,
    ):
        web.subscribers.import_rows(
            "news", [ParsedRow(2, "ann@example.org", "", "")], skip_invalid=False
        )
        assert web.subscribers.choose_lists("ann@example.org", [], actor="web") == "unsubscribed"
        # The complaint, uncommitted yet, in a session of its own (as suppress writes it).
        holder.execute(
            "UPDATE suppressions SET reason = 'complained' WHERE email = 'ann@example.org'"
        )
        result: list[str | None] = []
        form = threading.Thread(
            target=lambda: result.append(
                web.subscribers.choose_lists("ann@example.org", ["news"], actor="web")
            )
        )
        form.start()
        _until(lambda: _waiting(monitor, "suppressions") == 1, "the form waits for the row")
        holder.commit()
        form.join(timeout=30)
        assert result == ["complained"]
        assert feedback.subscribers.suppression("ann@example.org") == "complained"
        assert [m.state for m in feedback.subscribers.members("news")] == ["suppressed"]


def test_two_imports_of_one_file_at_once_add_each_person_once(postgres_url: str) -> None:
    """Two imports of overlapping files at once: each address is one subscriber and one
    member, with the columns of whichever committed last; the two reports add up."""
    with (
        closing(open_storage(postgres_url, create=True)) as first,
        closing(open_storage(postgres_url)) as second,
    ):
        rows = [ParsedRow(i + 2, f"r{i:04d}@example.org", "F", "", {"n": "1"}) for i in range(2000)]
        reports = []
        barrier = threading.Barrier(2)

        def run(storage: Storage) -> None:
            barrier.wait()
            reports.append(storage.subscribers.import_rows("news", rows, skip_invalid=False))

        threads = [threading.Thread(target=run, args=(s,)) for s in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(reports) == 2 and all(r.committed for r in reports)
        assert sum(r.added for r in reports) == 2000
        assert sum(r.updated for r in reports) == 2000
        assert first.subscribers.count("news") == (2000, 0)
        assert len({m.email for m in first.subscribers.members("news")}) == 2000


def test_a_large_import_again_updates_everyone_and_streams_in_order(postgres_url: str) -> None:
    """20,000 rows (many batches): the same file again adds no one and updates everyone;
    the list then streams in batches by id. (Speed: benchmarks, not here.)"""
    rows = [
        ParsedRow(i + 2, f"r{i:06d}@example.org", "F", "L", {"town": "Leeds"})
        for i in range(20_000)
    ]
    with closing(open_storage(postgres_url, create=True)) as storage:
        subs = storage.subscribers
        report = subs.import_rows("news", rows, skip_invalid=False)
        assert (report.added, report.updated, report.duplicates) == (20_000, 0, 0)
        again = subs.import_rows("news", rows, skip_invalid=False)
        assert (again.added, again.updated, again.duplicates) == (0, 20_000, 0)
        audience = subs.audience("news", ["town"])
        assert next(audience).email == "r000000@example.org"
        last = None
        count = 1
        for count, last in enumerate(audience, start=2):  # noqa: B007 - the last one is kept
            pass
        assert count == 20_000 and last is not None and last.email == "r019999@example.org"
        assert last.attributes == {"town": "Leeds"}


def test_an_import_refused_part_way_leaves_nothing_behind(postgres_url: str) -> None:
    """A refused import and an interrupted one leave no rows, no temporary table, and the
    connection usable for the next import."""
    with closing(open_storage(postgres_url, create=True)) as storage:
        subs = storage.subscribers
        bad: list[ParsedRow | Problem] = [
            ParsedRow(2, "a@example.org", "", ""),
            Problem("m.csv", 3, "email", "is empty"),
        ]
        assert not subs.import_rows("news", bad, skip_invalid=False).committed

        def crash() -> Iterator[ParsedRow]:
            yield ParsedRow(2, "b@example.org", "", "")
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            subs.import_rows("news", crash(), skip_invalid=False)
        assert subs.lists() == []
        ok = subs.import_rows("news", [ParsedRow(2, "c@example.org", "", "")], skip_invalid=False)
        assert ok.committed and ok.added == 1
        assert sql(storage, "SELECT to_regclass('pg_temp.import_rows')").fetchone()[0] is None
