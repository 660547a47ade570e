"""A real authoritative DNS server for the tests: dnslib on 127.0.0.1, UDP and TCP on one
port chosen by the OS.

A test writes its zone as records, ``server.add("example.org", "TXT", "v=spf1 -all")``,
and may change it at any time. The answers are authoritative: a name that holds no
record and has none under it is NXDOMAIN, a name with records of other types answers
NODATA. A UDP answer over 512 bytes is truncated (TC), as real servers do for a client
without EDNS room, so the client asks again over TCP. Names in ``silent`` are never
answered (the client times out). Every query is kept, with its protocol.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


@dataclass(frozen=True)
class Query:
    protocol: str  # "udp" or "tcp"
    name: str
    qtype: str


@dataclass
class _Zone:
    records: dict[str, list[tuple[str, object]]] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    queries: list[Query] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _rdata(rtype: str, value: object) -> object:
    if rtype == "TXT":
        text = str(value).encode()
        # One record of several strings of at most 255 bytes (RFC 1035 3.3.14).
        return TXT([text[i : i + 255] for i in range(0, len(text), 255)] or [b""])
    if rtype == "A":
        return A(str(value))
    if rtype == "AAAA":
        return AAAA(str(value))
    if rtype == "MX":
        preference, host = value  # type: ignore[misc]
        return MX(host, preference)
    raise ValueError(rtype)


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: _Zone) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.zone.lock:
            self.zone.queries.append(Query(handler.protocol, name, qtype))
            silent = any(name == s or name.endswith("." + s) for s in self.zone.silent)
            records = list(self.zone.records.get(name, []))
            below = any(n.endswith("." + name) for n in self.zone.records)
        if silent:
            raise DNSError("silent on purpose")  # the handler sends nothing
        reply = request.reply()
        reply.header.aa = 1
        if not records and not below:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rtype, value in records:
            if rtype == qtype:
                reply.add_answer(
                    RR(name, getattr(QTYPE, rtype), rdata=_rdata(rtype, value), ttl=60)
                )
        return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        packed: bytes = self.server.resolver.resolve(request, self).pack()
        if self.protocol == "udp" and len(packed) > 512:
            # Truncated (TC), the question kept (dnslib's truncate() drops it, and a
            # client then ignores the answer): the client must come back over TCP.
            cut = request.reply()
            cut.header.aa = 1
            cut.header.tc = 1
            packed = cut.pack()
        return packed


class DnsServer:
    """``DnsServer().start()``; ``port`` answers UDP and TCP on 127.0.0.1."""

    def __init__(self) -> None:
        self.zone = _Zone()
        self.port = 0
        self._servers: list[DNSServer] = []

    def add(self, name: str, rtype: str, value: object) -> DnsServer:
        with self.zone.lock:
            self.zone.records.setdefault(name.lower(), []).append((rtype, value))
        return self

    def set(self, name: str, rtype: str, *values: object) -> DnsServer:
        """``name``'s records of ``rtype`` are ``values`` now (none: removed)."""
        with self.zone.lock:
            kept = [r for r in self.zone.records.get(name.lower(), []) if r[0] != rtype]
            self.zone.records[name.lower()] = kept + [(rtype, v) for v in values]
        return self

    def add_all(self, records: Iterable[tuple[str, str, object]]) -> DnsServer:
        for name, rtype, value in records:
            self.add(name, rtype, value)
        return self

    def clear(self) -> None:
        with self.zone.lock:
            self.zone.records.clear()
            self.zone.silent.clear()
            self.zone.queries.clear()

    def silence(self, name: str) -> None:
        with self.zone.lock:
            self.zone.silent.add(name.lower())

    @property
    def queries(self) -> list[Query]:
        with self.zone.lock:
            return list(self.zone.queries)

    def start(self) -> DnsServer:
        quiet = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda *_: None)
        resolver = _Resolver(self.zone)
        for _ in range(20):  # the UDP port the OS picks may be taken for TCP
            udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=quiet, handler=_Handler)
            port = udp.server.socket.getsockname()[1]
            try:
                tcp = DNSServer(
                    resolver, address="127.0.0.1", port=port, tcp=True, logger=quiet,
                    handler=_Handler,
                )  # fmt: skip
            except OSError:
                udp.server.server_close()
                continue
            self._servers = [udp, tcp]
            self.port = port
            for server in self._servers:
                # A short poll: stop() waits for it (the default half second, twice).
                threading.Thread(
                    target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
                ).start()
            return self
        raise OSError("no port free for both UDP and TCP on 127.0.0.1")

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
