"""Issue-id stage: which files in an issues folder claim which id, and clashes between them.

Input: an issue file and the folder it sits in. Output: the :class:`IdClaim` of
each file (the id it declares with ``id:``, and that field's line, or the id
its file name gives) and, for one file, a :class:`Problem` for every other
file that claims the same id. Two files with one id would share one send log
and one archive page: a copy of last week's file that keeps ``id:`` would
"resume" last week's send and reach nobody, and its draft could replace last
week's page.

Only files with a top-level ``id:`` line are parsed (with the same YAML reader
as the issue itself); the others are named after their file, so checking a
folder of a few hundred issues costs a few milliseconds. A file that does not
parse still claims the id its ``id:`` line shows: a broken copy must not hide
a clash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from newsletter.errors import Problem
from newsletter.render.yaml_input import read_yaml

SUFFIXES = (".yaml", ".yml")
_ID_LINE = re.compile(r"^id[ \t]*:[ \t]*(?P<q>['\"]?)(?P<value>[^'\"#\s]*)(?P=q)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class IdClaim:
    file: Path
    issue_id: str
    line: int | None  # the line of `id:`; None when the id comes from the file name

    def how(self) -> str:
        return "with `id:`" if self.line is not None else "by its file name"


def issue_files(folder: Path) -> list[Path]:
    """The issue files of a folder: *.yaml and *.yml, not hidden (editors' swap files)."""
    try:
        found = [
            p
            for p in folder.iterdir()
            if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
        ]
    except OSError:
        return []
    return sorted(found)


def claim_of(path: Path) -> IdClaim:
    """The id ``path`` declares with ``id:``, or the one its file name gives."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return IdClaim(path, path.stem, None)
    match = _ID_LINE.search(text)
    if match is None:
        return IdClaim(path, path.stem, None)
    line = text.count("\n", 0, match.start()) + 1
    doc = read_yaml(path)
    if isinstance(doc.data, dict) and "id" in doc.data:
        value = doc.data["id"]
        return IdClaim(path, str(value).strip(), doc.line_of(("id",), key=True) or line)
    return IdClaim(path, match.group("value"), line)


def claims(folder: Path) -> list[IdClaim]:
    return [claim_of(p) for p in issue_files(folder)]


def clashes(issue_file: Path, *, others: list[IdClaim] | None = None) -> list[Problem]:
    """A problem for each other file in ``issue_file``'s folder that claims its id."""
    mine = claim_of(issue_file)
    try:
        me = issue_file.resolve()
    except OSError:
        me = issue_file
    problems = []
    for other in claims(issue_file.parent) if others is None else others:
        if other.issue_id != mine.issue_id or _same_file(other.file, me):
            continue
        shown = issue_file.parent / other.file.name
        fix = (
            "change `id:` in this file (a copy of an earlier issue keeps that issue's id)"
            if mine.line is not None
            else f"rename this file, or change `id:` in {shown}"
        )
        problems.append(
            Problem(
                str(issue_file),
                mine.line,
                "id",
                f"{mine.issue_id!r} ({'declared here' if mine.line else 'from the file name'}) "
                f"is also the id of {shown}{_line(other)} ({other.how()}); each issue needs "
                f"its own id, because the send log and the archive know an issue by it: {fix}",
            )
        )
    return problems


def _line(claim: IdClaim) -> str:
    return f":{claim.line}" if claim.line is not None else ""


def _same_file(path: Path, resolved: Path) -> bool:
    try:
        return path.resolve() == resolved
    except OSError:
        return False
