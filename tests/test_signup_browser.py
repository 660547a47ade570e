"""The signup end to end, as a person does it: `newsletter serve` (its own process, its
mailer thread), a real browser (Chromium through Playwright) and the test SMTP
server. The browser opens /subscribe at the society's public address (routed to the
local server), fills in the form and submits, its script solving the proof of work;
the confirmation mail arrives; the link from it opens a page that changes nothing;
Confirm puts the address on the list with a full consent record; the next send
reaches it. axe finds nothing to fix on the pages, at phone width too."""

from __future__ import annotations

import email
import email.policy
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLE, run_cli
from newsletter.storage import open_storage
from smtp_server import Server
from test_bounces_cli import ok

PUBLIC = "https://news.example.org"
SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key
READER = "ada@example.org"


def free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[Server]:
    server = Server().start()
    yield server
    server.stop()


def serving(project: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "serve", "--port", str(port)],
        cwd=project, env={**full, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    said = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        said.append(line)
        if "Uvicorn running on" in line or not line:
            break
    assert any("signup on: https://news.example.org/subscribe" in s for s in said), said
    return proc, f"http://127.0.0.1:{port}"


def axe_violations(browser: Any, url: str, route: Any, width: int) -> list[str]:
    """axe-core's violations on ``url`` (its script run past the page's CSP)."""
    from axe_playwright_python.sync_playwright import Axe

    context = browser.new_context(bypass_csp=True, viewport={"width": width, "height": 800})
    context.route(f"{PUBLIC}/**", route)
    page = context.new_page()
    page.goto(url)
    results = Axe().run(page)
    overflow = page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
    context.close()
    found = [v["id"] for v in results.response["violations"]]
    return found + (["horizontal scroll"] if overflow else [])


def mistyped(browser: Any, route: Any) -> None:
    """A mistyped address, at phone width: the form comes back with the field marked and
    described by its message, a summary linking to it, nothing for axe to find, and
    controls a finger can use (16 px text, 44 px high)."""
    from axe_playwright_python.sync_playwright import Axe

    context = browser.new_context(bypass_csp=True, viewport={"width": 375, "height": 800})
    context.route(f"{PUBLIC}/**", route)
    page = context.new_page()
    page.goto(f"{PUBLIC}/subscribe")
    page.evaluate("document.querySelector('form').noValidate = true")  # as an old browser
    page.get_by_label("Email address").fill("ada at example.org")
    page.get_by_role("button", name="Subscribe").click()
    page.wait_for_selector("[role=alert]")
    field = page.locator("#email")
    assert field.get_attribute("aria-invalid") == "true"
    described = page.locator(f"#{field.get_attribute('aria-describedby')}")
    assert "is not an email address" in described.inner_text()
    assert page.locator("[role=alert] a").get_attribute("href") == "#email"
    assert field.input_value() == "ada at example.org"  # what they typed, to mend
    size = page.evaluate(
        "(() => { const b = document.querySelector('#email').getBoundingClientRect();"
        " const s = getComputedStyle(document.querySelector('#email'));"
        " const k = document.querySelector('button').getBoundingClientRect();"
        " return [b.height, s.fontSize, k.height, b.width]; })()"
    )
    assert size[0] >= 44 and size[1] == "16px" and size[2] >= 44 and size[3] > 300, size
    assert [v["id"] for v in Axe().run(page).response["violations"]] == []
    context.close()


def test_a_person_signs_up_in_a_browser_and_the_next_send_reaches_them(
    project: Path, smtp: Server
) -> None:
    from test_rendering import ARGS, CHROMIUM

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (bash .ci/run does)")
    database = str(project / "newsletter.sqlite3")
    env = {
        "NEWSLETTER_DATABASE": database, "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_PUBLIC_URL": PUBLIC, "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(smtp.port), "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SMTP_USERNAME": "",
    }  # fmt: skip
    (project / "m.csv").write_text("email\nmember@example.org\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "m.csv", "--list", "research-news", cwd=project, env=env))
    proc, local = serving(project, env)
    try:

        def route(r: Any) -> None:
            # The public address, as the proxy in front would hand it to the server.
            r.fulfill(response=r.fetch(url=local + r.request.url.removeprefix(PUBLIC)))

        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            for width in (375, 1024):
                assert axe_violations(browser, f"{PUBLIC}/subscribe", route, width) == []
            mistyped(browser, route)
            context = browser.new_context(viewport={"width": 375, "height": 800})
            context.route(f"{PUBLIC}/**", route)
            off_site: list[str] = []
            context.on("request", lambda req: off_site.append(req.url)
                       if not req.url.startswith(PUBLIC) else None)  # fmt: skip
            page = context.new_page()
            page.goto(f"{PUBLIC}/subscribe")
            page.get_by_label("Email address").fill(READER)
            page.get_by_label("First name (optional)").fill("Ada")
            page.get_by_role("button", name="Subscribe").click()
            page.wait_for_selector("h1:text('Check your inbox')", timeout=30_000)
            assert READER in page.locator("main").inner_text()

            deadline = time.monotonic() + 30
            while not smtp.handler.received and time.monotonic() < deadline:
                time.sleep(0.1)
            (received,) = smtp.handler.received
            mail = email.message_from_bytes(received.data, policy=email.policy.default)  # type: ignore[arg-type]
            assert received.rcpt_tos == [READER]
            assert mail["Auto-Submitted"] == "auto-generated"
            text = mail.get_body(preferencelist=("plain",))
            assert text is not None
            link = re.search(rf"{re.escape(PUBLIC)}/confirm/[A-Za-z0-9_-]+", text.get_content())
            assert link, text.get_content()

            page.goto(link.group(0))
            assert page.locator("h1").inner_text() == "Confirm your subscription"
            with closing(open_storage(database)) as db:
                assert db.subscribers.lists_of(READER) == []  # opening it changed nothing
            page.get_by_role("button", name="Yes, subscribe me").click()
            page.wait_for_selector("h1:text('You are subscribed')")
            assert axe_violations(browser, link.group(0), route, 375) == []  # the 404 page now
            assert off_site == []  # nothing loaded from any other site
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)

    with closing(open_storage(database)) as db:
        assert db.subscribers.lists_of(READER) == [("research-news", False)]
        (record,) = db.signups.consents(READER)
        assert (record.method, record.source) == ("confirmed", "the signup page (/subscribe)")
        assert record.consent_text is not None and "MS Research News" in record.consent_text
        assert record.posted_ip == record.confirmed_ip == "127.0.0.1"
        assert record.posted_at and record.confirmed_at and record.signup_id
        (mailed,) = db.signups.outbox(READER)
        assert mailed.state == "sent"
    smtp.handler.received.clear()
    ok(run_cli("send", f"issues/{EXAMPLE.name}", "--yes", cwd=project, env=env))
    reached = sorted(r.rcpt_tos[0] for r in smtp.handler.received)
    assert reached == [READER, "member@example.org"]


@pytest.mark.parametrize(("trusted", "recorded"), [("127.0.0.1", "198.51.100.23"),
                                                    ("10.0.0.1", "127.0.0.1")])  # fmt: skip
def test_a_forwarded_address_is_believed_only_from_a_trusted_proxy(
    project: Path, smtp: Server, trusted: str, recorded: str
) -> None:
    import urllib.parse

    from test_signup_web import hidden, solved
    from test_web import call

    database = str(project / "newsletter.sqlite3")
    env = {
        "NEWSLETTER_DATABASE": database, "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_PUBLIC_URL": PUBLIC, "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(smtp.port), "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_TRUSTED_PROXIES": trusted,
    }  # fmt: skip
    (project / "m.csv").write_text("email\nmember@example.org\n", encoding="utf-8")
    ok(run_cli("subscribers", "import", "m.csv", "--list", "research-news", cwd=project, env=env))
    proc, local = serving(project, env)
    try:
        forwarded = {"X-Forwarded-For": "198.51.100.23"}
        page = call(f"{local}/subscribe", headers=forwarded)[1]
        fields = {"email": READER, "stamp": hidden(page, "stamp"), "altcha": solved(page),
                  "source": hidden(page, "source")}  # fmt: skip
        status, body, _ = call(f"{local}/subscribe", urllib.parse.urlencode(fields).encode(),
                               "application/x-www-form-urlencoded", headers=forwarded)  # fmt: skip
        assert status == 200 and "Check your inbox" in body
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    with closing(open_storage(database)) as db:
        (waiting,) = db.signups.signups_of(READER)
        assert waiting.posted_ip == recorded
