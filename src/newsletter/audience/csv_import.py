"""Import parsing stage: a subscriber CSV file → validated rows and located problems.

Input: a path to a CSV file and its encoding (UTF-8 by default, with or
without a BOM; any ASCII-compatible encoding such as cp1252 on request; ``,``
``;`` or tab between fields; quoted fields; CRLF or LF line ends). Output: a
stream of :class:`ParsedRow` and :class:`Problem` in file order, so that a
list of a million rows is never held in memory. Problems with the file as a
whole (unreadable, empty, a bad header) raise :class:`ValidationFailed`
before any row, listing every one of them.

The file is read as bytes, one physical line at a time, and each record
(a line, or several when a quoted cell holds a line break) is decoded and
parsed on its own: a stray quote, an over-long line or a byte that is not
valid in the encoding spoils that record only, is reported at its real line,
and the next record is read normally. A quote that is never closed is
reported at the line that opened it, and reading resumes on the next line,
so the rows it would otherwise swallow are still read.

Addresses are checked with email-validator (no DNS) and normalised: the
domain in its ASCII (IDNA) form, the whole address lower-case, which is the
key that makes ``Ann@X.org`` and ``ann@x.org`` one subscriber.

A column the file does not have is ``None`` in the row (the stored value is
kept); a present, empty cell is ``""`` (the stored value is cleared).

:func:`write_export` writes the other way, a list's members → CSV, with the
state columns this reader recognises, so that an export imports again as it is.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn, TextIO

from newsletter.errors import OutputError, Problem, ValidationFailed

if TYPE_CHECKING:
    from collections.abc import Iterable

    from newsletter.storage.base import Member

KNOWN = ("email", "first_name", "last_name")
NOTHING_IMPORTED = "nothing was imported"
SUPPRESSION_REASONS = ("unsubscribed", "bounced", "complained")
# The columns `subscribers export` adds; an import recognises them and never
# stores them as attributes (see ParsedRow.state).
STATE_COLUMNS = ("newsletter_state", "newsletter_reason", "newsletter_since")
STATES = ("subscribed", "opted-out", "suppressed")

MAX_CELL = 1000  # characters; a longer cell is a paste gone wrong, not a name
MAX_LINE_BYTES = 64 * 1024
MAX_RECORD_LINES = 100  # a quoted cell may span lines, but not the rest of the file
MAX_HEADER_CELL = 100

# Header names as other tools write them (Mailchimp, Outlook, Excel, Google),
# compared after lower-casing and folding runs of spaces, `_` and `-` to one space.
_ALIASES = {
    "email": "email",
    "e mail": "email",
    "email address": "email",
    "e mail address": "email",
    "e mail 1 value": "email",  # Google Contacts (the first of its addresses)
    "email 1 value": "email",
    "first name": "first_name",
    "firstname": "first_name",
    "given name": "first_name",
    "forename": "first_name",
    "last name": "last_name",
    "lastname": "last_name",
    "surname": "last_name",
    "family name": "last_name",
}
_FOLD = re.compile(r"[\s_-]+")
# The rest of a quoted cell up to its closing quote; `""` inside is an escaped
# quote. Possessive, so that `""` is never split to close the cell early:
# this must agree with the csv module, which parses the record afterwards.
_QUOTED_REST = re.compile(rb'(?:[^"]|"")*+"')
_BOM = codecs.BOM_UTF8
# Unicode's Cc category is exactly these: C0, DEL and C1.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_BREAKS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_EXCEL_HINT = 'if Excel saved it, run again with --encoding cp1252 (or save it as "CSV UTF-8")'


@dataclass(frozen=True, slots=True)
class ParsedRow:
    line: int
    email: str
    first_name: str | None  # None: the file has no such column, so the stored name stays
    last_name: str | None
    attributes: dict[str, str] = field(default_factory=dict)  # "" clears a stored attribute
    # From an export's newsletter_state column: "opted-out" or "suppressed"
    # (then ``reason`` is one of SUPPRESSION_REASONS); None otherwise.
    state: str | None = None
    reason: str | None = None
    # From newsletter_since: when it opted out or was suppressed (UTC, ISO 8601).
    since: str | None = None


def normalise_address(raw: str, *, new: bool = False) -> str:
    """The canonical form of an address, or ValueError with a reason a person can act on.

    ``new``: an address about to be added (an import's row, a signup) is held to RFC
    5321's limits too (64 octets before the @), which many mail servers refuse beyond;
    one already stored is still found by what it is, to be shown, removed or erased."""
    from email_validator import EmailNotValidError, validate_email

    if _CONTROL.search(raw):
        raise ValueError("contains a line break or another control character")
    try:
        valid = validate_email(
            raw.strip(), check_deliverability=False, allow_smtputf8=False, strict=new
        )
    except EmailNotValidError as exc:
        raise ValueError(str(exc).rstrip(".")) from None
    return str(valid.ascii_email).lower()


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or ValueError: only encodings in which `,`, `;`, `"`
    and line ends are the ASCII bytes can be split into records before decoding."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(
            f"unknown encoding {encoding!r}; use utf-8 (the default) or cp1252 "
            "(Excel on Windows), latin-1, ..."
        ) from None
    probe = 'email,;\t"\r\n'
    try:
        ascii_compatible = probe.encode(name) == probe.encode("ascii") and name != "utf-7"
    except UnicodeError:
        ascii_compatible = False
    if not ascii_compatible:
        raise ValueError(
            f"the encoding {encoding!r} is not supported for CSV files; save the file as "
            '"CSV UTF-8" and import it without --encoding'
        )
    return "utf-8" if name == "utf-8-sig" else name


def read_csv(path: Path, *, encoding: str = "utf-8") -> Iterator[ParsedRow | Problem]:
    """Parse ``path``; problems are yielded in place of the rows they spoil.

    Raises ValidationFailed, before any row, when the file cannot be read at all."""
    name = str(path)
    try:
        codec = check_encoding(encoding)
    except ValueError as exc:
        raise ValidationFailed(
            [Problem(name, None, "--encoding", str(exc))], outcome=NOTHING_IMPORTED
        ) from None
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ValidationFailed(
            [Problem(name, None, "", f"cannot read the file: {exc.strerror or exc}")],
            outcome=NOTHING_IMPORTED,
        ) from None
    with fh:
        yield from _Reader(name, fh, codec).rows()


@dataclass(slots=True)
class _Header:
    columns: list[str]  # canonical names of the named columns, in file order


class _Reader:
    def __init__(self, name: str, fh: BinaryIO, encoding: str) -> None:
        self.name = name
        self.fh = fh
        self.encoding = encoding
        self.delimiter = ","
        self.number = 0  # physical lines read so far
        self.pushed: deque[tuple[int, bytes | None]] = deque()

    # -- physical lines and records ----------------------------------------------
    def _line(self, *, skip_long: bool = True) -> tuple[int, bytes | None] | None:
        """The next physical line (with its line end), or None for one over the cap."""
        if self.pushed:
            return self.pushed.popleft()
        chunk = self.fh.readline(MAX_LINE_BYTES + 1)
        if not chunk:
            return None
        self.number += 1
        if len(chunk) > MAX_LINE_BYTES and not skip_long:
            return self.number, chunk  # the caller stops: never read on (/dev/zero)
        if len(chunk) > MAX_LINE_BYTES:
            while chunk and not chunk.endswith(b"\n"):  # skip the rest, never hold it
                chunk = self.fh.readline(MAX_LINE_BYTES)
            return self.number, None
        return self.number, chunk

    def _records(self) -> Iterator[tuple[int, list[bytes]] | Problem]:
        """(first line number, physical lines) of each record, or a Problem for a spoilt one."""
        delimiter = self.delimiter.encode("ascii")
        while (got := self._line()) is not None:
            start, data = got
            if data is None:
                yield self._problem(start, f"is longer than {MAX_LINE_BYTES // 1024} KiB")
                continue
            lines = [data]
            inside = _ends_inside_quotes(data, delimiter, inside=False)
            size = len(data)
            breaker = None  # read while looking for the closing quote, not part of the record
            while inside:
                more = self._line()
                if more is None:
                    break
                if more[1] is None or len(lines) == MAX_RECORD_LINES:
                    breaker = more
                    break
                size += len(more[1])
                if size > MAX_LINE_BYTES:
                    breaker = more
                    break
                lines.append(more[1])
                inside = _ends_inside_quotes(more[1], delimiter, inside=True)
            if not inside:
                yield start, lines
                continue
            if breaker is not None:
                self.pushed.appendleft(breaker)
            self._resync(start, lines)
            yield self._problem(
                start,
                "a quote opened on this line is never closed; check the quotes on this "
                "line (a cell that contains the delimiter or a quote must be quoted, with "
                'any quote inside it doubled: "Smith ""Smithy""")',
            )

    def _resync(self, start: int, lines: list[bytes]) -> None:
        """Read the lines after ``start`` again as records of their own: they were taken
        into a row by a quote that was not where it should be."""
        self.pushed.extendleft(reversed([(start + i, line) for i, line in enumerate(lines)][1:]))

    def _decode(self, start: int, data: bytes) -> str | Problem:
        try:
            text = data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            line = start + data.count(b"\n", 0, exc.start)
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            return self._problem(
                line,
                f"byte 0x{data[exc.start]:02X} at position {column} is not valid "
                f"{self.encoding}, so the file is not {self.encoding} text; "
                + (_EXCEL_HINT if self.encoding == "utf-8" else "try another --encoding"),
            )
        if self.encoding != "utf-8" and not data.isascii() and _is_utf8(data):
            # cp1252 or latin-1 decode any bytes at all: UTF-8 read as such turns
            # "José" into "JosÃ©" silently. Real cp1252 text is almost never valid UTF-8.
            return self._problem(
                start,
                f"is UTF-8 text ({text.strip()[:60]!r} as {self.encoding}), not "
                f"{self.encoding}: run again without --encoding",
            )
        return text

    def _split(self, start: int, end: int, text: str) -> list[str] | Problem | None:
        """The cells of one record, None for a blank line, or a Problem."""
        body = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        if '"' not in body and "\r" not in body and "\n" not in body:
            cells = body.split(self.delimiter)  # what csv would make of it, five times faster
            return None if all(not cell.strip() for cell in cells) else cells
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter, strict=True)
        try:
            records = list(reader)
        except csv.Error as exc:
            return self._problem(start, f"is not valid CSV: {exc}; check the quotes")
        if len(records) > 1:
            return self._problem(
                start, "has a carriage return inside a cell that is not quoted; remove it"
            )
        cells = records[0] if records else []
        if not cells or all(not cell.strip() for cell in cells):
            return None  # blank lines are common at the end of exported files
        return cells

    def _problem(self, line: int | None, message: str, column: str = "") -> Problem:
        return Problem(self.name, line, column, message)

    # -- the file -------------------------------------------------------------------
    def rows(self) -> Iterator[ParsedRow | Problem]:
        header = self._header()
        for record in self._records():
            if isinstance(record, Problem):
                yield record
                continue
            start, lines = record
            end = start + len(lines) - 1
            text = self._decode(start, b"".join(lines))
            cells = text if isinstance(text, Problem) else self._split(start, end, text)
            if cells is None:
                continue
            if end > start and (
                isinstance(cells, Problem) or not _fits(header, cells, self.delimiter)
            ):
                # Lines joined by a quote that do not make a row: a stray quote.
                # Report where it is, and read the lines it took as rows again.
                self._resync(start, lines)
                yield self._problem(
                    start,
                    f"a quote on this line runs on to line {end}, and lines {start}-{end} "
                    "do not make a row; check the quotes on this line",
                )
                continue
            if isinstance(cells, Problem):
                yield cells
                continue
            result = _parse_row(self.name, start, header, cells)
            if isinstance(result, ParsedRow):
                yield result
            else:
                yield from result

    def _header(self) -> _Header:
        got = self._line(skip_long=False)
        if got is None:
            self._fatal("the file is empty; the first line must name the columns")
        start, data = got
        assert data is not None
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            self._fatal('the file is UTF-16 ("Unicode Text"); save it as "CSV UTF-8"')
        if b"\0" in data:
            self._fatal("the file is not text (it has NUL bytes); export the list as CSV")
        if len(data) > MAX_LINE_BYTES:
            self._fatal(f"the first line is longer than {MAX_LINE_BYTES // 1024} KiB")
        if data.startswith(_BOM):
            if self.encoding != "utf-8":
                self._fatal(
                    "the file starts with a UTF-8 byte-order mark, so it is UTF-8 text; "
                    "run again without --encoding"
                )
            data = data[len(_BOM) :]
        if b"\r" in data.rstrip(b"\r\n"):
            self._fatal(
                "lines end with a lone carriage return (old Mac style); save the file as "
                '"CSV UTF-8" with ordinary line ends'
            )
        counts = {d: data.count(d.encode("ascii")) for d in (",", ";", "\t")}
        self.delimiter = max(counts, key=lambda d: counts[d])
        text = self._decode(start, data)
        if isinstance(text, Problem):
            self._fatal(f"the header line: {text.message}")
        cells = self._split(start, start, text)
        if isinstance(cells, Problem):
            self._fatal(cells.message)
        if cells is None:
            self._fatal("the first line is blank; it must name the columns")
        return _check_header(self.name, cells)

    def _fatal(self, message: str) -> NoReturn:
        raise ValidationFailed([self._problem(1, message)], outcome=NOTHING_IMPORTED)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ends_inside_quotes(line: bytes, delimiter: bytes, *, inside: bool) -> bool:
    """Whether ``line`` ends inside a quoted cell, by the csv module's rules: a quote
    opens a cell only at the cell's start; elsewhere it is an ordinary character."""
    if not inside and b'"' not in line:
        return False  # most lines: no quotes at all
    pos = 0
    while True:
        if inside:
            match = _QUOTED_REST.match(line, pos)
            if match is None:
                return True
            inside = False
            pos = line.find(delimiter, match.end())  # text after the closing quote: kept
        elif line.startswith(b'"', pos):
            inside = True
            pos += 1
            continue
        else:
            pos = line.find(delimiter, pos)
        if pos < 0:
            return False
        pos += 1


def _fold(header_cell: str) -> str:
    return _FOLD.sub(" ", header_cell.strip().lower())


def _check_header(name: str, cells: list[str]) -> _Header:
    while cells and not cells[-1].strip():
        cells = cells[:-1]  # a trailing delimiter, or empty columns Excel kept
    problems: list[Problem] = []
    columns: list[str] = []
    where: dict[str, list[int]] = {}
    for number, cell in enumerate(cells, 1):
        label = cell.strip()
        if not label:
            problems.append(
                Problem(name, 1, "", f"column {number} has no name; name it or delete the column")
            )
        elif len(label) > MAX_HEADER_CELL or _CONTROL.search(label):
            problems.append(
                Problem(
                    name,
                    1,
                    "",
                    f"column {number}'s name is not a column name (over {MAX_HEADER_CELL} "
                    "characters or with control characters); is the first line the header?",
                )
            )
        column = _ALIASES.get(_fold(label), label.lower())
        columns.append(column)
        if label:
            where.setdefault(column, []).append(number)
    for column, numbers in where.items():
        if len(numbers) > 1:
            found = " and ".join(f"{n} ({cells[n - 1].strip()})" for n in numbers)
            problems.append(
                Problem(name, 1, "", f"columns {found} each name `{column}`; keep one of them")
            )
    if "email" not in columns:
        found = ", ".join(c.strip() for c in cells if c.strip()) or "nothing"
        likely = [f"{n} ({c.strip()})" for n, c in enumerate(cells, 1) if "mail" in _fold(c)]
        hint = f" (column {' or '.join(likely)}?)" if likely else ""
        problems.append(
            Problem(
                name,
                1,
                "",
                f"no email column in the header (found: {found}); name the column of "
                f"addresses `email`{hint}",
            )
        )
    if problems:
        raise ValidationFailed(problems, outcome=NOTHING_IMPORTED)
    return _Header(columns)


def _fits(header: _Header, cells: list[str], delimiter: str) -> bool:
    """Whether a record spanning lines has the header's shape and is one row: a line
    break in a name (Alt+Enter in an Excel cell) is that row's problem, but a cell of
    an address or a name that holds a delimiter or an ``@`` after a line break has
    taken the next lines in, behind a stray quote."""
    columns = header.columns
    if len(cells) < len(columns) or any(c.strip() for c in cells[len(columns) :]):
        return False
    return not any(
        ("\n" in cell or "\r" in cell) and (delimiter in cell or "@" in cell)
        for column, cell in zip(columns, cells, strict=False)
        if column in KNOWN or column in STATE_COLUMNS
    )


def _parse_row(
    name: str, line: int, header: _Header, cells: list[str]
) -> ParsedRow | list[Problem]:
    columns = header.columns
    if len(cells) < len(columns) or any(c.strip() for c in cells[len(columns) :]):
        named = len(columns)
        return [
            Problem(
                name,
                line,
                "",
                f"has {len(cells)} cells but the header names {named} column"
                f"{'s' if named != 1 else ''}; check the delimiters and quotes",
            )
        ]
    problems: list[Problem] = []
    values: dict[str, str] = {}
    for column, cell in zip(columns, cells, strict=False):
        value = cell.strip()
        if len(value) > MAX_CELL:
            problems.append(
                Problem(name, line, column, f"is {len(value):,} characters; at most {MAX_CELL:,}")
            )
            continue
        # Names reach the To: header: no line breaks there. Other columns may
        # hold a multi-line address; other control characters are refused.
        core = column in KNOWN or column in STATE_COLUMNS
        if (_CONTROL if core else _CONTROL_BUT_BREAKS).search(value):
            message = "contains a line break or a control character"
            if core and not _CONTROL.search(value.replace("\r", "").replace("\n", "")):
                message = "has a line break inside the quoted cell; put it on one line"
            problems.append(Problem(name, line, column, message))
            continue
        values[column] = value if core else value.replace("\r\n", "\n")
    raw = values.pop("email", None)
    email = ""
    if raw is not None:
        if not raw:
            problems.append(Problem(name, line, "email", "is empty"))
        else:
            try:
                email = normalise_address(raw, new=True)
            except ValueError as exc:
                problems.append(
                    Problem(name, line, "email", f"{raw!r} is not a valid address: {exc}")
                )
    raw_since = values.get("newsletter_since", "")
    state, reason = _state(values, name, line, problems)
    since = _since(raw_since, name, line, problems) if state else None
    if problems:
        return problems
    first = values.pop("first_name", None)
    last = values.pop("last_name", None)
    return ParsedRow(line, email, first, last, values, state, reason, since)


def _since(raw: str, name: str, line: int, problems: list[Problem]) -> str | None:
    """An export's newsletter_since, as the store writes times; a date or a time without
    an offset is taken as UTC."""
    import datetime as dt

    if not raw.strip():
        return None
    try:
        when = dt.datetime.fromisoformat(raw.strip())
    except ValueError:
        problems.append(
            Problem(
                name,
                line,
                "newsletter_since",
                f"{raw!r} is not a date and time; use the form 2026-11-30T10:00:00+00:00 "
                "(or leave it empty)",
            )
        )
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _state(
    values: dict[str, str], name: str, line: int, problems: list[Problem]
) -> tuple[str | None, str | None]:
    raw_state = values.pop("newsletter_state", "")
    raw_reason = values.pop("newsletter_reason", "")
    values.pop("newsletter_since", None)
    state = _fold(raw_state).replace(" ", "-")
    if state in ("", "subscribed"):
        return None, None
    if state not in STATES:
        problems.append(
            Problem(
                name,
                line,
                "newsletter_state",
                f"{raw_state!r} is not a state; use {', '.join(STATES)} (or leave it empty)",
            )
        )
        return None, None
    if state == "opted-out":
        return state, None
    reason = raw_reason.strip().lower()
    if reason not in SUPPRESSION_REASONS:
        problems.append(
            Problem(
                name,
                line,
                "newsletter_reason",
                f"{raw_reason!r} is not a suppression reason; use {', '.join(SUPPRESSION_REASONS)}",
            )
        )
        return None, None
    return state, reason


def write_export(out: TextIO, attributes: list[str], members: Iterable[Member]) -> None:
    """Write ``members`` as CSV: email, names, every one of ``attributes`` (empty where a
    member has none), then the STATE_COLUMNS. Streams: one row in memory at a time."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*KNOWN, *attributes, *STATE_COLUMNS])
    for m in members:
        since = m.suppressed_since if m.suppressed else m.opted_out_since
        writer.writerow(
            [
                m.email,
                m.first_name,
                m.last_name,
                *(m.attributes.get(a, "") for a in attributes),
                m.state,
                m.suppressed or "",
                since or "",
            ]
        )


def export_to_file(path: Path, attributes: list[str], members: Iterable[Member]) -> None:
    """:func:`write_export` into ``path``: the whole file or, on any failure, none (it is
    written beside it first, then moved into place). Raises OutputError when it cannot
    be written."""
    write_whole(path, lambda fh: write_export(fh, attributes, members))


def write_whole(path: Path, write: Callable[[TextIO], object]) -> None:
    """``write`` into ``path`` (UTF-8): the whole file or, on any failure, none (it is
    written beside it first, then moved into place). OutputError when it cannot be."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as fh:
            write(fh)
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write {path}: {exc.strerror or exc}; nothing was written"
        ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
