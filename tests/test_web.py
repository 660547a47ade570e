"""`newsletter serve`: the unsubscribe pages, with a real server on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from conftest import EXAMPLE, REPO, TEST_KEY, build_file, sender
from newsletter import tokens
from newsletter.archive import Archive
from newsletter.compose import MessageTemplate
from newsletter.csv_import import ParsedRow
from newsletter.database import connect
from newsletter.loading import load_society
from newsletter.models import Recipient
from newsletter.subscribers import SubscriberStore
from newsletter.web import SECURITY_HEADERS, WebConfig, create_app, store_per_thread

EMAILS = ["ann@example.org", "bob@example.org"]


@dataclass
class Site:
    base: str
    db: Path

    def audience(self, list_name: str = "research-news") -> list[str]:
        return [r.email for r in SubscriberStore(connect(self.db)).audience(list_name)]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    db = tmp_path / "web.sqlite3"
    store = SubscriberStore(connect(db))
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
    app = create_app(WebConfig(TEST_KEY, society, store_per_thread(db, busy_seconds=0.5), archive))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Site(f"http://127.0.0.1:{port}", db)
    server.should_exit = True
    thread.join(timeout=10)


def call(
    url: str, data: bytes | None = None, content_type: str | None = None
) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def token(address: str, list_name: str = "research-news") -> str:
    return tokens.sign(TEST_KEY, list_name, address)


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
    for _ in range(3):  # a link scanner, then another
        status, body, headers = call(f"{site.base}/unsubscribe/{token(EMAILS[0])}")
        assert status == 200
    assert EMAILS[0] in body and '<form method="post">' in body and "<script" not in body
    assert site.audience() == EMAILS
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value or headers.get(name.title()) == value


def test_button_then_undo(site: Site) -> None:
    url = f"{site.base}/unsubscribe/{token(EMAILS[1])}"
    status, body, _ = call(url, b"confirm=yes", FORM)
    assert status == 200 and "will get no more" in body and "/undo" in body
    assert site.audience() == [EMAILS[0]]
    status, body, _ = call(url + "/undo", b"confirm=yes", FORM)
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
        token(EMAILS[0], "other-list").split(".")[0] + "." + token(EMAILS[0]).split(".")[1],
        tokens.sign(b"someone else's key", "research-news", EMAILS[0]),
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
    url = f"{site.base}/preferences/{token(EMAILS[0])}"
    status, body, _ = call(url)
    assert status == 200 and 'name="list:events" checked' in body
    assert 'name="list:research-news" checked' in body
    assert site.audience() == EMAILS  # looking changes nothing
    status, body, _ = call(url, b"confirm=yes&list%3Aevents=on", FORM)
    assert status == 200 and "Saved." in body
    assert site.audience() == [EMAILS[1]] and site.audience("events") == EMAILS
    call(url, b"confirm=yes", FORM)  # untick everything
    assert site.audience("events") == [EMAILS[1]]
    call(url, b"confirm=yes&list%3Aevents=on&list%3Aresearch-news=on", FORM)
    assert site.audience() == EMAILS and site.audience("events") == EMAILS


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
    _, body, _ = call(f"{site.base}/preferences/{token(EMAILS[0])}")
    assert "do-not-mail list (bounced)" in body
