"""Import parsing stage: a subscriber CSV file → validated rows and located problems.

Input: a path to a CSV file (UTF-8, with or without a BOM; ``,`` or ``;``
between fields; quoted fields; CRLF or LF line ends). Output: a stream of
:class:`ParsedRow` and :class:`Problem` in file order, so that a list of a
million rows is never held in memory. Addresses are checked with
email-validator (no DNS) and normalised: the domain in its ASCII (IDNA) form,
the whole address lower-case, which is the key that makes ``Ann@X.org`` and
``ann@x.org`` one subscriber.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from newsletter.errors import Problem

KNOWN = ("email", "first_name", "last_name")
_ALIASES = {
    "e-mail": "email",
    "email_address": "email",
    "firstname": "first_name",
    "lastname": "last_name",
    "first name": "first_name",
    "last name": "last_name",
}


@dataclass(frozen=True, slots=True)
class ParsedRow:
    line: int
    email: str
    first_name: str
    last_name: str
    attributes: dict[str, str] = field(default_factory=dict)


def normalise_address(raw: str) -> str:
    """The canonical form of an address, or ValueError with a reason a person can act on."""
    from email_validator import EmailNotValidError, validate_email

    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise ValueError("contains a line break or another control character")
    try:
        valid = validate_email(raw.strip(), check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc).rstrip(".")) from None
    return str(valid.ascii_email).lower()


def read_csv(path: Path) -> Iterator[ParsedRow | Problem]:
    """Parse ``path``; problems are yielded in place of the rows they spoil."""
    name = str(path)
    try:
        fh = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        yield Problem(name, None, "", f"cannot read the file: {exc.strerror or exc}")
        return
    with fh:
        try:
            yield from _read(name, fh)
        except UnicodeDecodeError:
            yield Problem(name, None, "", "is not UTF-8 text; export the file as CSV UTF-8")


def _read(name: str, fh: io.TextIOBase) -> Iterator[ParsedRow | Problem]:
    first_line = fh.readline()
    fh.seek(0)
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    reader = csv.reader(fh, delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        yield Problem(name, 1, "", "the file is empty; the first line must name the columns")
        return
    except csv.Error as exc:
        yield Problem(name, 1, "", f"the header line is not valid CSV: {exc}")
        return
    columns = [_ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
    if "email" not in columns:
        yield Problem(
            name,
            1,
            "",
            f"no `email` column in the header (found: {', '.join(header) or 'nothing'})",
        )
        return
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        yield Problem(name, 1, "", f"the header names these columns twice: {', '.join(dupes)}")
        return
    line = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError:
            yield Problem(name, line, "", "is not UTF-8 text; export the file as CSV UTF-8")
            return
        except csv.Error as exc:
            yield Problem(name, line, "", f"not valid CSV: {exc}; check the quotes on this line")
            return
        start, line = line, reader.line_num + 1
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines are common at the end of exported files
        yield _parse_row(name, start, columns, row)


def _parse_row(name: str, line: int, columns: list[str], row: list[str]) -> ParsedRow | Problem:
    if len(row) != len(columns):
        return Problem(name, line, "", f"has {len(row)} fields but the header has {len(columns)}")
    values = dict(zip(columns, row, strict=True))
    for column, value in values.items():
        if column != "email" and any(unicodedata.category(ch) == "Cc" for ch in value):
            return Problem(name, line, column, "contains a line break or a control character")
    raw = values.pop("email").strip()
    if not raw:
        return Problem(name, line, "email", "is empty")
    try:
        email = normalise_address(raw)
    except ValueError as exc:
        return Problem(name, line, "email", f"{raw!r} is not a valid address: {exc}")
    first = values.pop("first_name", "").strip()
    last = values.pop("last_name", "").strip()
    return ParsedRow(line, email, first, last, {k: v.strip() for k, v in values.items()})
