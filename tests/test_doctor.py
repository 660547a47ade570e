"""`newsletter doctor`: each check against real servers on 127.0.0.1.

DNS comes from a real authoritative server (tests/dns_server.py: dnslib, UDP and
TCP) serving zones each test writes, good and broken; the relay is aiosmtpd with and
without STARTTLS (trustme certificates); the one-click check posts to the real app
served by uvicorn over TLS, and the database shows that nobody was unsubscribed.
The command itself runs in a subprocess, as a user runs it, with and without --json.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client as http_client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import uvicorn
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import (
    REPO,
    TEST_KEY,
    example_data,
    preview_recipient,
    run_cli,
    sender,
    ten_article_data,
)
from dns_server import DnsServer, free_port
from newsletter import tokens
from newsletter.audience.csv_import import ParsedRow
from newsletter.build import BuildInputs
from newsletter.delivery.dkim_sign import DkimKey, public_key_b64
from newsletter.doctor.content import check_content, latest_issue, secret_strength
from newsletter.doctor.dkim import check_dkim
from newsletter.doctor.dmarc import check_dmarc, organisational_domain
from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding
from newsletter.doctor.one_click import OneClickSetup, check_one_click
from newsletter.doctor.receiving import check_receiving
from newsletter.doctor.relay import RelaySetup, check_relay
from newsletter.doctor.spf import check_spf
from newsletter.render.loading import load_society
from newsletter.storage import open_storage
from newsletter.storage.sqlite.connection import connect
from newsletter.storage.sqlite.subscribers import SubscriberStore
from newsletter.web.app import WebConfig, create_app
from smtp_server import Server

RELAY_IP = "192.0.2.25"  # what relay.example.net resolves to in the unit tests
SELECTOR = "news2026"
EMAILS = ["ann@example.org", "bob@example.org"]
NOW = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
STRONG_SECRET = "Xq3vR9-tLmZ8pKw2_Nb7cYd4Hs6Ju1Ef0Ga5Vr"  # noqa: S105 - a test key


def statuses(findings: list[Finding]) -> dict[str, str]:
    return {f.check: f.status for f in findings}


def one(findings: list[Finding], check: str) -> Finding:
    (found,) = [f for f in findings if f.check == check]
    return found


def rsa_pem(bits: int) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pem() -> bytes:
    return rsa_pem(2048)


@pytest.fixture(scope="module")
def other_pem() -> bytes:
    return rsa_pem(2048)


@pytest.fixture
def key(pem: bytes) -> DkimKey:
    return DkimKey(SELECTOR, "example.org", pem)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()


@pytest.fixture
def resolver(dns: DnsServer) -> Resolver:
    return Resolver(("127.0.0.1", dns.port), timeout=1.0)


def good_zone(dns: DnsServer, key: DkimKey, relay_ip: str = RELAY_IP) -> DnsServer:
    """example.org as it should be: SPF through the provider's include, DKIM, DMARC, MX."""
    return dns.add_all(
        [
            ("example.org", "TXT", "v=spf1 include:_spf.relay.example.net mx -all"),
            ("example.org", "TXT", "google-site-verification=abc123"),
            ("_spf.relay.example.net", "TXT",
             "v=spf1 ip4:198.51.100.0/24 a:relay.example.net ~all"),
            ("relay.example.net", "A", relay_ip),
            ("example.org", "MX", (10, "mx.example.org")),
            ("mx.example.org", "A", "192.0.2.10"),
            (f"{SELECTOR}._domainkey.example.org", "TXT",
             f"v=DKIM1; k=rsa; p={public_key_b64(key)}"),
            ("_dmarc.example.org", "TXT", "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.org"),
            ("_mta-sts.example.org", "TXT", "v=STSv1; id=20260101"),
            ("_smtp._tls.example.org", "TXT", "v=TLSRPTv1; rua=mailto:tls@example.org"),
            ("news.example.org", "A", "127.0.0.1"),
        ]
    )  # fmt: skip


# ------------------------------------------------------------------------ DNS


def test_a_good_domain_passes_every_dns_check(
    dns: DnsServer, resolver: Resolver, key: DkimKey
) -> None:
    good_zone(dns, key)
    spf = check_spf("example.org", ("relay.example.net",), resolver)
    assert statuses(spf) == {"spf.record": "pass", "spf.lookups": "pass", "spf.relay": "pass"}
    # include, a (inside it) and mx: three of the ten
    assert one(spf, "spf.lookups").detail == "3 look-up(s), 0 of them finding nothing"
    assert (
        f"{RELAY_IP}: pass (include:_spf.relay.example.net in example.org, by "
        "a:relay.example.net in _spf.relay.example.net)" in one(spf, "spf.relay").detail
    )
    dkim = check_dkim(key, None, resolver)
    assert statuses(dkim) == {"dkim.key": "pass", "dkim.record": "pass"}
    assert one(dkim, "dkim.key").detail == "2048-bit RSA, selector news2026, d=example.org"
    dmarc = check_dmarc("example.org", "example.org", "example.org", resolver)
    assert statuses(dmarc) == {"dmarc.record": "pass", "dmarc.alignment": "pass"}
    assert one(dmarc, "dmarc.record").detail == "p=quarantine at _dmarc.example.org"
    assert one(dmarc, "dmarc.alignment").detail.startswith(
        "aligned through DKIM d=example.org and the bounce domain example.org (SPF)"
    )
    receiving = check_receiving("example.org", "example.org", resolver)
    assert statuses(receiving) == {"mx.bounce": "pass", "mta_sts": "info", "tls_rpt": "info"}
    assert one(receiving, "mx.bounce").detail == "mail to example.org goes to mx.example.org"
    assert one(receiving, "mta_sts").detail.startswith("published at _mta-sts.example.org")
    assert one(receiving, "tls_rpt").detail.startswith("published at _smtp._tls.example.org")
    assert all(f.fix == "" for f in spf + dkim + dmarc) and all(
        f.fix == "" for f in receiving if f.status == "pass"
    )


ELEVEN = " ".join(f"include:i{n}.example.net" for n in range(1, 12))
SPF_CASES = {
    "no record": (
        [],
        {"spf.record": "fail"},
        "fix",
        f"publish a TXT record at example.org: v=spf1 ip4:{RELAY_IP} -all",
    ),
    "+all": (
        ["v=spf1 ip4:192.0.2.0/24 +all"],
        {"spf.record": "fail", "spf.lookups": "pass", "spf.relay": "pass"},
        "detail",
        "ends in +all: every server in the world passes SPF",
    ),
    "two records": (
        ["v=spf1 ip4:192.0.2.0/24 -all", "v=spf1 mx -all"],
        {"spf.record": "fail"},
        "detail",
        "publishes 2 SPF records",
    ),
    "eleven look-ups": (
        [f"v=spf1 {ELEVEN} a:relay.example.net -all"],
        {"spf.record": "pass", "spf.lookups": "fail", "spf.relay": "pass"},
        "detail",
        "12 DNS look-ups: over the limit of 10",
    ),
    "neutral ending": (
        [f"v=spf1 ip4:{RELAY_IP} ?all"],
        {"spf.record": "warn", "spf.lookups": "pass", "spf.relay": "pass"},
        "detail",
        "ends without -all or ~all",
    ),
    "relay not authorised": (
        ["v=spf1 ip4:198.51.100.0/24 -all"],
        {"spf.record": "pass", "spf.lookups": "pass", "spf.relay": "fail"},
        "fix",
        f"add ip4:{RELAY_IP} (or your provider's include:) to the SPF record",
    ),
    "softfail for the relay": (
        ["v=spf1 ip4:198.51.100.0/24 ~all"],
        {"spf.record": "pass", "spf.lookups": "pass", "spf.relay": "fail"},
        "detail",
        f"{RELAY_IP}: softfail (~all in example.org)",
    ),
    "include of nothing": (
        ["v=spf1 include:gone.example.net -all"],
        {"spf.record": "fail", "spf.lookups": "pass", "spf.relay": "fail"},
        "detail",
        "gone.example.net (included) has no SPF record",
    ),
    "redirect": (
        ["v=spf1 redirect=_spf.relay.example.net"],
        {"spf.record": "pass", "spf.lookups": "pass", "spf.relay": "pass"},
        "detail",
        f"{RELAY_IP}: pass (a:relay.example.net in _spf.relay.example.net)",
    ),
    "ipv6 and cidr": (
        ["v=spf1 ip6:2001:db8::/32 a:relay.example.net/24 -all"],
        {"spf.record": "pass", "spf.lookups": "pass", "spf.relay": "pass"},
        "detail",
        f"{RELAY_IP}: pass (a:relay.example.net/24 in example.org)",
    ),
}


@pytest.mark.parametrize("case", SPF_CASES)
def test_spf_findings(dns: DnsServer, resolver: Resolver, key: DkimKey, case: str) -> None:
    records, expected, field, text = SPF_CASES[case]
    good_zone(dns, key)
    dns.set("example.org", "TXT", "google-site-verification=abc123", *records)
    for n in range(1, 12):
        dns.add(f"i{n}.example.net", "TXT", f"v=spf1 ip4:203.0.113.{n} -all")
    findings = check_spf("example.org", ("relay.example.net",), resolver)
    assert statuses(findings) == expected, findings
    said = [getattr(f, field) for f in findings]
    assert any(text in s for s in said), said
    assert all(f.fix for f in findings if f.status != "pass")


def test_a_large_answer_comes_over_tcp(dns: DnsServer, resolver: Resolver, key: DkimKey) -> None:
    good_zone(dns, key)
    for n in range(8):  # verification records of other services: > 512 bytes in all
        dns.add("example.org", "TXT", f"site-verification-{n}=" + "x" * 60)
    findings = check_spf("example.org", ("relay.example.net",), resolver)
    assert statuses(findings)["spf.record"] == "pass"
    protocols = {q.protocol for q in dns.queries if (q.name, q.qtype) == ("example.org", "TXT")}
    assert protocols == {"udp", "tcp"}  # truncated over UDP, then asked again over TCP


def test_a_resolver_that_does_not_answer_is_said_once_and_quickly(
    dns: DnsServer, resolver: Resolver, key: DkimKey
) -> None:
    good_zone(dns, key)
    dns.silence("example.org")
    started = time.monotonic()
    findings = [
        *check_spf("example.org", ("relay.example.net",), resolver),
        *check_dkim(key, None, resolver),
        *check_dmarc("example.org", "example.org", None, resolver),
        *check_receiving("example.org", "example.org", resolver),
    ]
    # one time-out (1 s); the rest know the resolver is down
    assert time.monotonic() - started < 2.5
    reason = f"127.0.0.1:{dns.port} (NEWSLETTER_DNS_RESOLVER) did not answer within 1 s"
    checked = {f.check: (f.status, f.detail) for f in findings}
    for check in ("spf.record", "dkim.record", "dmarc.record", "mx.bounce"):
        assert checked[check] == ("fail", f"could not be checked: {reason}"), checked[check]
    assert checked["mta_sts"] == ("info", f"could not be looked up: {reason}")


def test_dkim_findings(dns: DnsServer, resolver: Resolver, key: DkimKey, other_pem: bytes) -> None:
    name = f"{SELECTOR}._domainkey.example.org"
    wanted = f"v=DKIM1; k=rsa; p={public_key_b64(key)}"
    # nothing published: the fix is the record itself
    missing = check_dkim(key, None, resolver)
    assert statuses(missing) == {"dkim.key": "pass", "dkim.record": "fail"}
    assert one(missing, "dkim.record").fix == f'publish TXT {name} "{wanted}"'
    # another key published
    other = DkimKey(SELECTOR, "example.org", other_pem)
    dns.set(name, "TXT", f"v=DKIM1; k=rsa; p={public_key_b64(other)}")
    mismatch = one(check_dkim(key, None, Resolver(("127.0.0.1", dns.port), 1.0)), "dkim.record")
    assert mismatch.status == "fail"
    assert "its p= is another key (2048-bit) than the private key's" in mismatch.detail
    assert mismatch.fix == f'publish TXT {name} "{wanted}"'
    # revoked, and testing mode
    dns.set(name, "TXT", "v=DKIM1; k=rsa; p=")
    revoked = one(check_dkim(key, None, Resolver(("127.0.0.1", dns.port), 1.0)), "dkim.record")
    assert (revoked.status, "the key is revoked" in revoked.detail) == ("fail", True)
    dns.set(name, "TXT", wanted + "; t=y")
    testing = one(check_dkim(key, None, Resolver(("127.0.0.1", dns.port), 1.0)), "dkim.record")
    assert testing.status == "warn" and "t=y" in testing.detail
    # none configured; and one configured whose file is unusable
    (absent,) = check_dkim(None, None, resolver)
    assert absent.status == "fail" and "NEWSLETTER_DKIM_KEY_FILE" in absent.fix
    (broken,) = check_dkim(None, "dkim.pem is not a usable DKIM private key", resolver)
    assert broken.status == "fail" and broken.detail.startswith("dkim.pem is not a usable")


def test_a_1024_bit_key_is_a_warning(dns: DnsServer, resolver: Resolver) -> None:
    weak = DkimKey(SELECTOR, "example.org", rsa_pem(1024))
    dns.add(f"{SELECTOR}._domainkey.example.org", "TXT", f"v=DKIM1; p={public_key_b64(weak)}")
    findings = check_dkim(weak, None, resolver)
    assert statuses(findings) == {"dkim.key": "warn", "dkim.record": "pass"}
    assert "1024-bit RSA" in one(findings, "dkim.key").detail


def test_dmarc_findings(dns: DnsServer, resolver: Resolver) -> None:
    absent = check_dmarc("example.org", "example.org", None, resolver)
    assert one(absent, "dmarc.record").status == "fail"
    assert one(absent, "dmarc.record").fix.startswith(
        'publish TXT _dmarc.example.org "v=DMARC1; p=none; rua=mailto:dmarc@example.org"'
    )
    dns.add("_dmarc.example.org", "TXT", "v=DMARC1; p=none; rua=mailto:d@example.org")
    r = Resolver(("127.0.0.1", dns.port), 1.0)
    none = check_dmarc("example.org", "example.org", None, r)
    assert statuses(none) == {"dmarc.record": "warn", "dmarc.alignment": "pass"}
    assert "p=none at _dmarc.example.org" in one(none, "dmarc.record").detail
    # a sending service's own domains for both: not aligned
    unaligned = one(
        check_dmarc("example.org", "bounces.mailer.example.net", "mailer.example.net", r),
        "dmarc.alignment",
    )
    assert unaligned.status == "fail"
    assert "neither DKIM d=mailer.example.net nor the bounce domain" in unaligned.detail
    assert (
        "NEWSLETTER_DKIM_DOMAIN" in unaligned.fix and "NEWSLETTER_BOUNCE_ADDRESS" in unaligned.fix
    )


def test_dmarc_of_a_subdomain_falls_back_and_aligns_relaxed_or_strict(
    dns: DnsServer, resolver: Resolver
) -> None:
    dns.add("_dmarc.example.org", "TXT", "v=DMARC1; p=reject")
    relaxed = check_dmarc("news.example.org", "bounces.example.org", None, resolver)
    assert statuses(relaxed) == {"dmarc.record": "pass", "dmarc.alignment": "pass"}
    assert one(relaxed, "dmarc.record").detail == "p=reject at _dmarc.example.org"
    dns.set("_dmarc.example.org", "TXT", "v=DMARC1; p=reject; aspf=s; adkim=s")
    r = Resolver(("127.0.0.1", dns.port), 1.0)
    strict = check_dmarc("news.example.org", "bounces.example.org", None, r)
    assert one(strict, "dmarc.alignment").status == "fail"
    signed = check_dmarc("news.example.org", "bounces.example.org", "news.example.org", r)
    assert one(signed, "dmarc.alignment").detail.startswith("aligned through DKIM d=news.example")
    assert organisational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organisational_domain("news.example.org") == "example.org"


def test_mx_findings(dns: DnsServer) -> None:
    def mx(name: str) -> Finding:
        r = Resolver(("127.0.0.1", dns.port), 1.0)
        return one(check_receiving(name, name, r), "mx.bounce")

    dns.add("example.org", "TXT", "v=spf1 -all")
    assert mx("example.org").status == "fail"
    assert "no MX record: bounces to example.org cannot come back" in mx("example.org").detail
    dns.add("example.org", "A", "192.0.2.7")
    assert mx("example.org").status == "warn"  # mail falls back to the A record
    dns.add("example.org", "MX", (0, "."))
    assert mx("example.org").status == "fail" and "null MX" in mx("example.org").detail
    assert mx("nowhere.example.org").detail.endswith("does not exist in DNS: bounces are lost")


# ---------------------------------------------------------------------- relay


@dataclass
class Certificates:
    ca: trustme.CA
    ca_file: Path

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server(self, *names: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(context)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certificates(ca, ca_file)


@contextlib.contextmanager
def smtp(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    server = Server(tls_context=tls).start()
    try:
        yield server
    finally:
        server.stop()


def relay_findings(
    resolver: Resolver,
    port: int,
    security: str,
    context: ssl.SSLContext,
    host: str = "127.0.0.1",
    timeout: float = 5,
) -> dict[str, Finding]:
    setup = RelaySetup(host, port, security, "example.org", context, timeout)  # type: ignore[arg-type]
    return {f.check: f for f in check_relay(setup, resolver)}


def test_a_relay_that_offers_starttls_passes(
    dns: DnsServer, resolver: Resolver, certs: Certificates
) -> None:
    dns.add("relay.example.net", "A", "127.0.0.1")
    with smtp(certs.server("127.0.0.1", "relay.example.net")) as server:
        good = relay_findings(resolver, server.port, "starttls", certs.client())
        named = relay_findings(
            resolver, server.port, "starttls", certs.client(), host="relay.example.net"
        )
        untrusted = relay_findings(resolver, server.port, "starttls", ssl.create_default_context())
        clear = relay_findings(resolver, server.port, "none", certs.client(), "relay.example.net")
    assert good["relay.tls"].status == "pass"
    assert good["relay.tls"].detail.startswith("127.0.0.1 speaks STARTTLS (TLSv1.")
    assert good["relay.security"].status == "pass"
    assert named["relay.tls"].detail.startswith("relay.example.net (127.0.0.1) speaks STARTTLS")
    # a CA the send would not trust: the handshake fails, as a send's would
    assert untrusted["relay.tls"].status == "fail"
    assert "certificate not accepted" in untrusted["relay.tls"].detail
    assert "NEWSLETTER_SMTP_CA_FILE" in untrusted["relay.tls"].fix
    # offered, but the settings send in clear to a relay elsewhere
    assert clear["relay.tls"].status == "pass"
    assert "offers STARTTLS (not used" in clear["relay.tls"].detail
    assert clear["relay.security"].status == "fail"
    assert clear["relay.security"].fix.startswith("set NEWSLETTER_SMTP_SECURITY=starttls")


def test_a_relay_with_implicit_tls_passes(resolver: Resolver, certs: Certificates) -> None:
    server = Server(implicit_tls=certs.server("127.0.0.1")).start()
    try:
        tls = relay_findings(resolver, server.port, "tls", certs.client())
        wrong = relay_findings(resolver, server.port, "starttls", certs.client(), timeout=0.5)
    finally:
        server.stop()
    assert tls["relay.tls"].status == "pass"
    assert tls["relay.tls"].detail.startswith("127.0.0.1 speaks implicit TLS (TLSv1.")
    # STARTTLS expected where TLS is spoken from the first byte: no greeting comes
    assert wrong["relay.tls"].status == "fail"
    assert wrong["relay.tls"].detail == f"127.0.0.1:{server.port}: no answer in time"


def test_a_relay_without_starttls_fails(resolver: Resolver, certs: Certificates) -> None:
    with smtp() as server:
        insisting = relay_findings(resolver, server.port, "starttls", certs.client())
        plain = relay_findings(resolver, server.port, "none", certs.client())
    assert insisting["relay.tls"].status == "fail"
    assert "does not offer STARTTLS, which NEWSLETTER_SMTP_SECURITY=starttls requires" in (
        insisting["relay.tls"].detail
    )
    # in clear to a relay on this machine: worth a word, not a failure
    assert (plain["relay.tls"].status, plain["relay.security"].status) == ("warn", "warn")
    assert server.handler.received == []  # nothing was sent
    refused = relay_findings(resolver, free_port(), "starttls", certs.client())
    assert refused["relay.tls"].status == "fail"
    assert refused["relay.tls"].detail.startswith("cannot connect to 127.0.0.1:")
    assert "NEWSLETTER_SMTP_HOST and NEWSLETTER_SMTP_PORT" in refused["relay.tls"].fix


# ------------------------------------------------------------------ one-click


@dataclass
class Site:
    port: int
    db: Path

    def audience(self) -> list[str]:
        return [r.email for r in SubscriberStore(connect(self.db)).audience("research-news")]

    def changes(self) -> tuple[int, int]:
        """Opt-outs and suppressions recorded, of anyone."""
        with contextlib.closing(connect(self.db)) as conn:
            optouts = conn.execute("SELECT count(*) FROM list_optouts").fetchone()[0]
            suppressed = conn.execute("SELECT count(*) FROM suppressions").fetchone()[0]
        return int(optouts), int(suppressed)


@contextlib.contextmanager
def https_site(tmp_path: Path, certs: Certificates, key: bytes = TEST_KEY) -> Iterator[Site]:
    """The real app with ann and bob on research-news, served by uvicorn over TLS with a
    certificate for news.example.org, on a port of 127.0.0.1."""
    db = tmp_path / "site.sqlite3"
    store = SubscriberStore(connect(db, create=True))
    store.import_rows(
        "research-news", [ParsedRow(2, e, "", "") for e in EMAILS], skip_invalid=False
    )
    cert = certs.ca.issue_cert("news.example.org")
    certfile, keyfile = tmp_path / "site.pem", tmp_path / "site.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(
        WebConfig(
            key,
            load_society(REPO / "society.yaml").value,
            open_storage(db, busy_seconds=0.5),
            public_url=f"https://news.example.org:{port}",
        )
    )
    config = uvicorn.Config(
        app, log_level="warning", ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield Site(port, db)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def one_click(
    site: Site, resolver: Resolver, context: ssl.SSLContext, key: bytes | None
) -> Finding:
    setup = OneClickSetup(
        f"https://news.example.org:{site.port}", key, "research-news", context, timeout=5
    )
    return check_one_click(setup, resolver, NOW)


def test_one_click_answers_the_test_link_and_unsubscribes_nobody(
    tmp_path: Path, dns: DnsServer, resolver: Resolver, certs: Certificates
) -> None:
    dns.add("news.example.org", "A", "127.0.0.1")
    with https_site(tmp_path, certs) as site:
        good = one_click(site, resolver, certs.client(), TEST_KEY)
        again = one_click(site, resolver, certs.client(), TEST_KEY)
        assert site.audience() == EMAILS and site.changes() == (0, 0)
        wrong_key = one_click(site, resolver, certs.client(), b"another-key-" * 3)
        untrusted = one_click(site, resolver, ssl.create_default_context(), TEST_KEY)
        no_key = one_click(site, resolver, certs.client(), None)
        # A real subscriber's link still unsubscribes, through the same server.
        real = tokens.make(TEST_KEY, tokens.Kind.UNSUBSCRIBE, "research-news", EMAILS[0], NOW)
        request = ("POST", f"/unsubscribe/{real}", b"List-Unsubscribe=One-Click")
        conn = _https(site.port, certs.client())
        conn.request(*request, {"Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 200
        conn.close()
        assert site.audience() == EMAILS[1:] and site.changes() == (1, 0)
    assert good.status == "pass", good
    assert good.detail == (
        f"POST https://news.example.org:{site.port}/unsubscribe/<test token> answered 200; "
        "the test link changed nothing"
    )
    assert again.status == "pass"
    assert wrong_key.status == "fail" and "answered 404" in wrong_key.detail
    assert "same NEWSLETTER_SECRET_KEY" in wrong_key.fix
    assert untrusted.status == "fail" and "certificate not accepted" in untrusted.detail
    assert no_key.status == "fail" and "NEWSLETTER_SECRET_KEY" in no_key.fix


def _https(port: int, context: ssl.SSLContext) -> http_client.HTTPSConnection:
    class Pinned(http_client.HTTPSConnection):
        def connect(self) -> None:
            raw = socket.create_connection(("127.0.0.1", port), 5)
            self.sock = context.wrap_socket(raw, server_hostname="news.example.org")

    return Pinned("news.example.org", port, context=context, timeout=5)


def test_one_click_to_a_host_without_an_address_fails(
    dns: DnsServer, resolver: Resolver, certs: Certificates
) -> None:
    dns.add("example.org", "TXT", "v=spf1 -all")
    finding = one_click(Site(free_port(), Path()), resolver, certs.client(), TEST_KEY)
    assert finding.status == "fail"
    assert finding.detail == "news.example.org has no address: no A or AAAA record"


# -------------------------------------------------------------------- content


@pytest.mark.parametrize(
    ("key", "status"),
    [
        (None, "fail"),
        ("a" * 40, "fail"),
        ("abc" * 12, "fail"),
        ("abcdefghijklmnopqrstuvwxyz012345", "fail"),  # a run
        ("0123456789abcdef" * 2, "fail"),
        ("aabcdfebdcaefbdcabedfcabdefcbade", "warn"),  # six letters: about 82 bits
        ("3f9a0c1be27d4856a1f03e9cb7d2468e", "pass"),  # token_hex(16)
        (STRONG_SECRET, "pass"),
    ],
)
def test_secret_strength(key: str | None, status: str) -> None:
    finding = secret_strength(key)
    assert finding.status == status, finding
    assert (finding.fix == "") == (status == "pass")


def test_the_latest_issue_is_built_and_its_footer_read(
    project: Path, write_issue: Callable[..., Path]
) -> None:
    data = example_data()
    data["date"] = "2021-01-07"
    write_issue(data, "later.yaml")
    assert latest_issue(project / "issues") == project / "issues" / "later.yaml"
    # next week's draft, still to be written, is not what the mail looks like
    draft = write_issue({**data, "date": "2021-01-14", "subject": "TODO: a subject"}, "d.yaml")
    assert latest_issue(project / "issues") == project / "issues" / "later.yaml"
    alone = project / "drafts-only"
    alone.mkdir()
    draft.rename(alone / draft.name)  # only drafts: the latest of them, which fails
    assert latest_issue(alone) == alone / draft.name

    def inputs(issue: Path) -> BuildInputs:
        return _build_inputs(issue, project)

    size, footer, _ = check_content(project / "issues", inputs, project / "society.yaml", None)
    assert size.status == "pass" and size.title.startswith("Latest issue later.yaml")
    assert footer.status == "pass" and "12 Example Street" in footer.detail
    # a society that gives only its name
    society = yaml.safe_load((project / "society.yaml").read_text(encoding="utf-8"))
    society["address"] = ["The MS Research Society"]
    (project / "society.yaml").write_text(yaml.safe_dump(society), encoding="utf-8")
    _, named_only, _ = check_content(project / "issues", inputs, project / "society.yaml", None)
    assert named_only.status == "warn" and "looks like a name" in named_only.detail
    # an issue too large for Gmail does not build, and the doctor says why
    heavy = ten_article_data()
    heavy["articles"] = heavy["articles"] * 2
    write_issue({**data, "articles": heavy["articles"]}, "later.yaml")
    big, _, _ = check_content(project / "issues", inputs, project / "society.yaml", None)
    assert big.status == "fail" and "Gmail clips" in big.detail, big


def _build_inputs(issue: Path, project: Path) -> BuildInputs:
    return BuildInputs(
        issue_file=issue,
        society_file=project / "society.yaml",
        templates_dir=project / "templates",
        sender=sender(),
        preview_recipient=preview_recipient(),
    )


# ------------------------------------------------------------------------ CLI


def test_the_command_passes_a_good_setup_and_fails_a_broken_one(
    tmp_path: Path, project: Path, dns: DnsServer, certs: Certificates, pem: bytes,
    other_pem: bytes,
) -> None:  # fmt: skip
    key = DkimKey(SELECTOR, "example.org", pem)
    good_zone(dns, key, relay_ip="127.0.0.1")
    (project / "dkim.pem").write_bytes(pem)
    with (
        https_site(tmp_path, certs, STRONG_SECRET.encode()) as site,
        smtp(certs.server("127.0.0.1", "relay.example.net")) as relay,
    ):
        env = {
            "NEWSLETTER_FROM": "MS Research News <news@example.org>",
            "NEWSLETTER_PUBLIC_URL": f"https://news.example.org:{site.port}",
            "NEWSLETTER_SECRET_KEY": STRONG_SECRET,
            "NEWSLETTER_DNS_RESOLVER": dns.address,
            "NEWSLETTER_SMTP_HOST": "relay.example.net",
            "NEWSLETTER_SMTP_PORT": str(relay.port),
            "NEWSLETTER_SMTP_CA_FILE": str(certs.ca_file),
            "NEWSLETTER_DKIM_KEY_FILE": "dkim.pem",
            "NEWSLETTER_DKIM_SELECTOR": SELECTOR,
            "SSL_CERT_FILE": str(certs.ca_file),  # the CAs the one-click check trusts
        }
        table = run_cli("doctor", cwd=project, env=env)
        good = run_cli("doctor", "--json", cwd=project, env=env)
        # The same project broken in most ways at once.
        dns.set("example.org", "TXT", "google-site-verification=abc123")  # no SPF
        dns.set("_dmarc.example.org", "TXT", "v=DMARC1; p=none")
        dns.set("example.org", "MX")
        (project / "dkim.pem").write_bytes(other_pem)  # not the published key
        broken_env = {
            **env,
            "NEWSLETTER_SECRET_KEY": "abc" * 12,
            "NEWSLETTER_SMTP_SECURITY": "none",
        }
        broken = run_cli("doctor", "--json", cwd=project, env=broken_env)
        broken_table = run_cli("doctor", cwd=project, env=broken_env)
        assert site.audience() == EMAILS and site.changes() == (0, 0)
    assert good.returncode == 0, good.stdout + good.stderr
    report = json.loads(good.stdout)
    assert report["ok"] is True
    assert {f["check"]: f["status"] for f in report["findings"]} == {
        "spf.record": "pass", "spf.lookups": "pass", "spf.relay": "pass",
        "dkim.key": "pass", "dkim.record": "pass",
        "dmarc.record": "pass", "dmarc.alignment": "pass",
        "mx.bounce": "pass", "mta_sts": "info", "tls_rpt": "info",
        "relay.tls": "pass", "relay.security": "pass",
        "one_click": "pass",
        "issue.size": "pass", "footer.address": "pass", "secret.strength": "pass",
    }  # fmt: skip
    assert report["counts"] == {"pass": 14, "warn": 0, "fail": 0, "info": 2}
    assert table.returncode == 0, table.stdout + table.stderr
    assert table.stdout.rstrip().endswith("14 pass, 0 warn, 0 fail, 2 info: nothing fails")
    for finding in report["findings"]:
        assert finding["title"] in table.stdout
    assert STRONG_SECRET not in table.stdout + good.stdout  # the secret is never shown

    assert broken.returncode == 1, broken.stdout + broken.stderr
    findings = {f["check"]: f for f in json.loads(broken.stdout)["findings"]}
    assert {c: f["status"] for c, f in findings.items()} == {
        "spf.record": "fail",
        "dkim.key": "pass", "dkim.record": "fail",
        "dmarc.record": "warn", "dmarc.alignment": "pass",
        "mx.bounce": "fail", "mta_sts": "info", "tls_rpt": "info",
        "relay.tls": "pass", "relay.security": "fail",
        "one_click": "fail",
        "issue.size": "pass", "footer.address": "pass", "secret.strength": "fail",
    }  # fmt: skip
    assert "publish a TXT record at example.org" in findings["spf.record"]["fix"]
    assert "another key" in findings["dkim.record"]["detail"]
    assert "answered 404" in findings["one_click"]["detail"]  # serve has the other key
    assert all(f["fix"] for f in findings.values() if f["status"] in ("fail", "warn"))
    assert broken_table.returncode == 1 and "Traceback" not in broken_table.stderr
    assert ": fix what fails" in broken_table.stdout


def test_the_test_link_changes_nothing_however_it_is_opened(
    tmp_path: Path, certs: Certificates
) -> None:
    check = tokens.make(
        TEST_KEY, tokens.Kind.UNSUBSCRIBE, "research-news", tokens.CHECK_ADDRESS, NOW
    )
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answers = []
    with https_site(tmp_path, certs) as site:
        for method, body in (("GET", None), ("POST", b""), ("POST", b"confirm=yes")):
            conn = _https(site.port, certs.client())
            conn.request(method, f"/unsubscribe/{check}", body, form)
            response = conn.getresponse()
            answers.append((response.status, response.read().decode()))
            conn.close()
        assert site.audience() == EMAILS and site.changes() == (0, 0)
    assert answers[0][0] == 200 and "it belongs to nobody and changes nothing" in answers[0][1]
    assert answers[1][0] == 400  # an incomplete request, as for a real link
    assert answers[2] == (200, "One-click unsubscribe works; this check changed nothing.\n")
    assert tokens.is_check(tokens.TokenSubject("research-news", "x@sub.example.INVALID."))
    assert not tokens.is_check(tokens.TokenSubject("research-news", "x@invalid.example.org"))


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("[::1]:5300", ("::1", 5300)),
        ("::1", ("::1", 53)),
    ],
)
def test_the_resolver_setting_takes_an_address_and_port(
    monkeypatch: pytest.MonkeyPatch, value: str, parsed: tuple[str, int]
) -> None:
    from newsletter.settings import load_settings

    monkeypatch.setenv("NEWSLETTER_DNS_RESOLVER", value)
    assert load_settings().dns_resolver_address == parsed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("dns.example.org:53", "is not a resolver's address: give an IP address and port"),
        ("127.0.0.1:0", "the port must be a number from 1 to 65535"),
        ("127.0.0.1:domain", "the port must be a number from 1 to 65535"),
        ("[::1", "is not a resolver's address"),
    ],
)
def test_a_resolver_setting_that_is_no_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    from newsletter.errors import ConfigError
    from newsletter.settings import load_settings

    monkeypatch.setenv("NEWSLETTER_DNS_RESOLVER", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NEWSLETTER_DNS_RESOLVER: " in str(info.value) and expected in str(info.value)


def test_each_relay_of_the_list_is_checked_and_named_by_its_place(
    project: Path, dns: DnsServer, certs: Certificates, pem: bytes
) -> None:
    key = DkimKey(SELECTOR, "example.org", pem)
    good_zone(dns, key, relay_ip="127.0.0.1")
    with smtp(certs.server("127.0.0.1", "relay.example.net")) as relay:
        relays = [
            {"host": "relay.example.net", "port": relay.port, "ca_file": str(certs.ca_file)},
            {"host": "backup.example.net", "port": 2525, "security": "none", "weight": 0},
        ]
        env = {
            "NEWSLETTER_FROM": "MS Research News <news@example.org>",
            "NEWSLETTER_PUBLIC_URL": "https://news.example.org",
            "NEWSLETTER_SECRET_KEY": STRONG_SECRET,
            "NEWSLETTER_DNS_RESOLVER": dns.address,
            "NEWSLETTER_SMTP_RELAYS": json.dumps(relays),
        }
        done = run_cli("doctor", "--json", cwd=project, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    findings = json.loads(done.stdout)["findings"]
    tls = [f for f in findings if f["check"] == "relay.tls"]
    security = [f for f in findings if f["check"] == "relay.security"]
    spf = [f for f in findings if f["check"] == "spf.relay"]
    assert [f["status"] for f in tls] == ["pass", "fail"]
    assert "check NEWSLETTER_SMTP_RELAYS[1].host" in tls[1]["fix"]
    assert [f["status"] for f in security] == ["pass", "fail"]
    assert "NEWSLETTER_SMTP_RELAYS[1].security=none" in security[1]["detail"]
    assert len(spf) == 2 and spf[0]["status"] == "pass" and spf[1]["status"] == "fail"


def test_a_resolver_port_nobody_listens_on_is_said_at_once(key: DkimKey) -> None:
    """An ICMP "port unreachable" ends the wait (a connected probe sees it): nothing is
    looked up, and every finding says why."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    closed = Resolver(("127.0.0.1", port), timeout=30.0)  # a wait nobody should sit out
    findings = check_spf("example.org", ("relay.example.net",), closed)
    reason = f"127.0.0.1:{port} (NEWSLETTER_DNS_RESOLVER) refuses DNS queries"
    assert findings[0].status == "fail" and reason in findings[0].detail


def test_json_is_json_even_when_the_settings_are_not_valid(project: Path) -> None:
    done = run_cli("doctor", "--json", cwd=project,
                   env={"NEWSLETTER_DNS_RESOLVER": "nonsense"})  # fmt: skip
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["findings"] == []
    assert "NEWSLETTER_DNS_RESOLVER" in report["error"] and "NEWSLETTER_DNS_RESOLVER" in done.stderr
