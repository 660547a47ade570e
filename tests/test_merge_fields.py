"""Merge fields: [[first_name|friend]] from the issue file to each recipient's message.

The syntax checks at load (file, line, field), the checks against the list at
send (an unknown field, recipients without a value, --strict), the values in
each place (HTML escaped, text verbatim, Subject RFC 2047), and the whole way
through the real CLI to a real SMTP server.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import html
import re
import sqlite3
from collections.abc import Callable, Iterator
from email.header import decode_header, make_header
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE, build_file, run_cli, sender
from newsletter.build import BuildResult
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.sending import check_merge_fields, prepare
from newsletter.errors import TemplateError, ValidationFailed
from newsletter.models import Recipient
from newsletter.render import merge_fields
from newsletter.storage.sqlite import SqliteStorage
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.subscribers import SubscriberStore
from smtp_server import Server

SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key
WHEN = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)

PERSONAL = """\
subject: "News for [[first_name|you]] this week"
date: 2026-12-03
preheader: "Hello [[first_name|friend]], the week's research"
intro: |
  Dear [[first_name|friend]],

  Greetings to [[town|everyone]] from [[last_name]].
articles:
  - title: "A trial"
    url: https://www.example.org/news/a
    summary: |
      Sent to [[email]] for [[first_name|you]].
"""


# ---------------------------------------------------------------- the syntax


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Dear [[first_name]],", [merge_fields.MergeField("first_name")]),
        (
            "Dear [[ first_name | dear friend ]],",
            [merge_fields.MergeField("first_name", "dear friend")],
        ),
        ("[[town|a|b]]", [merge_fields.MergeField("town", "a|b")]),
        ("[[[first_name]]'s page](https://e.org)", [merge_fields.MergeField("first_name")]),
        ("no fields [here] [x](https://e.org)", []),
        ("[[UNSUBSCRIBE_URL]] is the models' to refuse", []),
    ],
)
def test_scan_finds_the_fields(text: str, found: list[merge_fields.MergeField]) -> None:
    assert [f.field for f in merge_fields.scan(text)] == found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Dear [[first_name,", "with no ']]' after it on the same line"),
        ("Dear [[first_name\n]]", "with no ']]' after it on the same line"),
        ("Dear [[]]", "names no field"),
        ("Dear [[|friend]]", "names no field"),
        ("Dear [[First Name]]", "did you mean [[first_name]]?"),
        ("Dear [[1st]]", "a field name is lower-case letters"),
        ("Dear [[first_name|]]", "has '|' but no fallback text"),
        ("Dear [[first_name|[[x]]]]", "cannot hold another one"),
        ("Dear [[first_name|" + "x" * 101 + "]]", "at most 100"),
    ],
)
def test_scan_reports_malformed_fields(text: str, message: str) -> None:
    problems = [f.problem for f in merge_fields.scan(text) if f.field is None]
    assert len(problems) == 1 and message in problems[0]


def test_a_columns_field_name() -> None:
    assert merge_fields.key("Member since") == "member_since"
    assert merge_fields.key("  e-mail  2 ") == "e_mail_2"
    assert merge_fields.known_fields(["Town", "member since"]) == [
        "first_name",
        "last_name",
        "email",
        "town",
        "member_since",
    ]


def test_values_are_cleaned_and_capped() -> None:
    assert merge_fields.clean("Ann\r\nBcc: x@evil.example") == "Ann Bcc: x@evil.example"
    assert merge_fields.clean("A\x00n\x1bn\u202e\x7f ") == "Ann"
    assert merge_fields.clean("tab\there") == "tab here"
    assert len(merge_fields.clean("x" * 10_000)) == merge_fields.VALUE_MAX


def test_build_reports_every_malformed_field_with_its_place(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    path = write_issue(
        """\
subject: "News for [[First Name]]"
date: 2026-12-03
preheader: "Hi [[first_name|friend, this week"
intro: |
  Dear [[|friend]],

  Here is the news, [[town|]].
articles:
  - title: "Title [[first_name]]"
    url: https://www.example.org/news/a
    summary: >
      Summary for [[first_name]] and
      [[em ail]].
""",
        "2026-12-03.yaml",
    )
    done = run_cli("build", str(path), cwd=project)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    where = str(path)
    expected = [
        (1, "subject", "did you mean [[first_name]]?"),
        (3, "preheader", "with no ']]' after it"),
        (5, "intro", "names no field"),
        (7, "intro", "has '|' but no fallback"),
        (9, "articles[0].title", "merge fields are allowed only in subject, preheader, intro"),
        (13, "articles[0].summary", "did you mean [[em_ail]]?"),
    ]
    lines = [line.strip() for line in done.stderr.splitlines() if line.startswith("  ")]
    assert len(lines) == len(expected), done.stderr
    for line, (number, field, message) in zip(lines, expected, strict=True):
        assert line.startswith(f"{where}:{number}: {field}: "), line
        assert message in line


def test_the_society_file_may_not_hold_merge_fields(project: Path) -> None:
    society = project / "society.yaml"
    society.write_text(
        society.read_text("utf-8").replace(
            "registration:", "registration: 'For [[first_name]]' #", 1
        ),
        "utf-8",
    )
    done = run_cli("build", str(project / "issues" / EXAMPLE.name), cwd=project)
    assert done.returncode == 1
    assert "society.yaml:" in done.stderr and "not in the society file" in done.stderr


# ---------------------------------------------------------------- the build


def test_the_example_greets_the_sample_subscriber(project: Path) -> None:
    result = build_file(project / "issues" / EXAMPLE.name, project)
    assert "Dear Sam," in result.html and "Dear Sam," in result.text
    message = email.message_from_bytes(result.eml, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    for part in ("plain", "html"):
        body = message.get_body((part,))
        assert body is not None and "Dear Sam," in body.get_content()
    assert "[[" not in result.html and "[[" not in result.text


def test_the_archive_shows_the_fallback(project: Path) -> None:
    from newsletter.render.loading import load_issue, load_society
    from newsletter.render.pipeline import web_version
    from newsletter.render.templating import load_templates

    issue = load_issue(project / "issues" / EXAMPLE.name).value
    society = load_society(project / "society.yaml").value
    page = web_version(issue, society, load_templates(project / "templates"), "https://n.example")
    assert "Dear friend," in page and "[[" not in page


def test_templates_can_use_merge_fields(project: Path) -> None:
    template = project / "templates" / "email.txt.j2"
    template.write_text(
        "Hello {{ merge_field('first_name', 'reader') }}!\n" + template.read_text("utf-8"), "utf-8"
    )
    result = build_file(project / "issues" / EXAMPLE.name, project)
    assert result.text.startswith("Hello Sam!")
    assert any(u.path == "" and u.field.name == "first_name" for u in result.merge_uses)
    template.write_text("{{ merge_field('First') }}\n" + template.read_text("utf-8"), "utf-8")
    with pytest.raises(TemplateError, match="merge_field\\('First'\\)"):
        build_file(project / "issues" / EXAMPLE.name, project)


@pytest.fixture
def personal(project: Path, write_issue: Callable[..., Path]) -> BuildResult:
    return build_file(write_issue(PERSONAL, "2026-12-03.yaml"), project)


def subject_of(raw: bytes) -> str:
    """The Subject as a reader's client shows it: unfolded (RFC 5322 2.2.3: a long
    ASCII subject is folded at a space), then decoded from the raw header once."""
    folded = email.message_from_bytes(raw, policy=email.policy.compat32)["Subject"]
    return str(make_header(decode_header(re.sub(r"\r?\n(?=[ \t])", "", folded))))


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    text, page = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and page is not None
    return text.get_content(), page.get_content()


def test_each_place_gets_its_form(personal: BuildResult) -> None:
    template = MessageTemplate(personal.rendered, sender())
    hostile = 'Zoë <b>&</b> "O\'Neil" [[EMAIL]]'
    raw = template.personalise(
        Recipient("z@example.org", hostile, "Smith", {"Town": "Tōkyō </mj-text>"}), date=WHEN
    )
    message = parse(raw)
    assert not message.defects
    # RFC 2047 in the header, exactly the text once decoded.
    subject_line = re.search(rb"^Subject: (.*(?:\r\n[ \t].*)*)\r\n", raw, re.M)
    assert subject_line is not None and b"=?utf-8?" in subject_line.group(1)
    assert subject_of(raw) == f"News for {hostile} this week"
    text, page = parts(message)
    assert f"Dear {hostile}," in text
    assert "Greetings to Tōkyō </mj-text> from Smith." in text
    assert f"Dear {html.escape(hostile)}," in page
    assert "Tōkyō &lt;/mj-text&gt;" in page
    assert "[[EMAIL]]" in text  # a name that looks like a placeholder stays a name


def test_fallbacks_and_empty_values(personal: BuildResult) -> None:
    template = MessageTemplate(personal.rendered, sender())
    message = parse(template.personalise(Recipient("n@example.org"), date=WHEN))
    assert message["Subject"] == "News for you this week"
    text, page = parts(message)
    assert "Dear friend," in text and "Greetings to everyone from ." in text
    assert "Sent to n@example.org for you." in text
    assert "Dear friend," in page


def test_a_ten_kilobyte_name_is_cut(personal: BuildResult) -> None:
    template = MessageTemplate(personal.rendered, sender())
    plain = template.personalise(Recipient("a@example.org", "Ann"), date=WHEN)
    huge = template.personalise(Recipient("a@example.org", '"' * 10_000), date=WHEN)
    # Five uses of first_name (subject, preheader, intro, summary, To), each at most
    # 100 characters, each '"' 6 bytes as &quot; and then quoted-printable.
    assert len(huge) - len(plain) < 5 * merge_fields.VALUE_MAX * 6 * 3
    assert '"' * 101 not in parts(parse(huge))[0]


# ------------------------------------------------- hostile subscriber values


class _Shape(HTMLParser):
    """The elements and attribute names of a document, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.shape: list[tuple[str, tuple[str, ...]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.shape.append((tag, tuple(name for name, _ in attrs)))

    def handle_endtag(self, tag: str) -> None:
        self.shape.append(("/" + tag, ()))


def shape(page: str) -> list[tuple[str, tuple[str, ...]]]:
    parser = _Shape()
    parser.feed(page)
    return parser.shape


_HOSTILE = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
    | st.sampled_from(
        [
            "<",
            ">",
            "&",
            '"',
            "'",
            "\r",
            "\n",
            "\x00",
            "=?utf-8?q?x?=",
            "</mj-text>",
            "]]",
            "[[EMAIL]]",
        ]
    ),
    max_size=8,
).map("".join)


@pytest.fixture(scope="module")
def personal_template(tmp_path_factory: pytest.TempPathFactory) -> MessageTemplate:
    import shutil

    from conftest import REPO

    project = tmp_path_factory.mktemp("project")
    for folder in ("templates", "issues"):
        shutil.copytree(REPO / folder, project / folder)
    shutil.copy(REPO / "society.yaml", project / "society.yaml")
    path = project / "issues" / "2026-12-03.yaml"
    path.write_text(PERSONAL, "utf-8")
    return MessageTemplate(build_file(path, project).rendered, sender())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=_HOSTILE, last=_HOSTILE, town=_HOSTILE)
@example(first="abcdefgh " * 7, last="", town="")  # a long ASCII subject, folded at a space
def test_no_subscriber_value_becomes_markup_or_a_header(
    personal_template: MessageTemplate, first: str, last: str, town: str
) -> None:
    neutral = parse(
        personal_template.personalise(
            Recipient("a@example.org", "Ann", "Lee", {"town": "X"}), date=WHEN
        )
    )
    raw = personal_template.personalise(
        Recipient("a@example.org", first, last, {"town": town}), date=WHEN
    )
    message = parse(raw)
    assert not message.defects
    # No value adds a header line: the same headers, in the same order.
    assert list(message.keys()) == list(neutral.keys())
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(line[:1] in (b" ", b"\t") or b":" in line for line in head.split(b"\r\n"))
    subject_first = merge_fields.clean(first) or "you"
    assert message["Subject"] == f"News for {subject_first} this week"
    assert subject_of(raw) == f"News for {subject_first} this week"
    text, page = parts(message)
    _, neutral_page = parts(neutral)
    assert shape(page) == shape(neutral_page)
    assert f"Dear {merge_fields.clean(first) or 'friend'}," in text
    assert (
        f"Greetings to {merge_fields.clean(town) or 'everyone'} from {merge_fields.clean(last)}."
        in text.replace("\n", " ")
    )


# --------------------------------------------------------- against the list


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteStorage]:
    storage = SqliteStorage.open(tmp_path / "db.sqlite3", create=True)
    yield storage
    storage.close()


def import_csv(
    conn: sqlite3.Connection | SqliteStorage, tmp_path: Path, text: str, list_name: str = "news"
) -> None:
    from newsletter.audience.csv_import import read_csv

    path = tmp_path / "list.csv"
    path.write_text(text, "utf-8")
    store = conn.subscribers if isinstance(conn, SqliteStorage) else SubscriberStore(conn)
    report = store.import_rows(list_name, read_csv(path), skip_invalid=False)
    assert report.committed, report.problems


def test_a_field_the_list_never_had_is_an_error_with_its_place(
    personal: BuildResult, db: SqliteStorage, tmp_path: Path
) -> None:
    import_csv(db, tmp_path, "email,first_name,city\nann@example.org,Ann,Leeds\n")
    with pytest.raises(ValidationFailed) as failed:
        check_merge_fields(db, personal.issue_id, "news", personal.merge_uses)
    (problem,) = failed.value.problems
    assert problem.line == 7 and problem.field == "intro"
    assert "[[town]]: the list 'news' was never imported with a column" in problem.message
    assert "first_name, last_name, email, city" in problem.message


def test_an_empty_column_still_counts_as_imported(
    personal: BuildResult, db: SqliteStorage, tmp_path: Path
) -> None:
    # Nobody has a town: the column was there, so [[town|everyone]] is fine.
    import_csv(db, tmp_path, "email,first_name,last_name,Town\nann@example.org,Ann,Lee,\n")
    assert check_merge_fields(db, personal.issue_id, "news", personal.merge_uses) == []


def test_recipients_without_a_value_are_counted_and_strict_refuses(
    personal: BuildResult, db: SqliteStorage, tmp_path: Path
) -> None:
    import_csv(
        db,
        tmp_path,
        "email,first_name,last_name,town\n"
        "ann@example.org,Ann,Lee,Leeds\nbob@example.org,Bob,,\ncat@example.org,,  ,York\n",
    )
    notes = check_merge_fields(db, personal.issue_id, "news", personal.merge_uses)
    # Only [[last_name]] has no fallback; two of three have none.
    assert len(notes) == 1
    assert "[[last_name]] has no value for 2 of the 3 recipient(s)" in notes[0]
    assert notes[0].startswith(f"{personal_path(personal)}:7: intro: ")
    with pytest.raises(ValidationFailed, match=r"\(--strict\) \[\[last_name\]\] has no value"):
        check_merge_fields(db, personal.issue_id, "news", personal.merge_uses, strict=True)
    # Once frozen, only those still to be mailed are counted.
    record = prepare(db, personal.issue_id, "news").record
    db.conn.execute(
        "UPDATE deliveries SET state = 'sent' WHERE send_id = ? AND email = 'bob@example.org'",
        (record.id,),
    )
    notes = check_merge_fields(db, personal.issue_id, "news", personal.merge_uses)
    assert "has no value for 1 of the 2 recipient(s)" in notes[0]


def personal_path(result: BuildResult) -> str:
    return next(u.file for u in result.merge_uses if u.path)


def test_a_send_frozen_before_the_upgrade_reads_attributes_from_the_subscriber(
    personal: BuildResult, db: SqliteStorage, tmp_path: Path
) -> None:

    import_csv(db, tmp_path, "email,first_name,town\nann@example.org,Ann,Leeds\n")
    record = prepare(db, personal.issue_id, "news").record
    db.conn.execute("UPDATE deliveries SET attributes = NULL")  # as version 2 froze it
    (delivery,) = db.send_log.claim(record.id, 10, now=0).deliveries
    assert delivery.recipient.attributes == {"town": "Leeds"}


def test_migration_3_records_the_columns_lists_already_have(tmp_path: Path) -> None:
    from newsletter.storage.sqlite.connection import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    conn = connect(path, create=True)
    import_csv(conn, tmp_path, "email,Town,Member since\nann@example.org,Leeds,2020\n")
    conn.execute("DROP TABLE list_columns")
    conn.execute("ALTER TABLE deliveries DROP COLUMN attributes")
    # Back to schema 2 as it was: without schema 4's columns either.
    conn.execute("ALTER TABLE deliveries DROP COLUMN claimed_by")
    conn.execute("ALTER TABLE locks DROP COLUMN renewed")
    conn.execute("DROP TABLE feedback")  # schema 5's
    conn.execute("DROP TABLE mailbox_marks")
    conn.execute("ALTER TABLE sends DROP COLUMN paused")
    conn.execute("DROP INDEX deliveries_by_email")
    for table in ("outbox", "consents", "signups", "consent_texts", "rate_hits", "used_once",
                  "erasures"):  # fmt: skip
        conn.execute(f"DROP TABLE {table}")  # schema 6's
    conn.execute("ALTER TABLE sends DROP COLUMN frozen")  # schema 7's
    conn.execute("PRAGMA user_version=2")
    conn.close()
    again = connect(path)
    assert again.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert SubscriberStore(again).columns("news") == ["member since", "town"]


# --------------------------------------------- end to end: the CLI to SMTP


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def test_merge_fields_through_the_cli_to_a_real_smtp_server(project: Path, server: Server) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(PERSONAL, "utf-8")
    db = project / "db.sqlite3"
    env = {
        "NEWSLETTER_DATABASE": str(db),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port),
        "NEWSLETTER_SMTP_SECURITY": "none",
    }
    hostile = 'Mallory <script>x</script> "&" \u202e'
    (project / "list.csv").write_text(
        "email,first_name,last_name,town\n"
        "ann@example.org,Ann,Lee,Leeds\n"
        "bob@example.org,,Bell,\n"
        f'eve@example.org,"{hostile.replace(chr(34), chr(34) * 2)}",Evil,"</mj-text>"\n',
        "utf-8",
    )
    done = run_cli("subscribers", "import", "list.csv", "--list", "news", cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    # A dry run's sample messages show the real values.
    dry = run_cli(
        "send", "issues/2026-12-03.yaml", "--list", "news", "--dry-run", "--outbox", "ob",
        cwd=project, env=env,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "[[last_name]] has no value for 0" not in dry.stdout
    sample = parse((project / "ob" / "001-ann@example.org.eml").read_bytes())
    assert sample["Subject"] == "News for Ann this week"
    assert not server.handler.received
    # --strict refuses nothing here: every field without a fallback has a value.
    sent = run_cli(
        "send", "issues/2026-12-03.yaml", "--list", "news", "--yes", "--strict",
        cwd=project, env=env,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    by_address = {r.rcpt_tos[0]: r.message for r in server.handler.received}
    raw = {r.rcpt_tos[0]: r.data for r in server.handler.received}
    assert sorted(by_address) == ["ann@example.org", "bob@example.org", "eve@example.org"]

    ann_text, ann_page = parts(by_address["ann@example.org"])
    assert by_address["ann@example.org"]["Subject"] == "News for Ann this week"
    assert "Dear Ann," in ann_text and "Greetings to Leeds from Lee." in ann_text
    assert "Dear Ann," in ann_page

    bob_text, bob_page = parts(by_address["bob@example.org"])
    assert by_address["bob@example.org"]["Subject"] == "News for you this week"
    assert "Dear friend," in bob_text and "Greetings to everyone from Bell." in bob_text
    assert "Dear friend," in bob_page

    eve = by_address["eve@example.org"]
    shown = merge_fields.clean(hostile)  # the bidi override is gone
    assert "\u202e" not in shown
    assert subject_of(raw["eve@example.org"]) == f"News for {shown} this week"
    eve_text, eve_page = parts(eve)
    assert f"Dear {shown}," in eve_text and "Greetings to </mj-text> from Evil." in eve_text
    assert f"Dear {html.escape(shown)}," in eve_page
    assert "<script>" not in eve_page and shape(eve_page) == shape(ann_page)


def test_send_refuses_an_unknown_field_before_anything_is_sent(
    project: Path, server: Server
) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(
        PERSONAL.replace("[[town|everyone]]", "[[towm|everyone]]"), "utf-8"
    )
    env = {
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port),
        "NEWSLETTER_SMTP_SECURITY": "none",
    }
    (project / "list.csv").write_text("email,first_name,last_name,town\na@example.org,A,B,C\n")
    assert (
        run_cli(
            "subscribers", "import", "list.csv", "--list", "news", cwd=project, env=env
        ).returncode
        == 0
    )
    for extra in (["--dry-run"], ["--yes"]):
        done = run_cli(
            "send", "issues/2026-12-03.yaml", "--list", "news", *extra, cwd=project, env=env
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert (
            "issues/2026-12-03.yaml:7: intro: [[towm]]: the list 'news' was never imported"
            in done.stderr
        )
        assert "nothing was sent" in done.stderr
    assert not server.handler.received
    conn = sqlite3.connect(project / "db.sqlite3")
    assert conn.execute("SELECT count(*) FROM sends").fetchone()[0] == 0


def test_a_test_copy_shows_the_subscribers_own_values(project: Path) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(PERSONAL, "utf-8")
    env = {"NEWSLETTER_DATABASE": str(project / "db.sqlite3"), "NEWSLETTER_OUT_DIR": "out"}
    (project / "list.csv").write_text(
        "email,first_name,last_name,Town\neditor@example.org,Edie,Tor,Leeds\n", "utf-8"
    )
    done = run_cli("subscribers", "import", "list.csv", "--list", "news", cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    counted = run_cli("subscribers", "count", "--list", "news", cwd=project, env=env)
    assert (
        "merge fields an issue sent to news can use: [[first_name]], [[last_name]], "
        "[[email]], [[town]]" in counted.stdout
    )
    copies = run_cli(
        "send", "issues/2026-12-03.yaml", "--list", "news", "--dry-run",
        "--to", "Editor@Example.org", "--to", "someone@example.org", cwd=project, env=env,
    )  # fmt: skip
    assert copies.returncode == 0, copies.stdout + copies.stderr
    box = sorted((project / "out" / "2026-12-03" / "test-copies").iterdir())
    by_name = {p.name: parse(p.read_bytes()) for p in box}
    (editor,) = [m for n, m in by_name.items() if "editor@" in n]
    (stranger,) = [m for n, m in by_name.items() if "someone@" in n]
    assert editor["Subject"] == "News for Edie this week"
    assert "Greetings to Leeds from Tor." in parts(editor)[0]
    assert stranger["Subject"] == "News for you this week"
    assert "Dear friend," in parts(stranger)[0]


def test_a_merge_field_may_not_sit_in_a_link_target(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    path = write_issue(
        PERSONAL.replace(
            "Dear [[first_name|friend]],",
            "Dear [[first_name|friend]], see [your page](https://www.example.org/u/[[email]])\n"
            "  and <https://www.example.org/[[first_name]]>; [[[first_name|your]] page]"
            "(https://www.example.org/p) is fine.",
        ),
        "2026-12-03.yaml",
    )
    with pytest.raises(ValidationFailed) as failed:
        build_file(path, project)
    assert [(p.line, p.field) for p in failed.value.problems] == [(5, "intro"), (6, "intro")]
    assert all("may not sit inside a link's target" in p.message for p in failed.value.problems)


# ------------------------------------------------- found by trying a month of it


def test_invisible_only_values_fall_back() -> None:
    for nothing in ("\ufeff", "\u200b", "\u00ad", " \u00a0 ", "\u2060\ufeff"):
        assert merge_fields.clean(nothing) == ""
    assert merge_fields.clean("\ufeffAnn\u200b") == "Ann"
    assert merge_fields.clean("Zo\u00ade") == "Zo\u00ade"  # inside a word it stays


def test_column_names_in_any_script_and_the_ones_that_cannot_be_fields() -> None:
    columns = [
        "Straße",
        "Über-Gruppe",
        "Όνομα",
        "名前",
        "2nd Line",
        "!!",
        "Member since",
        "member-since",
    ]
    assert merge_fields.known_fields(columns) == [
        *merge_fields.BUILT_IN,
        "straße",
        "über_gruppe",
        "όνομα",
        "名前",
        "member_since",
    ]
    notes = merge_fields.column_notes(columns)
    assert len(notes) == 3
    (hidden,) = merge_fields.column_notes(["first.name"])
    assert "'first.name' is kept as an extra column, not as the first_name" in hidden
    assert "'2nd Line' cannot be used as a merge field ([[2nd_line]] does not start" in notes[0]
    assert "'!!' cannot be used as a merge field (it has no letters)" in notes[1]
    assert "'Member since' and 'member-since' are both the merge field [[member_since]]" in notes[2]
    assert [f.field for f in merge_fields.scan("[[straße]] [[über_gruppe|x]]")] == [
        merge_fields.MergeField("straße"),
        merge_fields.MergeField("über_gruppe", "x"),
    ]


def test_the_count_leaves_out_whom_another_lists_send_reached(
    personal: BuildResult, db: SqliteStorage, tmp_path: Path
) -> None:
    import_csv(db, tmp_path, "email,last_name,town\nann@example.org,Lee,\nbob@example.org,,\n", "a")
    import_csv(
        db, tmp_path, "email,last_name,town\nbob@example.org,,\ncat@example.org,Cole,\n", "b"
    )
    notes = check_merge_fields(db, personal.issue_id, "b", personal.merge_uses)
    assert "has no value for 1 of the 2 recipient(s)" in notes[0]
    prepare(db, personal.issue_id, "a")  # bob gets it from a
    assert check_merge_fields(db, personal.issue_id, "b", personal.merge_uses) == []
    with pytest.raises(ValidationFailed, match="strict"):
        check_merge_fields(db, personal.issue_id, "a", personal.merge_uses, strict=True)


def test_an_export_keeps_a_column_nobody_filled(db: SqliteStorage, tmp_path: Path) -> None:
    import_csv(db, tmp_path, "email,Nickname\nann@example.org,\n")
    assert db.subscribers.attribute_names("news") == ["nickname"]


def test_a_template_field_is_placed_at_its_line(project: Path) -> None:
    template = project / "templates" / "email.txt.j2"
    template.write_text(
        "\n\n{{ merge_field('postcode') }}\n" + template.read_text("utf-8"), "utf-8"
    )
    result = build_file(project / "issues" / EXAMPLE.name, project)
    (use,) = [u for u in result.merge_uses if u.field.name == "postcode"]
    assert (use.file, use.line) == (str(template), 3)


def cli_env(project: Path, server: Server | None = None, **extra: str) -> dict[str, str]:
    return {
        "NEWSLETTER_DATABASE": str(project / "db.sqlite3"),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(server.port if server else 9),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_OUT_DIR": "out",
        **extra,
    }


def test_the_schedule_and_due_sends_check_fields_against_every_list(
    project: Path, server: Server
) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(PERSONAL, "utf-8")
    env = cli_env(
        project,
        server,
        NEWSLETTER_SCHEDULE="Thu 09:00",
        NEWSLETTER_TIMEZONE="UTC",
        NEWSLETTER_SCHEDULE_LISTS="members,volunteers",
    )
    (project / "m.csv").write_text("email,last_name,town\nann@example.org,Lee,Leeds\n", "utf-8")
    (project / "v.csv").write_text("email,last_name\nvic@example.org,\n", "utf-8")
    for name, path in (("members", "m.csv"), ("volunteers", "v.csv")):
        done = run_cli("subscribers", "import", path, "--list", name, cwd=project, env=env)
        assert done.returncode == 0, done.stderr
    ahead = run_cli("schedule", cwd=project, env={**env, "NEWSLETTER_TEST_NOW": "2026-12-02"})
    assert "cannot be sent: list volunteers: " in ahead.stdout
    assert "[[town]]: the list 'volunteers' was never imported" in ahead.stdout
    assert "list members:" not in ahead.stdout
    # Fixed for volunteers; now vic has no last name and --strict refuses that.
    (project / "v.csv").write_text("email,last_name,town\nvic@example.org,,York\n", "utf-8")
    run_cli("subscribers", "import", "v.csv", "--list", "volunteers", cwd=project, env=env)
    due_env = {**env, "NEWSLETTER_TEST_NOW": "2026-12-03T09:05:00+00:00"}
    strict = run_cli("send", "--due", "--strict", cwd=project, env=due_env)
    assert strict.returncode == 1
    assert "(--strict) [[last_name]] has no value for 1 of the 1" in strict.stderr
    assert [r.rcpt_tos for r in server.handler.received] == [["ann@example.org"]]
    relaxed = run_cli("send", "--due", cwd=project, env=due_env)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == [
        "ann@example.org",
        "vic@example.org",
    ]


def test_every_dry_run_test_copy_is_written_and_a_missing_field_is_warned(
    project: Path,
) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(PERSONAL, "utf-8")
    env = cli_env(project)
    (project / "list.csv").write_text("email,first_name\nann@example.org,Ann\n", "utf-8")
    run_cli("subscribers", "import", "list.csv", "--list", "news", cwd=project, env=env)
    addresses = [f"t{i}@example.org" for i in range(8)]
    copies = run_cli(
        "send", "issues/2026-12-03.yaml", "--list", "news", "--dry-run",
        *(a for address in addresses for a in ("--to", address)), cwd=project, env=env,
    )  # fmt: skip
    assert copies.returncode == 0, copies.stderr
    assert len(list((project / "out" / "2026-12-03" / "test-copies").iterdir())) == 8
    assert "warning: " in copies.stderr and "[[town]]: the list 'news'" in copies.stderr
    assert "`send` refuses this" in copies.stderr


def test_an_import_says_which_columns_cannot_be_merge_fields(project: Path) -> None:
    env = cli_env(project)
    (project / "list.csv").write_text("email,2nd Line,Town\nann@example.org,x,y\n", "utf-8")
    done = run_cli("subscribers", "import", "list.csv", "--list", "news", cwd=project, env=env)
    assert done.returncode == 0
    assert "note: the column '2nd line' cannot be used as a merge field" in done.stdout


def test_a_field_as_a_links_text_and_markdown_references_cannot_touch_it(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    path = write_issue(
        PERSONAL.replace(
            "Dear [[first_name|friend]],",
            "Dear [[first_name|friend]], [[first_name]](https://www.example.org/p)\n\n"
            "  [merge1]: https://evil.example/\n  [1]: https://evil.example/",
        ),
        "2026-12-03.yaml",
    )
    result = build_file(path, project)
    assert "evil.example" not in result.html
    # Not a link (that is [[[first_name]]](url)), and never the slot: the name as text.
    assert "Dear Sam, Sam(https://www.example.org/p)" in result.text
    assert "Dear Sam, Sam(https://www.example.org/p)" in result.html


def test_a_filter_on_merge_field_changes_nothing_and_a_slice_fails_the_build(
    project: Path,
) -> None:
    template = project / "templates" / "email.txt.j2"
    original = template.read_text("utf-8")
    template.write_text("Hi {{ merge_field('first_name') | title }}!\n" + original, "utf-8")
    assert build_file(project / "issues" / EXAMPLE.name, project).text.startswith("Hi Sam!")
    template.write_text("Hi {{ merge_field('first_name')[:2] }}!\n" + original, "utf-8")
    with pytest.raises(Exception, match="apply no filter or slice to merge_field") as failed:
        build_file(project / "issues" / EXAMPLE.name, project)
    assert str(template) in str(failed.value) or "templates" in str(failed.value)
    template.write_text("{{ merge_field('Bad') }}\n" + original, "utf-8")
    with pytest.raises(TemplateError, match=rf"{re.escape(str(template))}:1: merge_field"):
        build_file(project / "issues" / EXAMPLE.name, project)


def test_editor_text_may_not_hold_the_slot_characters(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    path = write_issue(PERSONAL.replace("A trial", "A \ue0001\ue001 trial"), "2026-12-03.yaml")
    with pytest.raises(ValidationFailed, match="private-use character"):
        build_file(path, project)


def test_a_send_keeps_only_the_columns_its_issue_uses_and_reads_the_lists_own(
    personal: BuildResult, db: SqliteStorage, tmp_path: Path
) -> None:
    from newsletter.delivery.sending import merge_columns

    import_csv(db, tmp_path, "email,Town,Shoe size\nann@example.org,Leeds,7\n", "a")
    import_csv(db, tmp_path, "email,town!\nann@example.org,York\n", "b")  # also [[town]]
    columns = merge_columns(db.subscribers, "b", personal.merge_uses)
    assert columns == {"town": "town!"}
    record = prepare(db, personal.issue_id, "b", columns=list(columns.values())).record
    (delivery,) = db.send_log.claim(record.id, 10, now=0).deliveries
    assert delivery.recipient.attributes == {"town!": "York"}  # no shoe size kept
    template = MessageTemplate(personal.rendered, sender(), columns=columns)
    text, _ = parts(parse(template.personalise(delivery.recipient, date=WHEN)))
    assert "Greetings to York from ." in text


def test_a_misspelt_list_is_named_as_such(project: Path) -> None:
    (project / "issues" / "2026-12-03.yaml").write_text(PERSONAL, "utf-8")
    env = cli_env(project)
    (project / "list.csv").write_text("email\nann@example.org\n", "utf-8")
    run_cli("subscribers", "import", "list.csv", "--list", "news", cwd=project, env=env)
    done = run_cli(
        "send", "issues/2026-12-03.yaml", "--list", "nosuchlist", "--dry-run", cwd=project, env=env
    )
    assert done.returncode == 1
    assert "never imported" not in done.stderr and "no members" in done.stderr


def test_a_long_unbroken_value_in_the_subject_decodes_exactly(personal: BuildResult) -> None:
    template = MessageTemplate(personal.rendered, sender())
    for name in ("x" * 90, ("Ann" * 30 + " ") * 3):
        raw = template.personalise(Recipient("a@example.org", name), date=WHEN)
        assert subject_of(raw) == f"News for {merge_fields.clean(name)} this week"
        assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_brackets_in_other_fields_are_text_unless_they_are_a_field(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    ok = write_issue(PERSONAL.replace("A trial", "A trial [[citation needed]]"), "2026-12-03.yaml")
    assert "[[citation needed]]" in build_file(ok, project).text
    bad = write_issue(PERSONAL.replace("A trial", "A trial [[town]]"), "2026-12-03.yaml")
    with pytest.raises(ValidationFailed, match="merge fields are allowed only in"):
        build_file(bad, project)
