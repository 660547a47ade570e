"""Reading subscriber CSV files: every bad record reported at its own line, every good one read."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.audience.csv_import import ParsedRow, read_csv
from newsletter.errors import Problem, ValidationFailed

MAX_CELL = 1000  # csv_import.MAX_CELL, as the README documents it


def write(tmp_path: Path, content: bytes, name: str = "subs.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def rows_of(path: Path, **kw: str) -> tuple[list[ParsedRow], list[Problem]]:
    got = list(read_csv(path, **kw))
    return [r for r in got if isinstance(r, ParsedRow)], [r for r in got if isinstance(r, Problem)]


def many(first: int, last: int) -> bytes:
    return b"".join(b"r%d@example.org,Reader%d\n" % (i, i) for i in range(first, last + 1))


def test_a_stray_quote_spoils_its_own_line_only(tmp_path: Path) -> None:
    # Line 2 opens a quote that is never closed: the csv module would swallow
    # or stop at everything after it.
    path = write(tmp_path, b"email,first_name\n" + b'ann@example.org,"Ann\n' + many(3, 2000))
    rows, problems = rows_of(path)
    assert [p.line for p in problems] == [2]
    assert "a quote opened on this line is never closed" in str(problems[0])
    assert str(problems[0]).startswith(f"{path}:2: ")
    assert len(rows) == 1998 and rows[0].line == 3 and rows[-1].line == 2000
    assert rows[-1].email == "r2000@example.org"


def test_a_quote_closed_lines_later_does_not_take_those_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        b"email,first_name,last_name\n"
        b'ann@example.org,"Ann,Lee\n'  # line 2: stray quote
        b"bob@example.org,Bob,Smith\n"
        b'cy@example.org,Cy,"Young"\n'  # a quote that would close line 2's
        b"dee@example.org,Dee,Dow\n",
    )
    rows, problems = rows_of(path)
    assert [p.line for p in problems] == [2]
    assert [r.email for r in rows] == ["bob@example.org", "cy@example.org", "dee@example.org"]
    assert rows[1].last_name == "Young"


def test_a_stray_quote_mid_cell_is_text_and_bad_quoting_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        b'email,first_name\nann@example.org,O"Brien\nbob@example.org,"Bob"by\n' + many(4, 5),
    )
    rows, problems = rows_of(path)
    assert rows[0].first_name == 'O"Brien'
    assert [p.line for p in problems] == [3]
    assert "not valid CSV" in problems[0].message
    assert [r.line for r in rows] == [2, 4, 5]


def test_a_huge_cell_is_reported_and_the_next_line_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        b"email,first_name,notes\n"
        + b"ann@example.org,Ann,"
        + b"x" * 200_000
        + b"\n"  # line 2: a 200 KB paste
        + b"bob@example.org,Bob,"
        + b"y" * (MAX_CELL + 1)
        + b"\n"  # line 3: over the cell cap
        + b"cy@example.org,Cy,short\n",
    )
    rows, problems = rows_of(path)
    assert [(p.line, p.field) for p in problems] == [(2, ""), (3, "notes")]
    assert "longer than 64 KiB" in problems[0].message
    assert f"at most {MAX_CELL:,}" in problems[1].message
    assert [r.email for r in rows] == ["cy@example.org"]


def test_a_latin1_byte_is_reported_at_its_own_line(tmp_path: Path) -> None:
    # The case: the byte is on line 1,501 and must be reported there.
    content = (
        b"email,first_name\n" + many(2, 1500) + b"jurgen@example.org,J\xfcrgen\n" + many(1502, 3000)
    )
    path = write(tmp_path, content)
    rows, problems = rows_of(path)
    assert [p.line for p in problems] == [1501]
    text = str(problems[0])
    assert text.startswith(f"{path}:1501: byte 0xFC at position 21 is not valid utf-8")
    assert "--encoding cp1252" in text
    assert len(rows) == 2998 and rows[-1].line == 3000


def test_encoding_cp1252_reads_excel_files(tmp_path: Path) -> None:
    path = write(
        tmp_path, "email;First Name;City\r\nj@example.org;Jürgen;Köln €\r\n".encode("cp1252")
    )
    rows, problems = rows_of(path, encoding="cp1252")
    assert problems == []
    assert rows[0].first_name == "Jürgen" and rows[0].attributes == {"city": "Köln €"}
    assert rows[0].last_name is None  # no such column


def test_encodings_that_cannot_work(tmp_path: Path) -> None:
    path = write(tmp_path, b"email\nann@example.org\n")
    with pytest.raises(ValidationFailed, match="unknown encoding 'klingon'"):
        next(read_csv(path, encoding="klingon"))
    with pytest.raises(ValidationFailed, match="not supported for CSV files"):
        next(read_csv(path, encoding="utf-16"))
    utf16 = write(tmp_path, "email\nann@example.org\n".encode("utf-16"), "u16.csv")
    with pytest.raises(ValidationFailed, match="the file is UTF-16"):
        next(read_csv(utf16))
    bom = write(tmp_path, b"\xef\xbb\xbfemail\nann@example.org\n", "bom.csv")
    with pytest.raises(ValidationFailed, match="run again without --encoding"):
        next(read_csv(bom, encoding="cp1252"))


def test_a_quoted_cell_may_span_lines_and_line_numbers_stay_true(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        b"email,first_name,address\r\n"
        b'ann@example.org,Ann,"Flat 2\r\n12 High St\r\nLeeds"\r\n'  # lines 2-4
        b"not-an-address,Bad,\r\n"  # line 5
        b"bob@example.org,Bob,\r\n",
    )
    rows, problems = rows_of(path)
    assert rows[0].attributes == {"address": "Flat 2\n12 High St\nLeeds"}
    assert [p.line for p in problems] == [5]
    assert rows[1].line == 6


def test_a_line_break_in_a_name_is_a_stray_quote_not_a_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        b"email,first_name,last_name\n"
        b'ann@example.org,"Ann,Lee\n'  # the quote "closes" on the next line
        b'bob@example.org,Bob",Smith\n'
        b"cy@example.org,Cy,Young\n",
    )
    rows, problems = rows_of(path)
    assert problems[0].line == 2
    assert "lines 2-3 do not make a row" in problems[0].message
    # Line 3, read again on its own, is a row (its quote is then an ordinary character).
    assert [(r.email, r.first_name) for r in rows] == [
        ("bob@example.org", 'Bob"'),
        ("cy@example.org", "Cy"),
    ]
    assert len(problems) == 1


def test_every_header_problem_is_named(tmp_path: Path) -> None:
    two_empty = write(tmp_path, b"email,,,first_name\nann@example.org,,,Ann\n", "a.csv")
    with pytest.raises(ValidationFailed) as caught:
        next(read_csv(two_empty))
    assert [str(p) for p in caught.value.problems] == [
        f"{two_empty}:1: column 2 has no name; name it or delete the column",
        f"{two_empty}:1: column 3 has no name; name it or delete the column",
    ]
    twice = write(tmp_path, b"Email Address,First Name,first_name,E-mail\n", "b.csv")
    with pytest.raises(ValidationFailed) as caught:
        next(read_csv(twice))
    assert [p.message for p in caught.value.problems] == [
        "columns 1 (Email Address) and 4 (E-mail) each name `email`; keep one of them",
        "columns 2 (First Name) and 3 (first_name) each name `first_name`; keep one of them",
    ]


def test_usual_export_headers_and_trailing_empty_columns(tmp_path: Path) -> None:
    for header in (
        b"Email Address,First Name,Last Name,Town,,",
        b"E-mail,FirstName,Surname,TOWN,",
        b"Email address,first name,last_name,town",
        b"email_address,Given Name,Family Name,Town",
    ):
        path = write(tmp_path, header + b"\nAnn@Example.org,Ann,Lee,Leeds,\nbob@example.org,,,,\n")
        rows, problems = rows_of(path)
        assert problems == [], header
        assert rows[0] == ParsedRow(2, "ann@example.org", "Ann", "Lee", {"town": "Leeds"})
        assert rows[1] == ParsedRow(3, "bob@example.org", "", "", {"town": ""})
    path = write(tmp_path, b"email,name,\nann@example.org,Ann,oops\n")
    rows, problems = rows_of(path)
    assert "has 3 cells but the header names 2 columns" in problems[0].message


def test_export_state_columns_are_recognised(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        b"email,first_name,last_name,newsletter_state,newsletter_reason,newsletter_since\n"
        b"a@example.org,A,,subscribed,,\n"
        b"b@example.org,B,,opted-out,,2026-11-30T10:00:00+00:00\n"
        b"c@example.org,C,,suppressed,bounced,2026-11-30T10:00:00+00:00\n"
        b"d@example.org,D,,suppressed,,\n"
        b"e@example.org,E,,gone,,\n",
    )
    rows, problems = rows_of(path)
    assert [(r.email, r.state, r.reason, r.attributes) for r in rows] == [
        ("a@example.org", None, None, {}),
        ("b@example.org", "opted-out", None, {}),
        ("c@example.org", "suppressed", "bounced", {}),
    ]
    assert [(p.line, p.field) for p in problems] == [
        (5, "newsletter_reason"),
        (6, "newsletter_state"),
    ]


def test_tab_separated_files(tmp_path: Path) -> None:
    path = write(tmp_path, b"E-mail\tFirst Name\tNote\nann@example.org\tAnn\ta, b; c\n")
    rows, problems = rows_of(path)
    assert problems == []
    assert rows == [ParsedRow(2, "ann@example.org", "Ann", None, {"note": "a, b; c"})]


def test_a_header_line_that_never_ends_fails_at_once(tmp_path: Path) -> None:
    # /dev/zero (or a binary file without line ends) given by mistake: the
    # reader must not read on for the end of a line that has none.
    import subprocess
    import sys

    script = (
        "from pathlib import Path\n"
        "from newsletter.audience.csv_import import read_csv\n"
        "from newsletter.errors import ValidationFailed\n"
        "try:\n"
        "    list(read_csv(Path('/dev/zero')))\n"
        "except ValidationFailed as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True
    )
    assert "/dev/zero:1: " in done.stdout and "NUL bytes" in done.stdout
    path = write(tmp_path, b"x" * (3 * 64 * 1024) + b"\nann@example.org\n")
    with pytest.raises(ValidationFailed, match="first line is longer than 64 KiB"):
        rows_of(path)


def test_google_contacts_exports_and_a_hint_for_other_address_columns(tmp_path: Path) -> None:
    google = write(
        tmp_path,
        b"First Name,Middle Name,Last Name,Labels,E-mail 1 - Label,E-mail 1 - Value,"
        b"E-mail 2 - Label,E-mail 2 - Value\n"
        b"Bob,,Two,* myContacts,* Home,Bob@Example.org,,\n",
        "contacts.csv",
    )
    rows, problems = rows_of(google)
    assert problems == []
    assert (rows[0].email, rows[0].first_name, rows[0].last_name) == (
        "bob@example.org",
        "Bob",
        "Two",
    )
    other = write(tmp_path, b"Name,Work Mail,Phone\nBob,bob@example.org,1\n", "other.csv")
    with pytest.raises(ValidationFailed) as caught:
        next(read_csv(other))
    assert caught.value.problems[0].message.endswith(
        "name the column of addresses `email` (column 2 (Work Mail)?)"
    )


def test_utf8_read_as_cp1252_is_reported_not_stored_garbled(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,first_name\nann@example.org,Ann\njose@example.org,José\n".encode(),
    )
    rows, problems = rows_of(path, encoding="cp1252")
    assert [r.email for r in rows] == ["ann@example.org"]
    assert [p.line for p in problems] == [3]
    assert "is UTF-8 text" in problems[0].message
    assert problems[0].message.endswith("run again without --encoding")
    # Real cp1252 (Excel) text is read as before.
    latin = write(tmp_path, "email,first_name\njose@example.org,José\n".encode("cp1252"))
    rows, problems = rows_of(latin, encoding="cp1252")
    assert problems == [] and rows[0].first_name == "José"


def test_a_line_break_typed_in_a_name_cell_is_one_problem(tmp_path: Path) -> None:
    # Alt+Enter in an Excel cell: the quotes are right, the name has a line break.
    path = write(
        tmp_path,
        b'email,first_name,last_name\r\nann@example.org,"Ann\nMarie",Lee\r\n'
        b"bob@example.org,Bob,B\r\n",
    )
    rows, problems = rows_of(path)
    assert [(p.line, p.field, p.message) for p in problems] == [
        (2, "first_name", "has a line break inside the quoted cell; put it on one line")
    ]
    assert [(r.line, r.email) for r in rows] == [(4, "bob@example.org")]
