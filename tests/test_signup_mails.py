"""The signup mails: the double opt-in confirmation and the welcome email.

Real components throughout: the bundled templates/ and society.yaml, the stdlib
parser (policy.default) reading what was composed, the project's SMTP transport
talking to aiosmtpd on 127.0.0.1, dkimpy verifying a signature made with a real
RSA key, and the newsletter's own checks on the HTML and text.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import re
import shutil
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import getaddresses, parsedate_to_datetime
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import REPO
from newsletter.delivery import dkim_sign
from newsletter.delivery.transports import Envelope, SmtpConfig, SmtpTransport
from newsletter.errors import ConfigError, TemplateError
from newsletter.models import Outcome, Society
from newsletter.render import merge_fields
from newsletter.render.checks import check_message
from newsletter.render.loading import load_society
from newsletter.render.templating import Templates, load_templates
from newsletter.signup import mails
from smtp_server import Server

GOLDEN = REPO / "tests" / "golden" / "signup"
DATE = dt.datetime(2020, 12, 23, 9, 0, tzinfo=dt.UTC)
CONFIRM_URL = "https://news.example.org/signup/confirm/" + "c0nf1rm" * 12
PREFERENCES_URL = "https://news.example.org/preferences/" + "pr3f" * 21
UNSUBSCRIBE_URL = "https://news.example.org/unsubscribe/" + "uns7b" * 17
PUBLIC_URL = "https://news.example.org"
MESSAGE_ID = re.compile(r"<(confirm|welcome)\.[0-9a-f]{32}@example\.org>")
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.fixture(scope="module")
def templates() -> Templates:
    return load_templates(REPO / "templates")


@pytest.fixture(scope="module")
def society() -> Society:
    return load_society(REPO / "society.yaml").value


def confirm(templates: Templates, society: Society, **changes: Any) -> bytes:
    args: dict[str, Any] = {
        "sender_name": "MS Research News",
        "sender_address": "news@example.org",
        "to": "ann@example.org",
        "first_name": "Ann",
        "lists": ["MS Research News"],
        "confirm_url": CONFIRM_URL,
        "expires_at": DATE + dt.timedelta(hours=48),
        "public_url": PUBLIC_URL,
        "date": DATE,
    }
    return mails.confirmation_message(templates, society, **(args | changes))


def welcome(templates: Templates, society: Society, **changes: Any) -> bytes:
    args: dict[str, Any] = {
        "sender_name": "MS Research News",
        "sender_address": "news@example.org",
        "to": "ann@example.org",
        "first_name": "Ann",
        "lists": ["MS Research News"],
        "preferences_url": PREFERENCES_URL,
        "unsubscribe_url": UNSUBSCRIBE_URL,
        "public_url": PUBLIC_URL,
        "date": DATE,
    }
    return mails.welcome_message(templates, society, **(args | changes))


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> tuple[str, str]:
    """(text, HTML), checking the structure on the way: multipart/alternative holding
    text/plain then text/html, each quoted-printable UTF-8."""
    assert msg.get_content_type() == "multipart/alternative"
    subparts = list(msg.iter_parts())
    assert [p.get_content_type() for p in subparts] == ["text/plain", "text/html"]
    for part in subparts:
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
    text, html = (p.get_content() for p in subparts)
    assert isinstance(text, str) and isinstance(html, str)
    return text.replace("\r\n", "\n"), html.replace("\r\n", "\n")


def header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return [line.split(":", 1)[0] for line in head.split("\r\n") if line[:1] not in (" ", "\t")]


class Links(HTMLParser):
    """Every <a>, with its href and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._open: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._open.append([dict(attrs).get("href") or ""])

    def handle_data(self, data: str) -> None:
        for link in self._open:
            link.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open:
            href, *text = self._open.pop()
            self.links.append((href, " ".join("".join(text).split())))


def links(html: str) -> list[tuple[str, str]]:
    parser = Links()
    parser.feed(html)
    return parser.links


class Visible(HTMLParser):
    """The text a reader sees: the body's text, not its styles or Outlook's comments."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("style", "title", "head")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "title", "head")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def visible(html: str) -> str:
    parser = Visible()
    parser.feed(html)
    return " ".join("".join(parser.text).split())


def assert_wire_format(raw: bytes) -> None:
    """CRLF only, ASCII headers within RFC 5322's 998 octets, quoted-printable body lines
    of at most 76 (RFC 2045), nothing to dot-stuff."""
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    head.decode("ascii")
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert not any(line.startswith(b".") for line in raw.split(b"\r\n"))


# -- the confirmation ---------------------------------------------------------------


def test_confirmation_headers(templates: Templates, society: Society) -> None:
    raw = confirm(templates, society)
    assert_wire_format(raw)
    msg = parse(raw)
    assert header_names(raw) == [
        "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Auto-Submitted",
        "Content-Type",
    ]  # fmt: skip
    assert msg["From"] == "MS Research News <news@example.org>"
    assert msg["To"] == "Ann <ann@example.org>"
    assert msg["Subject"] == "Please confirm your subscription to MS Research News"
    assert parsedate_to_datetime(msg["Date"]) == DATE
    assert MESSAGE_ID.fullmatch(msg["Message-ID"])
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-generated"
    # Not a list message: the reader is on no list, so there is nothing to leave.
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "Precedence", "Bcc"):
        assert name not in msg
    assert not msg.defects


def test_confirmation_says_what_and_how_and_why(templates: Templates, society: Society) -> None:
    text, html = parts(parse(confirm(templates, society)))
    flat = " ".join(text.split())
    for said in (
        "Hello Ann,",
        "Someone, hopefully you, asked for this address (ann@example.org) to receive "
        "MS Research News from The MS Research Society.",
        "The link works for 48 hours, until 25 December 2020 at 09:00 UTC.",
        "If it was not you, ignore this email: you will not be subscribed, and you will "
        "get nothing more from us.",
        # the footer: the society, and why this came instead of an unsubscribe link
        "The MS Research Society, 12 Example Street, London N1 2AB, United Kingdom",
        "Registered charity no. 1234567",
        "because someone asked for it to be added to our mailing list. Ignore it and the "
        "address stays off our lists.",
    ):
        assert said in flat
        assert said in visible(html)
    assert f"\n  {CONFIRM_URL}\n" in text  # on a line of its own, never wrapped
    assert "unsubscribe" not in (text + html).lower()


def test_the_confirmation_link_is_the_only_call_to_action(
    templates: Templates, society: Society
) -> None:
    text, html = parts(parse(confirm(templates, society)))
    found = links(html)
    # The button is a real <a href> (MJML's bulletproof button), and the same address
    # is written out for a client that shows no button: nothing else is a link.
    assert ("" + CONFIRM_URL, "Confirm my subscription") in found
    assert {href for href, _ in found} == {CONFIRM_URL}
    assert len(found) == 2
    assert re.findall(r"https://\S+", text) == [CONFIRM_URL]
    # No social or website links, no view-in-browser line, no image to fetch.
    assert "<img" not in html and "facebook" not in html.lower()


def test_both_mails_keep_every_rule_the_newsletter_keeps(
    templates: Templates, society: Society
) -> None:
    """The build's own checks: lang, no remote CSS or fonts, no script, https links only,
    no template syntax or placeholder left, well under Gmail's clipping, and the link the
    mail is for (the confirmation link; the welcome's unsubscribe link) in both parts."""
    for raw, link in (
        (confirm(templates, society), CONFIRM_URL),
        (welcome(templates, society), UNSUBSCRIBE_URL),
    ):
        text, html = parts(parse(raw))
        report = check_message(html, text, unsubscribe_url=link)
        assert report.failures == [] and report.warnings == []
        assert report.html_bytes < 30_000  # Gmail clips at about 102 KB
        assert html.startswith("<!doctype html>") and '<html lang="en-GB"' in html
        assert "<link" not in html and "@import" not in html and "fonts.g" not in html
        assert 'style="' in html  # inline.css went through the inliner


def test_each_confirmation_has_its_own_message_id(templates: Templates, society: Society) -> None:
    ids = {parse(confirm(templates, society))["Message-ID"] for _ in range(3)}
    assert len(ids) == 3


def test_a_given_message_id_is_used_and_checked(templates: Templates, society: Society) -> None:
    """A mailer retrying one outbox mail may give every try the same Message-ID."""
    stable = "<confirm.42.5f2a@example.org>"
    assert parse(confirm(templates, society, message_id=stable))["Message-ID"] == stable
    welcomed = welcome(templates, society, message_id="<welcome.42@example.org>")
    assert parse(welcomed)["Message-ID"] == "<welcome.42@example.org>"
    for bad in (
        "confirm.42@example.org",
        "<a@b.org>\r\nBcc: evil@example.com",
        "<a b@c.org>",
        "<>",
    ):
        with pytest.raises(ValueError, match="not <local@domain>"):
            confirm(templates, society, message_id=bad)


def test_several_lists_and_the_subject_kept_short(templates: Templates, society: Society) -> None:
    msg = parse(confirm(templates, society, lists=["MS Research News", "Events", "Appeals"]))
    assert msg["Subject"] == (
        "Please confirm your subscription to MS Research News, Events and Appeals"
    )
    assert "receive MS Research News, Events and Appeals from" in " ".join(parts(msg)[0].split())
    long = parse(confirm(templates, society, lists=["Research news for people with MS"] * 3))
    assert long["Subject"] == (
        "Please confirm your subscription to mail from The MS Research Society"
    )


def test_expiry_is_said_in_the_zone_it_is_given_in(templates: Templates, society: Society) -> None:
    london = dt.datetime(2021, 7, 1, 18, 30, tzinfo=ZoneInfo("Europe/London"))
    text, _ = parts(parse(confirm(templates, society, expires_at=london)))
    assert "until 1 July 2021 at 18:30 BST." in " ".join(text.split())
    mail = mails.SignupMail(
        "a@example.org", "", ("L",), load_society(REPO / "society.yaml").value, PUBLIC_URL, DATE
    )
    for delta, said in [
        (dt.timedelta(days=7), "7 days"),
        (dt.timedelta(hours=48), "48 hours"),
        (dt.timedelta(hours=23, minutes=40), "24 hours"),
        (dt.timedelta(hours=1), "1 hour"),
        (dt.timedelta(minutes=30), "30 minutes"),
    ]:
        assert mails.SignupMail(**{**_fields(mail), "expires": DATE + delta}).valid_for == said


def _fields(mail: mails.SignupMail) -> dict[str, Any]:
    return {name: getattr(mail, name) for name in mail.__dataclass_fields__}


def test_times_must_be_aware_and_the_link_must_expire_later(
    templates: Templates, society: Society
) -> None:
    with pytest.raises(ValueError, match="aware"):
        confirm(templates, society, date=DATE.replace(tzinfo=None))
    with pytest.raises(ValueError, match="aware"):
        confirm(templates, society, expires_at=DATE.replace(tzinfo=None))
    with pytest.raises(ValueError, match="later"):
        confirm(templates, society, expires_at=DATE)
    with pytest.raises(ValueError, match="at least one list"):
        confirm(templates, society, lists=["", " \r\n"])
    with pytest.raises(TypeError):
        confirm(templates, society, lists="MS Research News")


def test_no_first_name_and_a_non_ascii_one(templates: Templates, society: Society) -> None:
    plain = parse(confirm(templates, society, first_name=""))
    assert plain["To"] == "ann@example.org"
    assert "Hello," in parts(plain)[0]
    raw = confirm(templates, society, first_name="Zoë", reply_to="Équipe MS <team@example.org>")
    assert b"To: =?utf-8?" in raw and b"Reply-To: =?utf-8?" in raw  # RFC 2047, as message.py
    msg = parse(raw)
    assert msg["To"] == "Zoë <ann@example.org>"
    assert msg["Reply-To"] == "Équipe MS <team@example.org>"
    assert "Hello Zoë," in parts(msg)[0] and "Hello Zoë," in parts(msg)[1]


# -- the welcome ----------------------------------------------------------------------


def test_welcome_headers_have_the_one_click_pair(templates: Templates, society: Society) -> None:
    raw = welcome(templates, society)
    assert_wire_format(raw)
    msg = parse(raw)
    assert header_names(raw) == [
        "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Auto-Submitted",
        "List-Unsubscribe", "List-Unsubscribe-Post", "Content-Type",
    ]  # fmt: skip
    assert msg["Subject"] == "Welcome to MS Research News"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert MESSAGE_ID.fullmatch(msg["Message-ID"]) and "<welcome." in msg["Message-ID"]
    assert f"List-Unsubscribe: <{UNSUBSCRIBE_URL}>\r\n".encode() in raw  # raw, never =?
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "List-Id" not in msg and not msg.defects


def test_welcome_with_the_mailto_unsubscribe(templates: Templates, society: Society) -> None:
    raw = welcome(templates, society, unsubscribe_mailto="unsubscribe@example.org")
    token = UNSUBSCRIBE_URL.rpartition("/")[2]
    assert (
        f"List-Unsubscribe: <{UNSUBSCRIBE_URL}>,\r\n"
        f" <mailto:unsubscribe@example.org?subject=unsubscribe%20{token}>\r\n"
    ).encode() in raw
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0]


def test_welcome_has_the_members_footer(templates: Templates, society: Society) -> None:
    text, html = parts(parse(welcome(templates, society)))
    hrefs = {text_: href for href, text_ in links(html)}
    assert hrefs["Manage your preferences"] == PREFERENCES_URL
    assert hrefs["Unsubscribe"] == UNSUBSCRIBE_URL
    assert hrefs["Visit our website"] == "https://www.example.org"
    assert hrefs["Read past issues"] == f"{PUBLIC_URL}/issues/"
    assert hrefs["Facebook"].startswith("https://www.facebook.com/")
    for url in (PREFERENCES_URL, UNSUBSCRIBE_URL, f"{PUBLIC_URL}/issues/"):
        assert f"\n  {url}\n" in text
    assert "You are now subscribed to MS Research News from The MS Research Society, at " in (
        " ".join(text.split())
    )
    assert "This email was sent to ann@example.org\nbecause it is on the MS Research News" in text


def test_the_welcome_mail_is_optional(tmp_path: Path) -> None:
    assert mails.welcome_templates_present(REPO / "templates")
    folder = tmp_path / "templates"
    shutil.copytree(REPO / "templates", folder)
    for name in mails.WELCOME_TEMPLATES:
        (folder / name).unlink()
    assert not mails.welcome_templates_present(folder)
    shutil.copy(REPO / "templates" / "welcome.mjml.j2", folder)
    with pytest.raises(ConfigError, match=r"welcome\.mjml\.j2 is there but .*welcome\.txt\.j2"):
        mails.welcome_templates_present(folder)
    # asked for anyway, the missing template is named
    society = load_society(REPO / "society.yaml").value
    with pytest.raises(ConfigError, match=r"welcome\.txt\.j2 not found"):
        welcome(load_templates(folder), society)
    (folder / "confirm.txt.j2").unlink()
    with pytest.raises(ConfigError, match=r"confirm\.txt\.j2 not found"):
        confirm(load_templates(folder), society)


@pytest.fixture
def own_templates(tmp_path: Path) -> Path:
    """A society's own copy of the templates, to change."""
    folder = tmp_path / "templates"
    shutil.copytree(REPO / "templates", folder)
    return folder


def test_a_changed_template_that_loses_its_link_or_misspells_a_tag_is_refused(
    own_templates: Path, society: Society
) -> None:
    page = own_templates / "confirm.mjml.j2"
    source = page.read_text(encoding="utf-8")
    page.write_text(source.replace("{{ mail.confirm_url }}", "https://www.example.org/"), "utf-8")
    with pytest.raises(TemplateError, match=r"the HTML part lacks the link .*mail\.confirm_url"):
        confirm(load_templates(own_templates), society)
    page.write_text(source.replace("mj-button", "mj-buton"), "utf-8")
    with pytest.raises(TemplateError, match=r"'<mj-buton'.*MJML did not know"):
        confirm(load_templates(own_templates), society)
    page.write_text(source.replace("{{ mail.to }}", "{{ mail.too }}"), "utf-8")
    with pytest.raises(TemplateError, match=r"confirm\.mjml\.j2:\d+: .*too"):
        confirm(load_templates(own_templates), society)
    text = own_templates / "welcome.txt.j2"
    text.write_text(text.read_text("utf-8").replace("{{ unsubscribe_url }}", ""), "utf-8")
    with pytest.raises(TemplateError, match=r"the text part lacks the link .*unsubscribe_url"):
        welcome(load_templates(own_templates), society)


# -- goldens ----------------------------------------------------------------------------


def normalised(raw: bytes) -> bytes:
    """The message with its random Message-ID made a fixed one (all else is repeatable)."""
    return re.sub(rb"<(confirm|welcome)\.[0-9a-f]{32}@", rb"<\1.RANDOM@", raw)


def test_golden_files(templates: Templates, society: Society, update_golden: bool) -> None:
    """Both mails render to exactly the reviewed files (pytest --update-golden)."""
    made: dict[str, bytes] = {}
    for name, raw in (
        ("confirm", confirm(templates, society)),
        ("welcome", welcome(templates, society)),
    ):
        text, html = parts(parse(raw))
        made |= {
            f"{name}.eml": normalised(raw),
            f"{name}.txt": text.encode(),
            f"{name}.html": html.encode(),
        }
    if update_golden:
        shutil.rmtree(GOLDEN, ignore_errors=True)
        GOLDEN.mkdir(parents=True)
        for file, content in made.items():
            (GOLDEN / file).write_bytes(content)
    for file, content in made.items():
        assert content == (GOLDEN / file).read_bytes(), (
            f"tests/golden/signup/{file} differs; if the change is intended, review it and "
            "run pytest tests/test_signup_mails.py --update-golden"
        )


# -- over SMTP, and signed --------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


def send(server: Server, envelope: Envelope) -> Outcome:
    async def go() -> Outcome:
        config = SmtpConfig(host="127.0.0.1", port=server.port, security="none", timeout=5)
        session = await SmtpTransport(config).open()
        try:
            return await session.send(envelope)
        finally:
            await session.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[dkim_sign.DkimKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "news.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return dkim_sign.load_key(
        path, "news", "example.org"
    ), b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns_for(record: bytes) -> Any:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"news._domainkey.example.org."
        return record

    return lookup


def signed_headers(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii").replace("\r\n ", " ").lower()
    return head.split(" h=", 1)[1].split(";", 1)[0].replace(" ", "").split(":")


@pytest.mark.parametrize("which", ["confirm", "welcome"])
def test_sent_over_smtp_byte_for_byte_and_the_signature_verifies(
    templates: Templates,
    society: Society,
    server: Server,
    dkim_key: tuple[dkim_sign.DkimKey, bytes],
    which: str,
) -> None:
    key, record = dkim_key
    make = confirm if which == "confirm" else welcome
    raw = make(templates, society, signer=lambda m: dkim_sign.sign(m, key))
    assert raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;")
    covered = ["from", "to", "subject", "date", "message-id", "mime-version", "content-type"]
    if which == "welcome":
        covered += ["list-unsubscribe", "list-unsubscribe-post"]  # RFC 8058 wants both
    assert set(covered) <= set(signed_headers(raw))

    outcome = send(server, Envelope("bounces@example.org", "ann@example.org", raw))
    assert outcome.state == "sent"
    [got] = server.handler.received
    assert got.mail_from == "bounces@example.org" and got.rcpt_tos == ["ann@example.org"]
    assert got.data == raw
    assert dkim.verify(got.data, dnsfunc=dns_for(record))
    link = CONFIRM_URL if which == "confirm" else UNSUBSCRIBE_URL
    text, html = parts(got.message)
    assert link in text and link in html
    # A changed link, or a header the signature covers, fails it.
    changed = got.data.replace(link[-20:].encode(), b"x" * 20)
    assert changed != got.data and not dkim.verify(changed, dnsfunc=dns_for(record))
    forged = got.data.replace(b"\r\nTo: Ann <", b"\r\nTo: Eve <")
    assert forged != got.data and not dkim.verify(forged, dnsfunc=dns_for(record))


# -- hostile input ----------------------------------------------------------------------

# Each with whether the confirmation still greets by it (see the form-spam test below).
HOSTILE_NAMES = [
    ("Ann\r\nBcc: evil@example.com", False),
    ("Ann\nX-Injected: yes", False),
    ("Ann\rX-Injected: yes", False),
    ("Ann\r\n\r\n<p>a body of my own</p>", False),
    ("<script>alert(1)</script>", False),
    ("</mj-text><mj-button href='https://evil.example.com/'>Win</mj-button>", False),
    ('"><a href="https://evil.example.com/">x</a>', False),
    ("\u202eevil\u202c Ann", True),
    ("Ann\u2066\u2069 \u202dLee", True),
    ("Ann\x00\x1b[31m\x07\x7f", False),
    ("=?utf-8?q?X-Injected=3A_yes?=", False),
    ("{{ 7 * 7 }} {% raw %}", False),
    ("[[UNSUBSCRIBE_URL]] [[EMAIL]]", False),
    ("Ann\u2028X-Injected: yes\u0085Bcc: evil@example.com", False),
    ("A" * 5000, False),
]


@pytest.mark.parametrize(("name", "greeted"), HOSTILE_NAMES)
@pytest.mark.parametrize("which", ["confirm", "welcome"])
def test_a_hostile_first_name_is_text_and_never_a_header(
    templates: Templates, society: Society, name: str, greeted: bool, which: str
) -> None:
    make = confirm if which == "confirm" else welcome
    # As a list's name too: the confirmation shows that whatever it holds.
    raw = make(templates, society, first_name=name, lists=[name, "MS Research News"])
    assert_wire_format(raw)
    msg = parse(raw)
    expected = header_names(
        welcome(templates, society) if which == "welcome" else confirm(templates, society)
    )
    assert header_names(raw) == expected  # not one header more
    assert not msg.defects
    cleaned = merge_fields.clean(name)
    assert len(cleaned) <= merge_fields.VALUE_MAX
    shown = cleaned if which == "welcome" or greeted else ""
    [(display, address)] = getaddresses([msg["To"]])
    # (the stdlib parser keeps the space between two encoded words of a long name)
    assert (display.replace(" ", ""), address) == (shown.replace(" ", ""), "ann@example.org")
    assert "\r" not in msg["Subject"] and "\n" not in msg["Subject"]
    text, html = parts(msg)
    hello = f"Hello {shown}," if shown else "Hello,"
    assert hello in " ".join(text.split())  # text/plain: as typed, once cleaned
    assert html_escape(hello, quote=False) in " ".join(html.split())
    # the list's name, in the text as typed and in the HTML escaped
    assert f"{cleaned} and MS Research News from" in " ".join(text.split())
    assert f"{html_escape(cleaned, quote=False)} and MS Research News" in " ".join(html.split())
    for body in (text, html, str(msg["To"]), str(msg["Subject"])):
        assert not any(c in body for c in BIDI)
        assert not any(c in body for c in "\x00\x1b\x07\x7f\u2028\u0085")
    # In the HTML it is escaped text: no tag, link or MJML of its making.
    assert "<script" not in html and '<a href="https://evil' not in html
    assert "<mj-" not in html and "Win</a>" not in html
    hrefs = {href for href, _ in links(html)}
    assert "https://evil.example.com/" not in hrefs
    if which == "confirm":
        assert hrefs == {CONFIRM_URL}
    if "[[" not in name and "{{" not in name:  # (which the checks take for template leftovers)
        link = CONFIRM_URL if which == "confirm" else UNSUBSCRIBE_URL
        assert check_message(html, text, unsubscribe_url=link).failures == []


@pytest.mark.parametrize(
    ("name", "greeted"),
    [
        ("Ann", True),
        ("Zoë", True),
        ("María José García López", True),
        ("Jean-Luc O'Neill", True),
        ("Siobhán O\u2019Brien", True),
        ("李小龍", True),
        ("محمد", True),
        ("Win $1000 at evil.example.com", False),
        ("Ann, call +44 20 7946 0000", False),
        ("visit https://evil.example.com", False),
        ("You have won a prize today", False),  # five words
        ("A" * 41, False),
        ("ann@example.org", False),
    ],
)
def test_the_confirmation_greets_only_by_what_looks_like_a_name(
    templates: Templates, society: Society, name: str, greeted: bool
) -> None:
    """Form spam: a stranger types someone else's address and a "name" that is a
    message of their own. The confirmation shows it only if it looks like a first name;
    the welcome, to someone who confirmed, shows it whatever it is."""
    text, html = parts(parse(confirm(templates, society, first_name=name)))
    flat = " ".join(text.split())
    assert (f"Hello {name}," in flat) is greeted
    assert ("Hello," in flat) is not greeted
    assert (name in html) is greeted or "@" in name  # (the address is in the text anyway)
    welcomed, _ = parts(parse(welcome(templates, society, first_name=name)))
    assert f"Hello {name}," in " ".join(welcomed.split())


@pytest.mark.parametrize(
    "address",
    [
        "ann@example.org\r\nBcc: evil@example.com",
        "ann@example.org\nBcc: evil@example.com",
        "ann@example.org>, <evil@example.com",
        "ann@example.org, evil@example.com",
        "Ann <ann@example.org>",
        " ann@example.org",
        "ann@exämple.org",
        "änn@example.org",
        "ann@example.org\x00",
        "ann@example.org\u202e",
        "ann",
        "ann@localhost",
        '"ann lee"@example.org',
        "",
        "a" * 250 + "@example.org",
    ],
)
def test_a_hostile_address_is_refused(templates: Templates, society: Society, address: str) -> None:
    with pytest.raises(ValueError, match="not a plain address"):
        confirm(templates, society, to=address)
    with pytest.raises(ValueError, match="not a plain address"):
        welcome(templates, society, to=address)


@pytest.mark.parametrize(
    "url",
    [
        'https://news.example.org/c/"><script>alert(1)</script>',
        "https://news.example.org/c/x\r\nBcc: evil@example.com",
        "https://news.example.org/c/a b",
        "https://news.example.org/c/<x>",
        "javascript:alert(1)",
        "http://news.example.org/c/x",
        "https://news.example.org/c/{{ x }}",
        "https://localhost/c/x",
    ],
)
def test_a_link_that_could_break_out_is_refused(
    templates: Templates, society: Society, url: str
) -> None:
    with pytest.raises(ValueError):
        confirm(templates, society, confirm_url=url)
    with pytest.raises(ValueError):
        welcome(templates, society, unsubscribe_url=url)
    with pytest.raises(ValueError):
        welcome(templates, society, preferences_url=url)
    with pytest.raises(ValueError):
        confirm(templates, society, public_url=url)


def test_hostile_sender_and_reply_to(templates: Templates, society: Society) -> None:
    raw = confirm(templates, society, sender_name="News\r\nBcc: evil@example.com")
    assert header_names(raw) == header_names(confirm(templates, society))
    assert getaddresses([parse(raw)["From"]])[0][1] == "news@example.org"
    for reply_to in (
        "team@example.org\r\nBcc: evil@example.com",
        "team@example.org, evil@example.com",
        "Team <team@example.org>\nX-Injected: yes",
    ):
        with pytest.raises(ValueError, match="one mailbox on one line"):
            confirm(templates, society, reply_to=reply_to)
    with pytest.raises(ValueError, match="not a plain address"):
        confirm(templates, society, sender_address="news@example.org\r\nBcc: x@example.com")
    with pytest.raises(ValueError, match="not a plain address"):
        welcome(templates, society, unsubscribe_mailto="u@example.org?subject=x")
