"""Signup mails stage: one signup → its confirmation email, and the optional welcome email.

Input: the :class:`Templates` of the society's folder, the :class:`Society`, who
sends, and what varies per signup (the address, a first name, the display
names of the lists asked for, and the confirmation link and its expiry, or the
member's preferences and unsubscribe links). Output: the whole MIME message as
bytes, ready for a :class:`~newsletter.delivery.transports.base.Envelope`:
multipart/alternative (text/plain, then text/html), both quoted-printable
UTF-8, CRLF line ends, DKIM-signed when a signer is given.

Both mails are composed through the newsletter's own render path: Jinja
(autoescape, StrictUndefined) → MJML → the inliner, the society footer, a text
template of their own (``confirm.*.j2``, ``welcome.*.j2`` in the templates
folder). Unlike an issue they are rendered once per message, with the real
values in the context: a signup is one message, and nothing is shared.

- The confirmation (:func:`confirmation_message`) goes to an address that is on
  no list yet: it is not a list message (RFC 2369), so it has no List-Id or
  List-Unsubscribe, and its footer says why it came instead and that ignoring it
  keeps the reader off the list. Its one call to action is the confirmation link.
- The welcome (:func:`welcome_message`) goes to a member once they confirmed:
  the normal footer links, and the one-click List-Unsubscribe pair as the
  newsletter has it (RFC 8058). It is optional: sent only when the templates
  folder holds ``welcome.mjml.j2`` and ``welcome.txt.j2``
  (:func:`welcome_templates_present`); a society that wants none deletes both.

Both carry ``Auto-Submitted: auto-generated`` (RFC 3834: a machine sent them,
so auto-responders stay quiet) and a random Message-ID on the From domain, made
without a DNS lookup. Every value a stranger typed (the first name, and the list
names, in case) is cleaned as a merge field is (one line, no control characters
or bidi controls, at most 100 characters), HTML-escaped by the templates, and
RFC 2047-encoded in a header when it must be; the confirmation greets by a name
only when it looks like one (it goes to an address nobody has confirmed yet). An
address or a URL that could break a header or a link is refused with ValueError
(the caller validates them first: reaching here with one is a bug).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import quote

# The newsletter's header rules, used as they are: RFC 2047 display names, folding,
# no bare line break in any header, List-Unsubscribe never encoded.
from newsletter.delivery.message import _header, _mailbox, _raw_header, qp_encode
from newsletter.errors import ConfigError, TemplateError
from newsletter.models import Society, https_url
from newsletter.render import merge_fields
from newsletter.render.checks import SIZE_FAIL
from newsletter.render.inliner import inline_css
from newsletter.render.mjml_compile import compile_mjml
from newsletter.render.templating import Templates, longdate, render

CONFIRM_TEMPLATES = ("confirm.mjml.j2", "confirm.txt.j2")
WELCOME_TEMPLATES = ("welcome.mjml.j2", "welcome.txt.j2")
INLINE_CSS = "inline.css"
SUBJECT_MAX = 78  # longer subjects are cut off on phones (RFC 5322 2.1.1's line, too)

# An address as it may stand in a header and in the text: a dot-atom local part
# and a domain of DNS labels (ASCII: an IDN domain comes in its A-label form).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})+")
_MESSAGE_ID = re.compile(f"<{_ADDRESS.pattern}>")  # RFC 5322 3.6.4, dot-atom form
_MJML_LEFTOVER = re.compile(r"</?mj-[\w-]*")
_GREETED_MAX = 40


@dataclass(frozen=True, slots=True)
class SignupMail:
    """What varies from one signup mail to the next: the templates' ``mail``.

    Every text is clean already (:func:`_clean_name`, :func:`_greeted`); ``confirm_url``
    and ``expires`` are set for the confirmation, ``preferences_url`` and
    ``unsubscribe_url`` for the welcome."""

    to: str  # the address
    first_name: str  # "" when the signup gave none
    lists: tuple[str, ...]  # the lists' display names, as given
    society: Society
    public_url: str  # https base of the public pages, no trailing /
    date: dt.datetime  # the message's Date
    confirm_url: str | None = None
    expires: dt.datetime | None = None
    preferences_url: str | None = None
    unsubscribe_url: str | None = None

    @property
    def lists_text(self) -> str:
        """``A``, ``A and B``, ``A, B and C``."""
        if len(self.lists) == 1:
            return self.lists[0]
        return ", ".join(self.lists[:-1]) + " and " + self.lists[-1]

    @property
    def expires_text(self) -> str:
        """``24 December 2020 at 09:00 UTC``, in the time zone ``expires`` is given in."""
        if self.expires is None:
            return ""
        return f"{longdate(self.expires)} at {self.expires:%H:%M} {self.expires.tzname()}"

    @property
    def valid_for(self) -> str:
        """How long the link works, from the message's Date: ``48 hours``, ``7 days``."""
        if self.expires is None:
            return ""
        minutes = round((self.expires - self.date).total_seconds() / 60)
        hours, rest = divmod(minutes, 60)
        if hours >= 72 and not rest and hours % 24 == 0:
            return f"{hours // 24} days"
        if hours >= 2:
            return f"{hours + (rest >= 30)} hours"
        return f"{minutes} minutes" if minutes != 60 else "1 hour"


def confirmation_message(
    templates: Templates,
    society: Society,
    *,
    sender_name: str,
    sender_address: str,
    to: str,
    first_name: str,
    lists: Sequence[str],
    confirm_url: str,
    expires_at: dt.datetime,
    public_url: str,
    date: dt.datetime,
    signer: Callable[[bytes], bytes] | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
) -> bytes:
    """The double opt-in email for one signup: "someone, hopefully you, asked to receive
    ``lists`` from the society; press the button to confirm; the link works until
    ``expires_at``; if it was not you, ignore this and you will get nothing more".

    Not a list message: no List-Id, no List-Unsubscribe (there is nothing to leave),
    and no link but the confirmation link. ``message_id`` (``<local@domain>``) replaces
    the random one: a mailer that tries one outbox mail again after an outcome it
    could not know may give each try the same id, so that receivers drop a duplicate."""
    _require(templates.folder, CONFIRM_TEMPLATES)
    _aware(date, "date")
    _aware(expires_at, "expires_at")
    if expires_at <= date:
        raise ValueError("expires_at must be later than the message's date")
    link = https_url(confirm_url)
    mail = SignupMail(
        to=_address(to, "to"),
        first_name=_greeted(first_name),
        lists=_clean_lists(lists),
        society=society,
        public_url=_base_url(public_url),
        date=date,
        confirm_url=link,
        expires=expires_at,
    )
    subject = _subject(
        f"Please confirm your subscription to {mail.lists_text}",
        f"Please confirm your subscription to mail from {society.name}",
    )
    ctx = {
        "mail": mail,
        "society": society,
        "subject": subject,
        "recipient_email": mail.to,
    }
    html, text = _render_mail(
        templates, CONFIRM_TEMPLATES, ctx, required_link=link, link_name="mail.confirm_url"
    )
    return _compose(
        kind="confirm",
        message_id=message_id,
        sender_name=sender_name,
        sender_address=sender_address,
        mail=mail,
        subject=subject,
        text=text,
        html=html,
        list_headers=b"",
        reply_to=reply_to,
        signer=signer,
    )


def welcome_message(
    templates: Templates,
    society: Society,
    *,
    sender_name: str,
    sender_address: str,
    to: str,
    first_name: str,
    lists: Sequence[str],
    preferences_url: str,
    unsubscribe_url: str,
    public_url: str,
    date: dt.datetime,
    signer: Callable[[bytes], bytes] | None = None,
    reply_to: str | None = None,
    unsubscribe_mailto: str | None = None,
    message_id: str | None = None,
) -> bytes:
    """The welcome email to a new member, once they confirmed (only when
    :func:`welcome_templates_present`; the templates are required here).

    It has the newsletter's footer links and its one-click pair (RFC 8058):
    ``List-Unsubscribe: <unsubscribe_url>`` (and, with ``unsubscribe_mailto``, the
    ``mailto:`` whose Subject is ``unsubscribe TOKEN``, the link's last path
    segment, as the newsletter writes it) and ``List-Unsubscribe-Post``. ``message_id``
    as for :func:`confirmation_message`."""
    _require(templates.folder, WELCOME_TEMPLATES)
    _aware(date, "date")
    unsubscribe = https_url(unsubscribe_url)
    mail = SignupMail(
        to=_address(to, "to"),
        first_name=_clean_name(first_name),
        lists=_clean_lists(lists),
        society=society,
        public_url=_base_url(public_url),
        date=date,
        preferences_url=https_url(preferences_url),
        unsubscribe_url=unsubscribe,
    )
    subject = _subject(
        f"Welcome to {mail.lists_text}", f"Welcome to the mailing lists of {society.name}"
    )
    ctx = {
        "mail": mail,
        "society": society,
        "subject": subject,
        "recipient_email": mail.to,
        "preferences_url": mail.preferences_url,
        "unsubscribe_url": mail.unsubscribe_url,
    }
    html, text = _render_mail(
        templates, WELCOME_TEMPLATES, ctx, required_link=unsubscribe, link_name="unsubscribe_url"
    )
    uris = [f"<{unsubscribe}>"]
    if unsubscribe_mailto is not None:
        token = unsubscribe.rpartition("/")[2]
        mailbox = _address(unsubscribe_mailto, "unsubscribe_mailto")
        uris = [uris[0] + ",", f"<mailto:{mailbox}?subject={quote('unsubscribe ' + token)}>"]
    # Written raw, never RFC 2047-encoded (providers ignore an encoded one); folded
    # between its URIs, as the newsletter's is.
    list_headers = _raw_header("List-Unsubscribe", *uris) + _header(
        "List-Unsubscribe-Post", "List-Unsubscribe=One-Click"
    )
    return _compose(
        kind="welcome",
        message_id=message_id,
        sender_name=sender_name,
        sender_address=sender_address,
        mail=mail,
        subject=subject,
        text=text,
        html=html,
        list_headers=list_headers,
        reply_to=reply_to,
        signer=signer,
    )


def welcome_templates_present(templates_folder: Path) -> bool:
    """Whether the society sends a welcome email: True when its templates folder holds
    both ``welcome.mjml.j2`` and ``welcome.txt.j2``, False when it holds neither.

    One without the other is a ConfigError (a welcome email with no text part, or
    none at all when one was meant): ask at start-up, not at the first signup."""
    there = {name: (templates_folder / name).is_file() for name in WELCOME_TEMPLATES}
    if all(there.values()):
        return True
    if any(there.values()):
        have = next(name for name, found in there.items() if found)
        lack = next(name for name, found in there.items() if not found)
        raise ConfigError(
            f"{templates_folder / have} is there but {templates_folder / lack} is not: the "
            "welcome email needs both (its HTML and its text part); add the missing one, "
            "or delete both to send no welcome email"
        )
    return False


# -- rendering ------------------------------------------------------------------------


def _require(folder: Path, names: tuple[str, str]) -> None:
    for name in names:
        if not (folder / name).is_file():
            raise ConfigError(
                f"template {folder / name} not found; copy it from the templates/ folder "
                "of the newsletter's repository into NEWSLETTER_TEMPLATES_DIR"
            )


def _render_mail(
    templates: Templates,
    names: tuple[str, str],
    ctx: dict[str, Any],
    *,
    required_link: str,
    link_name: str,
) -> tuple[str, str]:
    """(inlined HTML, text) of one mail, checked as far as a signup mail can be checked:
    no MJML tag left over, under Gmail's clipping, the link it exists for in both parts
    (``required_link``, the value of the context's ``link_name``)."""
    html_name, text_name = names
    mjml_source, text = render(templates, ctx, html_template=html_name, text_template=text_name)
    where = templates.folder / html_name
    html = inline_css(compile_mjml(mjml_source, template=str(where)), _css(templates.folder))
    # In the HTML every value is escaped ("&lt;mj-"): "<mj-" there is a tag of the
    # template's that MJML did not know (it passes them through). "{{" is not looked
    # for: a first name may hold it, and a template that left one would not parse.
    leftover = _MJML_LEFTOVER.search(html)
    if leftover:
        raise TemplateError(
            f"{where}: the HTML still contains {leftover.group(0)!r}: MJML did not know "
            "this tag; check its spelling"
        )
    if len(html.encode("utf-8")) > SIZE_FAIL:
        raise TemplateError(
            f"{where}: the HTML is over {SIZE_FAIL // 1000} KB; Gmail clips it at about 102 KB"
        )
    escaped = required_link.replace("&", "&amp;")
    for part, body, name in (("HTML", html, html_name), ("text", text, text_name)):
        if (escaped if part == "HTML" else required_link) not in body:
            raise TemplateError(
                f"{templates.folder / name}: the {part} part lacks the link it is sent for; "
                f"keep {{{{ {link_name} }}}} in the template"
            )
    return html, text


def _css(folder: Path) -> str:
    css_file = folder / INLINE_CSS
    try:
        return css_file.read_text(encoding="utf-8") if css_file.is_file() else ""
    except UnicodeDecodeError:
        raise TemplateError(f"{css_file} is not UTF-8 text; save it as UTF-8") from None


# -- what a stranger typed -------------------------------------------------------------


def _clean_name(value: str) -> str:
    """One line, no control characters or bidi controls, at most 100 characters."""
    return merge_fields.clean(value)


def _greeted(value: str) -> str:
    """The first name the confirmation greets (and puts in To), or "" for "Hello,".

    A stranger types both the address and the name, so a signup form is a way to
    mail anyone a line of one's own ("Ann, claim your prize at evil.example"):
    form spam. The confirmation shows only what looks like a first name: at most
    40 characters in at most 4 words of letters (any script), with apostrophes and
    hyphens. The welcome, to someone who confirmed, shows the name as cleaned."""
    name = _clean_name(value)
    if len(name) > _GREETED_MAX or len(name.split()) > 4:
        return ""
    if all(unicodedata.category(c)[0] in "LM" or c in " '\u2019-" for c in name):
        return name
    return ""


def _clean_lists(lists: Sequence[str]) -> tuple[str, ...]:
    if isinstance(lists, str):
        raise TypeError("lists is a sequence of display names, not one string")
    cleaned = tuple(name for name in (merge_fields.clean(n) for n in lists) if name)
    if not cleaned:
        raise ValueError("a signup mail names at least one list")
    return cleaned


def _address(value: str, what: str) -> str:
    if len(value) > 254 or not _ADDRESS.fullmatch(value):
        raise ValueError(
            f"{what} {value[:300]!r} is not a plain address (ASCII local@domain, no display "
            "name, space, quote, angle bracket or line break)"
        )
    return value


def _reply_to(value: str) -> str:
    """One mailbox (``Name <local@domain>`` or an address) as the header writes it.

    parseaddr() would quietly drop what follows the first mailbox (a line break and
    a header, a second address): refused instead."""
    found = getaddresses([value])
    if any(unicodedata.category(c) == "Cc" for c in value) or len(found) != 1:
        raise ValueError(f"reply_to {value[:300]!r} is not one mailbox on one line")
    name, address = found[0]
    return _mailbox(name, _address(address, "reply_to"))


def _base_url(value: str) -> str:
    return https_url(value.rstrip("/"))


def _aware(value: dt.datetime, what: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (with its time zone)")


def _subject(wanted: str, shorter: str) -> str:
    return wanted if len(wanted) <= SUBJECT_MAX else shorter


# -- the message -----------------------------------------------------------------------


def _compose(
    *,
    kind: str,
    message_id: str | None,
    sender_name: str,
    sender_address: str,
    mail: SignupMail,
    subject: str,
    text: str,
    html: str,
    list_headers: bytes,
    reply_to: str | None,
    signer: Callable[[bytes], bytes] | None,
) -> bytes:
    domain = _address(sender_address, "sender_address").rpartition("@")[2].lower()
    # Random, so that no two signup mails share one, and on our own domain: make_msgid()
    # without a domain would look up this host's name in the DNS.
    if message_id is None:
        message_id = f"<{kind}.{secrets.token_hex(16)}@{domain}>"
    elif not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"message_id {message_id[:300]!r} is not <local@domain> (RFC 5322 3.6.4)")
    text = text if text.endswith("\n") else text + "\n"
    html = html if html.endswith("\n") else html + "\n"
    # '=_' never occurs in a quoted-printable body ('=' is followed by hex or a line end).
    digest = hashlib.sha256(html.encode() + text.encode()).hexdigest()
    boundary = f"=_nl_{digest[:32]}".encode("ascii")
    headers = [
        _header("From", _mailbox(sender_name, sender_address)),
        _header("To", _mailbox(mail.first_name, mail.to)),
        _header("Subject", subject),
        _header("Date", format_datetime(mail.date)),
        _header("Message-ID", message_id),
        _header("MIME-Version", "1.0"),
        _header("Auto-Submitted", "auto-generated"),  # RFC 3834 5
        list_headers,
    ]
    if reply_to:
        headers.append(_header("Reply-To", _reply_to(reply_to)))
    headers.append(
        _header("Content-Type", f'multipart/alternative;\r\n boundary="{boundary.decode()}"')
    )
    message = b"".join(
        [
            *headers,
            b"\r\nThis is a multipart message in MIME format.\r\n",
            b"\r\n--" + boundary + b'\r\nContent-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            qp_encode(text),
            b"\r\n--" + boundary + b'\r\nContent-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            qp_encode(html),
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )
    return signer(message) if signer is not None else message
