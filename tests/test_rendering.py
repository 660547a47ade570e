"""The built email in a real browser (Debian's Chromium, headless): phone and desktop.

Chromium is installed by .ci/run. Where no Chromium can be found the tests are
skipped with the reason; everything else in the suite still runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLE, build_file

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is a test dependency"
)

CHROMIUM = (
    os.environ.get("NEWSLETTER_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COLUMNS = "Array.from(document.querySelectorAll('.mj-outlook-group-fix'))"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (bash .ci/run does)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_email(browser: Any, html: str, width: int) -> Any:
    page = browser.new_page(viewport={"width": width, "height": 900})
    requested: list[str] = []

    def block(route: Any) -> None:
        # Nothing leaves the machine: images are answered with nothing.
        requested.append(route.request.url)
        route.abort()

    page.route("**/*", block)
    page.set_content(html, wait_until="load")
    page.requested = requested
    return page


def test_phone_width_is_one_column_without_sideways_scrolling(browser: Any, project: Path) -> None:
    html = build_file(project / "issues" / EXAMPLE.name, project).html
    page = open_email(browser, html, 375)
    scroll, client = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert scroll <= client == 375
    widths = page.evaluate(f"{COLUMNS}.map(e => e.getBoundingClientRect().width)")
    lefts = page.evaluate(f"{COLUMNS}.map(e => e.getBoundingClientRect().left)")
    assert widths and all(w == pytest.approx(375, abs=1) for w in widths)
    assert all(left == pytest.approx(0, abs=1) for left in lefts)
    # the text is readable: nothing smaller than 13px
    sizes = page.evaluate(
        "Array.from(document.querySelectorAll('p, li, h1, h2'))"
        ".filter(e => e.textContent.trim())"  # MJML draws dividers as empty 1px <p>
        ".map(e => parseFloat(getComputedStyle(e).fontSize))"
    )
    assert min(sizes) >= 13
    # only the two article images were requested, and they are https
    assert all(url.startswith("https://www.example.org/images/") for url in page.requested)
    page.close()


def test_desktop_is_a_centred_600px_layout_with_image_columns(browser: Any, project: Path) -> None:
    html = build_file(project / "issues" / EXAMPLE.name, project).html
    page = open_email(browser, html, 1000)
    boxes = page.evaluate(
        f"{COLUMNS}.map(e => {{ const r = e.getBoundingClientRect(); return [r.left, r.width]; }})"
    )
    full = [b for b in boxes if b[1] == pytest.approx(600, abs=1)]
    assert full and all(left == pytest.approx(200, abs=1) for left, _ in full)
    narrow = [b for b in boxes if b[1] < 590]
    # two articles have an image: each is a 34% / 66% pair side by side
    assert [round(w) for _, w in narrow] == [204, 396, 204, 396]
    page.close()
