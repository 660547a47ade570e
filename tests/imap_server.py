"""A real IMAP server for the tests: Dovecot on 127.0.0.1, with a configuration of its own.

Everything the server uses lives in one temporary folder: the configuration
(``dovecot -c``, never the system's /etc/dovecot), its base_dir (sockets,
master.pid), state_dir, log, the passwd-file with the test users and their
mail (Maildir). It listens on 127.0.0.1 only, on free ports, and serves
plain IMAP with STARTTLS, and implicit TLS on a second port when given a
certificate (:meth:`TLS.by_trustme`), so a test can try every security.
IDLE and MOVE are Dovecot's own.

Use the :func:`imap_server` fixture (``from imap_server import imap_server as
imap_server  # noqa: PLC0414``: the "as" keeps ruff from calling each test's
argument a redefinition), or ``with Dovecot(tls=...) as server:``. Where Dovecot
is not installed the tests skip, saying what to install; with
``NEWSLETTER_TEST_DOVECOT_REQUIRED=1`` (``.ci/run``) they fail instead.

Tests put mail in with :meth:`Dovecot.deliver` (APPEND as the user, as a mail
client does, so Dovecot's indexes stay right) and look at what a folder holds
afterwards with :meth:`Dovecot.messages` (EXAMINE: looking changes nothing).
"""

from __future__ import annotations

import atexit
import contextlib
import imaplib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import pytest

HOST = "127.0.0.1"
INSTALL = "apt-get install dovecot-imapd"
REQUIRED = "NEWSLETTER_TEST_DOVECOT_REQUIRED"
START_TIMEOUT = 10.0  # seconds for the server to answer before start() gives up
USERS: Mapping[str, str] = {"bounces": "s3cret"}

Security = Literal["none", "starttls", "tls"]


def dovecot_binary() -> str | None:
    """The path of the dovecot binary, or None. /usr/sbin is not on every user's PATH."""
    found = shutil.which("dovecot")
    if found:
        return found
    debian = Path("/usr/sbin/dovecot")
    return str(debian) if os.access(debian, os.X_OK) else None


def dovecot_or_skip() -> str:
    """The dovecot binary; without one the test is skipped with what to install, or
    fails where ``NEWSLETTER_TEST_DOVECOT_REQUIRED`` says CI must run it."""
    binary = dovecot_binary()
    if binary is None:
        why = f"dovecot is not installed: {INSTALL}"
        if os.environ.get(REQUIRED):
            pytest.fail(f"Dovecot is required here ({REQUIRED}, .ci/run) but {why}")
        pytest.skip(why)
    return binary


@dataclass(frozen=True)
class TLS:
    """A server certificate and key for Dovecot, and the CA a client trusts it by."""

    ca_file: Path  # the CA's certificate (PEM): what a client is told to trust
    cert_file: Path  # the server's certificate chain (PEM)
    key_file: Path  # the server's private key (PEM)

    @classmethod
    def by_trustme(cls, folder: Path) -> TLS:
        """A new trustme CA and a certificate from it for 127.0.0.1 and localhost,
        written into ``folder``."""
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert(HOST, "localhost")
        folder.mkdir(parents=True, exist_ok=True)
        tls = cls(folder / "ca.pem", folder / "server-cert.pem", folder / "server-key.pem")
        ca.cert_pem.write_to_path(str(tls.ca_file))
        with tls.cert_file.open("wb") as out:  # the leaf first, then the chain up to the CA
            for pem in leaf.cert_chain_pems:
                out.write(pem.bytes())
        leaf.private_key_pem.write_to_path(str(tls.key_file))
        return tls

    def client_context(self) -> ssl.SSLContext:
        """A client's context that trusts this CA only and checks the host name."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@dataclass(frozen=True)
class Message:
    uid: int
    flags: frozenset[str]  # stored flags (\\Seen, \\Deleted, keywords); never \\Recent
    data: bytes  # the message as stored, byte for byte

    @property
    def seen(self) -> bool:
        return "\\Seen" in self.flags


class DovecotError(RuntimeError):
    """Dovecot did not start; the message carries its log."""


def _quoted(name: str) -> str:
    """An IMAP quoted string: imaplib sends arguments as they are, and a folder name
    with a space would otherwise be two arguments."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _free_ports(count: int) -> list[int]:
    """Ports nobody listens on just now. All are bound at once so they differ; they are
    released before Dovecot binds them, so another process may take one in between
    (start() then tries again with new ones)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass(frozen=True)
class _Identity:
    """Who Dovecot's processes run as (the names go into the configuration)."""

    mail_user: str
    mail_group: str
    mail_uid: int
    mail_gid: int
    login_user: str | None  # None: Dovecot's default (dovenull)
    internal_user: str | None  # None: Dovecot's default (dovecot)
    internal_group: str | None


def _group_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def _identity() -> _Identity:
    if os.geteuid() == 0:
        # Dovecot will not run mail processes as root (and should not be asked to):
        # the users' mail belongs to nobody. Login and internal processes keep
        # Debian's dovenull and dovecot, which the package creates.
        nobody = pwd.getpwnam("nobody")
        return _Identity(
            "nobody", _group_name(nobody.pw_gid), nobody.pw_uid, nobody.pw_gid, None, None, None
        )
    # Not root: every process runs as this user (Dovecot's "rootless" set-up), since
    # it can switch to no one else.
    me = pwd.getpwuid(os.geteuid())
    group = _group_name(os.getegid())
    return _Identity(me.pw_name, group, me.pw_uid, os.getegid(), me.pw_name, me.pw_name, group)


class Dovecot:
    """Dovecot serving ``users`` (name: password) on 127.0.0.1.

    ``port`` is plain IMAP (STARTTLS offered when ``tls`` is given), ``tls_port``
    implicit TLS (None without ``tls``); both are known once started. Start with
    ``Dovecot().start()`` and stop with ``stop()``, or use it as a context manager.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] = USERS,
        tls: TLS | None = None,
        separator: str = "/",
        binary: str | None = None,
    ) -> None:
        if not users:
            raise ValueError("Dovecot needs at least one user")
        for name, password in users.items():
            # The passwd-file is colon-separated, one user a line.
            if not re.fullmatch(r"[A-Za-z0-9._@+-]+", name) or re.search(r"[:\s]", password):
                raise ValueError(f"not a user name and password for a passwd-file: {name!r}")
        self.users = dict(users)
        self.user, self.password = next(iter(self.users.items()))  # the first is the default
        self.tls = tls
        self.separator = separator
        self.binary = binary or dovecot_binary()
        self.host = HOST
        self.port = 0
        self.tls_port: int | None = None
        self.folder: Path | None = None
        self.startup_seconds = 0.0  # how long the last start() waited for the server
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ start and stop

    def start(self) -> Dovecot:
        if self.binary is None:
            raise DovecotError(f"dovecot is not installed: {INSTALL}")
        if self._process is not None:
            raise DovecotError("this Dovecot is already running")
        began = time.monotonic()
        # Not pytest's tmp_path: it is private to the user running the tests, and
        # Dovecot's unprivileged processes must reach into this folder. /tmp keeps
        # the UNIX socket paths short (108 bytes at most) whatever TMPDIR says.
        parent = "/tmp" if Path("/tmp").is_dir() else None  # noqa: S108
        self.folder = Path(tempfile.mkdtemp(prefix="newsletter-dovecot-", dir=parent))
        atexit.register(self.stop)  # should a test session end without stop()
        who = _identity()
        try:
            self._prepare(who)
            for _ in range(5):  # a collision on a port: try again on new ones
                if self._launch(who):
                    break
            else:
                raise DovecotError(f"no free port for Dovecot after 5 tries\n{self.log()}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop our Dovecot (SIGTERM to its master's process group, then wait for every
        process of it) and remove its folder. Harmless when it is not running."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, self._master_pid())
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        atexit.unregister(self.stop)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        """Dovecot's log, and what it wrote to stderr before its log was open."""
        if self.folder is None:
            return ""
        parts = []
        for name in ("dovecot.log", "stderr.log"):
            path = self.folder / name
            if path.exists() and path.stat().st_size:
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "".join(parts)

    def maildir(self, user: str | None = None) -> Path:
        """The user's Maildir on disk (owned by the mail processes' user)."""
        assert self.folder is not None, "start() first"
        return self.folder / "home" / (user or self.user) / "Maildir"

    def _prepare(self, who: _Identity) -> None:
        assert self.folder is not None
        root = self.folder
        # Dovecot's processes (nobody, dovenull, dovecot) pass through this folder.
        root.chmod(0o755)
        for name in ("run", "state", "home"):
            (root / name).mkdir()
        lines = []
        for name, password in self.users.items():
            home = root / "home" / name
            home.mkdir(mode=0o700)
            # The mail processes run as who.mail_uid and create the Maildir here.
            os.chown(home, who.mail_uid, who.mail_gid)
            lines.append(f"{name}:{{PLAIN}}{password}:{who.mail_uid}:{who.mail_gid}::{home}::\n")
        users = root / "users"
        users.write_text("".join(lines), encoding="utf-8")
        # Read by the auth process, which runs as Dovecot's internal user, not root.
        users.chmod(0o644)

    def _config(self, who: _Identity, token: str) -> str:
        assert self.folder is not None
        root = self.folder
        tls = self.tls
        lines = [
            f"base_dir = {root / 'run'}",
            f"state_dir = {root / 'state'}",
            # Its own name: `doveadm instance list` and the logs tell it from the system's.
            f"instance_name = newsletter-test-{token}",
            f"log_path = {root / 'dovecot.log'}",
            # How start() knows the server answering is this one, not whoever took the port.
            f"login_greeting = newsletter test Dovecot {token} ready",
            "protocols = imap",
            f"listen = {HOST}",
            # Plain LOGIN on the port without TLS, for security "none". (Dovecot
            # counts 127.0.0.1 as secured anyway; this says it for any address.)
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            "auth_verbose = yes",
            # A wrong password is answered within half a second (Dovecot's failure
            # timer), not after 2 s; the auth penalty is off below.
            "auth_failure_delay = 0",
            f"mail_location = maildir:{root / 'home'}/%u/Maildir",
            f"mail_uid = {who.mail_user}",
            f"mail_gid = {who.mail_group}",
            # Only that uid; Dovecot's default refuses uids under 500.
            f"first_valid_uid = {who.mail_uid}",
            f"last_valid_uid = {who.mail_uid}",
            f"first_valid_gid = {who.mail_gid}",
            # Throwaway mail: no need to wait for the disk.
            "mail_fsync = never",
            "namespace inbox {",
            "  inbox = yes",
            f"  separator = {self.separator}",
            "}",
            "passdb {",
            "  driver = passwd-file",
            f"  args = {root / 'users'}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {root / 'users'}",
            "}",
        ]
        if tls is None:
            lines.append("ssl = no")
        else:
            # "yes", not "required": STARTTLS is offered and plain IMAP still works.
            lines += ["ssl = yes", f"ssl_cert = <{tls.cert_file}", f"ssl_key = <{tls.key_file}"]
        if who.login_user is not None:
            lines += [
                f"default_login_user = {who.login_user}",
                f"default_internal_user = {who.internal_user}",
                f"default_internal_group = {who.internal_group}",
            ]
        lines += [
            "service imap-login {",
            "  inet_listener imap {",
            f"    port = {self.port}",
            "  }",
            # Dovecot's built-in default is 993; port 0 is no listener at all.
            "  inet_listener imaps {",
            f"    port = {self.tls_port or 0}",
            "    ssl = yes" if tls is not None else "",
            "  }",
        ]
        if who.login_user is not None:
            lines.append("  chroot =")  # only root can chroot
        lines.append("}")
        lines += [
            "service anvil {",
            # Without this socket there is no auth penalty: each failed login from an
            # address would delay its next one more (2 s, 4 s, ... 15 s), so one test
            # of a wrong password would slow down every login after it.
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            "  chroot =" if who.login_user is not None else "",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _launch(self, who: _Identity) -> bool:
        """Start Dovecot on new free ports; False when one of them was taken meanwhile."""
        assert self.folder is not None and self.binary is not None
        ports = _free_ports(2 if self.tls else 1)
        self.port, self.tls_port = ports[0], (ports[1] if self.tls else None)
        token = secrets.token_hex(4)
        conf = self.folder / "dovecot.conf"
        conf.write_text(self._config(who, token), encoding="utf-8")
        for name in ("dovecot.log", "stderr.log"):
            (self.folder / name).unlink(missing_ok=True)
        with (self.folder / "stderr.log").open("wb") as stderr:
            # -F: the master stays in the foreground, our child, so its pid (the one
            # base_dir/master.pid names) is known without a race and it can be waited
            # for. Its own session: a Ctrl-C at the terminal is for pytest, and the
            # process group is ours alone.
            self._process = subprocess.Popen(
                [self.binary, "-F", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        greeting = f"newsletter test Dovecot {token} ready".encode()
        while True:
            if "Address already in use" in self.log():
                # It is on its way out; no need to wait the second it takes for that.
                process, self._process = self._process, None
                _terminate(process, None)
                return False
            if self._process.poll() is not None:
                process, self._process = self._process, None
                _terminate(process, None)  # the children it may have left
                raise DovecotError(
                    f"Dovecot exited with status {process.returncode} at start-up\n{self.log()}"
                )
            if _greets(self.port, greeting) and (
                self.tls_port is None or _greets(self.tls_port, greeting, self.tls)
            ):
                return True
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"Dovecot did not answer on {HOST}:{self.port} within "
                    f"{START_TIMEOUT:.0f} s\n{self.log()}"
                )
            time.sleep(0.02)

    def _master_pid(self) -> int | None:
        if self.folder is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int((self.folder / "run" / "master.pid").read_text().strip())
        return None

    # ------------------------------------------------------------ the mailbox

    def connect(
        self,
        security: Security = "none",
        *,
        user: str | None = None,
        password: str | None = None,
        login: bool = True,
        timeout: float = 10.0,
    ) -> imaplib.IMAP4:
        """A client connection, logged in as ``user`` (the first by default) unless
        ``login`` is False. ``starttls`` and ``tls`` trust the server's CA only."""
        if security != "none" and self.tls is None:
            raise ValueError(f"security {security!r} needs a Dovecot started with tls")
        conn: imaplib.IMAP4
        if security == "tls":
            assert self.tls is not None and self.tls_port is not None
            conn = imaplib.IMAP4_SSL(
                self.host, self.tls_port, ssl_context=self.tls.client_context(), timeout=timeout
            )
        else:
            conn = imaplib.IMAP4(self.host, self.port, timeout=timeout)
            if security == "starttls":
                assert self.tls is not None
                conn.starttls(ssl_context=self.tls.client_context())
        if login:
            name = user or self.user
            try:
                conn.login(name, password if password is not None else self.users[name])
            except BaseException:
                conn.shutdown()  # a refused login leaves no open socket behind
                raise
        return conn

    @contextlib.contextmanager
    def session(self, user: str | None = None) -> Iterator[imaplib.IMAP4]:
        """A logged-in connection (plain IMAP), logged out afterwards."""
        conn = self.connect(user=user)
        try:
            yield conn
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()

    def create_folder(self, name: str, *, user: str | None = None) -> None:
        with self.session(user) as conn:
            _ok(conn.create(_quoted(name)), f"CREATE {name}")

    def folders(self, *, user: str | None = None) -> list[str]:
        """The user's folder names, as LIST gives them."""
        with self.session(user) as conn:
            typ, data = conn.list()
            _ok((typ, data), "LIST")
        names = []
        for line in data:
            if not isinstance(line, bytes):
                continue
            match = re.match(rb'\((?P<attrs>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$', line)
            assert match, line
            name = match["name"].decode()
            if name.startswith('"'):
                name = re.sub(r"\\(.)", r"\1", name[1:-1])
            names.append(name)
        return names

    def deliver(
        self,
        folder: str,
        raw: bytes,
        *,
        flags: Iterable[str] = (),
        user: str | None = None,
    ) -> int:
        """Put ``raw`` into ``folder`` (which must exist) as a client's APPEND does;
        returns its UID."""
        flag_list = " ".join(flags)
        with self.session(user) as conn:
            typ, data = conn.append(
                _quoted(folder), f"({flag_list})" if flag_list else None, None, raw
            )
            _ok((typ, data), f"APPEND to {folder}")
        # Dovecot has UIDPLUS: "[APPENDUID <uidvalidity> <uid>] Append completed."
        match = re.search(rb"APPENDUID \d+ (\d+)", data[0] if isinstance(data[0], bytes) else b"")
        assert match, data
        return int(match[1])

    def messages(self, folder: str = "INBOX", *, user: str | None = None) -> list[Message]:
        """What ``folder`` holds, by UID. EXAMINE and BODY.PEEK: the looking sets no
        \\Seen and takes no \\Recent."""
        with self.session(user) as conn:
            _ok(conn.select(_quoted(folder), readonly=True), f"EXAMINE {folder}")
            typ, data = conn.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
            _ok((typ, data), f"FETCH in {folder}")
        found = []
        for item in data:
            # Each message is (b'N (UID u FLAGS (...) BODY[] {size}', body), then b')'.
            if not isinstance(item, tuple):
                continue
            head, body = item
            uid = re.search(rb"\bUID (\d+)", head)
            flags = re.search(rb"\bFLAGS \(([^)]*)\)", head)
            assert uid and flags, head
            names = frozenset(flags[1].decode().split()) - {"\\Recent"}
            found.append(Message(int(uid[1]), names, body))
        return sorted(found, key=lambda m: m.uid)


def _ok(response: tuple[str, list[object]], what: str) -> None:
    typ, data = response
    if typ != "OK":
        raise AssertionError(f"{what}: {typ} {data!r}")


def _greets(port: int, greeting: bytes, tls: TLS | None = None) -> bool:
    """Whether our Dovecot answers on ``port`` (with TLS first when ``tls`` is given)."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as raw:
            if tls is None:
                return greeting in raw.recv(1024)
            with tls.client_context().wrap_socket(raw, server_hostname=HOST) as wrapped:
                return greeting in wrapped.recv(1024)
    except (OSError, ssl.SSLError):
        return False


def _terminate(process: subprocess.Popen[bytes], master_pid: int | None) -> None:
    """SIGTERM to the master we started and its children, then wait for them."""
    # master.pid names our child (-F: the master does not fork away). Should it ever
    # name another process, that one is not ours to signal: the child's pid is.
    pid = master_pid if master_pid == process.pid else process.pid
    # The signal goes to the master's process group, which is its own session's
    # (start_new_session): Dovecot's processes and nobody else's. To the master
    # alone, it would SIGQUIT its children and sleep a second for them, and an imap
    # process with a client still connected would stay 10 s after it; all at once,
    # everything is gone within milliseconds.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        process.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if _group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: with the
    master gone, its last children are reaped by init, which may take its time."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel, zombies and all
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.fixture
def imap_server(tmp_path: Path) -> Iterator[Dovecot]:
    """A Dovecot of the test's own with the user bounces (password s3cret), plain IMAP
    with STARTTLS on ``port`` and TLS on ``tls_port``, by a trustme CA whose
    certificate is ``server.tls.ca_file``."""
    binary = dovecot_or_skip()
    with Dovecot(tls=TLS.by_trustme(tmp_path / "tls"), binary=binary) as server:
        yield server
