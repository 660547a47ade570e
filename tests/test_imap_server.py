"""The test IMAP server (tests/imap_server.py) is a real Dovecot that does what the
bounce tests need of it: log in with each security, keep mail as it was given,
make folders, MOVE, and tell an IDLE-ing client about new mail at once."""

from __future__ import annotations

import imaplib
import os
import socket
import ssl
import time
from pathlib import Path

import pytest

import imap_server as helper
from imap_server import Dovecot, Security, dovecot_or_skip

# The fixture. "as" itself says it is imported to be used by name (pytest's), so
# the tests' arguments of that name are no redefinition for ruff.
from imap_server import imap_server as imap_server  # noqa: PLC0414

BOUNCE = (
    b"Return-Path: <>\r\n"
    b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n"
    b"To: bounces+42@news.example.org\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"\r\n"
    b"This is the mail system.\r\n"
    b"\r\n"
    b"<ed@example.org>: host mx.example.org said: 550 5.1.1 no such user\r\n"
)


def raw(subject: str) -> bytes:
    return BOUNCE.replace(b"Undelivered Mail", subject.encode())


@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
def test_a_user_logs_in_with_each_security(imap_server: Dovecot, security: Security) -> None:
    conn = imap_server.connect(security)
    try:
        assert conn.state == "AUTH"
        if security == "none":
            assert not isinstance(conn.sock, ssl.SSLSocket)
        else:
            assert isinstance(conn.sock, ssl.SSLSocket)
            # Verified against the trustme CA, for the address connected to.
            peer = conn.sock.getpeercert()
            assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        typ, data = conn.capability()
        assert typ == "OK"
        capabilities = data[0].split()  # type: ignore[union-attr]
        assert b"IDLE" in capabilities
        assert b"MOVE" in capabilities
    finally:
        conn.logout()


def test_the_plain_port_offers_starttls_and_the_log_is_clean(imap_server: Dovecot) -> None:
    conn = imap_server.connect(login=False)
    try:
        assert "STARTTLS" in conn.capabilities
        assert "AUTH=PLAIN" in conn.capabilities  # LOGINDISABLED would mean no "none"
    finally:
        conn.logout()
    # Our configuration draws no complaint from Dovecot.
    problems = [
        line
        for line in imap_server.log().splitlines()
        if any(word in line for word in ("Warning:", "Error:", "Fatal:"))
    ]
    assert problems == []


def test_a_wrong_password_is_refused(imap_server: Dovecot) -> None:
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_server.connect(password="wrong")  # noqa: S106 - a test password


def test_the_certificate_is_trusted_through_its_ca_only(imap_server: Dovecot) -> None:
    assert imap_server.tls_port is not None
    context = ssl.create_default_context()  # the system's CAs, not the test's
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL("127.0.0.1", imap_server.tls_port, ssl_context=context, timeout=5)


def test_delivered_mail_is_listed_byte_for_byte_and_looking_changes_nothing(
    imap_server: Dovecot,
) -> None:
    assert imap_server.messages() == []
    first = imap_server.deliver("INBOX", raw("one"))
    second = imap_server.deliver("INBOX", raw("two"), flags=["\\Seen", "$Processed"])
    assert (first, second) == (1, 2)

    listed = imap_server.messages("INBOX")
    assert [(m.uid, m.data, m.flags) for m in listed] == [
        (1, raw("one"), frozenset()),
        (2, raw("two"), frozenset({"\\Seen", "$Processed"})),
    ]
    assert not listed[0].seen  # BODY.PEEK: reading the body did not mark it
    assert imap_server.messages("INBOX") == listed

    # The mail is in the Maildir under the server's folder, written by the mail
    # processes' user (nobody, when root runs the tests), never by root.
    # Dovecot keeps them with bare LF line ends there, and gives CRLF over IMAP.
    files = [p for p in imap_server.maildir().glob("*/*") if p.parent.name in ("new", "cur")]
    on_disk = [raw("one").replace(b"\r\n", b"\n"), raw("two").replace(b"\r\n", b"\n")]
    assert sorted(p.read_bytes() for p in files) == on_disk
    if os.geteuid() == 0:
        assert {p.stat().st_uid for p in files} == {65534}


def test_folders_are_made_and_a_message_moves_with_imap_move(imap_server: Dovecot) -> None:
    imap_server.create_folder("Processed")
    imap_server.create_folder("Needs review")  # a space: quoted on the wire
    assert set(imap_server.folders()) == {"INBOX", "Processed", "Needs review"}
    imap_server.deliver("INBOX", raw("keep"))
    uid = imap_server.deliver("INBOX", raw("move me"))

    with imap_server.session() as conn:
        assert conn.select("INBOX")[0] == "OK"
        typ, data = conn.uid("MOVE", str(uid), "Processed")
        assert typ == "OK", data

    assert [m.data for m in imap_server.messages("INBOX")] == [raw("keep")]
    moved = imap_server.messages("Processed")
    assert [(m.uid, m.data) for m in moved] == [(1, raw("move me"))]
    assert imap_server.messages("Needs review") == []


def test_an_idle_client_hears_of_new_mail_at_once(imap_server: Dovecot) -> None:
    conn = imap_server.connect("starttls")
    try:
        assert conn.select("INBOX") == ("OK", [b"0"])
        # imaplib (Python 3.11) has no idle(): the command by hand, on its connection.
        tag = conn._new_tag()  # type: ignore[attr-defined]
        conn.send(tag + b" IDLE\r\n")
        assert conn.readline().startswith(b"+ ")  # "+ idling"
        conn.sock.settimeout(5)

        began = time.monotonic()
        imap_server.deliver("INBOX", raw("news"))  # another connection's APPEND
        lines = []
        while b"* 1 EXISTS\r\n" not in lines:
            lines.append(conn.readline())
        waited = time.monotonic() - began
        assert waited < 2, f"EXISTS came after {waited:.1f} s: {lines}"

        conn.send(b"DONE\r\n")
        while not (line := conn.readline()).startswith(tag):
            lines.append(line)
        assert line.startswith(tag + b" OK"), line
    finally:
        conn.logout()


def test_each_user_has_a_mailbox_of_their_own() -> None:
    dovecot_or_skip()
    with Dovecot(users={"bounces": "s3cret", "abuse": "other-s3cret"}) as server:
        server.deliver("INBOX", raw("for abuse"), user="abuse")
        assert server.messages(user="bounces") == []
        assert [m.data for m in server.messages(user="abuse")] == [raw("for abuse")]
        with pytest.raises(imaplib.IMAP4.error):
            server.connect(user="abuse", password="s3cret")  # noqa: S106 - bounces' password


def test_stop_ends_every_process_and_removes_the_folder() -> None:
    dovecot_or_skip()
    server = Dovecot().start()
    assert server.startup_seconds < 5
    folder, port = server.folder, server.port
    assert folder is not None
    master = int((folder / "run" / "master.pid").read_text())
    server.deliver("INBOX", raw("x"))
    idle = server.connect()  # a session still open when the server stops
    pgid = os.getpgid(master)
    assert pgid == master  # a process group of its own: nobody else's processes in it

    server.stop()
    assert not helper._group_alive(pgid)
    assert not Path(f"/proc/{master}").exists()
    assert not folder.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        idle.noop()
    idle.shutdown()
    server.stop()  # twice is harmless


def test_a_port_taken_meanwhile_is_given_up_for_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dovecot_or_skip()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        free_ports = helper._free_ports
        offered: list[list[int]] = []

        def first_a_taken_one(count: int) -> list[int]:
            ports = free_ports(count)
            if not offered:
                ports[0] = taken  # as if another process bound it after we looked
            offered.append(ports)
            return ports

        monkeypatch.setattr(helper, "_free_ports", first_a_taken_one)
        with Dovecot() as server:
            assert len(offered) == 2
            assert server.port != taken
            with server.session() as conn:
                assert conn.noop()[0] == "OK"


def test_without_dovecot_the_tests_skip_unless_ci_requires_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(helper, "dovecot_binary", lambda: None)
    monkeypatch.delenv(helper.REQUIRED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install dovecot-imapd"):
        dovecot_or_skip()
    monkeypatch.setenv(helper.REQUIRED, "1")
    with pytest.raises(pytest.fail.Exception, match="dovecot is not installed"):
        dovecot_or_skip()
