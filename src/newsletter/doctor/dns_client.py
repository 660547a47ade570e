"""DNS for the doctor: TXT, MX and address look-ups through dnspython, never raising.

Input: the resolver to ask (an address and port, NEWSLETTER_DNS_RESOLVER; or the
system's, /etc/resolv.conf), a timeout, and names. Output: an :class:`Answer` per
look-up: the records, whether the name does not exist, or why no answer came. This
is the one module that imports dnspython; its exceptions end here.

Answers are kept for the run (SPF, DMARC and MX ask about the same domains). A
resolver that let one query time out is taken as down for the rest of the run:
every other check would wait as long, for the same outcome.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

DEFAULT_TIMEOUT = 4.0  # seconds for one look-up, retries included


@dataclass(frozen=True, slots=True)
class Answer:
    name: str
    records: tuple[str, ...] = ()
    nxdomain: bool = False  # the name does not exist at all
    error: str | None = None  # no answer came: why

    @property
    def void(self) -> bool:
        """An answer, and an empty one (RFC 7208 4.6.4's void look-up)."""
        return self.error is None and not self.records


class Resolver:
    """Look-ups through one DNS server (or the system's), each answer kept for the run."""

    def __init__(self, server: tuple[str, int] | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.server = server
        self._down: str | None = None
        self._cache: dict[tuple[str, str], Answer] = {}
        try:
            self._resolver = dns.resolver.Resolver(configure=server is None)
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf, or an empty one
            self._resolver = dns.resolver.Resolver(configure=False)
            self._down = f"the system has no usable resolver ({exc}); set NEWSLETTER_DNS_RESOLVER"
        if server is not None:
            # The port first: dnspython fixes each server's port when it is assigned.
            self._resolver.port = server[1]
            self._resolver.nameservers = [server[0]]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._probed = False

    def _refused(self) -> str | None:
        """Why the server refuses queries outright, or None. A UDP port nobody listens on
        answers with an ICMP error that only a connected socket sees; dnspython's would
        wait out the whole timeout for it."""
        assert self.server is not None
        host, port = self.server
        query = dns.message.make_query(".", "NS").to_wire()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.settimeout(min(self._resolver.lifetime, 2.0))
            try:
                probe.connect((host, port))
                probe.send(query)
                probe.recv(4096)
            except ConnectionRefusedError:
                return f"{self.description} refuses DNS queries: nothing answers on that port"
            except OSError:
                return None  # a timeout or the like: the look-ups themselves will say
        return None

    @property
    def description(self) -> str:
        if self.server is None:
            return "the system's resolver"
        host, port = self.server
        return f"{f'[{host}]' if ':' in host else host}:{port} (NEWSLETTER_DNS_RESOLVER)"

    def txt(self, name: str) -> Answer:
        """The TXT records of ``name``, each record's strings joined (RFC 7208 3.3)."""
        return self._lookup(name, "TXT")

    def mx(self, name: str) -> Answer:
        """The MX hosts of ``name``, by preference; a null MX (RFC 7505) is ``"."``."""
        return self._lookup(name, "MX")

    def addresses(self, name: str) -> Answer:
        """The IPv4 and IPv6 addresses of ``name`` (an address literal is its own)."""
        try:
            return Answer(name, (str(ipaddress.ip_address(name)),))
        except ValueError:
            pass
        v4, v6 = self._lookup(name, "A"), self._lookup(name, "AAAA")
        records = v4.records + v6.records
        if records:
            return Answer(name, records)
        # Either failing means the addresses are not known; both empty means none.
        return Answer(name, (), nxdomain=v4.nxdomain, error=v4.error or v6.error)

    def _lookup(self, name: str, rdtype: str) -> Answer:
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._cache:
            self._cache[key] = self._ask(name, rdtype)
        return self._cache[key]

    def _ask(self, name: str, rdtype: str) -> Answer:
        if self._down is None and self.server is not None and not self._probed:
            self._probed = True
            self._down = self._refused()
        if self._down is not None:
            return Answer(name, error=self._down)
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".")
            answer = self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Answer(name, nxdomain=True)
        except dns.exception.Timeout:
            self._down = f"{self.description} did not answer within {self._resolver.lifetime:g} s"
            return Answer(name, error=self._down)
        except dns.resolver.NoNameservers:
            return Answer(name, error=f"{self.description} answered with an error (SERVFAIL)")
        except dns.exception.DNSException as exc:
            return Answer(name, error=f"{rdtype} {name}: {exc}")
        if answer.rrset is None:
            return Answer(name)
        return Answer(name, tuple(_text(rdata) for rdata in _ordered(answer.rrset, rdtype)))


def _ordered(rrset: dns.rrset.RRset, rdtype: str) -> list[dns.rdata.Rdata]:
    if rdtype == "MX":
        return sorted(rrset, key=lambda r: (r.preference, str(r.exchange)))
    return list(rrset)


def _text(rdata: dns.rdata.Rdata) -> str:
    if isinstance(rdata, TXT):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if isinstance(rdata, MX):
        return rdata.exchange.to_text(omit_final_dot=True) or "."  # the root: a null MX
    if isinstance(rdata, A | AAAA):
        return str(rdata.address)
    return rdata.to_text()
