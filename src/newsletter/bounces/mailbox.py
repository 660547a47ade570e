"""Fetching feedback from an IMAP mailbox: the bounce mailbox → each new message handled.

Input: an :class:`ImapAccount` (server, login, the folder to read and the folder to
move what was understood into), the :class:`~newsletter.storage.base.FeedbackStore`
that remembers how far each folder was read, and a handler that processes one
message's bytes and says whether it was understood. Output: a :class:`Fetched`
count of what was read, moved and left; :func:`watch` does it again whenever the
server says new mail came (IMAP IDLE, RFC 2177), or at each poll without IDLE.

Nothing is ever deleted or changed in the mailbox except by a move of what was
understood: messages are read with ``BODY.PEEK`` (no ``\\Seen`` flag set), and what
was not understood stays where it was, for review. Each message is handled, moved,
and only then is the folder's mark (UIDVALIDITY, last UID) advanced, so a crash
between the steps reads the message again, which the handler recognises (the
evidence's digest) and moves this time. What was left is not read again at the
next fetch; a server that renumbers its folder (a new UIDVALIDITY) is read from
the start, and nothing is recorded twice.

Every failure of the server or the connection is a :class:`MailboxError` naming
the server, and the message stays in the mailbox for the next fetch.
"""

from __future__ import annotations

import imaplib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Literal

from newsletter.bounces.reading import MAX_BYTES
from newsletter.errors import NewsletterError
from newsletter.storage.base import FeedbackStore

__all__ = [
    "DEFAULT_PORTS",
    "IDLE_SECONDS",
    "Fetched",
    "ImapAccount",
    "Mailbox",
    "MailboxError",
    "Stopper",
    "fetch_new",
    "folder_problem",
    "watch",
]

Security = Literal["tls", "starttls", "none"]
# The port each security uses when none is given (RFC 8314: 993 for IMAP over TLS).
DEFAULT_PORTS: dict[Security, int] = {"tls": 993, "starttls": 143, "none": 143}
# RFC 2177: a client re-issues IDLE at least every 29 minutes, or the server may
# drop it as inactive. Some servers and NAT boxes drop sooner; ten minutes is safe.
IDLE_SECONDS = 600.0
# One more byte than the reader accepts: anything longer is refused as too large
# without the whole of it crossing the network or sitting in memory.
_FETCH_LIMIT = MAX_BYTES + 1
_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)", re.IGNORECASE)
_NEW_MAIL = re.compile(rb"\* \d+ (?:EXISTS|RECENT)\b", re.IGNORECASE)


class MailboxError(NewsletterError):
    """The IMAP server could not be reached or refused what we asked; nothing in the
    mailbox was changed by the step that failed."""


def folder_problem(name: str) -> str | None:
    """Why ``name`` cannot be an IMAP folder name here, or None."""
    if not name or len(name) > 200:
        return "must be 1 to 200 characters"
    if not name.isascii():
        # IMAP names non-ASCII folders in modified UTF-7 (RFC 3501 5.1.3).
        return "must be ASCII (name the folder in ASCII on the server)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain control characters"
    if "*" in name or "%" in name:
        return "must not contain * or % (wildcards in IMAP)"
    return None


@dataclass(frozen=True, slots=True)
class ImapAccount:
    host: str
    port: int
    security: Security
    username: str
    password: str = field(repr=False)
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    timeout: float = 60.0
    tls_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    # The settings it came from, for the hints in errors.
    settings: str = "NEWSLETTER_BOUNCE_IMAP"

    @property
    def name(self) -> str:
        """How this folder is named in messages and in its mark."""
        return f"imap://{self.username}@{self.host}:{self.port}/{self.folder}"

    @property
    def server(self) -> str:
        return f"the IMAP server {self.host}:{self.port} ({self.security})"


@dataclass(slots=True)
class Fetched:
    read: int = 0
    moved: int = 0
    left: int = 0

    def add(self, other: Fetched) -> None:
        self.read += other.read
        self.moved += other.moved
        self.left += other.left


def _quoted(name: str) -> str:
    """An IMAP quoted string (RFC 3501 4.3): the folder names go on the wire as one."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Mailbox:
    """One logged-in connection with the account's folder selected."""

    def __init__(self, account: ImapAccount) -> None:
        self.account = account
        self._imap: imaplib.IMAP4 | None = None
        self.uidvalidity = 0
        self.can_move = False
        self.can_expunge_uid = False
        self.can_idle = False

    # ------------------------------------------------------------- connecting

    def open(self) -> Mailbox:
        account = self.account
        with self._said("cannot be reached"):
            if account.security == "tls":
                imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    account.host,
                    account.port,
                    ssl_context=account.tls_context or ssl.create_default_context(),
                    timeout=account.timeout,
                )
            else:
                imap = imaplib.IMAP4(account.host, account.port, timeout=account.timeout)
        self._imap = imap
        try:
            if account.security == "starttls":
                with self._said("refused STARTTLS"):
                    if "STARTTLS" not in imap.capabilities:
                        raise MailboxError(
                            f"{account.server} does not offer STARTTLS; the password is not "
                            f"sent in clear: use {account.settings}_SECURITY=tls (port 993)"
                        )
                    imap.starttls(account.tls_context or ssl.create_default_context())
            with self._said(
                "refused the login",
                hint=f"check {account.settings}_USERNAME and {account.settings}_PASSWORD",
            ):
                imap.login(account.username, account.password)
            with self._said(f"cannot open the folder {account.folder!r}"):
                kind, data = imap.select(_quoted(account.folder))
                if kind != "OK":
                    raise MailboxError(
                        f"{account.server} has no folder {account.folder!r} for "
                        f"{account.username} ({_words(data)}); check {account.settings}_FOLDER"
                    )
                self.uidvalidity = self._uidvalidity(imap)
            # Asked again once logged in: servers name MOVE, UIDPLUS and IDLE only then.
            with self._said("refused CAPABILITY"):
                kind, data = imap.capability()
                self._ok(kind, data, "CAPABILITY")
            words = b" ".join(d for d in data if isinstance(d, bytes)).decode("ascii", "replace")
            capabilities = {c.upper() for c in words.split()} | set(imap.capabilities)
            self.can_move = "MOVE" in capabilities
            self.can_expunge_uid = "UIDPLUS" in capabilities
            self.can_idle = "IDLE" in capabilities
            self._processed_folder_exists()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Mailbox:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        imap, self._imap = self._imap, None
        if imap is None:
            return
        try:
            # LOGOUT, never CLOSE: CLOSE would expunge whatever is marked deleted.
            imap.logout()
        except (imaplib.IMAP4.error, OSError, ValueError):
            if imap.sock is not None:
                imap.sock.close()

    def _uidvalidity(self, imap: imaplib.IMAP4) -> int:
        _, data = imap.response("UIDVALIDITY")
        for item in data or ():
            if isinstance(item, bytes) and item.isdigit():
                return int(item)
        _, data = imap.status(_quoted(self.account.folder), "(UIDVALIDITY)")
        found = _UIDVALIDITY.search(b" ".join(d for d in data if isinstance(d, bytes)))
        if not found:
            raise MailboxError(f"{self.account.server} gave no UIDVALIDITY for the folder")
        return int(found.group(1))

    def _processed_folder_exists(self) -> None:
        imap = self._connected()
        target = self.account.processed_folder
        with self._said(f"cannot make the folder {target!r}"):
            kind, data = imap.list('""', _quoted(target))
            if kind == "OK" and any(isinstance(d, bytes) for d in data):
                return
            kind, data = imap.create(_quoted(target))
            if kind != "OK":
                raise MailboxError(
                    f"{self.account.server} refused to make the folder {target!r} for "
                    f"processed mail ({_words(data)}); make it, or set "
                    f"{self.account.settings}_PROCESSED_FOLDER"
                )

    # ------------------------------------------------------------- reading

    def uids_after(self, last: int) -> list[int]:
        """The UIDs in the folder above ``last``, in order."""
        imap = self._connected()
        with self._said("refused to list the folder"):
            # NOOP first: a server shows mail that came since the last command only
            # once it has told us of it, which a NOOP lets it do.
            kind, data = imap.noop()
            self._ok(kind, data, "NOOP")
            kind, data = imap.uid("SEARCH", f"UID {last + 1}:*")
            self._ok(kind, data, "UID SEARCH")
        # "n:*" always matches the highest UID, even one below n (RFC 3501 6.4.8).
        uids = {int(u) for chunk in data if chunk for u in bytes(chunk).split()}
        return sorted(u for u in uids if u > last)

    def fetch(self, uid: int) -> bytes | None:
        """The message ``uid`` as it is on the server (its first bytes only, for one too
        large to read), without setting ``\\Seen``; None if it is gone."""
        imap = self._connected()
        with self._said(f"refused to give message {uid}"):
            kind, data = imap.uid("FETCH", str(uid), f"(BODY.PEEK[]<0.{_FETCH_LIMIT}>)")
            self._ok(kind, data, "UID FETCH")
        for item in data:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
                return item[1]
        return None

    def move(self, uid: int) -> None:
        """Move ``uid`` to the processed folder (RFC 6851 MOVE; or COPY, then delete the
        original by its UID alone, which UIDPLUS allows). Without either, it is only
        copied: the original stays, and the mark keeps it from being read again."""
        imap = self._connected()
        target = _quoted(self.account.processed_folder)
        with self._said(f"refused to move message {uid}"):
            if self.can_move:
                kind, data = imap.uid("MOVE", str(uid), target)
                self._ok(kind, data, "UID MOVE")
                return
            kind, data = imap.uid("COPY", str(uid), target)
            self._ok(kind, data, "UID COPY")
            if self.can_expunge_uid:
                # Only this message: a plain EXPUNGE would remove any other message
                # someone else marked deleted.
                kind, data = imap.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
                self._ok(kind, data, "UID STORE")
                kind, data = imap.uid("EXPUNGE", str(uid))
                self._ok(kind, data, "UID EXPUNGE")

    def idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for new mail (IDLE). True: new mail came, and the
        connection goes on. False: nothing came; the connection is closed (a socket that
        timed out cannot be read again), and the caller connects anew."""
        imap = self._connected()
        # New mail the server announced during an earlier command (imaplib keeps such
        # untagged answers): it would not be announced again inside IDLE.
        announced = [imap.untagged_responses.pop(key, None) for key in ("EXISTS", "RECENT")]
        if any(announced):
            return True
        tag = imap._new_tag()  # imaplib has no IDLE before Python 3.14
        with self._said("dropped the connection while waiting for mail"):
            imap.send(tag + b" IDLE\r\n")
            line = imap.readline()
            while line.startswith(b"* "):  # an untagged line before the go-ahead
                if _NEW_MAIL.match(line):
                    break
                line = imap.readline()
            if line.startswith(tag):
                raise MailboxError(f"{self.account.server} refused IDLE: {_words([line])}")
            came = bool(_NEW_MAIL.match(line))
            if not came:
                assert imap.sock is not None
                imap.sock.settimeout(seconds)
                try:
                    while not came:
                        line = imap.readline()
                        if not line:
                            raise OSError("the server closed the connection")
                        came = bool(_NEW_MAIL.match(line))
                except TimeoutError:
                    self._abandon()
                    return False
                except BaseException:
                    # Stopped (a signal) mid-wait: the connection is in IDLE, where a
                    # LOGOUT would not be read; drop it.
                    self._abandon()
                    raise
                imap.sock.settimeout(self.account.timeout)
            imap.send(b"DONE\r\n")
            while not line.startswith(tag):
                line = imap.readline()
                if not line:
                    raise OSError("the server closed the connection")
        return True

    def interrupt(self) -> None:
        """End a wait for mail from another thread: the socket is shut, so the wait
        ends at once in a :class:`MailboxError` (the connection is then dropped)."""
        imap = self._imap
        if imap is not None and imap.sock is not None:
            with suppress(OSError):
                imap.sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------- helpers

    def _connected(self) -> imaplib.IMAP4:
        if self._imap is None:
            raise MailboxError(f"{self.account.server}: not connected")
        return self._imap

    def _abandon(self) -> None:
        imap, self._imap = self._imap, None
        if imap is not None and imap.sock is not None:
            imap.sock.close()

    def _ok(self, kind: str, data: Sequence[object], command: str) -> None:
        if kind != "OK":
            raise MailboxError(f"{self.account.server} refused {command}: {_words(data)}")

    @contextmanager
    def _said(self, what: str, hint: str = "") -> Iterator[None]:
        """Our error for what imaplib, ssl or the socket raises, naming the server."""
        try:
            yield
        except MailboxError:
            raise
        except imaplib.IMAP4.abort as exc:
            self._abandon()
            raise MailboxError(
                f"{self.account.server} {what}: the connection broke ({_words([exc.args[0]])})"
            ) from None
        except imaplib.IMAP4.error as exc:
            then = f"; {hint}" if hint else ""
            raise MailboxError(
                f"{self.account.server} {what}: {_words([exc.args[0]])}{then}"
            ) from None
        except ssl.SSLError as exc:
            self._abandon()
            raise MailboxError(
                f"{self.account.server} {what}: TLS failed ({exc.reason or exc}); check the "
                f"host name, {self.account.settings}_SECURITY and {self.account.settings}_CA_FILE"
            ) from None
        except (OSError, EOFError) as exc:
            self._abandon()
            why = "timed out" if isinstance(exc, socket.timeout) else (
                getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            )  # fmt: skip
            raise MailboxError(f"{self.account.server} {what}: {why}") from None


def _words(data: object) -> str:
    """A server's words, short and printable."""
    items = data if isinstance(data, list | tuple) else [data]
    text = " ".join(
        i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in items if i
    )
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return (text[:200] + "...") if len(text) > 200 else text or "no reason given"


Handle = Callable[[bytes], bool]  # processes one message; True: understood, move it


def fetch_new(box: Mailbox, marks: FeedbackStore, handle: Handle) -> Fetched:
    """Handle every message of the folder not read before (module docstring)."""
    account = box.account
    mark = marks.mailbox_mark(account.name)
    last = mark[1] if mark is not None and mark[0] == box.uidvalidity else 0
    done = Fetched()
    for uid in box.uids_after(last):
        raw = box.fetch(uid)
        if raw is not None:  # else gone since the search: someone else took it
            done.read += 1
            if handle(raw):
                box.move(uid)
                done.moved += 1
            else:
                done.left += 1
        marks.set_mailbox_mark(account.name, box.uidvalidity, uid)
    return done


def watch(
    account: ImapAccount,
    marks: FeedbackStore,
    handle: Handle,
    *,
    report: Callable[[Fetched], None],
    trouble: Callable[[NewsletterError], None],
    poll: float = 60.0,
    idle_seconds: float = IDLE_SECONDS,
    keep_going: Callable[[], bool] = lambda: True,
    idling: Callable[[Mailbox], AbstractContextManager[object]] = lambda box: nullcontext(),
) -> None:
    """Fetch, then again each time new mail comes, until ``keep_going`` says no.

    A server without IDLE is polled every ``poll`` seconds. A failure (the server
    down, the database busy) is given to ``trouble`` and tried again after a pause
    that doubles up to five minutes; nothing is lost meanwhile, as the mail waits on
    the server. ``idling`` wraps each wait for IDLE: the one time to interrupt it
    (:meth:`Mailbox.interrupt`; between messages, never in the middle of one)."""
    pause = 5.0
    while keep_going():
        try:
            with Mailbox(account) as box:
                report(fetch_new(box, marks, handle))
                pause = 5.0
                while keep_going():
                    if box.can_idle:
                        with idling(box):
                            came = box.idle(idle_seconds)
                        if not came:
                            break  # connect anew, and look again
                    else:
                        _sleep(poll, keep_going)
                    report(fetch_new(box, marks, handle))
        except NewsletterError as exc:
            trouble(exc)
            _sleep(pause, keep_going)
            pause = min(pause * 2, 300.0)


class Stopper:
    """Stops several :func:`watch` loops (one thread each) together: :meth:`stop`, safe
    to call from a signal handler, ends each wait for mail at once and lets a message
    in hand finish. Give each loop ``keep_going`` and ``idling``."""

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._waiting: set[Mailbox] = set()

    def keep_going(self) -> bool:
        return not self._stopped.is_set()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for box in self._waiting:
                box.interrupt()

    @contextmanager
    def idling(self, box: Mailbox) -> Iterator[None]:
        with self._lock:
            self._waiting.add(box)
            if self._stopped.is_set():  # stopped just before this wait began
                box.interrupt()
        try:
            yield
        finally:
            with self._lock:
                self._waiting.discard(box)


def _sleep(seconds: float, keep_going: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while keep_going() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 1.0))
