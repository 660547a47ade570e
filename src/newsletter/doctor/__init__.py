"""Doctor: will the society's mail be accepted under Gmail's, Yahoo's and Microsoft's
bulk-sender rules, and what to fix (``newsletter doctor``).

Input: :class:`~newsletter.doctor.run.DoctorInputs` (plain values the CLI wires from
the settings). Output: a :class:`~newsletter.doctor.findings.Diagnosis`, one
:class:`~newsletter.doctor.findings.Finding` per check, each pass, warn, fail or info
with a one-line fix. One module per group of checks:

- :mod:`~newsletter.doctor.dns_client`: the one module that talks DNS (dnspython);
- :mod:`~newsletter.doctor.spf`: SPF of the bounce domain, its DNS lookups, the relay;
- :mod:`~newsletter.doctor.dkim`: the published DKIM key against the configured one;
- :mod:`~newsletter.doctor.dmarc`: DMARC's policy and the From domain's alignment;
- :mod:`~newsletter.doctor.receiving`: MX of the bounce domain, MTA-STS, TLS-RPT;
- :mod:`~newsletter.doctor.relay`: STARTTLS on the relay, and the settings' demand for it;
- :mod:`~newsletter.doctor.one_click`: an RFC 8058 POST to the public URL with a test token;
- :mod:`~newsletter.doctor.content`: the footer's postal address, the latest issue's
  size, the secret key's strength;
- :mod:`~newsletter.doctor.run`: runs them all, in order.

A check that cannot run (a DNS timeout, a refused connection) is a finding that
says why, never an exception.
"""

from newsletter.doctor.findings import Diagnosis, Finding
from newsletter.doctor.run import DoctorInputs, diagnose

__all__ = ["Diagnosis", "DoctorInputs", "Finding", "diagnose"]
