"""`newsletter serve`: the unsubscribe pages, with a real server on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email
import email.policy
import html
import http.client
import re
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp

from conftest import EXAMPLE, REPO, TEST_KEY, build_file, sender
from newsletter import tokens
from newsletter.audience.csv_import import ParsedRow
from newsletter.delivery.message import MessageTemplate
from newsletter.models import Recipient
from newsletter.render.loading import load_society
from newsletter.storage import open_storage
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.subscribers import SubscriberStore
from newsletter.web.app import SECURITY_HEADERS, WebConfig, create_app
from newsletter.web.archive import Archive

EMAILS = ["ann@example.org", "bob@example.org"]
NOW = dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC)
SENT = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)  # the Date of this week's email


@dataclass
class Clock:
    """The pages' clock: tests move it to see links expire."""

    now: dt.datetime = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Site:
    base: str
    db: Path
    clock: Clock
    public_url: str = ""

    def audience(self, list_name: str = "research-news") -> list[str]:
        return [r.email for r in SubscriberStore(connect(self.db)).audience(list_name)]

    def store(self) -> SubscriberStore:
        return SubscriberStore(connect(self.db))

    def local(self, url: str) -> str:
        """A URL on the public site, as the proxy in front hands it to us (prefix stripped)."""
        assert url.startswith(self.public_url + "/"), url
        return self.base + url.removeprefix(self.public_url)


@contextmanager
def running(make_app: Callable[[str], ASGIApp]) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1; ``make_app`` gets its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(make_app(base), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def make_site(tmp_path: Path, public_url: str | None = None) -> Iterator[Site]:
    db = tmp_path / "web.sqlite3"
    store = SubscriberStore(connect(db, create=True))
    rows = [ParsedRow(i + 2, e, "", "") for i, e in enumerate(EMAILS)]
    for list_name in ("research-news", "events"):
        store.import_rows(list_name, rows, skip_invalid=False)
    society = load_society(REPO / "society.yaml").value
    with connect(db) as conn:  # the bundled issue has been sent to one list
        conn.execute(
            "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
            "VALUES ('2020-12-23', 'research-news', '2020-12-23T14:00:00+00:00', 2, 0)"
        )
        conn.execute(
            "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
            "VALUES (1, 0, 'ann@example.org', '', '', 'sent')"
        )
    archive = Archive(REPO / "issues", REPO / "templates", society, "https://news.example.org")
    clock = Clock()

    def app(base: str) -> ASGIApp:
        return create_app(
            WebConfig(
                TEST_KEY,
                society,
                open_storage(db, busy_seconds=0.5),
                archive,
                public_url=public_url or base,
                clock=clock,
            )
        )

    with running(app) as base:
        yield Site(base, db, clock, public_url or base)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from make_site(tmp_path)


def call(
    url: str,
    data: bytes | None = None,
    content_type: str | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    """One request as it is sent, redirects not followed; header names in lower case."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    sent = dict(headers or {})
    if content_type:
        sent["Content-Type"] = content_type
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method or ("POST" if data is not None else "GET"), path, data, sent)
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def token(address: str, list_name: str = "research-news", issued: dt.datetime = SENT) -> str:
    """The unsubscribe token of this week's email."""
    return tokens.make(TEST_KEY, tokens.Kind.UNSUBSCRIBE, list_name, address, issued)


def prefs_token(address: str, issued: dt.datetime = SENT, list_name: str = "research-news") -> str:
    return tokens.make(TEST_KEY, tokens.Kind.PREFERENCES, list_name, address, issued)


def legacy(address: str, list_name: str = "research-news") -> str:
    """A version 1 token, as in mail sent before tokens were opaque."""
    return tokens.sign(TEST_KEY, list_name, address)


def actions(body: str) -> list[str]:
    """The form actions on a page."""
    return re.findall(r'<form method="post" action="([^"]*)"', body)


FORM = "application/x-www-form-urlencoded"


def test_one_click_post_as_gmail_sends_it(site: Site) -> None:
    status, body, _ = call(
        f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"List-Unsubscribe=One-Click", FORM
    )
    assert status == 200 and "Unsubscribed" in body
    assert site.audience() == [EMAILS[1]]
    assert site.audience("events") == EMAILS  # only that list
    # importing the address again does not bring it back
    report = SubscriberStore(connect(site.db)).import_rows(
        "research-news", [ParsedRow(2, EMAILS[0], "", "")], skip_invalid=False
    )
    assert report.suppressed == 1 and site.audience() == [EMAILS[1]]


def test_get_shows_and_changes_nothing(site: Site) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[0])}"
    for _ in range(3):  # a link scanner, then another
        status, body, headers = call(url)
        assert status == 200
    assert EMAILS[0] in body and actions(body) == [url] and "<script" not in body
    assert site.audience() == EMAILS
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value or headers.get(name.title()) == value


def test_button_then_undo(site: Site) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[1])}"
    status, body, _ = call(url, b"confirm=yes", FORM)
    assert status == 200 and "will get no more" in body
    [undo] = actions(body)
    assert undo.startswith(f"{site.base}/undo/")
    assert site.audience() == [EMAILS[0]]
    status, body, _ = call(undo, b"confirm=yes", FORM)
    assert status == 200 and "Welcome back" in body
    assert site.audience() == EMAILS
    # a POST that is neither one-click nor the button changes nothing
    status, _, _ = call(url, b"something=else", FORM)
    assert status == 400 and site.audience() == EMAILS


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-token",
        token(EMAILS[0])[:-2] + "AA",  # altered signature
        legacy(EMAILS[0], "other-list").split(".")[0] + "." + legacy(EMAILS[0]).split(".")[1],
        tokens.sign(b"someone else's key", "research-news", EMAILS[0]),
        tokens.make(b"someone else's key", tokens.Kind.UNSUBSCRIBE, "research-news", "x", SENT),
        token(EMAILS[0])[:10] + token(EMAILS[0])[11:],  # a character lost
        token(EMAILS[0]) + "A",
        prefs_token(EMAILS[0]),  # a real token, of another kind
        "A" * 5000,
        "%00%0d%0a",
    ],
)
def test_forged_tokens_change_nothing_and_reveal_nothing(site: Site, bad: str) -> None:
    for data in (None, b"List-Unsubscribe=One-Click"):
        status, body, _ = call(f"{site.base}/unsubscribe/{bad}", data, FORM if data else None)
        assert status == 404
        assert "not valid" in body and "@" not in body.split("<body>")[1].split('example.org">')[0]
    assert site.audience() == EMAILS


def test_the_link_in_a_sent_message_works(site: Site, project: Path) -> None:
    rendered = build_file(project / "issues" / EXAMPLE.name, project).rendered
    raw = MessageTemplate(rendered, sender()).personalise(
        Recipient(EMAILS[0]), date=dt.datetime(2020, 12, 23, tzinfo=dt.UTC)
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    one_click = str(msg["List-Unsubscribe"]).split("<")[1].split(">")[0]
    path = one_click.removeprefix("https://news.example.org")
    status, _, _ = call(site.base + path, b"List-Unsubscribe=One-Click", FORM)
    assert status == 200 and site.audience() == [EMAILS[1]]


def test_preferences_leave_some_or_all_lists(site: Site) -> None:
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    status, body, _ = call(url)
    assert status == 200 and 'name="list:events" checked' in body
    assert 'name="list:research-news" checked' in body
    assert actions(body) == [url]
    assert site.audience() == EMAILS  # looking changes nothing
    status, body, _ = call(url, b"confirm=yes&list%3Aevents=on", FORM)
    assert status == 200 and "Saved." in body
    assert f"<strong>{EMAILS[0]}</strong> gets: events." in body
    assert site.audience() == [EMAILS[1]] and site.audience("events") == EMAILS
    call(url, b"confirm=yes", FORM)  # untick everything
    assert site.audience("events") == [EMAILS[1]]
    call(url, b"confirm=yes&list%3Aevents=on&list%3Aresearch-news=on", FORM)
    assert site.audience() == EMAILS and site.audience("events") == EMAILS
    assert site.store().suppression(EMAILS[0]) is None


def test_archive_and_feed(site: Site) -> None:
    status, body, _ = call(f"{site.base}/issues/")
    assert status == 200 and 'href="https://news.example.org/issues/2020-12-23"' in body
    status, body, headers = call(f"{site.base}/issues/2020-12-23")
    assert status == 200 and "Positive Results Reported" in body
    assert "[[" not in body and "@example.org" not in body.replace("research@example.org", "")
    assert 'https://news.example.org/unsubscribe"' in body  # a general link, no token
    status, _, _ = call(f"{site.base}/issues/2099-01-01")
    assert status == 404
    status, feed, headers = call(f"{site.base}/feed.xml")
    assert status == 200 and headers.get("content-type", "").startswith("application/atom+xml")
    assert "<title>MS Research News: stem cell therapy shows promise</title>" in feed
    assert (
        '<link rel="alternate" type="text/html" href="https://news.example.org/issues/2020-12-23"/>'
        in feed
    )
    import xml.etree.ElementTree as ET

    ET.fromstring(feed)  # noqa: S314 - our own feed, checked for well-formedness


def test_in_a_browser_from_the_link_in_a_sent_message(site: Site, project: Path) -> None:
    """Headless Chromium opens the footer's unsubscribe link, clicks, and sees the result."""
    from test_rendering import ARGS, CHROMIUM

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (bash .ci/run does)")
    rendered = build_file(project / "issues" / EXAMPLE.name, project).rendered
    raw = MessageTemplate(rendered, sender()).personalise(
        Recipient(EMAILS[0]), date=dt.datetime(2020, 12, 23, tzinfo=dt.UTC)
    )
    html_part = email.message_from_bytes(raw, policy=email.policy.default).get_body(("html",))
    assert html_part is not None
    footer_link = html_part.get_content().split('href="https://news.example.org/unsubscribe/')[1]
    signed = footer_link.split('"')[0]
    url = f"{site.base}/unsubscribe/{signed}"
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url)
        assert page.locator("h1").inner_text() == "Unsubscribe"
        assert EMAILS[0] in page.locator("main").inner_text()
        assert site.audience() == EMAILS  # opening the page did nothing
        page.get_by_role("button", name="Unsubscribe").click()
        page.wait_for_selector("h1:text('Unsubscribed')")
        assert site.audience() == [EMAILS[1]]
        page.get_by_role("button", name="Undo: keep sending it to me").click()
        page.wait_for_selector("h1:text('Welcome back')")
        assert site.audience() == EMAILS
        browser.close()


def test_serve_command(project: Path) -> None:
    import os
    import re
    import subprocess
    import sys

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_DATABASE": str(project / "web.sqlite3"),
        "NEWSLETTER_SECRET_KEY": "x" * 40,
    }
    connect(project / "web.sqlite3", create=True).close()  # as an import would have
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "serve", "--port", "0"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert port, "the server did not say where it listens"
        status, body, headers = call(f"http://127.0.0.1:{port}/issues/")
        assert status == 200 and "No issue has been sent yet" in body
        assert "server" not in {k.lower() for k in headers}  # no version banner
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    no_key = {k: v for k, v in env.items() if k != "NEWSLETTER_SECRET_KEY"}
    refused = subprocess.run(
        [sys.executable, "-m", "newsletter", "serve"],
        cwd=project,
        env=no_key,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and "NEWSLETTER_SECRET_KEY is not set" in refused.stderr


def test_one_click_as_multipart_form_data(site: Site) -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        b"One-Click\r\n--XyZ--\r\n"
    )
    status, _, _ = call(
        f"{site.base}/unsubscribe/{token(EMAILS[0])}", body, "multipart/form-data; boundary=XyZ"
    )
    assert status == 200 and site.audience() == [EMAILS[1]]


def test_large_bodies_and_a_busy_database(site: Site) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[0])}"
    status, _, _ = call(url, b"List-Unsubscribe=One-Click&pad=" + b"x" * 100_000, FORM)
    assert status == 413 and site.audience() == EMAILS
    holder = connect(site.db)
    holder.execute("BEGIN IMMEDIATE")  # a send freezing a large audience, say
    try:
        status, body, headers = call(url, b"List-Unsubscribe=One-Click", FORM)
    finally:
        holder.execute("ROLLBACK")
    assert status == 503 and "try again" in body
    assert headers.get("retry-after") == "60" or headers.get("Retry-After") == "60"
    status, _, _ = call(url, b"List-Unsubscribe=One-Click", FORM)
    assert status == 200 and site.audience() == [EMAILS[1]]


def test_archive_leaves_out_issues_nobody_received(site: Site) -> None:
    with connect(site.db) as conn:
        conn.execute("UPDATE deliveries SET state = 'rejected'")
    _, body, _ = call(f"{site.base}/issues/")
    assert "No issue has been sent yet" in body
    assert call(f"{site.base}/issues/2020-12-23")[0] == 404


def test_preferences_say_when_the_address_gets_nothing_at_all(site: Site) -> None:
    SubscriberStore(connect(site.db)).suppress(EMAILS[0], "bounced")
    _, body, _ = call(f"{site.base}/preferences/{prefs_token(EMAILS[0])}")
    assert "do-not-mail list (bounced: our emails to it could not be delivered" in body


# -- HEAD is GET ----------------------------------------------------------------------


def test_head_behaves_as_get_and_changes_nothing(site: Site) -> None:
    """Link checkers send HEAD, some with a body: same status as GET, nothing changed."""
    urls = [
        f"{site.base}/unsubscribe/{token(EMAILS[0])}",
        f"{site.base}/unsubscribe/{legacy(EMAILS[0])}",
        f"{site.base}/preferences/{prefs_token(EMAILS[0])}",
        f"{site.base}/preferences/{legacy(EMAILS[0])}",  # expired: 410, as for GET
        f"{site.base}/unsubscribe/not-a-token",
        f"{site.base}/issues/",
        f"{site.base}/unsubscribe",
    ]
    for url in urls:
        get_status = call(url)[0]
        for body in (None, b"List-Unsubscribe=One-Click", b"confirm=yes"):
            status, text, _ = call(url, body, FORM if body else None, method="HEAD")
            assert (status, text) == (get_status, ""), url
    assert site.audience() == EMAILS and site.audience("events") == EMAILS
    assert site.store().suppression(EMAILS[0]) is None


# -- opaque tokens, old tokens, windows ----------------------------------------------


def test_links_in_new_mail_carry_no_address(site: Site, project: Path) -> None:
    rendered = build_file(project / "issues" / EXAMPLE.name, project).rendered
    raw = MessageTemplate(rendered, sender()).personalise(Recipient(EMAILS[0]), date=SENT)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    header = str(msg["List-Unsubscribe"])
    html_part = msg.get_body(("html",))
    assert html_part is not None
    links = re.findall(r'href="(https://news\.example\.org/[^"]+)"', html_part.get_content())
    personal = [u for u in links if "/unsubscribe/" in u or "/preferences/" in u]
    assert len(personal) >= 2
    one_click = header.split("<")[1].split(">", maxsplit=1)[0]
    for url in [one_click, *personal]:
        path = url.removeprefix("https://news.example.org")
        assert "@" not in path and "research" not in path
        for chunk in ("ann@", "@example.org", "research-news"):
            for shift in range(3):  # base64 of the chunk at each alignment
                encoded = base64.urlsafe_b64encode(b"x" * shift + chunk.encode()).decode()
                assert encoded[4:12] not in path
    path = one_click.removeprefix("https://news.example.org")
    status, _, _ = call(site.base + path, b"List-Unsubscribe=One-Click", FORM)
    assert status == 200 and site.audience() == [EMAILS[1]]


def test_old_tokens_still_unsubscribe_every_way(site: Site) -> None:
    """Links in mail already sent keep working for unsubscribing, as the law requires."""
    url = f"{site.base}/unsubscribe/{legacy(EMAILS[0])}"
    status, body, _ = call(url)
    assert status == 200 and actions(body) == [url] and site.audience() == EMAILS
    status, body, _ = call(url, b"confirm=yes", FORM)
    assert status == 200 and "will get no more" in body and site.audience() == [EMAILS[1]]
    url = f"{site.base}/unsubscribe/{legacy(EMAILS[1], 'events')}"
    status, body, _ = call(url, b"List-Unsubscribe=One-Click", FORM)
    assert status == 200 and site.audience("events") == [EMAILS[0]]


def test_old_tokens_open_no_preferences_and_undo_nothing(site: Site) -> None:
    old = legacy(EMAILS[0])
    status, body, _ = call(f"{site.base}/preferences/{old}")
    assert status == 410 and "expired" in body and "events" not in body
    assert "checkbox" not in body
    # it still lets the person unsubscribe from that list, through a fresh token
    [fresh] = actions(body)
    assert fresh.startswith(f"{site.base}/unsubscribe/") and old not in fresh
    subject = tokens.read(TEST_KEY, fresh.rsplit("/", 1)[1])
    assert subject == tokens.TokenSubject("research-news", EMAILS[0], tokens.Kind.UNSUBSCRIBE, NOW)
    # posting the old preferences form changes nothing
    status, _, _ = call(f"{site.base}/preferences/{old}", b"confirm=yes", FORM)
    assert status == 410 and site.audience() == EMAILS and site.audience("events") == EMAILS
    status, body, _ = call(fresh, b"confirm=yes", FORM)
    assert status == 200 and site.audience() == [EMAILS[1]] and site.audience("events") == EMAILS
    # the undo address of pages served before undo had its own token
    for path in (f"/unsubscribe/{old}/undo", f"/unsubscribe/{token(EMAILS[0])}/undo"):
        status, body, _ = call(site.base + path, b"confirm=yes", FORM)
        assert status == 410 and "Too late" in body and site.audience() == [EMAILS[1]]
    # and no old or unsubscribe token is an undo token
    for bad in (old, token(EMAILS[0]), prefs_token(EMAILS[0])):
        assert call(f"{site.base}/undo/{bad}", b"confirm=yes", FORM)[0] == 404
    assert site.audience() == [EMAILS[1]]


def test_preferences_links_expire_after_90_days(site: Site) -> None:
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    site.clock.now = SENT + dt.timedelta(days=90)
    status, body, _ = call(url)
    assert status == 200 and "checkbox" in body
    site.clock.now = SENT + dt.timedelta(days=90, seconds=1)
    status, body, _ = call(url)
    assert status == 410 and "90 days" in body and "checkbox" not in body
    assert "events" not in body  # nothing about the address's other lists
    status, _, _ = call(url, b"confirm=yes", FORM)  # unticks nothing, leaves nothing
    assert status == 410 and site.audience() == EMAILS and site.audience("events") == EMAILS
    [unsubscribe] = actions(body)
    status, body, _ = call(unsubscribe, b"confirm=yes", FORM)
    assert status == 200 and site.audience() == [EMAILS[1]] and site.audience("events") == EMAILS


def test_undo_works_for_an_hour_from_the_unsubscribe(site: Site) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[0])}"
    site.clock.now = SENT + dt.timedelta(days=200)  # an email from months ago
    _, body, _ = call(url, b"confirm=yes", FORM)
    [undo] = actions(body)
    assert "next 60 minutes" in body
    site.clock.now += dt.timedelta(minutes=60)
    status, body, _ = call(undo, b"confirm=yes", FORM)
    assert status == 200 and "Welcome back" in body and site.audience() == EMAILS
    # unsubscribed again; the next undo button is too late an hour and a second later
    _, body, _ = call(url, b"confirm=yes", FORM)
    [undo] = actions(body)
    site.clock.now += dt.timedelta(hours=1, seconds=1)
    status, body, _ = call(undo, b"confirm=yes", FORM)
    assert status == 410 and "Too late" in body and "it changed nothing" in body
    assert f"{EMAILS[0]} still gets no" in text_of(body) and site.audience() == [EMAILS[1]]
    # came back through the preferences page meanwhile: the page says that instead
    call(
        f"{site.base}/preferences/{prefs_token(EMAILS[0], issued=site.clock.now)}",
        b"confirm=yes&list%3Aresearch-news=on&list%3Aevents=on",
        FORM,
    )
    status, body, _ = call(undo, b"confirm=yes", FORM)
    assert status == 410 and "is not unsubscribed from" in text_of(body)
    assert site.audience() == EMAILS
    call(url, b"confirm=yes", FORM)
    # an undo token is good for nothing else
    undo_token = undo.rsplit("/", 1)[1]
    assert (
        call(f"{site.base}/unsubscribe/{undo_token}", b"List-Unsubscribe=One-Click", FORM)[0] == 404
    )
    assert call(f"{site.base}/preferences/{undo_token}")[0] == 404


def test_an_old_email_cannot_bring_back_someone_who_left(site: Site) -> None:
    """Unsubscribing an address that had already left offers no undo."""
    url = f"{site.base}/unsubscribe/{token(EMAILS[0])}"
    call(url, b"List-Unsubscribe=One-Click", FORM)
    status, body, _ = call(url)
    assert status == 200 and "Already unsubscribed" in body and actions(body) == []
    status, body, _ = call(url, b"confirm=yes", FORM)
    assert status == 200 and "had already left" in body and "nothing changed" in body
    assert actions(body) == [] and "/undo/" not in body
    assert site.audience() == [EMAILS[1]]


# -- what every page says matches what was done --------------------------------------


def text_of(body: str) -> str:
    main = body.split("<main>")[1].split("</main>", maxsplit=1)[0]
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", main))).strip()


@pytest.mark.parametrize("reason", ["complained", "bounced"])
def test_undo_for_a_suppressed_address_says_no_mail_will_come(site: Site, reason: str) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[0])}"
    status, body, _ = call(url)
    assert "Unsubscribe" in body and site.audience() == EMAILS
    _, body, _ = call(url, b"confirm=yes", FORM)
    [undo] = actions(body)
    site.store().suppress(EMAILS[0], reason)  # the complaint arrives in the meantime
    status, body, _ = call(undo, b"confirm=yes", FORM)
    text = text_of(body)
    assert status == 200 and "Welcome back" not in text and "keep getting" not in text
    assert "no emails will come" in text and "do-not-mail list" in text
    assert {"complained": "reported as spam", "bounced": "could not be delivered"}[reason] in text
    assert site.audience() == [EMAILS[1]] and site.audience("events") == [EMAILS[1]]
    assert site.store().suppression(EMAILS[0]) == reason  # undo never lifts it
    # the unsubscribe page says so too
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0], 'events')}")
    assert "we send it none of our emails" in text_of(body)


def test_undo_after_being_removed_from_the_list_says_so(site: Site) -> None:
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    [undo] = actions(body)
    site.store().remove("research-news", [EMAILS[0]])
    _, body, _ = call(undo, b"confirm=yes", FORM)
    assert "no longer on that list" in text_of(body) and "Welcome back" not in body
    assert site.audience() == [EMAILS[1]]


def suppression_log(site: Site) -> list[tuple[str, str, str, str | None, str]]:
    with connect(site.db) as conn:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT email, action, reason, list_name, actor FROM suppression_log ORDER BY id"
            )
        ]


def test_leaving_everything_reaches_lists_made_later(site: Site) -> None:
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    _, body, _ = call(url)
    assert "If you untick them all and save, we will send this address no emails at all" in (
        text_of(body)
    )
    status, body, _ = call(url, b"confirm=yes", FORM)
    text = text_of(body)
    assert status == 200 and "Saved. You have left everything" in text
    assert "from any list created or imported later" in text
    assert "checked" not in body
    assert site.store().suppression(EMAILS[0]) == "unsubscribed"
    assert suppression_log(site) == [(EMAILS[0], "suppress", "unsubscribed", None, "web")]
    # next month: a new list is imported, with the address on it
    report = site.store().import_rows(
        "appeal", [ParsedRow(2, e, "", "") for e in EMAILS], skip_invalid=False
    )
    assert report.suppressed == 1 and site.audience("appeal") == [EMAILS[1]]
    # the page shows the new list unticked: nothing reaches the address
    _, body, _ = call(url)
    assert "You have left everything" in text_of(body)
    assert 'name="list:appeal">' in body and "checked" not in body
    # ticking one list brings back that list only, and lifts the suppression
    status, body, _ = call(url, b"confirm=yes&list%3Aevents=on", FORM)
    assert status == 200 and f"Saved. {EMAILS[0]} gets: events." in text_of(body)
    assert site.store().suppression(EMAILS[0]) is None
    assert site.audience("events") == EMAILS
    assert site.audience("appeal") == [EMAILS[1]] and site.audience() == [EMAILS[1]]
    assert suppression_log(site)[1] == (
        EMAILS[0],
        "unsuppress",
        "chose a list on the preferences page",
        None,
        "web",
    )


@pytest.mark.parametrize("reason", ["complained", "bounced"])
def test_ticking_a_list_never_lifts_a_bounce_or_complaint(site: Site, reason: str) -> None:
    site.store().suppress(EMAILS[0], reason)
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    for form in (b"confirm=yes&list%3Aevents=on", b"confirm=yes"):
        status, body, _ = call(url, form, FORM)
        text = text_of(body)
        assert status == 200 and "do-not-mail list" in text and "gets none of these" in text
        assert "gets: " not in text and "You have left everything" not in text
        assert site.store().suppression(EMAILS[0]) == reason
        assert site.audience("events") == [EMAILS[1]]
    assert [row[1] for row in suppression_log(site)] == ["suppress"]


def test_an_address_on_no_list_can_still_refuse_everything(site: Site) -> None:
    site.store().remove("research-news", [EMAILS[0]])
    site.store().remove("events", [EMAILS[0]])
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    _, body, _ = call(url)
    assert "is on none of our lists" in text_of(body) and "checkbox" not in body
    call(url, b"confirm=yes", FORM)
    assert site.store().suppression(EMAILS[0]) == "unsubscribed"
    site.store().import_rows("events", [ParsedRow(2, EMAILS[0], "", "")], skip_invalid=False)
    assert site.audience("events") == [EMAILS[1]]


def test_a_forged_list_in_the_form_changes_nothing(site: Site) -> None:
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    call(url, b"confirm=yes&list%3Aevents=on", FORM)
    status, body, _ = call(
        url, b"confirm=yes&list%3Aevents=on&list%3Aother=on&list%3A%3Cb%3E=on", FORM
    )
    assert status == 200 and "gets: events." in text_of(body) and "<b>" not in body
    assert site.store().lists_of(EMAILS[0]) == [("events", False), ("research-news", True)]
    assert call(url, b"list%3Aevents=on", FORM)[0] == 400  # not from our form


# -- redirects, the public URL and its path --------------------------------------------


def test_redirects_never_follow_the_host_header(tmp_path: Path) -> None:
    for public in ("https://news.example.org", "https://host.example/news"):
        sites = make_site(tmp_path / public.rsplit("/", 1)[1], public)
        site = next(sites)
        try:
            for path, query in (("/issues", ""), ("/issues", "?page=2"), ("/feed.xml/", "")):
                status, _, headers = call(
                    site.base + path + query, headers={"Host": "evil.example"}
                )
                assert status in (301, 302, 307, 308)
                assert (
                    headers["location"]
                    == public + path.rstrip("/") + ("/" if path == "/issues" else "") + query
                )
            forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
            for path in (
                f"/unsubscribe/{token(EMAILS[0])}",
                f"/preferences/{prefs_token(EMAILS[0])}",
            ):
                status, body, _ = call(site.base + path, headers=forged)
                assert status == 200 and "evil" not in body and actions(body) == [public + path]
        finally:
            next(sites, None)


def test_behind_a_proxy_that_strips_a_path_prefix(tmp_path: Path) -> None:
    """NEWSLETTER_PUBLIC_URL=https://host.example/news; the proxy hands us /unsubscribe/..."""
    sites = make_site(tmp_path, "https://host.example/news")
    site = next(sites)
    try:
        public = "https://host.example/news"
        pages = [
            call(site.local(f"{public}/unsubscribe/{token(EMAILS[0])}"))[1],
            call(site.local(f"{public}/preferences/{prefs_token(EMAILS[0])}"))[1],
            call(site.local(f"{public}/preferences/{legacy(EMAILS[0])}"))[1],
        ]
        _, body, _ = call(
            site.local(f"{public}/unsubscribe/{token(EMAILS[0])}"), b"confirm=yes", FORM
        )
        pages.append(body)
        [undo] = actions(body)
        _, body, _ = call(site.local(undo), b"confirm=yes", FORM)
        pages.append(body)
        assert "Welcome back" in body and site.audience() == EMAILS
        for page in pages:
            urls = re.findall(r'(?:href|action)="([^"]*)"', page)
            assert urls, page
            for url in urls:
                assert url.startswith((f"{public}/", "https://www.example.org")), url
        # every form on those pages posts somewhere that works through the proxy
        for page in pages[:3]:
            for action in actions(page):
                assert call(site.local(action))[0] in (200, 405)
    finally:
        next(sites, None)


def test_personal_pages_are_never_cached_but_a_page_may_choose(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from newsletter.web.app import _SecurityHeaders

    def app(base: str) -> ASGIApp:
        inner = Starlette(
            routes=[
                Route(
                    "/public",
                    lambda r: PlainTextResponse("x", headers={"Cache-Control": "max-age=300"}),
                ),
                Route("/private", lambda r: PlainTextResponse("x")),
            ]
        )
        return _SecurityHeaders(inner, base)

    with running(app) as base:
        assert call(f"{base}/public")[2]["cache-control"] == "max-age=300"
        assert call(f"{base}/private")[2]["cache-control"] == "no-store"
        assert call(f"{base}/public")[2]["content-security-policy"]


# -- the access log ---------------------------------------------------------------------


def test_the_access_log_holds_no_token_and_no_address(project: Path) -> None:
    import os
    import subprocess
    import sys

    db = project / "web.sqlite3"
    SubscriberStore(connect(db, create=True)).import_rows(
        "research-news", [ParsedRow(2, EMAILS[0], "", "")], skip_invalid=False
    )
    key = "x" * 40
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_DATABASE": str(db),
        "NEWSLETTER_SECRET_KEY": key,
        "NEWSLETTER_PUBLIC_URL": "https://host.example/news",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "serve", "--port", "0"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    port = None
    deadline = time.monotonic() + 30
    lines = []
    while port is None and time.monotonic() < deadline:
        lines.append(proc.stdout.readline())
        found = re.search(r"http://127\.0\.0\.1:(\d+)", lines[-1])
        port = int(found.group(1)) if found else None
    assert port, "the server did not say where it listens"
    base = f"http://127.0.0.1:{port}"
    new = tokens.make(key.encode(), tokens.Kind.UNSUBSCRIBE, "research-news", EMAILS[0], SENT)
    prefs = tokens.make(key.encode(), tokens.Kind.PREFERENCES, "research-news", EMAILS[0], SENT)
    old = tokens.sign(key.encode(), "research-news", EMAILS[0])
    try:
        assert call(f"{base}/unsubscribe/{old}")[0] == 200
        assert call(f"{base}/preferences/{prefs}?email={EMAILS[0]}")[0] == 200
        assert call(f"{base}/unsubscribe/{new}", b"List-Unsubscribe=One-Click", FORM)[0] == 200
        assert call(f"{base}/news/unsubscribe/{new}")[0] == 404  # a proxy that kept the prefix
        assert call(f"{base}/{new}")[0] == 404
        assert call(f"{base}/x%0d%0aGET%20/forged%20200")[0] == 404
        assert call(f"{base}/issues", headers={"Host": "evil.example"})[0] == 307
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    log = "".join(lines) + out
    access = [line for line in log.splitlines() if "newsletter.web.access" in line]
    assert len(access) == 7, log
    for secret in (new, old, prefs, old.split(".")[0], EMAILS[0], "ann", "email="):
        assert secret not in log
    assert re.search(r"newsletter\.web\.access GET /unsubscribe/<token> 200 \d+\.\dms$", access[0])
    assert " GET /preferences/<token> 200 " in access[1]
    assert " POST /unsubscribe/<token> 200 " in access[2]
    assert " GET /news/unsubscribe/<token> 404 " in access[3]
    assert " GET /<86 characters> 404 " in access[4]
    assert " GET /x\\r\\nGET /forged 200 404 " in access[5]
    assert " GET /issues 307 " in access[6]
    assert '"GET ' not in log  # uvicorn's own access log, which prints the path, is off


def test_no_undo_is_offered_when_no_mail_would_come_back(site: Site) -> None:
    site.store().suppress(EMAILS[0], "complained")
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    text = text_of(body)
    assert "will get no more" in text and "we send it none of our emails" in text
    assert actions(body) == [] and "Undo" not in text
    assert site.store().lists_of(EMAILS[0]) == [("events", False), ("research-news", True)]


def test_preferences_of_someone_who_left_every_list_one_by_one(site: Site) -> None:
    for list_name in ("events", "research-news"):
        call(f"{site.base}/unsubscribe/{token(EMAILS[0], list_name)}", b"confirm=yes", FORM)
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    _, body, _ = call(url)
    assert "has left every list below, so it gets none of them" in text_of(body)
    assert "checked" not in body and site.store().suppression(EMAILS[0]) is None
    call(url, b"confirm=yes", FORM)
    assert site.store().suppression(EMAILS[0]) == "unsubscribed"


def test_in_a_browser_behind_a_proxy_that_strips_the_prefix(tmp_path: Path) -> None:
    """Chromium at https://host.example/news/...: every click goes to the public URL, and
    the "proxy" (Playwright's request routing) hands the server the path without /news."""
    from test_rendering import ARGS, CHROMIUM

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (bash .ci/run does)")
    public = "https://host.example/news"
    sites = make_site(tmp_path, public)
    site = next(sites)
    seen: list[str] = []

    def proxy(route: Any) -> None:
        seen.append(route.request.url)
        if not route.request.url.startswith(public + "/"):
            route.abort()  # anything else would be a link off our site
            return
        route.fulfill(response=route.fetch(url=site.local(route.request.url)))

    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            context = browser.new_context()
            context.route("**/*", proxy)
            page = context.new_page()
            page.goto(f"{public}/preferences/{prefs_token(EMAILS[0])}")
            assert page.locator("h1").inner_text() == "Your newsletters"
            page.get_by_label("research-news").uncheck()
            page.get_by_label("events").uncheck()
            page.get_by_role("button", name="Save").click()
            page.wait_for_selector("text=You have left everything")
            assert site.store().suppression(EMAILS[0]) == "unsubscribed"
            page.get_by_label("events").check()
            page.get_by_role("button", name="Save").click()
            page.wait_for_selector(f"text=Saved. {EMAILS[0]} gets: events.")
            assert site.audience("events") == EMAILS and site.audience() == [EMAILS[1]]
            page.goto(f"{public}/unsubscribe/{token(EMAILS[0], 'events')}")
            page.get_by_role("button", name="Unsubscribe").click()
            page.wait_for_selector("h1:text('Unsubscribed')")
            assert site.audience("events") == [EMAILS[1]]
            page.get_by_role("button", name="Undo: keep sending it to me").click()
            page.wait_for_selector("h1:text('Welcome back')")
            assert site.audience("events") == EMAILS
            browser.close()
    finally:
        next(sites, None)
    assert seen and all(url.startswith(public + "/") for url in seen), seen


def test_an_expired_preferences_link_says_what_is_true_of_its_list(site: Site) -> None:
    """The expired page offers to unsubscribe only someone who still gets that list, and
    says so; a version 1 link is called old, not 90 days old."""
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    site.clock.now = SENT + dt.timedelta(days=91)
    call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"List-Unsubscribe=One-Click", FORM)
    status, body, _ = call(url)
    text = text_of(body)
    assert status == 410 and actions(body) == [] and "You can still stop" not in text
    assert f"{EMAILS[0]} already gets no MS Research News (research-news) emails" in text
    site.store().suppress(EMAILS[1], "complained")
    _, body, _ = call(f"{site.base}/preferences/{prefs_token(EMAILS[1])}")
    text = text_of(body)
    assert "we send it none of our emails" in text and "reported as spam" in text
    # a version 1 link: from an older email, whatever its age
    site.clock.now = SENT
    status, body, _ = call(f"{site.base}/preferences/{legacy(EMAILS[1], 'events')}")
    text = text_of(body)
    assert status == 410 and "90 days" not in text and "older email" in text
    assert len(actions(body)) == 1 and site.audience("events") == [EMAILS[0]]


def test_the_undo_button_of_an_older_page_does_not_claim_its_hour_is_over(site: Site) -> None:
    """/unsubscribe/<token>/undo comes from pages served before undo had a time of its
    own: it may be a minute old, so the page says the button no longer works."""
    url = f"{site.base}/unsubscribe/{legacy(EMAILS[0])}"
    call(url, b"confirm=yes", FORM)
    status, body, _ = call(url + "/undo", b"confirm=yes", FORM)
    text = text_of(body)
    assert status == 410 and "that time is over" not in text and "60 minutes" not in text
    assert "no longer works" in text and "it changed nothing" in text
    assert f"{EMAILS[0]} still gets no" in text and site.audience() == [EMAILS[1]]


def test_serve_help_names_every_page_it_serves(tmp_path: Path) -> None:
    from conftest import run_cli

    done = run_cli("serve", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    words = " ".join(done.stdout.split())
    for page in ("unsubscribe", "undo", "preferences", "archive", "feed"):
        assert page in words, page


def test_a_database_that_cannot_be_used_is_named_in_the_log_not_called_busy(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A database made by a newer version (or unreadable) is no busy database: the operator
    reads why in the log, and the page promises no retry in a minute."""
    with connect(site.db) as conn:
        conn.execute("PRAGMA user_version=99")
    caplog.set_level("INFO", logger="newsletter.web")
    status, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    assert status == 503 and "nothing was changed" in body and "in a minute" not in body
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "newsletter.web")
    assert "made by a newer version of newsletter" in logged and "busy" not in logged
    assert EMAILS[0] not in logged


# -- page texts that say what the code does -------------------------------------------


@pytest.mark.parametrize("reason", ["bounced", "complained", "unsubscribed"])
def test_a_suppressed_address_is_not_told_its_other_lists_are_unaffected(
    site: Site, reason: str
) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[0])}"
    site.store().suppress(EMAILS[0], reason)
    _, body, _ = call(url, b"confirm=yes", FORM)  # the button
    first = text_of(body)
    call(url, b"List-Unsubscribe=One-Click", FORM)
    _, body, _ = call(url, b"confirm=yes", FORM)  # the button on an old link: already left
    again = text_of(body)
    for text in (first, again):
        assert "we send it none of our emails, from any list" in text
        assert "not affected" not in text
        if reason == "unsubscribed":  # what works for this one: the preferences page
            assert "tick a list and save" in text and "reply" not in text
        else:
            assert "the preferences page cannot change that" in text and "reply" in text
    assert "had already left" in again
    # an address that is not suppressed is still told about its other lists, truly
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[1])}", b"confirm=yes", FORM)
    assert "Any other lists of ours this address is on are not affected" in text_of(body)
    assert site.audience("events") == [EMAILS[1]]


def test_undo_after_leaving_everything_points_to_what_works(site: Site) -> None:
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    [undo] = actions(body)
    prefs = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    call(prefs, b"confirm=yes", FORM)  # then leaves everything on the preferences page
    assert site.store().suppression(EMAILS[0]) == "unsubscribed"
    _, body, _ = call(undo, b"confirm=yes", FORM)
    text = text_of(body)
    assert "no emails will come" in text and "has since left everything" in text
    assert "tick the lists you want and save" in text and "reply" not in text
    # and it is true: ticking a list on that page brings that list back
    _, body, _ = call(prefs, b"confirm=yes&list%3Aresearch-news=on", FORM)
    assert site.audience() == EMAILS and site.audience("events") == [EMAILS[1]]


def test_opening_an_undo_address_explains_and_changes_nothing(site: Site) -> None:
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    [undo] = actions(body)
    for _ in range(2):  # a reload, then the address pasted into another tab
        status, body, headers = call(undo)
        assert status == 200 and headers["content-type"].startswith("text/html")
        text = text_of(body)
        assert "changes nothing: only the undo button does" in text
        assert f"{EMAILS[0]} is unsubscribed from" in text and actions(body) == [undo]
        assert site.audience() == [EMAILS[1]]
    status, body, _ = call(undo, method="HEAD")
    assert status == 200 and body == "" and site.audience() == [EMAILS[1]]
    # the button on that page works as the first one does
    status, body, _ = call(undo, b"confirm=yes", FORM)
    assert status == 200 and "Welcome back" in body and site.audience() == EMAILS
    status, body, _ = call(undo)
    assert status == 200 and "Nothing to undo" in body and actions(body) == []
    # after its hour, and forged: the same answers as a POST, and still no change
    site.clock.now += dt.timedelta(hours=2)
    status, body, _ = call(undo)
    assert status == 410 and "Too late" in body and site.audience() == EMAILS
    assert call(undo[:-3] + "AAA")[0] == 404


def test_opening_an_undo_address_of_a_suppressed_address_offers_no_button(site: Site) -> None:
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    [undo] = actions(body)
    site.store().suppress(EMAILS[0], "bounced")
    status, body, _ = call(undo)
    text = text_of(body)
    assert status == 200 and actions(body) == [] and "would bring no email back" in text
    assert "could not be delivered" in text and site.store().suppression(EMAILS[0]) == "bounced"


def test_too_late_to_undo_points_to_the_preferences_page_that_works(site: Site) -> None:
    _, body, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"confirm=yes", FORM)
    [undo] = actions(body)
    site.clock.now += dt.timedelta(hours=2)
    _, body, _ = call(undo, b"confirm=yes", FORM)
    text = text_of(body)
    assert "tick research-news and save" in text and "reply" not in text
    call(
        f"{site.base}/preferences/{prefs_token(EMAILS[0], issued=site.clock.now)}",
        b"confirm=yes&list%3Aresearch-news=on&list%3Aevents=on",
        FORM,
    )
    assert site.audience() == EMAILS


def test_coming_back_from_everything_with_two_lists_gets_both(site: Site) -> None:
    url = f"{site.base}/preferences/{prefs_token(EMAILS[0])}"
    _, body, _ = call(url, b"confirm=yes", FORM)
    assert "tick the lists you want and save: you will then get those lists only" in (text_of(body))
    _, body, _ = call(url, b"confirm=yes&list%3Aevents=on&list%3Aresearch-news=on", FORM)
    assert f"Saved. {EMAILS[0]} gets: events, research-news." in text_of(body)
    assert site.audience() == EMAILS and site.audience("events") == EMAILS


# -- a database removed or replaced while serving ------------------------------------


def _warm(site: Site) -> None:
    """Requests that make the server threads open their connections to the database."""
    for _ in range(3):
        status, _, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[1])}")
        assert status == 200


def test_a_database_removed_while_serving_answers_503_and_is_not_made_again(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    _warm(site)
    site.db.unlink()  # rm newsletter.sqlite3, while serve runs
    caplog.set_level("INFO", logger="newsletter.web")
    status, body, _ = call(
        f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"List-Unsubscribe=One-Click", FORM
    )
    assert status == 503 and "nothing was changed" in body
    assert not site.db.exists()
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "newsletter.web")
    assert "was removed while in use" in logged and str(site.db) in logged


def test_a_database_replaced_while_serving_is_served_from_the_new_file(site: Site) -> None:
    """A backup restored while serving (moved over the file, its old -wal and -shm
    removed so that they are not applied to it): the opt-out goes into the file that is
    there now, not into the unlinked one the threads had open."""
    _warm(site)
    backup = site.db.with_name("backup.sqlite3")
    with (
        contextlib.closing(sqlite3.connect(site.db)) as src,
        contextlib.closing(sqlite3.connect(backup)) as dst,
    ):
        src.backup(dst)
    backup.replace(site.db)  # rename(2): the old file is unlinked, the threads hold it
    for stale in ("-wal", "-shm"):
        Path(f"{site.db}{stale}").unlink(missing_ok=True)
    status, _, _ = call(
        f"{site.base}/unsubscribe/{token(EMAILS[0])}", b"List-Unsubscribe=One-Click", FORM
    )
    assert status == 200
    assert site.audience() == [EMAILS[1]]  # read from the file at the path now
    status, _, _ = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}")
    assert status == 200 and EMAILS[0] not in site.audience()
