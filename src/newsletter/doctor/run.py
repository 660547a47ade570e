"""Running the doctor: every check, in order → a :class:`~newsletter.doctor.findings.Diagnosis`.

Input: :class:`DoctorInputs`, plain values the CLI wires from the settings
(:func:`newsletter.wiring.doctor_inputs`) and a clock. Output: the diagnosis, in the
order a reader fixes things: the domain's DNS (SPF, DKIM, DMARC, MX, MTA-STS,
TLS-RPT), the relay, the public unsubscribe URL, then the mail's content.
Every look-up and connection has a timeout; nothing here raises for what the
network does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from newsletter.build import BuildInputs
from newsletter.delivery.dkim_sign import DkimKey
from newsletter.doctor.content import check_content
from newsletter.doctor.dkim import check_dkim
from newsletter.doctor.dmarc import check_dmarc
from newsletter.doctor.dns_client import DEFAULT_TIMEOUT, Resolver
from newsletter.doctor.findings import Diagnosis, Finding
from newsletter.doctor.one_click import OneClickSetup, check_one_click
from newsletter.doctor.receiving import check_receiving
from newsletter.doctor.relay import RelaySetup, check_relay
from newsletter.doctor.spf import check_spf


@dataclass(frozen=True, slots=True)
class DoctorInputs:
    from_address: str  # NEWSLETTER_FROM's address
    envelope_sender: str  # MAIL FROM: NEWSLETTER_BOUNCE_ADDRESS, or the From address
    dkim_key: DkimKey | None
    dkim_problem: str | None  # why there is no key although one is configured
    relays: tuple[RelaySetup, ...]  # the one relay, or each of NEWSLETTER_SMTP_RELAYS
    one_click: OneClickSetup
    issues_dir: Path
    build_inputs: Callable[[Path], BuildInputs]
    society_file: Path
    secret_key: str | None
    dns_server: tuple[str, int] | None  # NEWSLETTER_DNS_RESOLVER; None: the system's
    dns_timeout: float = DEFAULT_TIMEOUT


def diagnose(inputs: DoctorInputs, *, clock: Callable[[], dt.datetime] | None = None) -> Diagnosis:
    now = (clock or (lambda: dt.datetime.now(dt.UTC)))()
    resolver = Resolver(inputs.dns_server, inputs.dns_timeout)
    from_domain = _domain(inputs.from_address)
    bounce_domain = _domain(inputs.envelope_sender)
    dkim_domain = inputs.dkim_key.domain if inputs.dkim_key is not None else None
    findings: list[Finding] = [
        *check_spf(bounce_domain, tuple(relay.host for relay in inputs.relays), resolver),
        *check_dkim(inputs.dkim_key, inputs.dkim_problem, resolver),
        *check_dmarc(from_domain, bounce_domain, dkim_domain, resolver),
        *check_receiving(bounce_domain, from_domain, resolver),
        *(finding for relay in inputs.relays for finding in check_relay(relay, resolver)),
        check_one_click(inputs.one_click, resolver, now),
        *check_content(
            inputs.issues_dir, inputs.build_inputs, inputs.society_file, inputs.secret_key
        ),
    ]
    return Diagnosis(tuple(findings))


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")
