"""DKIM stage: the configured signing key and the record published for it → findings.

Input: the loaded :class:`~newsletter.delivery.dkim_sign.DkimKey` (or why there is
none: not configured, or the file is unusable) and a
:class:`~newsletter.doctor.dns_client.Resolver`. Output: ``dkim.key`` (configured,
RSA, at least 2048 bits) and ``dkim.record`` (the TXT at
``<selector>._domainkey.<domain>`` exists, is DKIM1 for RSA, not revoked, and its p=
is the public half of the private key: otherwise every signature fails).
"""

from __future__ import annotations

import re

from newsletter.delivery import dkim_sign
from newsletter.doctor.dns_client import Resolver
from newsletter.doctor.findings import Finding

_TAG = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")


def tags(record: str) -> dict[str, str]:
    """A DKIM or DMARC record's tags (RFC 6376 3.2: ``tag=value`` separated by ';')."""
    found: dict[str, str] = {}
    for part in record.split(";"):
        match = _TAG.fullmatch(part)
        if match:
            found.setdefault(match.group(1).lower(), match.group(2))
    return found


def check_dkim(
    key: dkim_sign.DkimKey | None, problem: str | None, resolver: Resolver
) -> list[Finding]:
    """``problem``: why there is no key (None and no key: DKIM is not configured)."""
    if key is None:
        return [_no_key(problem)]
    name = f"{key.selector}._domainkey.{key.domain}"
    findings = [
        Finding(
            "dkim.key", "DKIM signing key", "warn",
            f"{key.bits}-bit RSA (selector {key.selector}, d={key.domain}): receivers "
            f"recommend {dkim_sign.GOOD_BITS} bits",
            f"make a {dkim_sign.GOOD_BITS}-bit key (openssl genrsa -out dkim.pem 2048), "
            "publish it under a new selector, then switch NEWSLETTER_DKIM_KEY_FILE and "
            "NEWSLETTER_DKIM_SELECTOR",
        ) if key.weak else Finding(
            "dkim.key", "DKIM signing key", "pass",
            f"{key.bits}-bit RSA, selector {key.selector}, d={key.domain}",
        )
    ]  # fmt: skip
    findings.append(_record(key, name, resolver))
    return findings


def _no_key(problem: str | None) -> Finding:
    if problem is not None:
        return Finding(
            "dkim.key", "DKIM signing key", "fail", problem,
            "fix NEWSLETTER_DKIM_KEY_FILE (an RSA key in PEM) as said",
        )  # fmt: skip
    return Finding(
        "dkim.key", "DKIM signing key", "fail",
        "no DKIM key is configured: Gmail and Yahoo require bulk mail to be DKIM-signed",
        "make a key (openssl genrsa -out dkim.pem 2048), set NEWSLETTER_DKIM_KEY_FILE and "
        "NEWSLETTER_DKIM_SELECTOR, and publish its public key (the doctor then prints the "
        "record); or have the relay sign for the From domain",
    )  # fmt: skip


def _record(key: dkim_sign.DkimKey, name: str, resolver: Resolver) -> Finding:
    title = f"DKIM record {name}"
    wanted = f"v=DKIM1; k=rsa; p={dkim_sign.public_key_b64(key)}"
    publish = f'publish TXT {name} "{wanted}"'
    answer = resolver.txt(name)
    if answer.error is not None:
        return Finding(
            "dkim.record", title, "fail", f"could not be checked: {answer.error}",
            "check NEWSLETTER_DNS_RESOLVER (or the network) and run the doctor again",
        )  # fmt: skip
    records = [r for r in answer.records if "p=" in r.replace(" ", "")]
    if not records:
        return Finding(
            "dkim.record", title, "fail",
            f"nothing is published at {name}: every signature fails to verify",
            publish,
        )  # fmt: skip
    if len(records) > 1:
        return Finding(
            "dkim.record", title, "fail",
            f"{len(records)} key records at {name}: verifiers may take either",
            f"keep one: {wanted}",
        )  # fmt: skip
    found = tags(records[0])
    problem = _record_problem(key, found)
    if problem is not None:
        return Finding("dkim.record", title, "fail", f"the record at {name}: {problem}", publish)
    if "y" in found.get("t", "").split(":"):
        return Finding(
            "dkim.record", title, "warn",
            "matches the private key, but says t=y (testing): receivers may ignore it",
            f"remove t=y from the record at {name}",
        )  # fmt: skip
    return Finding(
        "dkim.record", title, "pass", "published, and its key is the private key's public half"
    )


def _record_problem(key: dkim_sign.DkimKey, found: dict[str, str]) -> str | None:
    if found.get("v", "DKIM1") != "DKIM1":
        return f"v={found['v']} is not DKIM1"
    if found.get("k", "rsa").lower() != "rsa":
        return f"k={found['k']}, but the private key is RSA"
    if "h" in found and "sha256" not in found["h"].lower().split(":"):
        return f"h={found['h']} does not allow sha256, which the signatures use"
    if not found.get("p"):
        return "p= is empty: the key is revoked"
    problem = dkim_sign.published_key_problem(key, found["p"])
    if problem is not None:
        return (
            f"{problem} (NEWSLETTER_DKIM_KEY_FILE): every signature fails to verify; publish "
            "this key's public half, or configure the key that matches"
        )
    return None
