"""DMARC stage: the From domain's DMARC record and its alignment → findings.

Input: the From domain, the bounce (envelope sender) domain, the DKIM signing domain
(d=, or None without DKIM), a :class:`~newsletter.doctor.dns_client.Resolver`.
Output: ``dmarc.record`` (present, one, with a policy; p=none warns) and
``dmarc.alignment`` (the From domain aligned with d= or the bounce domain, RFC 7489
3.1: relaxed unless the record asks adkim=s or aspf=s).

The organisational domain (for the fallback look-up and relaxed alignment) is found
by a small rule, not the Public Suffix List: the last two labels, or the last three
when the last two are a known second-level registry suffix (co.uk, org.au, ...).
"""

from __future__ import annotations

from newsletter.doctor.dkim import tags
from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding

# Second-level suffixes under which registrations are made (a small part of the PSL).
_SECOND_LEVEL = frozenset(
    f"{second}.{top}"
    for top, seconds in {
        "uk": "co org ac gov me ltd plc net nhs sch police",
        "au": "com org net edu gov asn id",
        "nz": "co org net ac govt school geek gen kiwi maori",
        "jp": "co or ne ac go",
        "za": "co org net ac gov",
        "br": "com org net gov edu",
        "in": "co org net ac gov res",
        "il": "co org net ac gov",
        "kr": "co or ne ac go",
        "mx": "com org net gob edu",
        "ar": "com org net gob edu",
        "tr": "com org net gov edu",
        "cn": "com org net gov edu ac",
        "hk": "com org net gov edu",
        "sg": "com org net gov edu",
    }.items()
    for second in seconds.split()
)


def organisational_domain(domain: str) -> str:
    """``news.example.org`` → ``example.org``; ``mail.example.org.uk`` → ``example.org.uk``."""
    labels = domain.lower().rstrip(".").split(".")
    keep = 3 if ".".join(labels[-2:]) in _SECOND_LEVEL else 2
    return ".".join(labels[-keep:])


def check_dmarc(
    from_domain: str, bounce_domain: str, dkim_domain: str | None, resolver: Resolver
) -> list[Finding]:
    from_domain, bounce_domain = from_domain.lower(), bounce_domain.lower()
    record, where, problem = _find(from_domain, resolver)
    found = tags(record) if record else {}
    findings = [_policy(from_domain, record, where, problem, found)]
    findings.append(_alignment(from_domain, bounce_domain, dkim_domain, found))
    return findings


def _find(from_domain: str, resolver: Resolver) -> tuple[str | None, str, str | None]:
    """The record that applies (RFC 7489 6.6.3: the From domain's, else the
    organisational domain's), where it was found, or why it could not be looked up."""
    candidates = [f"_dmarc.{from_domain}"]
    org = organisational_domain(from_domain)
    if org != from_domain:
        candidates.append(f"_dmarc.{org}")
    for name in candidates:
        answer = resolver.txt(name)
        if answer.error is not None:
            return None, name, f"could not be checked: {answer.error}"
        records = [r for r in answer.records if r.replace(" ", "").startswith("v=DMARC1")]
        if len(records) > 1:
            return None, name, f"{name} has {len(records)} DMARC records; receivers use none"
        if records:
            return records[0], name, None
    return None, candidates[-1], None


def _policy(
    domain: str, record: str | None, where: str, problem: str | None, found: dict[str, str]
) -> Finding:
    title = f"DMARC policy of {domain}"
    example = f'publish TXT _dmarc.{domain} "v=DMARC1; p=none; rua=mailto:dmarc@{domain}"'
    if problem is not None:
        fix = (
            "check NEWSLETTER_DNS_RESOLVER (or the network) and run the doctor again"
            if problem.startswith("could not")
            else "keep one record"
        )
        return Finding("dmarc.record", title, "fail", problem, fix)
    if record is None:
        return Finding(
            "dmarc.record", title, "fail",
            f"no DMARC record at _dmarc.{domain} (nor the organisational domain's): Gmail and "
            "Yahoo require one from bulk senders",
            f"{example}, then move to p=quarantine once the reports are clean",
        )  # fmt: skip
    policy = found.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return Finding(
            "dmarc.record", title, "fail",
            f"{record!r} at {where} has no valid p= (none, quarantine or reject)",
            example,
        )  # fmt: skip
    pct = found.get("pct", "100")
    share = f", applied to {pct}% of mail" if pct != "100" else ""
    if policy == "none":
        return Finding(
            "dmarc.record", title, "warn",
            f"p=none at {where}{share}: receivers are asked to act on nothing, so mail "
            "forged in your name is delivered too",
            "once the aggregate reports (rua=) show only your own mail, move to "
            "p=quarantine, then p=reject",
        )  # fmt: skip
    return Finding("dmarc.record", title, "pass", f"p={policy} at {where}{share}")


def _alignment(
    from_domain: str, bounce_domain: str, dkim_domain: str | None, found: dict[str, str]
) -> Finding:
    strict_dkim = found.get("adkim", "r").lower() == "s"
    strict_spf = found.get("aspf", "r").lower() == "s"
    ways = []
    if dkim_domain is not None and _aligned(dkim_domain, from_domain, strict_dkim):
        ways.append(f"DKIM d={dkim_domain}")
    if _aligned(bounce_domain, from_domain, strict_spf):
        ways.append(f"the bounce domain {bounce_domain} (SPF)")
    mode = ", ".join(
        f"{what} {'strict' if strict else 'relaxed'}"
        for what, strict in (("DKIM", strict_dkim), ("SPF", strict_spf))
    )
    title = f"From domain {from_domain} aligned (DMARC)"
    if ways:
        return Finding(
            "dmarc.alignment", title, "pass", f"aligned through {' and '.join(ways)} ({mode})"
        )
    signed = f"DKIM d={dkim_domain}" if dkim_domain else "no DKIM signature"
    return Finding(
        "dmarc.alignment", title, "fail",
        f"neither {signed} nor the bounce domain {bounce_domain} matches {from_domain} "
        f"({mode}): DMARC fails for every message",
        f"set NEWSLETTER_DKIM_DOMAIN to {organisational_domain(from_domain)} (or sign "
        f"with a key of {from_domain}), or NEWSLETTER_BOUNCE_ADDRESS to an address at "
        f"{from_domain}",
    )  # fmt: skip


def _aligned(domain: str, from_domain: str, strict: bool) -> bool:
    domain = domain.lower().rstrip(".")
    if strict:
        return domain == from_domain
    return organisational_domain(domain) == organisational_domain(from_domain)
