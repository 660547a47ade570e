"""A private Postfix instance for the tests: real bounces, made by the real MTA.

:func:`start` writes a main.cf and a master.cf of its own in a folder of its
own, with the queue, data and log under it too, and starts Debian's Postfix on
them with ``postfix -c``: the system's /etc/postfix configuration is not used,
and the system's own instance is never started. The folder is a new one under
the system's temporary folder (the postfix user must reach it: a pytest
temporary folder, under /tmp/pytest-of-root with mode 0700, is out of its
reach). Its smtpd listens on a free 127.0.0.1 port; mail for LOCAL_DOMAIN is
delivered locally, where every address is accepted at RCPT and unknown users
are bounced by local(8);
each domain of ``routes`` goes by SMTP to ``[127.0.0.1]:port`` (a test server
of tests/smtp_server.py that refuses chosen recipients, or keeps the bounces
sent to our VERP domain). Queue times are seconds, not days, so a message
refused with 4xx expires in a few seconds into a "failed" report, with a delay
warning first.

Postfix starts its master as root: :func:`missing` says why it cannot be used
here (not installed, not root), for the tests to skip with that reason, or to
fail where it is required (NEWSLETTER_TEST_POSTFIX_REQUIRED=1).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
LOCAL_DOMAIN = "local.test"
MYHOSTNAME = "mx.postfix.test"

# Queue times for the tests: a deferred message is retried every second or two,
# warned about after a second, and returned as failed after QUEUE_LIFETIME.
QUEUE_LIFETIME = 4
_TIMES = {
    "maximal_queue_lifetime": f"{QUEUE_LIFETIME}s",
    "bounce_queue_lifetime": f"{QUEUE_LIFETIME}s",
    "delay_warning_time": "1s",
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
}

# The services a sending and bouncing Postfix needs (Debian's master.cf.proto
# without chroot, nor the pipe transports), with smtpd on {port} of 127.0.0.1.
_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def missing() -> str:
    """Why a private Postfix cannot be started here, or "" when it can."""
    for program in (POSTFIX, POSTCONF):
        if not Path(program).exists():
            return f"postfix is not installed ({program} is missing): apt-get install postfix"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "postfix is installed but its 'postfix' user is missing: apt-get install postfix"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master starts as root)"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postfix:
    """A running private instance; see :func:`start`."""

    folder: Path
    port: int  # its smtpd, on 127.0.0.1
    remove: bool = False  # the folder is removed when it stops (start made it)

    @property
    def config_directory(self) -> Path:
        return self.folder / "etc"

    @property
    def queue_directory(self) -> Path:
        return self.folder / "queue"

    @property
    def data_directory(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "maillog"

    def log(self) -> str:
        """Its mail log so far (for a failing test's message)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``postfix -c <its config> ARGS`` (start, stop, status, check...)."""
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_directory), *args],
            capture_output=True, text=True, timeout=60, check=check,
        )  # fmt: skip

    def send(self, mail_from: str, rcpt_to: str, message: EmailMessage | bytes) -> None:
        """Hand one message to its smtpd, MAIL FROM ``mail_from``, RCPT TO ``rcpt_to``."""
        data = message if isinstance(message, bytes) else message.as_bytes()
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.sendmail(mail_from, [rcpt_to], data)

    def stop(self) -> None:
        """Stop it (``postfix stop``; its master's process group by PID if that fails),
        wait until none of its processes runs, and remove its folder when
        :func:`start` made it."""
        pid = self.master_pid()
        if pid is not None and _running(pid):
            self.postfix("stop", check=False)
            # The master ends its children, and leads their process group (setsid).
            deadline = time.monotonic() + 10
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        if self.remove:
            shutil.rmtree(self.folder, ignore_errors=True)


def _running(group: int) -> bool:
    """Whether a process of process group ``group`` still runs (not counting zombies)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == group and state != "Z":
            return True
    return False


def main_cf(postfix: Postfix, parameters: Mapping[str, str]) -> str:
    """Its main.cf: the settings above, then ``parameters`` (they win)."""
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(postfix.queue_directory),
        "data_directory": str(postfix.data_directory),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": MYHOSTNAME,
        "mydomain": "postfix.test",
        "myorigin": "$myhostname",
        "mydestination": LOCAL_DOMAIN,
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relayhost": "",
        "transport_maps": f"texthash:{postfix.config_directory / 'transport'}",
        # Every local address is taken at RCPT: local(8) bounces the unknown ones,
        # which is what makes a report (a refusal at RCPT would make none).
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "smtp_dns_support_level": "disabled",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "smtp_connect_timeout": "5s",
        "maillog_file": str(postfix.log_file),
        "maillog_file_prefixes": str(postfix.folder),
        **_TIMES,
        **parameters,
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


def reachable(folder: Path) -> str:
    """Why the ``postfix`` user cannot reach ``folder``, or "": its daemons open their
    data folder by its path after they drop root (a pytest temporary folder, under
    /tmp/pytest-of-root with mode 0700, is out of their reach)."""
    user = pwd.getpwnam("postfix")
    for step in [folder, *folder.parents]:
        info = step.stat()
        if info.st_uid == user.pw_uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid == user.pw_gid:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            return f"the postfix user may not enter {step} (mode {info.st_mode & 0o777:o})"
    return ""


def start(
    routes: Mapping[str, int],
    *,
    parameters: Mapping[str, str] | None = None,
    folder: Path | None = None,
) -> Postfix:
    """A Postfix instance of its own, started: mail for each domain of ``routes`` goes
    to ``[127.0.0.1]:port`` by SMTP, for LOCAL_DOMAIN to local(8); ``parameters`` are
    more main.cf settings (they win). Its files (etc/, queue/, data/, maillog) are in
    ``folder`` (an existing one, which the postfix user must reach), or in a new folder under the
    system's temporary folder, removed by :meth:`Postfix.stop`. Raises RuntimeError,
    with Postfix's words, when it does not start; call :meth:`Postfix.stop` at the end."""
    why = missing()
    if why:
        raise RuntimeError(why)
    if folder is None:
        made = Path(tempfile.mkdtemp(prefix="newsletter-postfix-"))
        made.chmod(0o755)
        postfix = Postfix(made, _free_port(), remove=True)
    else:
        why = reachable(folder)
        if why:
            raise RuntimeError(f"a private Postfix cannot live in {folder}: {why}")
        postfix = Postfix(folder, _free_port())
    try:
        _start(postfix, routes, parameters or {})
    except BaseException:
        postfix.stop()
        raise
    return postfix


def _start(postfix: Postfix, routes: Mapping[str, int], parameters: Mapping[str, str]) -> None:
    config = postfix.config_directory
    config.mkdir(parents=True)
    # Postfix insists on its queue belonging to root (`postfix start` makes its
    # subfolders, owned by postfix), and on its data folder belonging to postfix.
    postfix.queue_directory.mkdir(mode=0o755)
    postfix.data_directory.mkdir(mode=0o700)
    shutil.chown(postfix.data_directory, "postfix", "postfix")
    (config / "main.cf").write_text(main_cf(postfix, parameters))
    (config / "master.cf").write_text(_MASTER_CF.format(port=postfix.port))
    (config / "transport").write_text(
        "".join(f"{domain} smtp:[127.0.0.1]:{port}\n" for domain, port in routes.items())
    )
    started = postfix.postfix("start", check=False)
    if started.returncode != 0:
        raise RuntimeError(
            f"the private Postfix did not start: {started.stderr.strip()}\n{postfix.log()}"
        )
    # `postfix start` returns once the master runs; smtpd answers when it listens.
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", postfix.port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the private Postfix smtpd never listened\n{postfix.log()}"
                ) from None
            time.sleep(0.1)


@contextlib.contextmanager
def running(
    routes: Mapping[str, int],
    *,
    parameters: Mapping[str, str] | None = None,
    folder: Path | None = None,
) -> Iterator[Postfix]:
    """:func:`start`, then :meth:`Postfix.stop` however the block ends."""
    postfix = start(routes, parameters=parameters, folder=folder)
    try:
        yield postfix
    finally:
        postfix.stop()
