"""The MIME message: structure, headers, encoding and the once-per-issue splice."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE, TEST_KEY, build_file, sender
from newsletter import tokens
from newsletter.build import BuildResult
from newsletter.delivery.message import MessageTemplate, qp_encode, recipient_values
from newsletter.models import Recipient, RenderedIssue
from newsletter.render import placeholders


@pytest.fixture
def example(project: Path) -> BuildResult:
    return build_file(project / "issues" / EXAMPLE.name, project)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_preview_is_multipart_alternative_text_then_html(example: BuildResult) -> None:
    msg = parse(example.eml)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert not part.defects
    assert not msg.defects
    text, html = (p.get_content().replace("\r\n", "\n") for p in parts)
    assert text == example.text
    assert html == example.html


def test_headers(example: BuildResult) -> None:
    msg = parse(example.eml)
    assert msg["From"] == "MS Research News <news@example.org>"
    assert msg["To"] == "Sam Sample <sam.sample@example.org>"
    assert msg["Subject"] == "MS Research News: stem cell therapy shows promise"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == dt.datetime(2020, 12, 23, 9, 0, tzinfo=dt.UTC)
    assert re.fullmatch(r"<2020-12-23\.[0-9a-f]{24}@example\.org>", msg["Message-ID"])
    assert msg["List-Id"] == "MS Research News <research-news.example.org>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    for name in ("Bcc", "Cc", "X-Mailer"):
        assert name not in msg
    for name in ("From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe"):
        assert len(msg.get_all(name) or []) == 1


def test_list_unsubscribe_is_raw_one_click_https_and_mailto(example: BuildResult) -> None:
    head = example.eml.split(b"\r\n\r\n", 1)[0].decode("ascii")
    # one header, folded once between its two URIs (RFC 5322 unfolding joins them)
    (field,) = re.findall(r"^List-Unsubscribe:.*\r\n(?:[ \t].*\r\n)*", head + "\r\n", re.M)
    physical = field.split("\r\n")[:-1]
    assert len(physical) == 2 and all(len(p) < 998 for p in physical)  # RFC 5322 2.1.1
    line = field.replace("\r\n", "")
    assert "=?" not in line
    urls = re.findall(r"<([^>]+)>", line)
    assert urls[0].startswith("https://news.example.org/unsubscribe/")
    token = urls[0].rsplit("/", 1)[1]
    # the mailto: carries the same token, for `bounces process` to read in the Subject
    assert urls[1] == f"mailto:unsubscribe@example.org?subject=unsubscribe%20{token}"
    subject = tokens.read(TEST_KEY, token)
    assert subject is not None and subject.kind is tokens.Kind.UNSUBSCRIBE
    assert (subject.list_name, subject.email) == ("research-news", "sam.sample@example.org")
    # the same one-click URL is the footer's unsubscribe link
    assert f'href="{urls[0]}"' in example.html


def test_wire_format_is_clean(example: BuildResult) -> None:
    raw = example.eml
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    head, body = raw.split(b"\r\n\r\n", 1)
    for line in body.split(b"\r\n"):
        assert len(line) <= 76
        assert not line.startswith(b"."), "no SMTP dot-stuffing should ever be needed"
        assert not line.startswith(b"From ")
    for line in head.split(b"\r\n"):
        assert len(line) <= 998


def test_non_ascii_names_and_subject_are_encoded(example: BuildResult) -> None:
    rendered = example.rendered
    rendered = RenderedIssue(
        issue_id=rendered.issue_id,
        subject="Forschung: Stammzellen \u2013 Ergebnisse f\u00fcr Patienten",
        preheader=None,
        language="de",
        html=rendered.html,
        text=rendered.text,
        mjml=rendered.mjml,
        merge_fields=rendered.merge_fields,
    )
    template = MessageTemplate(rendered, sender())
    raw = template.personalise(
        Recipient("zoe@example.org", "Zoë", "O'Brien, Jr."),
        date=dt.datetime(2020, 12, 23, 9, tzinfo=dt.UTC),
    )
    assert raw.isascii()
    msg = parse(raw)
    assert msg["Subject"] == "Forschung: Stammzellen \u2013 Ergebnisse f\u00fcr Patienten"
    assert msg["To"].addresses[0].display_name == "Zoë O'Brien, Jr."
    assert msg["To"].addresses[0].addr_spec == "zoe@example.org"


def test_each_recipient_gets_their_own_links(example: BuildResult) -> None:
    template = MessageTemplate(example.rendered, sender())
    date = dt.datetime(2020, 12, 23, 9, tzinfo=dt.UTC)
    ann = parse(template.personalise(Recipient("ann@example.org"), date=date))
    bob = parse(template.personalise(Recipient("bob@example.net"), date=date))
    assert ann["Message-ID"] != bob["Message-ID"]
    assert ann["List-Unsubscribe"] != bob["List-Unsubscribe"]
    ann_html = ann.get_body(("html",))
    assert ann_html is not None
    html = ann_html.get_content()
    values = recipient_values(sender(), Recipient("ann@example.org"), date=date)
    assert values[placeholders.UNSUBSCRIBE_URL] in html
    assert "bob@example.net" not in html
    assert "This email was sent to ann@example.org because" in html


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.tuples(_text, st.sampled_from(placeholders.ALL)), max_size=4),
    tail=_text,
    email_local=st.from_regex(r"[a-z0-9]{1,20}([._+-][a-z0-9]{1,10}){0,2}", fullmatch=True),
)
def test_spliced_body_decodes_to_the_filled_text(
    pieces: list[tuple[str, str]], tail: str, email_local: str
) -> None:
    text = "".join(a + b for a, b in pieces) + tail
    html = "<p>" + text + "</p>"
    rendered = RenderedIssue("x", "Subject", None, "en", html, text, "")
    recipient = Recipient(f"{email_local}@example.org")
    raw = MessageTemplate(rendered, sender()).personalise(
        recipient, date=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    )
    msg = parse(raw)
    values = recipient_values(sender(), recipient, date=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))

    def lines(s: str) -> str:
        return s.replace("\r\n", "\n").replace("\r", "\n")

    want_text = lines(placeholders.fill(text, values, is_html=False))
    want_html = lines(placeholders.fill(html, values, is_html=True))
    plain, rich = (p.get_payload(decode=True) for p in msg.iter_parts())
    assert isinstance(plain, bytes) and isinstance(rich, bytes)
    assert plain.decode("utf-8").replace("\r\n", "\n").rstrip("\n") == want_text.rstrip("\n")
    assert rich.decode("utf-8").replace("\r\n", "\n").rstrip("\n") == want_html.rstrip("\n")
    for line in raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n"):
        assert len(line) <= 76 and not line.startswith(b".")


def test_qp_encode_escapes_leading_dots_and_from() -> None:
    encoded = qp_encode(".hidden\nFrom here\n..\n")
    assert encoded == b"=2Ehidden\r\n=46rom here\r\n=2E.\r\n"


def test_encoded_words_in_text_cannot_inject_headers(example: BuildResult) -> None:
    sneaky = "MS Research News =?utf-8?q?=0D=0ABcc:_everyone@evil.example?="
    rendered = RenderedIssue(
        "x",
        sneaky,
        None,
        "en",
        example.rendered.html,
        "text\n",
        "",
        merge_fields=example.rendered.merge_fields,
    )
    raw = MessageTemplate(rendered, sender()).personalise(
        Recipient("ann@example.org", "=?utf-8?q?=0D=0ACc:_x@evil.example?=", "Lee"),
        date=dt.datetime(2020, 12, 23, 9, tzinfo=dt.UTC),
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head and b"\r\nCc:" not in head
    msg = parse(raw)
    assert msg["Subject"] == sneaky  # shown literally, not decoded into a header
    assert "Bcc" not in msg and "Cc" not in msg
    assert msg["To"].addresses[0].addr_spec == "ann@example.org"
    assert len(msg["To"].addresses) == 1


def test_a_leading_dot_never_makes_a_line_too_long() -> None:
    for n in range(60, 80):
        text = "x" * n + "." + "y" * 200 + "\n" + "From here on\n"
        encoded = qp_encode(text)
        for line in encoded.split(b"\r\n"):
            assert len(line) <= 76 and not line.startswith((b".", b"From "))
        assert (
            encoded.decode("ascii")
            .replace("=\r\n", "")
            .replace("=2E", ".")
            .replace("=46", "F")
            .replace("\r\n", "\n")
            == text
        )


def test_message_id_is_the_same_from_every_list_and_test_copies_get_their_own(
    example: BuildResult,
) -> None:
    from dataclasses import replace

    ann = Recipient("Ann@example.org", "Ann")
    on_a = MessageTemplate(example.rendered, replace(sender(), list_name="a"))
    on_b = MessageTemplate(example.rendered, replace(sender(), list_name="b"))
    # one issue, one person: one id, whichever list it came from (receivers drop a copy)
    assert on_a.message_id(ann) == on_b.message_id(ann)
    assert on_a.message_id(ann) != on_a.message_id(Recipient("bob@example.org"))
    date = dt.datetime(2020, 12, 23, tzinfo=dt.UTC)
    test_id = on_a.test_message_id("0123456789abcdef")
    assert test_id == "<2020-12-23.test.0123456789abcdef@example.org>"
    copy = parse(on_a.personalise(ann, date=date, message_id=test_id))
    assert copy["Message-ID"] == test_id
    assert parse(on_a.personalise(ann, date=date))["Message-ID"] == on_a.message_id(ann)
    with pytest.raises(ValueError, match="nonce"):
        on_a.test_message_id("x>\r\nBcc: y")


@pytest.mark.parametrize(
    "reply_to",
    [
        "Équipe Recherche <research@example.org>",
        "research@example.org",
        '"Doe, Jo" <jo@example.org>',
        "Jo =?utf-8?q?x?= <jo@example.org>",
    ],
)
def test_reply_to_is_written_as_from_is(example: BuildResult, reply_to: str) -> None:
    from dataclasses import replace
    from email.utils import parseaddr

    template = MessageTemplate(example.rendered, replace(sender(), reply_to=reply_to))
    raw = template.personalise(Recipient("ann@example.org"), date=dt.datetime.now(dt.UTC))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    msg = parse(raw)
    name, address = parseaddr(reply_to)
    assert msg["Reply-To"].addresses[0].display_name == name
    assert msg["Reply-To"].addresses[0].addr_spec == address
    assert not msg.defects
