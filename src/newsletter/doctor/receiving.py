"""Receiving stage: can mail come back to the society's domains → findings.

Input: the bounce domain, the From domain, a
:class:`~newsletter.doctor.dns_client.Resolver`. Output: ``mx.bounce`` (the bounce
domain has MX hosts, so bounces and complaints reach it; a null MX refuses them),
and, as information only, ``mta_sts`` (``_mta-sts.<From domain>``, RFC 8461) and
``tls_rpt`` (``_smtp._tls.<From domain>``, RFC 8460): they protect and report on
mail *to* the society, and no mailbox provider requires them of a sender.
"""

from __future__ import annotations

from newsletter.doctor.dkim import tags
from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding

_AGAIN = "check NEWSLETTER_DNS_RESOLVER (or the network) and run the doctor again"


def check_receiving(bounce_domain: str, from_domain: str, resolver: Resolver) -> list[Finding]:
    return [
        _mx(bounce_domain, resolver),
        _info(
            "mta_sts", f"MTA-STS of {from_domain}", f"_mta-sts.{from_domain}", "STSv1",
            "senders to you may be made to use TLS: publish an MTA-STS policy (RFC 8461) "
            "if you like",
            resolver,
        ),
        _info(
            "tls_rpt", f"TLS-RPT of {from_domain}", f"_smtp._tls.{from_domain}", "TLSRPTv1",
            'reports of TLS failures towards you: publish "v=TLSRPTv1; rua=mailto:..." '
            "(RFC 8460) if you like",
            resolver,
        ),
    ]  # fmt: skip


def _mx(domain: str, resolver: Resolver) -> Finding:
    title = f"MX of the bounce domain {domain}"
    answer = resolver.mx(domain)
    if answer.error is not None:
        return Finding("mx.bounce", title, "fail", f"could not be checked: {answer.error}", _AGAIN)
    if answer.records == (".",):
        return Finding(
            "mx.bounce", title, "fail",
            f"{domain} has a null MX (RFC 7505): it accepts no mail, so bounces are lost and "
            "some receivers refuse mail from it",
            "give the bounce domain a mailbox (MX), or set NEWSLETTER_BOUNCE_ADDRESS to an "
            "address that receives mail",
        )  # fmt: skip
    if answer.records:
        return Finding("mx.bounce", title, "pass", f"mail to {domain} goes to "
                       + ", ".join(h for h in answer.records if h != "."))  # fmt: skip
    fix = (
        f"publish an MX record for {domain} (its mail host), or set NEWSLETTER_BOUNCE_ADDRESS "
        "to an address at a domain that receives mail"
    )
    if answer.nxdomain:
        return Finding(
            "mx.bounce", title, "fail", f"{domain} does not exist in DNS: bounces are lost", fix
        )
    addresses = resolver.addresses(domain)
    if addresses.records:
        return Finding(
            "mx.bounce", title, "warn",
            f"no MX record: mail falls back to {domain}'s own address (RFC 5321 5.1), which "
            "many receivers do not accept as a sender's",
            fix,
        )  # fmt: skip
    return Finding(
        "mx.bounce", title, "fail",
        f"no MX record: bounces to {domain} cannot come back, and receivers refuse senders "
        "whose domain takes no mail",
        fix,
    )  # fmt: skip


def _info(
    check: str, title: str, name: str, version: str, absent: str, resolver: Resolver
) -> Finding:
    answer = resolver.txt(name)
    if answer.error is not None:
        return Finding(check, title, "info", f"could not be looked up: {answer.error}")
    records = [r for r in answer.records if tags(r).get("v") == version]
    if not records:
        return Finding(check, title, "info", f"not published at {name} (optional)", absent)
    return Finding(check, title, "info", f"published at {name}: {records[0]!r}")
