"""Content stage: what the mail itself must carry → findings on the footer, the size
and the secret key.

Input: the issues folder, a function that gives an issue file's
:class:`~newsletter.build.BuildInputs`, the society file, and the secret key's text.
Output: ``issue.size`` (the latest issue builds, by the build's own code, under
Gmail's clipping point: clipped mail hides the unsubscribe link), ``footer.address``
(the footer of that build shows the society's postal address, as CAN-SPAM and the
bulk-sender rules require) and ``secret.strength`` (NEWSLETTER_SECRET_KEY is long and
varied enough that nobody can guess it and forge unsubscribe links).

"Latest" is the issue file with the latest ``date:`` (the file name breaks ties; a
file whose date cannot be read counts as the oldest), leaving out drafts that still
hold ``TODO:`` placeholders (``newsletter new``) while a finished issue is there:
next week's draft does not build until it is written, which says nothing about
the size of the mail.
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from newsletter.build import BuildInputs, BuildResult, build
from newsletter.doctor.findings import Finding
from newsletter.errors import NewsletterError
from newsletter.render.checks import SIZE_FAIL, SIZE_WARN
from newsletter.render.issue_ids import issue_files
from newsletter.render.loading import load_society, placeholders
from newsletter.render.yaml_input import read_yaml

GOOD_BITS = 96  # what the estimate must reach to pass (32 hex digits: about 115)
WEAK_BITS = 64  # below: guessable
_TAGS = re.compile(r"<[^>]*>")


def latest_issue(issues_dir: Path) -> Path | None:
    """The issue file with the latest ``date:``; None when the folder has none."""
    dated: list[tuple[str, str, Path]] = []
    drafts: list[tuple[str, str, Path]] = []
    for path in issue_files(issues_dir):
        doc = read_yaml(path)
        data = doc.data
        date = str(data.get("date", "")) if isinstance(data, dict) else ""
        (drafts if placeholders(doc) else dated).append((date, path.name, path))
    return max(dated or drafts)[2] if dated or drafts else None


def check_content(
    issues_dir: Path,
    inputs_for: Callable[[Path], BuildInputs],
    society_file: Path,
    secret_key: str | None,
) -> list[Finding]:
    issue = latest_issue(issues_dir)
    built: BuildResult | None = None
    if issue is None:
        size = Finding(
            "issue.size", "Latest issue under Gmail's clipping point", "warn",
            f"no issue file in {issues_dir} to build", "check NEWSLETTER_ISSUES_DIR",
        )  # fmt: skip
    else:
        built, size = _size(issue, inputs_for(issue))
    return [size, _footer(built, society_file), secret_strength(secret_key)]


def _size(issue: Path, inputs: BuildInputs) -> tuple[BuildResult | None, Finding]:
    title = f"Latest issue {issue.name} under Gmail's clipping point"
    try:
        built = build(inputs)
    except NewsletterError as exc:
        first = str(exc).splitlines()
        said = "; ".join(line.strip() for line in first[:3])
        return None, Finding(
            "issue.size", title, "fail", f"it does not build: {said}",
            f"run `newsletter build {issue}` and fix what it says",
        )  # fmt: skip
    size = built.report.html_bytes
    kb = f"{size / 1000:.1f} KB of HTML"
    if size > SIZE_FAIL:
        return built, Finding(
            "issue.size", title, "fail",
            f"{kb}: Gmail clips above about 102 KB and hides the footer with the unsubscribe link",
            f"shorten {issue} (summaries, fewer articles) to under {SIZE_FAIL // 1000} KB",
        )  # fmt: skip
    if size > SIZE_WARN:
        return built, Finding(
            "issue.size", title, "warn", f"{kb}: close to Gmail's clipping point (about 102 KB)",
            f"shorten {issue} a little",
        )  # fmt: skip
    return built, Finding("issue.size", title, "pass", f"{kb} (Gmail clips at about 102 KB)")


def _footer(built: BuildResult | None, society_file: Path) -> Finding:
    title = "Postal address in the footer"
    if built is None:
        try:
            society = load_society(society_file).value
        except NewsletterError as exc:
            return Finding(
                "footer.address", title, "fail",
                f"{society_file} cannot be read: {str(exc).splitlines()[-1].strip()}",
                f"fix {society_file} (NEWSLETTER_SOCIETY_FILE)",
            )  # fmt: skip
        lines = list(society.address)
        seen_in = "society.yaml (no issue built to look at the footer)"
        missing: list[str] = []
    else:
        lines = list(built.society.address)
        html_text = _words(html.unescape(_TAGS.sub(" ", built.html)))
        plain = _words(built.text)
        missing = [ln for ln in lines if _words(ln) not in html_text or _words(ln) not in plain]
        seen_in = "the footer of both parts"
    shown = ", ".join(lines)
    if missing:
        return Finding(
            "footer.address", title, "fail",
            f"the built message lacks {', '.join(map(repr, missing))} of the address",
            "keep society.address in templates/footer.mjml.j2 and email.txt.j2",
        )  # fmt: skip
    if len(lines) < 2 or not any(ch.isdigit() for ch in shown):
        return Finding(
            "footer.address", title, "warn",
            f"{shown!r} looks like a name, not a postal address (no street or postcode)",
            f"give the full postal address under `address:` in {society_file}",
        )  # fmt: skip
    return Finding("footer.address", title, "pass", f"{shown} ({seen_in})")


def _words(text: str) -> str:
    return " ".join(text.split())


def key_bits(key: str) -> float:
    """A rough estimate of a key's entropy in bits: its shortest repeating unit's
    length times the Shannon entropy of that unit's characters, or of the steps from
    each character to the next when that is lower. ``abcabc...``, ``abcdef...`` and
    keys of few characters score low, a random key about what it holds; words are not
    known to it, so a phrase of several scores as its letters do."""
    period = next(
        p for p in range(1, len(key) + 1) if all(key[i] == key[i - p] for i in range(p, len(key)))
    ) if key else 0  # fmt: skip
    unit = key[:period]
    steps = [ord(b) - ord(a) for a, b in itertools.pairwise(unit)]
    return len(unit) * min(_shannon(list(unit)), _shannon(steps))


def _shannon(symbols: list[str] | list[int]) -> float:
    if not symbols:
        return 0.0
    counts = Counter(symbols)
    return -sum(n / len(symbols) * math.log2(n / len(symbols)) for n in counts.values())


def secret_strength(key: str | None) -> Finding:
    title = "Strength of NEWSLETTER_SECRET_KEY"
    make = (
        'make one with python3 -c "import secrets; print(secrets.token_urlsafe(32))" and '
        "give `send` and `serve` the same (links in mail already sent stop working)"
    )
    if key is None:
        return Finding(
            "secret.strength", title, "fail",
            "not set: nothing can be sent, and links could not be checked", make,
        )  # fmt: skip
    bits = key_bits(key)
    said = f"{len(key)} characters, about {bits:.0f} bits by their variety"
    if bits < WEAK_BITS:
        return Finding(
            "secret.strength", title, "fail",
            f"{said}: guessable, and with it anyone can unsubscribe your readers", make,
        )  # fmt: skip
    if bits < GOOD_BITS:
        return Finding(
            "secret.strength", title, "warn", f"{said}: less than {GOOD_BITS} bits", make
        )
    return Finding("secret.strength", title, "pass", said)
