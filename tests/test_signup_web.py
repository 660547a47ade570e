"""The public signup on a real server (uvicorn on 127.0.0.1), on both backends, with its
confirmation mail sent by the real mailer to the test SMTP server: the form, the proof
of work (solved here as the browser's script does) or the wait without JavaScript,
the honeypot, the limits, the same answer for every state of an address, and the
confirmation link: a GET that changes nothing, a POST that works once, and forged,
altered, expired and replayed tokens that all get the same 404."""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import json
import re
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.types import ASGIApp

from conftest import REPO
from newsletter import wiring
from newsletter.audience.csv_import import ParsedRow
from newsletter.render.loading import load_society
from newsletter.settings import load_settings
from newsletter.signup.joining import SignupPolicy
from newsletter.signup.mailer import Mailer
from newsletter.storage import Storage, open_storage
from newsletter.storage.signups import erasure_hash, erasure_key
from newsletter.web.app import WebConfig, create_app
from smtp_server import Server
from test_web import call, running

FORM = "application/x-www-form-urlencoded"
NOW = dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC)
NEW = "new.reader@example.org"
PUBLIC = "https://news.example.org"  # the mail's links; the pages are served at Signup.base
SECRET = "test-secret-for-the-suite-0123456789"  # noqa: S105 - a test key
KEY = SECRET.encode()


@dataclass
class Clock:
    now: dt.datetime = NOW

    def __call__(self) -> dt.datetime:
        return self.now

    def later(self, **by: float) -> None:
        self.now += dt.timedelta(**by)


@dataclass
class Signup:
    base: str
    database: str
    clock: Clock
    smtp: Server
    mailer: Mailer
    policy: SignupPolicy
    storages: list[Storage] = field(default_factory=list)

    def db(self) -> Storage:
        storage = open_storage(self.database)
        self.storages.append(storage)
        return storage

    def form_page(self) -> str:
        status, body, _ = call(f"{self.base}/subscribe")
        assert status == 200, body
        return body

    def post(self, fields: dict[str, str], *, headers: dict[str, str] | None = None,
             solve: bool = True, page: str | None = None) -> tuple[int, str]:  # fmt: skip
        """POST the form as the browser would: with the page's stamp and, when ``solve``,
        its challenge solved (signup.js's work, done here in Python)."""
        shown = page if page is not None else self.form_page()
        sent = {"stamp": hidden(shown, "stamp"), "source": hidden(shown, "source"),
                "altcha": solved(shown) if solve else "", **fields}  # fmt: skip
        status, body, _ = call(f"{self.base}/subscribe", urllib.parse.urlencode(sent).encode(),
                               FORM, headers=headers)  # fmt: skip
        return status, body

    def mails(self) -> list[email.message.EmailMessage]:
        self.mailer.run_once()
        return [
            email.message_from_bytes(r.data, policy=email.policy.default)  # type: ignore[misc]
            for r in self.smtp.handler.received
        ]


def hidden(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no {name} in the page"
    return found.group(1)


def solved(page: str) -> str:
    """The payload signup.js puts in the form: the page's challenge, solved."""
    import altcha

    found = re.search(r"data-altcha-challenge='([^']*)'", page)
    assert found, "no challenge in the page"
    challenge = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    solution = altcha.solve_challenge_v1(
        challenge["challenge"], challenge["salt"], challenge["algorithm"],
        challenge["maxnumber"], 0,
    )  # fmt: skip
    assert solution is not None
    payload = {
        "algorithm": challenge["algorithm"], "challenge": challenge["challenge"],
        "number": solution.number, "salt": challenge["salt"],
        "signature": challenge["signature"],
    }  # fmt: skip
    return base64.b64encode(json.dumps(payload).encode()).decode()


def confirm_link(message: email.message.EmailMessage, base: str) -> str:
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    found = re.search(re.escape(PUBLIC) + r"/confirm/[A-Za-z0-9_-]+", text.get_content())
    assert found, text.get_content()
    return base + found.group(0).removeprefix(PUBLIC)


@contextmanager
def signup_site(database: str, **policy: Any) -> Iterator[Signup]:
    society = load_society(REPO / "society.yaml").value
    clock = Clock()
    smtp = Server().start()
    with closing(open_storage(database, create=True)) as storage:
        storage.subscribers.import_rows(
            "research-news", [ParsedRow(2, "member@example.org", "Mem", None, {})],
            skip_invalid=False,
        )  # fmt: skip
    holder: dict[str, Any] = {}

    def app(base: str) -> ASGIApp:
        settings = load_settings(
            smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_security="none", database=database,
            secret_key=SECRET, public_url=PUBLIC,
        )  # fmt: skip
        made = wiring.signup_policy(settings, society)
        assert made is not None
        made = SignupPolicy(**{**{n: getattr(made, n) for n in SignupPolicy.__slots__},
                               **policy})  # fmt: skip
        mailer = Mailer(open_storage(database), wiring.signup_composer(settings, society, made),
                        wiring.smtp_transport(settings), "bounces@example.org")  # fmt: skip
        holder.update(policy=made, mailer=mailer)
        return create_app(
            WebConfig(
                KEY,
                society,
                open_storage(database, busy_seconds=5),
                None,
                public_url=base,
                clock=clock,
                signup=made,
            )
        )

    try:
        with running(app) as base:
            site = Signup(base, database, clock, smtp, holder["mailer"], holder["policy"])
            try:
                yield site
            finally:
                for storage in site.storages:
                    storage.close()
                site.mailer.storage.close()
    finally:
        smtp.stop()


@pytest.fixture
def site(database: str) -> Iterator[Signup]:
    with signup_site(database) as made:
        yield made


def test_the_form_page_loads_nothing_from_elsewhere_and_works_without_a_script(
    site: Signup,
) -> None:
    status, page, headers = call(f"{site.base}/subscribe")
    assert status == 200
    assert "script-src 'self'" in headers["content-security-policy"]
    assert 'name="email" type="email" autocomplete="email" required' in page
    assert site.policy.consent_text in page.replace("&#x27;", "'")
    assert 'name="website" tabindex="-1"' in page  # the honeypot
    # Everything the page loads is our own: one script, no image, style sheet or font.
    loads = re.findall(r'<(?:script|img|link|iframe)[^>]*(?:src|href)="([^"]*)"', page)
    assert loads == [f"{site.base}/static/signup.js"]
    status, script, headers = call(f"{site.base}/static/signup.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert "crypto.subtle" in script


def test_a_signup_confirmed_by_its_link_joins_the_list_with_a_full_consent_record(
    site: Signup,
) -> None:
    status, body = site.post({"email": "New.Reader@EXAMPLE.org", "first_name": "Ada"},
                             headers={"Referer": f"{site.base}/subscribe"})  # fmt: skip
    assert status == 200 and "Check your inbox" in body
    db = site.db()
    assert db.subscribers.lists_of(NEW) == []  # nothing until confirmed
    (mail,) = site.mails()
    assert mail["To"].addresses[0].addr_spec == NEW
    assert mail["Auto-Submitted"] == "auto-generated" and mail["List-Unsubscribe"] is None
    link = confirm_link(mail, site.base)
    # GET (a mail scanner, a preview): a page with a button, and nothing changes.
    for method in ("GET", "HEAD"):
        status, page, _ = call(link, method=method)
        assert status == 200
    assert "Yes, subscribe me" in call(link)[1]
    assert db.subscribers.lists_of(NEW) == [] and db.signups.consents(NEW) == []
    site.clock.later(minutes=3)
    status, page, _ = call(link, b"confirm=yes", FORM)
    assert status == 200 and "You are subscribed" in page
    assert db.subscribers.lists_of(NEW) == [("research-news", False)]
    assert NEW in [r.email for r in db.subscribers.audience("research-news")]
    (record,) = db.signups.consents(NEW)
    assert (record.method, record.list_name, record.consent_text) == (
        "confirmed", "research-news", site.policy.consent_text)  # fmt: skip
    assert record.posted_at == "2026-12-03T09:30:00+00:00"
    assert record.confirmed_at == "2026-12-03T09:33:00+00:00"
    assert record.posted_ip == record.confirmed_ip == "127.0.0.1"
    assert record.source == "the signup page (/subscribe)"
    # The link again, replayed or clicked twice: the same 404 as a forged one.
    again = call(link, b"confirm=yes", FORM)
    forged = call(f"{site.base}/confirm/" + "A" * 54, b"confirm=yes", FORM)
    assert again[0] == forged[0] == 404 and again[1] == forged[1]
    assert call(link)[0] == 404
    assert len(db.signups.consents(NEW)) == 1


def test_altered_and_expired_links_get_the_same_404_and_change_nothing(site: Signup) -> None:
    site.post({"email": NEW})
    (mail,) = site.mails()
    link = confirm_link(mail, site.base)
    token = link.rpartition("/")[2]
    flipped = token[:10] + ("B" if token[10] != "B" else "C") + token[11:]
    not_found = call(f"{site.base}/confirm/nothing-like-a-token")
    for bad in (flipped, token[:-2], token + "A", token.upper()):
        got = call(f"{site.base}/confirm/{bad}", b"confirm=yes", FORM)
        assert (got[0], got[1]) == (404, not_found[1]), bad
    site.clock.later(hours=48)  # the link's 48 hours are over
    assert call(link)[0] == 404
    assert call(link, b"confirm=yes", FORM)[1] == not_found[1]
    assert site.db().subscribers.lists_of(NEW) == []


def test_every_state_of_an_address_gets_the_same_answer(site: Signup) -> None:
    """New, waiting, subscribed, suppressed, erased: one page, the address aside."""
    db = site.db()
    db.subscribers.import_rows("research-news", [ParsedRow(2, "gone@example.org", None, None, {})],
                               skip_invalid=False)  # fmt: skip
    db.subscribers.suppress("gone@example.org", "complained", actor="test")
    key = erasure_key(KEY)
    db.signups.erase("erased@example.org", erasure_hash(key, "erased@example.org"), now="x")
    site.post({"email": "waiting@example.org"})
    answers = {}
    for who in ("fresh@example.org", "waiting@example.org", "member@example.org",
                "gone@example.org", "erased@example.org"):  # fmt: skip
        status, body = site.post({"email": who})
        answers[who] = (status, body.replace(who, "ADDRESS"))
    assert len(set(answers.values())) == 1, answers
    assert next(iter(answers.values()))[0] == 200


def test_a_member_gets_one_mail_a_day_and_a_new_address_its_limit(site: Signup) -> None:
    site.db().subscribers.suppress("gone@example.org", "complained", actor="test")
    for _ in range(2):
        site.post({"email": "member@example.org"})
        # Suppressed (they left everything): a stranger cannot mail them three times a day.
        site.post({"email": "gone@example.org"})
    for _ in range(5):
        site.post({"email": NEW})
    sent = [m["To"].addresses[0].addr_spec for m in site.mails()]
    assert sent.count("member@example.org") == 1
    assert sent.count("gone@example.org") == 1
    assert sent.count(NEW) == 3  # NEWSLETTER_SIGNUP_ADDRESS_LIMIT's default
    site.clock.later(hours=25)
    site.post({"email": "member@example.org"})
    site.post({"email": "gone@example.org"})
    assert len(site.mails()) == len(sent) + 2


def test_the_honeypot_and_a_replayed_proof_keep_nothing(site: Signup) -> None:
    status, body = site.post({"email": NEW, "website": "https://spam.example"})
    assert status == 200 and "Check your inbox" in body  # the same answer
    assert site.mails() == [] and site.db().signups.signups_of(NEW) == []
    page = site.form_page()
    first = site.post({"email": NEW}, page=page)
    assert "Check your inbox" in first[1]
    replay = site.post({"email": "other@example.org"}, page=page)  # the same solved challenge
    assert replay[0] == 200 and "One more step" in replay[1]
    assert 'value="other@example.org"' in replay[1]  # shown again, filled in
    assert site.db().signups.signups_of("other@example.org") == []


def test_without_javascript_the_form_must_have_waited(site: Signup) -> None:
    page = site.form_page()
    early = site.post({"email": NEW}, solve=False, page=page)
    assert "One more step" in early[1] and site.db().signups.signups_of(NEW) == []
    site.clock.later(seconds=6)
    late = site.post({"email": NEW}, solve=False, page=page)
    assert "Check your inbox" in late[1]
    site.clock.later(seconds=6)
    reused = site.post({"email": "other@example.org"}, solve=False, page=page)
    assert "One more step" in reused[1]
    assert len(site.mails()) == 1


def test_the_work_policy_needs_the_proof_of_work(database: str) -> None:
    with signup_site(database, challenge="work") as site:
        page = site.form_page()
        site.clock.later(seconds=60)
        assert "One more step" in site.post({"email": NEW}, solve=False, page=page)[1]
        assert "Check your inbox" in site.post({"email": NEW})[1]


def test_one_network_has_an_hourly_limit(database: str) -> None:
    with signup_site(database, ip_limit=2) as site:
        answers = [site.post({"email": f"r{i}@example.org"})[0] for i in range(3)]
        assert answers == [200, 200, 429]
        site.clock.later(minutes=61)
        assert site.post({"email": "r9@example.org"})[0] == 200


def test_the_societys_own_form_gets_the_last_step_on_our_page(site: Signup) -> None:
    """A form on the society's website posts only its fields: our page shows them back
    with the check, and the signup records that page as where it came from."""
    own = urllib.parse.urlencode({"email": NEW, "first_name": "Ada", "lists": "research-news"})
    referer = {"Referer": "https://www.example.org/join?x=1"}
    status, body, _ = call(f"{site.base}/subscribe", own.encode(), FORM, headers=referer)
    assert status == 200 and "One more step" in body and f'value="{NEW}"' in body
    status, body = site.post({"email": NEW, "first_name": "Ada"}, page=body, headers=referer)
    assert "Check your inbox" in body
    (waiting,) = site.db().signups.signups_of(NEW)
    assert waiting.form == "form at https://www.example.org/join"


def test_bad_input_is_shown_back_and_nothing_is_kept(site: Signup) -> None:
    for fields, said in (
        ({"email": "not an address"}, "is not an email address"),
        ({"email": ""}, "Please give your email address."),
        ({"email": NEW, "first_name": "x" * 150}, "under 100 characters"),
    ):
        status, body = site.post(fields)
        assert status == 400 and said in body, body
    status, body = site.post({"email": "<script>alert(1)</script>@example.org"})
    assert status == 400 and "<script>alert" not in body
    big = call(f"{site.base}/subscribe", b"email=" + b"a" * 20_000, FORM)
    assert big[0] == 413
    assert site.db().signups.signups_of(NEW) == []


def test_a_bounced_address_comes_back_only_by_its_own_confirmation(site: Signup) -> None:
    db = site.db()
    db.subscribers.suppress("member@example.org", "bounced", actor="test")
    site.post({"email": "member@example.org"})
    (mail,) = site.mails()
    call(confirm_link(mail, site.base), b"confirm=yes", FORM)
    assert db.subscribers.suppression("member@example.org") is None
    record = [c for c in db.signups.consents("member@example.org") if c.method == "confirmed"]
    assert "the suppression (bounced" in record[0].lifted


def test_the_mailer_records_every_fate(site: Signup) -> None:
    site.smtp.handler.behaviour.reject = {"refused@example.org": (550, "5.1.1 no such user")}
    site.post({"email": "refused@example.org"})
    site.post({"email": NEW})
    assert site.mailer.run_once() == 2
    states = {m.email: m.state for m in site.db().signups.outbox()}
    assert states == {"refused@example.org": "rejected", NEW: "sent"}


def test_a_welcome_mail_follows_the_confirmation_when_the_society_wants_one(
    database: str,
) -> None:
    with signup_site(database, welcome=True) as site:
        site.post({"email": NEW, "first_name": "Ada"})
        (confirmation,) = site.mails()
        call(confirm_link(confirmation, site.base), b"confirm=yes", FORM)
        welcome = site.mails()[-1]
        assert welcome["To"].addresses[0].addr_spec == NEW
        assert welcome["List-Unsubscribe"].startswith(f"<{PUBLIC}/unsubscribe/")
        assert welcome["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert [m.kind for m in site.db().signups.outbox(NEW)] == ["confirm", "welcome"]
        assert {m.state for m in site.db().signups.outbox(NEW)} == {"sent"}


def test_the_mailer_defers_a_mail_while_the_relay_is_down(site: Signup) -> None:
    from newsletter.delivery.transports import SmtpConfig, SmtpTransport
    from test_signup_browser import free_port

    site.post({"email": NEW})
    down = SmtpTransport(SmtpConfig("127.0.0.1", free_port(), "none", timeout=2))
    mailer = Mailer(site.db(), site.mailer.compose, down, "bounces@example.org")
    assert mailer.run_once() == 1
    (mail,) = site.db().signups.outbox(NEW)
    assert mail.state == "deferred"  # not lost, not unknown: it never left
    assert site.mailer.run_once() == 0  # not due yet: tried again in a minute
    assert site.mailer.run_once(now=dt.datetime.now(dt.UTC).timestamp() + 120) == 1
    assert site.db().signups.outbox(NEW)[0].state == "sent"


def test_networks_and_stamps() -> None:
    from newsletter.signup.joining import form_stamp, network_of

    assert network_of("::ffff:198.51.0.7") == "198.51.0.7"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert form_stamp(KEY, 1000.0) != form_stamp(KEY, 1000.0)  # two visitors, one second


def test_a_form_posted_in_its_pages_charset_keeps_the_name_as_typed(site: Signup) -> None:
    """The society's own page in ISO-8859-1 posts its escapes in that charset."""
    shown = site.form_page()
    sent = {"stamp": hidden(shown, "stamp"), "source": "https://www.example.org/join",
            "altcha": solved(shown), "email": NEW, "first_name": "José"}  # fmt: skip
    body = urllib.parse.urlencode(sent, encoding="iso-8859-1").encode("ascii")
    assert b"Jos%E9" in body
    status, answer, _ = call(f"{site.base}/subscribe", body,
                             "application/x-www-form-urlencoded; charset=ISO-8859-1")  # fmt: skip
    assert status == 200 and "Check your inbox" in answer
    (kept,) = site.db().signups.signups_of(NEW)
    assert kept.first_name == "José"
    # A charset Python does not know, or one that is not ASCII inside, counts as UTF-8.
    for odd in ("x-unknown-charset", "utf-16"):
        shown = site.form_page()
        again = {**sent, "stamp": hidden(shown, "stamp"), "altcha": solved(shown),
                 "email": f"{odd}@example.org", "first_name": "Zoë"}  # fmt: skip
        body = urllib.parse.urlencode(again).encode("ascii")
        status, _, _ = call(f"{site.base}/subscribe", body,
                            f"application/x-www-form-urlencoded; charset={odd}")  # fmt: skip
        assert status == 200
        (odd_kept,) = site.db().signups.signups_of(f"{odd}@example.org")
        assert odd_kept.first_name == "Zoë"
