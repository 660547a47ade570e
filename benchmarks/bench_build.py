"""Build benchmark: how long one issue takes to build, and how fast the CLI starts.

Run from the repository root:  python benchmarks/bench_build.py [--runs N]

Builds tests/data/ten-articles.yaml (ten articles, each with an image and a
long summary) in-process, repeatedly, after a warm-up, and prints the median
and 90th percentile of the whole build (load, Jinja, MJML, inlining, checks,
preview message) and of each stage. Then times `newsletter --help` in a fresh
interpreter. Targets: build under 50 ms, --help under 0.3 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from newsletter.build import BuildInputs, build  # noqa: E402
from newsletter.delivery.message import MessageTemplate, Sender, recipient_values  # noqa: E402
from newsletter.models import Recipient, RenderedIssue  # noqa: E402
from newsletter.render import placeholders  # noqa: E402
from newsletter.render.checks import check_message  # noqa: E402
from newsletter.render.inliner import inline_css  # noqa: E402
from newsletter.render.loading import load_issue, load_society  # noqa: E402
from newsletter.render.markdown import _tokens as markdown_tokens  # noqa: E402
from newsletter.render.mjml_compile import compile_mjml  # noqa: E402
from newsletter.render.pipeline import issue_links  # noqa: E402
from newsletter.render.templating import context, load_templates, render  # noqa: E402

ISSUE = REPO / "tests" / "data" / "ten-articles.yaml"
BUILD_TARGET_MS = 50.0
HELP_TARGET_S = 0.3


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    result = fn()  # warm-up: imports, template compilation, caches
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples, result


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1]


def _uncached_render(templates: Any, ctx: Any) -> Any:
    markdown_tokens.cache_clear()  # each run parses the Markdown as a fresh build does
    return render(templates, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()

    sender = Sender(
        name="MS Research News",
        address="news@example.org",
        list_name="research-news",
        public_url="https://news.example.org",
        token_key=b"bench",
        unsubscribe_mailto="unsubscribe@example.org",
    )
    recipient = Recipient("sam.sample@example.org", "Sam", "Sample")
    templates = load_templates(REPO / "templates")
    inputs = BuildInputs(
        issue_file=ISSUE,
        society_file=REPO / "society.yaml",
        templates_dir=REPO / "templates",
        sender=sender,
        preview_recipient=recipient,
    )

    def one_build() -> Any:
        # A CLI run builds once: start every build with an empty Markdown cache.
        markdown_tokens.cache_clear()
        return build(inputs, templates=templates)

    total, result = timed(one_build, args.runs)
    median = statistics.median(total)
    print(
        f"build of {ISSUE.relative_to(REPO)} ({len(result.html):,} bytes of HTML), {args.runs} runs"
    )
    print(
        f"  whole build      median {median:6.1f} ms   p90 {p90(total):6.1f} ms   "
        f"target {BUILD_TARGET_MS:.0f} ms   ratio {median / BUILD_TARGET_MS:.2f}"
    )

    issue = load_issue(ISSUE).value
    society = load_society(REPO / "society.yaml").value
    ctx = context(issue, society, issue_links(issue, society, sender.public_url))
    mjml_src, text = render(templates, ctx)
    compiled = compile_mjml(mjml_src, template="email.mjml.j2")
    css = (REPO / "templates" / "inline.css").read_text(encoding="utf-8")
    inlined = inline_css(compiled, css)
    rendered = RenderedIssue(issue.id, issue.subject, issue.preheader, "en", inlined, text, "")
    import datetime as dt

    when = dt.datetime(2020, 12, 30, 9, tzinfo=dt.UTC)
    values = recipient_values(sender, recipient, date=when)
    html = placeholders.fill(inlined, values, is_html=True)
    unsub = values[placeholders.UNSUBSCRIBE_URL]
    template = MessageTemplate(rendered, sender)
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("load + validate", lambda: (load_issue(ISSUE), load_society(REPO / "society.yaml"))),
        ("jinja + markdown", lambda: _uncached_render(templates, ctx)),
        ("mjml compile", lambda: compile_mjml(mjml_src, template="email.mjml.j2")),
        ("css inline", lambda: inline_css(compiled, css)),
        ("checks", lambda: check_message(html, text, unsubscribe_url=unsub)),
        ("message template", lambda: MessageTemplate(rendered, sender)),
        ("one message", lambda: template.personalise(recipient, date=when)),
    ]
    for name, fn in stages:
        samples, _ = timed(fn, args.runs)
        print(f"  {name:16} median {statistics.median(samples):6.2f} ms")

    help_runs = []
    bare_runs = []
    for _ in range(10):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "newsletter", "--help"], capture_output=True, check=True
        )
        help_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], capture_output=True, check=True)
        bare_runs.append(time.perf_counter() - start)
    help_median = statistics.median(help_runs)
    bare = statistics.median(bare_runs)
    print(
        f"newsletter --help  median {help_median:.3f} s   (bare python {bare:.3f} s)   "
        f"target {HELP_TARGET_S} s   ratio {help_median / HELP_TARGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
