"""SPF stage: the bounce domain's SPF record → findings on the record, its DNS
look-ups, and whether it authorises the relay.

Input: the bounce domain (the envelope sender's: SPF checks MAIL FROM, RFC 7208 2.2),
the relay's host name, a :class:`~newsletter.doctor.dns_client.Resolver`. Output:
the findings ``spf.record``, ``spf.lookups`` and ``spf.relay``.

The record's whole tree (``include:``, ``redirect=``) is fetched once, and every DNS
look-up it can cost is counted (RFC 7208 4.6.4: ``include``, ``a``, ``mx``, ``ptr``,
``exists`` and ``redirect``; more than 10 is a permanent error, and so are more than
2 that find nothing). The count is over the whole tree, not one address's path: a
receiver's path depends on the address, and a tree over the limit fails for some.
Each of the relay's addresses is then evaluated against the tree (check_host, 4.6):
the first mechanism that matches decides. Macros (``%{i}``) are not expanded and
``ptr`` is not followed: such a mechanism is counted, and an address that reaches it
is reported as not evaluated.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding

MAX_LOOKUPS = 10  # RFC 7208 4.6.4
MAX_VOID = 2
_WALK_LIMIT = 40  # look-ups fetched before giving up on a tree (a loop, a huge one)
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_RESULT = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class _Mechanism:
    qualifier: str
    kind: str
    text: str
    networks: list[Network] = field(default_factory=list)  # ip4, ip6; a and mx once looked up
    child: _Record | None = None  # include's record
    exists: bool = False  # exists: the name has an A record
    unknown: str | None = None  # why it cannot be evaluated here


@dataclass
class _Record:
    domain: str
    text: str
    mechanisms: list[_Mechanism] = field(default_factory=list)
    redirect: _Record | None = None
    redirect_failed: bool = False


@dataclass
class _Tree:
    """What fetching a record and all it refers to found."""

    root: _Record | None = None
    lookups: int = 0
    void: int = 0
    problems: list[str] = field(default_factory=list)  # permanent errors
    notes: list[str] = field(default_factory=list)  # deprecated or unevaluated parts
    unreachable: str | None = None  # the record itself could not be fetched: why
    records_found: int = 0  # v=spf1 records at the domain itself


def check_spf(domain: str, relay_hosts: tuple[str, ...], resolver: Resolver) -> list[Finding]:
    """The findings on ``domain``'s SPF record and on each relay of ``relay_hosts``."""
    tree = _fetch_tree(domain, resolver)
    title = f"SPF record of {domain}"
    relays = [(host, resolver.addresses(host)) for host in dict.fromkeys(relay_hosts)]
    example = _suggested(tuple(a for _, found in relays for a in found.records))
    if tree.unreachable is not None:
        return [
            Finding(
                "spf.record", title, "fail", f"could not be checked: {tree.unreachable}",
                "check NEWSLETTER_DNS_RESOLVER (or the network) and run the doctor again",
            )
        ]  # fmt: skip
    if tree.records_found == 0:
        return [
            Finding(
                "spf.record", title, "fail",
                f"{domain} (the bounce domain) publishes no SPF record: receivers cannot "
                "tell the relay may send for it",
                f"publish a TXT record at {domain}: {example}",
            )
        ]  # fmt: skip
    if tree.records_found > 1:
        return [
            Finding(
                "spf.record", title, "fail",
                f"{domain} publishes {tree.records_found} SPF records: receivers treat that "
                "as an error and SPF fails (RFC 7208 3.2)",
                "merge them into one TXT record starting v=spf1",
            )
        ]  # fmt: skip
    assert tree.root is not None
    findings = [_record_finding(tree, tree.root, title), _lookups_finding(tree)]
    for host, found in relays:
        findings.append(_relay_finding(tree.root, host, found.records, found.error, tree))
    return findings


def _suggested(addresses: tuple[str, ...]) -> str:
    mechanisms = " ".join(
        f"ip{ipaddress.ip_address(a).version}:{a}"
        for a in addresses
        if not ipaddress.ip_address(a).is_loopback
    )
    fallback = "include:<your provider's SPF domain>"
    return f"v=spf1 {mechanisms or fallback} -all (your relay provider says what to include)"


def _record_finding(tree: _Tree, root: _Record, title: str) -> Finding:
    if tree.problems:
        return Finding(
            "spf.record", title, "fail",
            f"{root.text!r} is broken, so SPF fails for every message: {'; '.join(tree.problems)}",
            "correct the record (or the record it includes) as said",
        )  # fmt: skip
    last = _ending(root)
    if last in ("+", ""):
        return Finding(
            "spf.record", title, "fail",
            f"{root.text!r} ends in {'+all' if last else 'all'}: every server in the world "
            "passes SPF for this domain, and receivers distrust it",
            "end the record with -all (or ~all) instead",
        )  # fmt: skip
    notes = f" ({'; '.join(tree.notes)})" if tree.notes else ""
    if last in ("?", None):
        return Finding(
            "spf.record", title, "warn",
            f"{root.text!r} ends without -all or ~all: other servers are neutral, not "
            f"refused{notes}",
            "end the record with ~all or -all",
        )  # fmt: skip
    return Finding("spf.record", title, "pass", f"{root.text!r}{notes}")


def _ending(record: _Record) -> str | None:
    """The qualifier of ``all`` where the record (or its redirect) ends; None without one."""
    for m in record.mechanisms:
        if m.kind == "all":
            return m.qualifier if m.text[0] in "+-~?" else ""
    if record.redirect is not None:
        return _ending(record.redirect)
    return None


def _lookups_finding(tree: _Tree) -> Finding:
    title = f"SPF DNS look-ups (at most {MAX_LOOKUPS})"
    detail = f"{tree.lookups} look-up(s), {tree.void} of them finding nothing"
    if tree.lookups > MAX_LOOKUPS:
        more = "+" if tree.lookups >= _WALK_LIMIT else ""
        return Finding(
            "spf.lookups", title, "fail",
            f"{tree.lookups}{more} DNS look-ups: over the limit of {MAX_LOOKUPS}, receivers "
            "stop with a permanent error and SPF fails (RFC 7208 4.6.4)",
            "remove include:s you no longer use, or replace some with their ip4:/ip6: ranges",
        )  # fmt: skip
    if tree.void > MAX_VOID:
        return Finding(
            "spf.lookups", title, "fail",
            f"{detail}: more than {MAX_VOID} that find nothing is a permanent error "
            "(RFC 7208 4.6.4)",
            "remove the mechanisms that name domains without records",
        )  # fmt: skip
    return Finding("spf.lookups", title, "pass", detail)


def _relay_finding(
    root: _Record, host: str, addresses: tuple[str, ...], error: str | None, tree: _Tree
) -> Finding:
    title = f"SPF authorises the relay {host}"
    if error is not None or not addresses:
        return Finding(
            "spf.relay", title, "fail",
            f"the relay's addresses are not known: {error or f'{host} has none'}",
            "check NEWSLETTER_SMTP_HOST",
        )  # fmt: skip
    if tree.problems:
        return Finding(
            "spf.relay", title, "fail", "not evaluated: the record is broken (above)",
            "correct the SPF record first",
        )  # fmt: skip
    results = [(a, *_evaluate(root, ipaddress.ip_address(a), 0)) for a in addresses]
    failing = [(a, result, why) for a, result, why in results if result != "pass"]
    said = "; ".join(f"{a}: {result} ({why})" for a, result, why in results)
    if not failing:
        return Finding(
            "spf.relay", title, "pass",
            f"{said}. (The relay's own addresses: a provider that sends from other "
            "servers is covered by its include:.)",
        )  # fmt: skip
    local = all(ipaddress.ip_address(a).is_loopback for a, _, _ in failing)
    add = " ".join(f"ip{ipaddress.ip_address(a).version}:{a}" for a, _, _ in failing if not local)
    return Finding(
        "spf.relay", title, "warn" if local else "fail",
        said + (
            ": a relay on this machine sends on from its own public address, which "
            "the doctor cannot see; make sure SPF covers that one" if local else
            ": receivers will not see mail from the relay as the bounce domain's"
        ),
        f"add {add} (or your provider's include:) to the SPF record" if add else
        "authorise the address the relay sends from in the SPF record",
    )  # fmt: skip


# ----------------------------------------------------------------- evaluating


def _evaluate(record: _Record, ip: Address, depth: int) -> tuple[str, str]:
    """check_host() for ``ip`` over the fetched tree: (result, what decided it)."""
    if depth > 12:
        return "permerror", "includes too deep"
    for m in record.mechanisms:
        where = f"{m.text} in {record.domain}"
        if m.kind == "include":
            if m.child is None:
                return "permerror", f"{where}: no record"
            result, why = _evaluate(m.child, ip, depth + 1)
            if result in ("permerror", "not evaluated"):
                return result, why
            if result == "pass":
                return _RESULT[m.qualifier], f"{where}, by {why}"
            continue
        if m.unknown is not None:
            return "not evaluated", f"{where}: {m.unknown}"
        if m.kind == "all" or (m.kind == "exists" and m.exists):
            return _RESULT[m.qualifier], where
        if any(ip in net for net in m.networks if net.version == ip.version):
            return _RESULT[m.qualifier], where
    if record.redirect is not None:
        return _evaluate(record.redirect, ip, depth + 1)
    if record.redirect_failed:
        return "permerror", f"redirect= in {record.domain}: no record"
    return "neutral", f"nothing in {record.domain} matched"


# ------------------------------------------------------------------- fetching


def _fetch_tree(domain: str, resolver: Resolver) -> _Tree:
    tree = _Tree()
    answer = resolver.txt(domain)
    if answer.error is not None:
        tree.unreachable = answer.error
        return tree
    found = [r for r in answer.records if _is_spf(r)]
    tree.records_found = len(found)
    if len(found) == 1:
        tree.root = _parse(domain, found[0], tree, resolver, (domain.lower(),))
    return tree


def _is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def _child(domain: str, tree: _Tree, resolver: Resolver, path: tuple[str, ...]) -> _Record | None:
    """The record ``include:`` or ``redirect=`` names (one DNS look-up, counted)."""
    tree.lookups += 1
    if domain.lower() in path:
        tree.problems.append(f"{domain} includes itself (a loop)")
        return None
    if tree.lookups > _WALK_LIMIT:
        return None
    answer = resolver.txt(domain)
    if answer.error is not None:
        tree.problems.append(f"{domain}: {answer.error}")
        return None
    found = [r for r in answer.records if _is_spf(r)]
    if not found:
        tree.void += answer.void or answer.nxdomain
        tree.problems.append(f"{domain} (included) has no SPF record")
        return None
    if len(found) > 1:
        tree.problems.append(f"{domain} (included) has {len(found)} SPF records")
        return None
    return _parse(domain, found[0], tree, resolver, (*path, domain.lower()))


def _parse(
    domain: str, text: str, tree: _Tree, resolver: Resolver, path: tuple[str, ...]
) -> _Record:
    record = _Record(domain, text)
    redirect: str | None = None
    for term in text.split()[1:]:
        modifier = _MODIFIER.fullmatch(term)
        if modifier:
            if modifier.group(1).lower() == "redirect":
                redirect = modifier.group(2)
            continue
        mechanism = _mechanism(term, domain, tree, resolver, path)
        if mechanism is None:
            tree.problems.append(f"{term!r} in {domain} is not an SPF mechanism")
            continue
        record.mechanisms.append(mechanism)
    # RFC 7208 6.1: redirect= is ignored when the record has an "all".
    if redirect is not None and not any(m.kind == "all" for m in record.mechanisms):
        if "%" in redirect:
            tree.lookups += 1
            tree.notes.append(f"redirect={redirect} has a macro, not evaluated")
        else:
            record.redirect = _child(redirect, tree, resolver, path)
            record.redirect_failed = record.redirect is None
    return record


def _mechanism(
    term: str, domain: str, tree: _Tree, resolver: Resolver, path: tuple[str, ...]
) -> _Mechanism | None:
    qualifier = term[0] if term[0] in "+-~?" else "+"
    body = term[1:] if term[0] in "+-~?" else term
    kind = re.split(r"[:/]", body, maxsplit=1)[0].lower()
    if kind not in _MECHANISMS:
        return None
    rest = body[len(kind) :]
    m = _Mechanism(qualifier, kind, term)
    if kind == "all":
        return m if not rest else None
    if kind in ("ip4", "ip6"):
        try:
            network = ipaddress.ip_network(rest.removeprefix(":"), strict=False)
        except ValueError:
            return None
        if not rest.startswith(":") or network.version != int(kind[2]):
            return None
        m.networks.append(network)
        return m
    target, v4, v6 = _target(rest, domain)
    if target is None or (kind == "include" and (v4, v6, rest[:1]) != (None, None, ":")):
        return None
    if "%" in target:
        tree.lookups += 1
        m.unknown = "it has a macro, which the doctor does not expand"
        tree.notes.append(f"{term} has a macro, not evaluated")
        return m
    if kind == "include":
        m.child = _child(target, tree, resolver, path)  # counts its look-up
        return m
    tree.lookups += 1
    if kind == "ptr":
        m.unknown = "ptr is not followed (it is deprecated, RFC 7208 5.5)"
        tree.notes.append("ptr is deprecated (RFC 7208 5.5): use ip4:, ip6: or a:")
    elif kind == "exists":
        answer = resolver.addresses(target)
        _note_void(answer.void or answer.nxdomain, tree)
        m.exists = any(ipaddress.ip_address(a).version == 4 for a in answer.records)
        m.unknown = answer.error
    else:
        m.networks, m.unknown = _hosts(kind, target, v4, v6, tree, resolver)
    return m


def _note_void(void: bool, tree: _Tree) -> None:
    tree.void += void


def _hosts(
    kind: str, target: str, v4: int | None, v6: int | None, tree: _Tree, resolver: Resolver
) -> tuple[list[Network], str | None]:
    """The networks an ``a`` or ``mx`` mechanism stands for."""
    if tree.lookups > _WALK_LIMIT:
        return [], "not looked up (too many look-ups)"
    names = [target]
    if kind == "mx":
        answer = resolver.mx(target)
        if answer.error is not None:
            return [], answer.error
        _note_void(answer.void or answer.nxdomain, tree)
        names = [n for n in answer.records if n != "."]
        if len(names) > 10:
            tree.problems.append(f"mx:{target} has {len(names)} MX hosts, over 10 (RFC 7208 4.6.4)")
            names = names[:10]
    networks: list[Network] = []
    for name in names:
        answer = resolver.addresses(name)
        if answer.error is not None:
            return networks, answer.error
        if kind == "a":
            _note_void(answer.void or answer.nxdomain, tree)
        for address in answer.records:
            ip = ipaddress.ip_address(address)
            prefix = (v4 if ip.version == 4 else v6) or ip.max_prefixlen
            networks.append(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
    return networks, None


def _target(rest: str, domain: str) -> tuple[str | None, int | None, int | None]:
    """``:domain/24//64`` → (domain, 24, 64); the current domain when none is given."""
    name, slash, cidr = rest.partition("/")
    if name and not name.startswith(":"):
        return None, None, None
    target = name[1:] if name else domain
    if not target:
        return None, None, None
    v4 = v6 = None
    if slash:
        left, double, right = ("/" + cidr).partition("//")
        try:
            v4 = int(left[1:]) if left else None
            v6 = int(right) if double else None
        except ValueError:
            return None, None, None
        if (v4 is not None and not 0 <= v4 <= 32) or (v6 is not None and not 0 <= v6 <= 128):
            return None, None, None
    return target, v4, v6
