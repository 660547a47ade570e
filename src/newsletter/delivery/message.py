"""Composing stage: a rendered issue + one recipient → the MIME message, as bytes.

Input: a :class:`RenderedIssue`, the :class:`Sender` (who sends, to which
list, where the unsubscribe pages live) and a :class:`Recipient`. Output: a
complete multipart/alternative message (text/plain first, then text/html;
RFC 2046 puts the preferred part last), CRLF line ends, ready for SMTP.

The expensive part, quoted-printable encoding of ~60 KB of HTML, is done once
per issue in :class:`MessageTemplate`: the bodies are split at the
placeholders, each fixed piece is encoded once and ends in a soft line break,
and per recipient only the short values are encoded and spliced in. The
result is byte-for-byte a valid QP body (soft breaks may sit anywhere), and
no encoded line starts with ``.`` or ``From `` so SMTP dot-stuffing and mbox
quoting never have anything to do.
"""

from __future__ import annotations

import binascii
import contextlib
import datetime as dt
import hashlib
import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import format_datetime, parseaddr
from urllib.parse import quote

from newsletter import tokens
from newsletter.delivery.sign_process import DkimSigner
from newsletter.models import Recipient, RenderedIssue
from newsletter.render import merge_fields, placeholders

_SLOT = re.compile(
    "(" + "|".join([*(re.escape(p) for p in placeholders.ALL), merge_fields.SLOT.pattern]) + ")"
)
_SOFT_BREAK = b"=\r\n"


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sends, to which list, and where the per-recipient links point."""

    name: str
    address: str
    list_name: str
    public_url: str  # base of the web pages (unsubscribe, preferences, archive), no trailing /
    token_key: bytes
    unsubscribe_mailto: str
    reply_to: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


def recipient_values(
    sender: Sender,
    recipient: Recipient,
    *,
    date: dt.datetime,
    rendered: RenderedIssue | None = None,
    columns: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The value of every placeholder for one recipient of a message dated ``date``,
    and of every merge-field slot of ``rendered``, unescaped.

    Each link has a token of its own kind: the preferences link expires some
    time after ``date``, the unsubscribe link never does."""
    unsubscribe, preferences = (
        tokens.make(sender.token_key, kind, sender.list_name, recipient.email, date)
        for kind in (tokens.Kind.UNSUBSCRIBE, tokens.Kind.PREFERENCES)
    )
    values = {
        placeholders.UNSUBSCRIBE_URL: f"{sender.public_url}/unsubscribe/{unsubscribe}",
        placeholders.PREFERENCES_URL: f"{sender.public_url}/preferences/{preferences}",
        placeholders.EMAIL: recipient.email,
    }
    if rendered is not None and rendered.merge_fields:
        values.update(merge_fields.values(rendered.merge_fields, recipient, columns))
    return values


def qp_encode(text: str) -> bytes:
    """Quoted-printable (RFC 2045 6.7) with CRLF line ends and no line starting with '.'."""
    # Text parts are lines: a lone CR means nothing in them, and RFC 5322
    # forbids it on the wire, so every line end becomes CRLF.
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    out = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    return b"\r\n".join(_safe_lines(line) for line in out.split(b"\n"))


def _safe_lines(line: bytes, limit: int = 76) -> bytes:
    """Escape a leading '.' (it would need SMTP dot-stuffing, RFC 5321 4.5.2) and a
    leading 'From ' (mbox tools mangle it), then re-break anything over ``limit``."""
    if line.startswith(b"."):
        line = b"=2E" + line[1:]
    elif line.startswith(b"From "):
        line = b"=46" + line[1:]
    if len(line) <= limit:
        return line
    cut = limit - 1  # room for the soft break's '='
    if line[cut - 1 : cut] == b"=":
        cut -= 1
    elif line[cut - 2 : cut - 1] == b"=":
        cut -= 2
    return line[:cut] + _SOFT_BREAK + _safe_lines(line[cut:], limit)


_PLAIN = re.compile(rb"[!-<>-~]+")  # printable ASCII but '=' and space: QP keeps it as is


def _encode_piece(text: str) -> bytes:
    """Encode a piece of a body so that the next piece can start on a fresh line."""
    raw = text.encode("utf-8")
    if _PLAIN.fullmatch(raw):
        # The per-recipient values (links, addresses) take this path: QP only
        # has to break them into lines of 75 plus the soft break's '='.
        chunks = [raw[i : i + 75] for i in range(0, len(raw), 75)]
        if not any(c.startswith(b".") for c in chunks):
            return _SOFT_BREAK.join(chunks) + _SOFT_BREAK
    encoded = qp_encode(text)
    if not encoded or encoded.endswith(b"\r\n"):
        return encoded
    start = encoded.rfind(b"\r\n") + 2 if b"\r\n" in encoded else 0
    # The last line gets a soft break, so it may hold 75 octets at most.
    return encoded[:start] + _safe_lines(encoded[start:], limit=75) + _SOFT_BREAK


@dataclass(frozen=True, slots=True)
class _Body:
    pieces: tuple[bytes | str, ...]  # encoded fixed bytes, or a placeholder name to fill
    is_html: bool

    @classmethod
    def split(cls, text: str, *, is_html: bool) -> _Body:
        parts = _SLOT.split(text)
        pieces: list[bytes | str] = []
        for i, part in enumerate(parts):
            if i % 2:
                pieces.append(part)
            elif part:
                pieces.append(_encode_piece(part))
        return cls(tuple(pieces), is_html)

    def fill(self, values: dict[str, str]) -> bytes:
        encoded: dict[str, bytes] = {}  # a placeholder often occurs more than once
        out: list[bytes] = []
        for piece in self.pieces:
            if isinstance(piece, bytes):
                out.append(piece)
                continue
            chunk = encoded.get(piece)
            if chunk is None:
                value = values[piece]
                chunk = _encode_piece(html.escape(value) if self.is_html else value)
                encoded[piece] = chunk
            out.append(chunk)
        return b"".join(out)


class MessageTemplate:
    """One issue's message with slots for what differs per recipient. Build once, fill often."""

    def __init__(
        self,
        rendered: RenderedIssue,
        sender: Sender,
        *,
        signer: Callable[[bytes], bytes] | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        self.rendered = rendered
        self.columns = columns  # merge field → the list's column (sending.merge_columns)
        self.sender = sender
        self.signer = signer
        slots = {slot for slot, _ in rendered.merge_fields}
        for part in (rendered.subject, rendered.text, rendered.html):
            unknown = set(merge_fields.SLOT.findall(part)) - slots
            if unknown:
                raise ValueError(f"the rendered issue has slots without a field: {sorted(unknown)}")
        self._text = _Body.split(_ensure_final_newline(rendered.text), is_html=False)
        self._html = _Body.split(_ensure_final_newline(rendered.html), is_html=True)
        # A boundary made of '=_' can never occur in a QP body, where '=' is
        # always followed by two hex digits or a line end.
        digest = hashlib.sha256(rendered.html.encode() + rendered.text.encode()).hexdigest()
        self.boundary = f"=_nl_{digest[:32]}"
        # Header order as readers expect it; the per-recipient ones are spliced
        # between these fixed runs in personalise().
        self._from = _header("From", _mailbox(sender.name, sender.address))
        # A subject with merge fields is encoded per recipient (b"" here), one without once.
        personal = merge_fields.SLOT.search(rendered.subject)
        self._subject = b"" if personal else _header("Subject", rendered.subject)
        self._list_id = _header("MIME-Version", "1.0") + _header(
            "List-Id", f"{_phrase(sender.name)} <{sender.list_name}.{sender.domain}>"
        )
        tail = [_header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
        if sender.reply_to:
            # Encoded as From is: a non-ASCII display name is RFC 2047-encoded.
            name, address = parseaddr(sender.reply_to)
            tail.append(_header("Reply-To", _mailbox(name, address)))
        tail.append(
            _header("Content-Type", f'multipart/alternative;\r\n boundary="{self.boundary}"')
        )
        self._tail = b"".join(tail)
        b = self.boundary.encode("ascii")
        self._open_text = (
            b"\r\n--" + b + b'\r\nContent-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        )
        self._open_html = (
            b"--" + b + b'\r\nContent-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        )
        self._close = b"--" + b + b"--\r\n"

    def message_id(self, recipient: Recipient) -> str:
        """Stable per issue and recipient, whichever list it goes to: a resend, or a
        second copy from another list, carries the same id, so receivers that
        deduplicate on Message-ID drop it."""
        digest = _message_digest(self.rendered.issue_id, recipient.email)
        return f"<{self.rendered.issue_id}.{digest}@{self.sender.domain}>"

    def test_message_id(self, nonce: str) -> str:
        """A test copy's own id, never the real message's: a receiver that saw the test
        copy would otherwise drop the real one as a duplicate. ``nonce`` makes each
        test copy unique (the caller passes something random)."""
        if not re.fullmatch(r"[0-9A-Za-z]{8,64}", nonce):
            raise ValueError("the nonce must be 8-64 letters or digits")
        return f"<{self.rendered.issue_id}.test.{nonce}@{self.sender.domain}>"

    def personalise(
        self, recipient: Recipient, *, date: dt.datetime, message_id: str | None = None
    ) -> bytes:
        """The message for ``recipient``; ``message_id`` overrides the stable id (test copies)."""
        message = self.unsigned(recipient, date=date, message_id=message_id)
        return self.signer(message) if self.signer is not None else message

    async def personalised(self, recipient: Recipient, *, date: dt.datetime) -> bytes:
        """:meth:`personalise` for a send's event loop: a signer that can sign in another
        process (:class:`~newsletter.delivery.sign_process.DkimSigner`) does, while the
        loop composes and sends on the other connections."""
        message = self.unsigned(recipient, date=date)
        if isinstance(self.signer, DkimSigner):
            return await self.signer.signed(message)
        return self.signer(message) if self.signer is not None else message

    def signing(self) -> contextlib.AbstractAsyncContextManager[None]:
        """For the length of a send: the signer's second process, when it has one."""
        if isinstance(self.signer, DkimSigner):
            return self.signer.helping()
        return contextlib.nullcontext()

    def unsigned(
        self, recipient: Recipient, *, date: dt.datetime, message_id: str | None = None
    ) -> bytes:
        """The message for ``recipient`` before any DKIM signature."""
        values = recipient_values(
            self.sender, recipient, date=date, rendered=self.rendered, columns=self.columns
        )
        unsub = values[placeholders.UNSUBSCRIBE_URL]
        subject = self._subject or _header(
            "Subject", placeholders.fill(self.rendered.subject, values, is_html=False)
        )
        # The same token as the link's, in the Subject: whoever reads the mailbox (our
        # `bounces` processing) knows who asks and from which list, whoever sends it.
        token = unsub.rpartition("/")[2]
        mailto = f"mailto:{self.sender.unsubscribe_mailto}?subject={quote('unsubscribe ' + token)}"
        return b"".join(
            [
                self._from,
                _header(
                    "To", _mailbox(merge_fields.clean(recipient.display_name), recipient.email)
                ),
                subject,
                _header("Date", format_datetime(date)),
                _header("Message-ID", message_id or self.message_id(recipient)),
                self._list_id,
                # Written raw, never RFC 2047-encoded: providers ignore an
                # encoded List-Unsubscribe (RFC 2369, RFC 8058). Folded between its
                # two URIs: with the token in both, one line could pass 998 octets.
                _raw_header("List-Unsubscribe", f"<{unsub}>,", f"<{mailto}>"),
                self._tail,
                b"\r\nThis is a multipart message in MIME format.\r\n",
                self._open_text,
                self._text.fill(values),
                b"\r\n",
                self._open_html,
                self._html.fill(values),
                b"\r\n",
                self._close,
            ]
        )


def _ensure_final_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


_FOLDED = re.compile(rb"[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n")
_ATOM_OK = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")


def _needs_encoding(text: str) -> bool:
    # '=?' must be encoded too: a parser would decode it as an encoded word
    # and could turn a harmless-looking subject into header lines. A word too
    # long for a folded line (a long address from a merge field) is encoded too:
    # encoded words may be split anywhere, plain ones only at spaces, and a
    # fold before it would add a space to the subject.
    return (
        not text.isascii()
        or "=?" in text
        or any(ord(c) < 32 or c == "\x7f" for c in text)
        or any(len(word) > 60 for word in text.split(" "))
    )


def _encode_words(text: str, name: str) -> str:
    from email.header import Header

    charset = "utf-8" if _needs_encoding(text) else "us-ascii"
    return Header(text, charset, maxlinelen=76, header_name=name).encode(linesep="\r\n")


def _mailbox(name: str, address: str) -> str:
    """A mailbox written by hand, never re-parsed (see _needs_encoding)."""
    if not address.isascii() or any(c in address for c in ' <>"\r\n,;'):
        raise ValueError(f"{address!r} is not a plain ASCII address")
    return f"{_phrase(name)} <{address}>" if name else address


def _phrase(name: str) -> str:
    """A display name: as is, quoted, or RFC 2047-encoded."""
    if _needs_encoding(name):
        return _encode_words(name, "To")
    if _ATOM_OK.fullmatch(name) and "=" not in name:
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header(name: str, value: str) -> bytes:
    """One header, folded with CRLF; unstructured text is RFC 2047-encoded when it must be."""
    if name == "Subject":
        value = _encode_words(value, name)
    line = f"{name}: {value}\r\n".encode("ascii")
    if not _FOLDED.fullmatch(line):
        raise ValueError(f"{name} header would contain a bare line break")
    return line


def _raw_header(name: str, value: str, *more: str) -> bytes:
    """``name: value`` as it is, each of ``more`` on a folded line of its own."""
    lines = [f"{name}: {value}", *(f" {v}" for v in more)]
    for line in lines:
        if "\r" in line or "\n" in line or not line.isascii() or len(line) > 998:
            raise ValueError(f"{name} header must be ASCII lines of at most 998 octets")
    return "\r\n".join(lines).encode("ascii") + b"\r\n"


def _message_digest(issue_id: str, email: str) -> str:
    key = f"{issue_id}\0{email.lower()}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def issue_of_message_id(message_id: str, email: str) -> str | None:
    """The issue id of our Message-ID ``message_id`` for the message to ``email``
    (:meth:`MessageTemplate.message_id`), or None when it is not ours for that address:
    someone else's, a test copy's, or ours for another recipient. For a provider's
    report that quotes our Message-ID but not our VERP address."""
    local, at, _ = message_id.strip().strip("<>").rpartition("@")
    issue_id, dot, digest = local.rpartition(".")
    if not at or not dot or not issue_id:
        return None
    return issue_id if digest == _message_digest(issue_id, email) else None
