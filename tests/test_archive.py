"""The archive: what was sent, once per id, served from a real server with HTTP caching.

Sends go through the real CLI to a real SMTP server (aiosmtpd on 127.0.0.1);
the pages come from a real uvicorn server over the same database. What the pages
read runs on both backends (the ``database`` fixture); the tests that send through
the CLI use SQLite.
"""

from __future__ import annotations

import email.utils
import http.client
import shutil
import sqlite3
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn

from conftest import EXAMPLE, REPO, TEST_KEY, run_cli
from newsletter import tokens
from newsletter.render import issue_ids
from newsletter.render.loading import load_society
from newsletter.storage import open_storage
from newsletter.storage.base import ArchivedIssue, Source, Storage
from newsletter.storage.sqlite.connection import connect
from newsletter.web.app import WebConfig, create_app
from newsletter.web.archive import Archive, Page
from smtp_server import Server

ID = "2020-12-23"
VIEW_LINE = "View this email in your browser"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def env_for(server: Server, project: Path, **extra: str) -> dict[str, str]:
    return {
        "NEWSLETTER_DATABASE": str(project / "newsletter.sqlite3"),
        "NEWSLETTER_SECRET_KEY": "test-secret-for-the-suite-0123456789",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SEND_CONNECTIONS": "2",
        "NEWSLETTER_SEND_MAX_WAIT": "0",
        **extra,
    }


def subscribe(
    project: Path, env: dict[str, str], n: int, list_name: str = "research-news", start: int = 0
) -> None:
    lines = ["email,first_name,last_name"] + [
        f"reader{i}@example.org,R,{i}" for i in range(start, start + n)
    ]
    (project / "subs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = run_cli("subscribers", "import", "subs.csv", "--list", list_name, cwd=project, env=env)
    assert done.returncode == 0, done.stderr


@contextmanager
def serving(
    project: Path, db: Path | str, public_url: str = "https://news.example.org"
) -> Iterator[tuple[str, Archive]]:
    society = load_society(project / "society.yaml").value
    archive = Archive(project / "issues", project / "templates", society, public_url)
    app = create_app(WebConfig(TEST_KEY, society, open_storage(db), archive))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", archive
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, parts.path or "/", headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def text(url: str) -> str:
    status, body, _ = fetch(url)
    assert status == 200, (url, status)
    return body.decode()


def archive_rows(db: Path) -> list[sqlite3.Row]:
    with closing(connect(db)) as conn:
        return conn.execute("SELECT * FROM archive").fetchall()


def sent_copy(project: Path, name: str = "2020-12-30.yaml", *, subject: str) -> Path:
    """Last week's file copied for this week, keeping its explicit `id:` (its date is
    updated: a file named for a day must carry that date, which is checked first)."""
    original = EXAMPLE.read_text(encoding="utf-8")
    body = original.replace(
        'subject: "MS Research News: stem cell therapy shows promise"', f'subject: "{subject}"'
    ).replace("\ndate: 2020-12-23\n", f"\ndate: {Path(name).stem}\n")
    path = project / "issues" / name
    path.write_text(f"id: {ID}\n{body}", encoding="utf-8")
    return path


# ------------------------------------------------------------------ duplicate ids


def test_build_refuses_an_id_that_another_file_claims(project: Path) -> None:
    sent_copy(project, subject="DRAFT - embargoed")
    copy = run_cli("build", "issues/2020-12-30.yaml", cwd=project)
    assert copy.returncode == 1
    assert f"issues/2020-12-30.yaml:1: id: '{ID}' (declared here) is also the id of " in (
        copy.stderr
    )
    assert "issues/2020-12-23.yaml (by its file name)" in copy.stderr
    assert "change `id:` in this file" in copy.stderr
    assert not (project / "build").exists()  # nothing written
    original = run_cli("build", f"issues/{EXAMPLE.name}", cwd=project)
    assert original.returncode == 1
    assert "issues/2020-12-30.yaml:1 (with `id:`)" in original.stderr
    assert "change `id:` in issues/2020-12-30.yaml" in original.stderr
    # every problem at once: a mistake elsewhere in the copy is reported with the clash
    broken = (project / "issues" / "2020-12-30.yaml").read_text().replace("date:", "dait:")
    (project / "issues" / "2020-12-30.yaml").write_text(broken)
    both = run_cli("build", "issues/2020-12-30.yaml", cwd=project)
    assert "dait: is not a known field" in both.stderr and "is also the id of" in both.stderr


def test_id_claims_read_quotes_comments_and_broken_files(tmp_path: Path) -> None:
    folder = tmp_path / "issues"
    folder.mkdir()
    (folder / "a.yaml").write_text('# id: not-this\nsubject: x\nid: "week-1"  # a comment\n')
    (folder / "b.yml").write_text("subject: [unclosed\nid: 'week-1'\n")  # not YAML
    (folder / "week-1.yaml").write_text("subject: named after its id\n")
    (folder / ".week-1.yaml.swp").write_text("id: week-1\n")  # an editor's, not an issue
    (folder / "notes.txt").write_text("id: week-1\n")
    found = {(c.file.name, c.issue_id, c.line) for c in issue_ids.claims(folder)}
    assert found == {
        ("a.yaml", "week-1", 3),
        ("b.yml", "week-1", 2),
        ("week-1.yaml", "week-1", None),
    }
    problems = issue_ids.clashes(folder / "week-1.yaml")
    assert [str(p).split(" is also the id of ")[1].split(" (")[0] for p in problems] == [
        f"{folder}/a.yaml:3",
        f"{folder}/b.yml:2",
    ]
    assert issue_ids.clashes(folder / "a.yaml", others=[]) == []


def test_send_refuses_an_id_already_sent_from_another_file(project: Path, server: Server) -> None:
    env = env_for(server, project)
    subscribe(project, env, 3)
    first = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    # last week's file is tidied away, so only the database knows the id was used
    (project / "sent").mkdir()
    shutil.move(project / "issues" / EXAMPLE.name, project / "sent" / EXAMPLE.name)
    sent_copy(project, subject="DRAFT - embargoed")
    for extra in ((), ("--dry-run",)):
        refused = run_cli("send", "issues/2020-12-30.yaml", "--yes", *extra, cwd=project, env=env)
        assert refused.returncode == 1, refused.stdout
        assert (
            f"issues/2020-12-30.yaml:1: id: the issue id '{ID}' was already used by the send "
            "to research-news" in refused.stderr
        )
        assert "from issues/2020-12-23.yaml, a different file" in refused.stderr
        assert "change `id:` in issues/2020-12-30.yaml (line 1)" in refused.stderr
        assert "Nothing was sent" in refused.stderr and "resume" not in refused.stdout
        assert "Run the same command again to resume" not in refused.stderr
    # to another list too: the archive has that id from the other file
    # (other people: members of both lists get an issue once, from its first list)
    subscribe(project, env, 2, "events", start=3)
    other = run_cli(
        "send", "issues/2020-12-30.yaml", "--list", "events", "--yes", cwd=project, env=env
    )
    assert other.returncode == 1 and "already used by" in other.stderr
    assert len(server.handler.received) == 3
    # the same file given another way, to another list, is the same issue
    moved = run_cli(
        "send",
        str(project / "sent" / EXAMPLE.name),
        "--list",
        "events",
        "--yes",
        cwd=project,
        env=env,
    )
    assert moved.returncode == 0, moved.stderr
    assert len(server.handler.received) == 5
    with serving(project, project / "newsletter.sqlite3") as (base, _):
        assert "DRAFT" not in text(f"{base}/issues/") + text(f"{base}/issues/{ID}")


def test_a_file_edited_during_its_send_resumes_when_accepted_and_the_archive_keeps_the_first(
    project: Path, server: Server
) -> None:
    env = env_for(server, project)
    subscribe(project, env, 4)
    server.handler.behaviour.reject = {"reader2@example.org": (451, "4.3.0 try later")}
    first = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert first.returncode == 3 and "deferred 1" in first.stdout, first.stdout
    path = project / "issues" / EXAMPLE.name
    first_sha = Source.of(path).sha256
    path.write_text(
        path.read_text().replace("stem cell therapy shows promise", "corrected subject line")
    )
    server.handler.behaviour.reject = {}
    refused = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert refused.returncode == 1 and "changed since" in refused.stderr
    resumed = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", "--accept-changes",
                      cwd=project, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "sent 4" in resumed.stdout
    out = " ".join((resumed.stdout + resumed.stderr).split())
    assert f"note: issues/{EXAMPLE.name} has changed since {ID} was first sent" in out
    assert "the archive keeps the version first sent" in out
    late = [r for r in server.handler.received if r.rcpt_tos == ["reader2@example.org"]]
    assert "corrected subject line" in str(late[0].message["Subject"])
    rows = archive_rows(project / "newsletter.sqlite3")
    assert len(rows) == 1 and rows[0]["source_sha256"] == first_sha
    assert "stem cell therapy shows promise" in rows[0]["subject"]
    with closing(connect(project / "newsletter.sqlite3")) as conn:
        sends = conn.execute("SELECT source_file, source_sha256 FROM sends").fetchall()
    assert [tuple(r) for r in sends] == [(f"issues/{EXAMPLE.name}", first_sha)]


# ------------------------------------------------------------------- what was sent


def test_the_archive_shows_what_was_sent_not_todays_file(project: Path, server: Server) -> None:
    env = env_for(server, project)
    subscribe(project, env, 2)
    assert run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env).returncode == 0
    path = project / "issues" / EXAMPLE.name
    path.write_text(path.read_text().replace("Positive Results Reported", "Rewritten history"))
    with serving(project, project / "newsletter.sqlite3") as (base, _):
        page = text(f"{base}/issues/{ID}")
        assert "Positive Results Reported" in page and "Rewritten history" not in page
        assert VIEW_LINE not in page  # the web version is the browser view
        assert "[[" not in page and "reader" not in page
        assert 'https://news.example.org/unsubscribe"' in page  # general, not personal
    # the email itself keeps its link to the web version
    sent = server.handler.received[0].message.get_body(("html",))
    assert sent is not None and VIEW_LINE in sent.get_content()
    assert f'href="https://news.example.org/issues/{ID}"' in sent.get_content()


def test_dry_runs_and_test_copies_leave_the_archive_alone(project: Path, server: Server) -> None:
    env = env_for(server, project)
    subscribe(project, env, 2)
    dry = run_cli("send", f"issues/{EXAMPLE.name}", "--dry-run", cwd=project, env=env)
    copy = run_cli("send", f"issues/{EXAMPLE.name}", "--to", "ed@example.org", cwd=project, env=env)
    assert dry.returncode == 0 and copy.returncode == 0, dry.stderr + copy.stderr
    assert archive_rows(project / "newsletter.sqlite3") == []


# ------------------------------------------------------------------------ caching


def sql(storage: Storage, statement: str, params: tuple[object, ...] = ()) -> Any:
    """Run ``statement`` (``?`` for parameters) on the storage's own connection, as a
    send would have written its rows; its cursor."""
    from newsletter.storage.postgres import PostgresStorage

    conn: Any = storage.conn  # type: ignore[attr-defined]  # the backend's own
    if isinstance(storage, PostgresStorage):
        statement = statement.replace("?", "%s")
    return conn.execute(statement, params)


@pytest.fixture
def archived(database: str) -> str:
    """A database where the bundled issue was frozen and delivered to one person."""
    with closing(open_storage(database, create=True)) as storage:
        add_sent_issue(
            storage, ID, "MS Research News: stem cell therapy shows promise", "2020-12-23"
        )
    return database


def add_sent_issue(storage: Storage, issue_id: str, subject: str, date: str) -> None:
    cur = sql(
        storage,
        "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
        "VALUES (?, 'research-news', ?, 1, 0) RETURNING id",
        (issue_id, f"{date}T14:00:00+00:00"),
    )
    send_id = cur.fetchone()[0]
    sql(
        storage,
        "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
        "VALUES (?, 0, 'ann@example.org', '', '', 'sent')",
        (send_id,),
    )
    storage.archive.freeze(
        ArchivedIssue(
            issue_id=issue_id,
            subject=subject,
            date=date,
            preheader="",
            html=f"<!doctype html><html lang='en'><p>{subject}</p></html>",
            source=Source(f"issues/{issue_id}.yaml", "0" * 64),
            frozen_at=f"{date}T14:00:01+00:00",
        )
    )


@pytest.mark.parametrize("path", ["/issues/", f"/issues/{ID}", "/feed.xml"])
def test_public_pages_are_cacheable_and_answer_conditional_requests(
    project: Path, archived: str, path: str
) -> None:
    with serving(project, archived) as (base, _):
        status, body, headers = fetch(base + path)
        assert status == 200 and body
        assert headers["cache-control"].startswith("public, max-age=")
        etag, modified = headers["etag"], headers["last-modified"]
        assert etag.startswith('"') and not etag.startswith("W/")
        assert email.utils.parsedate_to_datetime(modified).year == 2020
        for conditional in (
            {"If-None-Match": etag},
            {"If-None-Match": f'"other", W/{etag}'},
            {"If-None-Match": "*"},
        ) + (({"If-Modified-Since": modified},) if path == f"/issues/{ID}" else ()):
            status, empty, again = fetch(base + path, headers=conditional)
            assert (status, empty) == (304, b""), conditional
            assert again["etag"] == etag and again["cache-control"] == headers["cache-control"]
            assert again.get("content-length", str(len(body))) == str(len(body))  # RFC 9110 8.6
        for fresh in (
            {"If-None-Match": '"something-else"', "If-Modified-Since": modified},  # INM wins
            *(() if path == f"/issues/{ID}" else ({"If-Modified-Since": modified},)),
            {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"},
            {"If-Modified-Since": "not a date\r\n"[:-2]},
            {"If-None-Match": etag[:-3] + '"'},
        ):
            status, again_body, _ = fetch(base + path, headers=fresh)
            assert (status, again_body) == (200, body), fresh
        status, head_body, head = fetch(base + path, method="HEAD")
        assert (status, head_body) == (200, b"")
        assert head["etag"] == etag and head["content-length"] == str(len(body))
        assert head["content-type"] == headers["content-type"]


def test_personal_and_missing_pages_stay_no_store(project: Path, archived: str) -> None:
    with serving(project, archived) as (base, _):
        token = tokens.sign(TEST_KEY, "research-news", "ann@example.org")
        for path in (f"/unsubscribe/{token}", f"/preferences/{token}", "/issues/2099-01-01"):
            _, _, headers = fetch(base + path)
            assert headers["cache-control"] == "no-store", path
            assert "etag" not in headers


def test_rendered_once_per_change_of_the_archive(project: Path, archived: str) -> None:
    with serving(project, archived) as (base, archive):
        _, first, headers = fetch(f"{base}/issues/")
        _, feed, feed_headers = fetch(f"{base}/feed.xml")
        with closing(open_storage(archived)) as storage:
            page = archive.index_page(storage.archive, lambda e: b"not used")
        assert page.body == first  # the same bytes, not rendered again
        assert fetch(f"{base}/issues/")[2]["etag"] == headers["etag"]
        with closing(open_storage(archived)) as storage:
            add_sent_issue(storage, "2020-12-30", "Next week <b>&amp;</b> more", "2020-12-30")
        _, second, after = fetch(f"{base}/issues/")
        assert (
            after["etag"] != headers["etag"] and after["last-modified"] != headers["last-modified"]
        )
        assert b"Next week &lt;b&gt;&amp;amp;&lt;/b&gt; more" in second
        assert second.index(b"2020-12-30") < second.index(b"2020-12-23")  # newest first
        _, feed2, feed2_headers = fetch(f"{base}/feed.xml")
        assert feed2 != feed and feed2_headers["etag"] != feed_headers["etag"]
        ET.fromstring(feed2)  # noqa: S314 - our own feed, checked for well-formedness
        assert fetch(f"{base}/issues/", headers={"If-None-Match": headers["etag"]})[0] == 200


def test_links_are_absolute_under_the_public_url_path(project: Path, archived: str) -> None:
    with serving(project, archived, "https://charity.example/news") as (base, _):
        index = text(f"{base}/issues/")
        assert f'href="https://charity.example/news/issues/{ID}"' in index
        assert 'href="https://charity.example/news/feed.xml"' in index
        assert 'href="/' not in index
        feed = text(f"{base}/feed.xml")
        assert f'href="https://charity.example/news/issues/{ID}"' in feed
        assert '<link rel="self" href="https://charity.example/news/feed.xml"/>' in feed
        assert "<id>https://charity.example/news/issues/</id>" in feed


def test_hostile_issue_paths_are_404(project: Path, archived: str) -> None:
    with serving(project, archived) as (base, _):
        for path in (
            "/issues/..%2f..%2fetc",
            "/issues/%00",
            f"/issues/{ID}%0d%0aX:1",
            "/issues/" + "a" * 5000,
        ):
            status, _, headers = fetch(base + path)
            assert status == 404 and headers["cache-control"] == "no-store", path


# -------------------------------------------- sends from before the archive kept them


def legacy_send(db: str, issue_id: str) -> None:
    with closing(open_storage(db, create=True)) as storage:
        cur = sql(
            storage,
            "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
            "VALUES (?, 'research-news', '2020-12-23T14:00:00+00:00', 1, 0) RETURNING id",
            (issue_id,),
        )
        sql(
            storage,
            "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
            "VALUES (?, 0, 'ann@example.org', '', '', 'sent')",
            (cur.fetchone()[0],),
        )


def test_a_send_from_before_the_archive_is_rendered_once_from_its_file(
    project: Path, database: str
) -> None:
    db = database
    legacy_send(db, ID)
    path = project / "issues" / EXAMPLE.name
    with serving(project, db) as (base, _):
        index = text(f"{base}/issues/")
        assert "stem cell therapy shows promise" in index
        page = text(f"{base}/issues/{ID}")
        assert "Positive Results Reported" in page and VIEW_LINE not in page
        path.write_text(path.read_text().replace("stem cell therapy shows promise", "edited"))
        assert text(f"{base}/issues/") == index  # no YAML is read on a request
        assert text(f"{base}/issues/{ID}") == page


def test_a_send_from_before_the_archive_whose_id_two_files_claim_is_left_out(
    project: Path, database: str
) -> None:
    db = database
    legacy_send(db, ID)
    sent_copy(project, subject="DRAFT - embargoed")
    with serving(project, db) as (base, _):
        assert "No issue has been sent yet" in text(f"{base}/issues/")
        assert fetch(f"{base}/issues/{ID}")[0] == 404
        assert "DRAFT" not in text(f"{base}/feed.xml")


def test_page_validators_ignore_garbage() -> None:
    page = Page.of(b"x", "text/plain", "2020-12-23T14:00:00.123+00:00", 60)
    assert page.last_modified == "Wed, 23 Dec 2020 14:00:00 GMT"
    assert page.not_modified(None, "Wed, 23 Dec 2020 14:00:00 GMT")
    assert not page.not_modified(None, "Wed, 23 Dec 2020 13:59:59 GMT")
    for junk in ("", "yesterday", "Wed, 99 Foo 2020 99:99:99 GMT", "\x00" * 100, "1" * 10_000):
        assert not page.not_modified(None, junk), junk
        assert not page.not_modified(junk, None), junk
    assert page.not_modified(f" {page.etag} ", None) and page.not_modified("*", None)
    assert not page.not_modified(None, "Fri, 01 Jan 2100 00:00:00 GMT")  # a clock far ahead


def test_repository_example_still_builds_alone() -> None:
    # The bundled issues folder must never hold two files with one id.
    ids = [c.issue_id for c in issue_ids.claims(REPO / "issues")]
    assert len(ids) == len(set(ids))


def test_a_scheduled_send_keeps_the_web_version_too(project: Path, server: Server) -> None:
    env = env_for(
        server,
        project,
        NEWSLETTER_SCHEDULE="Wed 09:00",
        NEWSLETTER_TIMEZONE="America/New_York",
        NEWSLETTER_TEST_NOW="2020-12-23T09:30:00-05:00",
    )
    subscribe(project, env, 2)
    due = run_cli("send", "--due", cwd=project, env=env)
    assert due.returncode == 0, due.stdout + due.stderr
    rows = archive_rows(project / "newsletter.sqlite3")
    assert [r["issue_id"] for r in rows] == [ID]
    assert rows[0]["source_file"] == str(Path("issues") / EXAMPLE.name)
    assert VIEW_LINE not in rows[0]["html"] and "Positive Results Reported" in rows[0]["html"]


def test_the_version_check_sees_writes_on_its_own_connection_too(database: str) -> None:
    with closing(open_storage(database, create=True)) as storage:
        store = storage.archive
        assert store.published() == []
        add_sent_issue(storage, ID, "Subject", "2020-12-23")  # the same connection
        assert [p.issue_id for p in store.published()] == [ID]
        assert store.published()[0].archived


def test_a_copy_with_the_same_file_name_in_another_folder_is_another_file(
    project: Path, server: Server
) -> None:
    """One folder per issue (week1/issue.yaml, week2/issue.yaml): a copy that keeps `id:`
    shares the file name, but it is not the same file while the first one is still there."""
    env = env_for(server, project)
    subscribe(project, env, 2)
    body = EXAMPLE.read_text(encoding="utf-8")
    for week in ("week1", "week2"):
        (project / week).mkdir()
    (project / "week1" / "issue.yaml").write_text(f"id: week-one\n{body}", encoding="utf-8")
    first = run_cli("send", "week1/issue.yaml", "--yes", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    copy = body.replace("stem cell therapy shows promise", "DRAFT - embargoed")
    (project / "week2" / "issue.yaml").write_text(f"id: week-one\n{copy}", encoding="utf-8")
    refused = run_cli("send", "week2/issue.yaml", "--yes", cwd=project, env=env)
    assert refused.returncode == 1, refused.stdout
    assert "week2/issue.yaml:1: id: the issue id 'week-one' was already used" in refused.stderr
    assert "from week1/issue.yaml, a different file" in refused.stderr
    assert "resuming" not in refused.stdout and len(server.handler.received) == 2
    # the first file moved away (and edited): then the name is the same issue again
    shutil.move(project / "week1" / "issue.yaml", project / "issue.yaml")
    (project / "week1").rmdir()
    (project / "week1").mkdir()
    moved = run_cli("send", "week2/issue.yaml", "--yes", cwd=project, env=env)
    assert moved.returncode == 0 and "resuming" in moved.stdout, moved.stderr
    assert len(server.handler.received) == 2


def test_a_copy_that_keeps_the_id_of_a_send_from_before_version_2_is_refused(
    project: Path, server: Server
) -> None:
    """A database upgraded from schema 1: last week's send recorded no file. Last week's
    file is tidied away and a copy keeps its `id:`: the copy is neither "resumed" (reaching
    nobody) nor frozen into the archive, and the archive does not show it either."""
    env = env_for(server, project)
    subscribe(project, env, 2)
    db = project / "newsletter.sqlite3"
    with closing(connect(db)) as conn:
        cur = conn.execute(
            "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
            "VALUES (?, 'research-news', '2020-12-23T14:00:00+00:00', 2, 0) RETURNING id",
            (ID,),
        )
        send_id = cur.fetchone()[0]
        for seq, address in enumerate(("reader0@example.org", "reader1@example.org")):
            conn.execute(
                "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
                "VALUES (?, ?, ?, 'R', '', 'sent')",
                (send_id, seq, address),
            )
    (project / "sent").mkdir()
    shutil.move(project / "issues" / EXAMPLE.name, project / "sent" / EXAMPLE.name)
    sent_copy(project, subject="DRAFT - embargoed")
    with serving(project, db) as (base, _):
        for path in ("/issues/", f"/issues/{ID}", "/feed.xml"):
            assert b"DRAFT" not in fetch(base + path)[1], path
    refused = run_cli("send", "issues/2020-12-30.yaml", "--yes", cwd=project, env=env)
    assert refused.returncode == 1, refused.stdout
    assert f"issues/2020-12-30.yaml:1: id: the issue id '{ID}' was already used" in refused.stderr
    assert f"name it {ID}.yaml" in refused.stderr and "Nothing was sent" in refused.stderr
    assert "resuming" not in refused.stdout and archive_rows(db) == []
    # the file named for the id is that send's file: it resumes, and is kept from then on
    shutil.move(project / "sent" / EXAMPLE.name, project / "issues" / EXAMPLE.name)
    (project / "issues" / "2020-12-30.yaml").unlink()
    resumed = run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    [row] = archive_rows(db)
    assert row["source_file"] == f"issues/{EXAMPLE.name}" and "DRAFT" not in row["subject"]
    assert server.handler.received == []


def test_a_change_the_index_dates_do_not_show_is_never_answered_304(
    project: Path, archived: str
) -> None:
    """An issue published later but first started earlier (a send frozen last week and
    delivered only now) changes the list without moving its latest date: a client that
    revalidates with If-Modified-Since alone must still get the new list. Issue pages,
    frozen once sent, keep answering it."""
    with serving(project, archived) as (base, _):
        _, _, index = fetch(f"{base}/issues/")
        _, _, feed = fetch(f"{base}/feed.xml")
        _, _, issue = fetch(f"{base}/issues/{ID}")
        with closing(open_storage(archived)) as storage:
            add_sent_issue(storage, "2020-12-16", "Started earlier, delivered now", "2020-12-16")
        for path, headers in (("/issues/", index), ("/feed.xml", feed)):
            since = {"If-Modified-Since": headers["last-modified"]}
            status, body, _ = fetch(base + path, headers=since)
            assert status == 200 and b"Started earlier, delivered now" in body, path
        since = {"If-Modified-Since": issue["last-modified"]}
        assert fetch(f"{base}/issues/{ID}", headers=since)[0] == 304
