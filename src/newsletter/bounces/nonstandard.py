"""Reading a bounce that is not a standard report: qmail, old Exim, Yahoo and the like.

Input: a parsed message that is no RFC 3464 report. Output: the recipients it says
failed, as :class:`~newsletter.bounces.reading.Reported`, with the RFC 3463 status
code written next to each address when there is one (qmail's ``(#5.1.1)``, most
MTAs' ``550 5.1.1``), and the words that follow it as the diagnostic. Which
addresses failed, and whether for good, is flufl.bounce's reading (its detectors for
a score of MTAs' own formats); nothing else imports it.

flufl.bounce reads words, not codes, so its "permanent" is only a hint: a recipient
without a status code is reported with an empty one, and the decision counts it as a
soft bounce (three sends in a row suppress it), never as a hard one.
"""

from __future__ import annotations

import logging
from email.message import Message

from flufl.bounce import all_failures

from newsletter.bounces.status_codes import IN_WORDS

# flufl.bounce logs each detector that fails on a stranger's message with its traceback:
# noise in the MTA's log for what is only a message it could not read.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

__all__ = ["failures"]

# What is read of the body around an address: bounces are short, the returned message
# that follows is not wanted.
_BODY_LIMIT = 64 * 1024
_NEAR = 300  # characters after an address where its code and reason are looked for
_MAX_DIAGNOSTIC = 500


def failures(message: Message) -> list[tuple[str, str, str, str]]:
    """(address, action ``failed`` or ``delayed``, status or "", diagnostic) of each
    recipient ``message`` reports; [] when it reports none or cannot be read."""
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # noqa: BLE001 - a stranger's message must not crash the reader
        return []
    body = _body(message)
    found = []
    for raw, action in [(a, "failed") for a in sorted(permanent)] + [
        (a, "delayed") for a in sorted(temporary - permanent)
    ]:
        address = raw.decode("ascii", "replace").strip().strip("<>")[:254]
        if "@" not in address:
            continue
        status, diagnostic = _near(body, address)
        found.append((address, action, status, diagnostic))
    return found


def _body(message: Message) -> str:
    """The bounce's own words: its first text part, cut."""
    for part in message.walk():
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_type() != "text/plain":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload[:_BODY_LIMIT].decode("utf-8", "replace").replace("\r\n", "\n")
        return ""
    return ""


def _near(body: str, address: str) -> tuple[str, str]:
    """The status code and the reason written just after ``address``, or ("", "")."""
    at = body.lower().find(address.lower())
    if at < 0:
        return "", ""
    after = body[at + len(address) : at + len(address) + _NEAR]
    after = after.split("\n\n", 1)[0]  # its own paragraph only
    match = IN_WORDS.search(after)
    words = " ".join(after.replace(">", " ").replace(":", " ", 1).split())
    words = "".join(c if c.isprintable() else "\ufffd" for c in words)
    return (".".join(match.groups()) if match else ""), words[:_MAX_DIAGNOSTIC]
