"""Deciding on a posted signup form: its fields → what to answer, and what to keep.

Input: the form's fields (our page's, or the society's own form posted to
``/subscribe``), the visitor's address, the :class:`SignupPolicy` (the lists offered,
the consent text, the limits, the keys) and the stores. Output: a :class:`Decision`:

- ``invalid``: the form itself is wrong (an address that is not one, no list chosen):
  shown again with what to fix; nothing kept.
- ``prove``: no proof that a person sent it (no solved challenge, or under
  ``work-or-wait`` a form that did not wait :data:`WAIT_SECONDS` since it was shown):
  the form is shown again, filled in, with a new challenge; nothing kept.
- ``busy``: this network posted more than its hourly limit: 429; nothing kept.
- ``done``: the same answer whether the address is new, waiting, already subscribed,
  suppressed or erased (nobody learns who is on the list), and whether a mail went out:
  a confirmation mail is queued unless the honeypot was filled in, or the address had
  its day's mails (one a day once it is on every list chosen).

Only what a confirmation needs is kept (:meth:`~newsletter.storage.base.Signups.begin`);
rate limits count keyed hashes of the network, never the address itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from newsletter.audience.csv_import import normalise_address
from newsletter.models import SignupList
from newsletter.storage.base import Signups, Subscribers
from newsletter.storage.signups import NewSignup, nonce

__all__ = [
    "HONEYPOT",
    "OUR_PAGE",
    "WAIT_SECONDS",
    "Decision",
    "Posted",
    "SignupPolicy",
    "challenge_key",
    "decide",
    "form_stamp",
    "network_of",
    "read_form",
]

log = logging.getLogger("newsletter.signup")

HONEYPOT = "website"  # a field people never see; software that fills in every field does
WAIT_SECONDS = 5.0  # under work-or-wait: a form posted sooner after it was shown is a bot's
STAMP_VALID = 2 * 3600.0  # a form shown longer ago than this is shown again
MAX_NAME = 100
HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class SignupPolicy:
    lists: tuple[SignupList, ...]
    consent_text: str
    key: bytes  # the deployment's secret key (tokens, stamps, rate-limit hashes)
    confirm_valid: dt.timedelta = dt.timedelta(hours=48)
    ip_limit: int = 10  # signups an hour from one network
    address_limit: int = 3  # confirmation mails a day to one address
    challenge: Literal["work", "work-or-wait"] = "work-or-wait"
    welcome: bool = False

    def title(self, name: str) -> str:
        return next((item.title for item in self.lists if item.name == name), name)


@dataclass(frozen=True, slots=True)
class Posted:
    """A form's fields, read; ``problems`` say what the visitor must fix, each as (the
    field it is about: "email", "first_name" or "lists"; the words shown)."""

    email: str  # normalised when valid; as typed otherwise (shown back)
    first_name: str
    lists: tuple[str, ...]
    form: str  # where it was posted from: OUR_PAGE, the society's page, or its `source`
    honeypot: bool
    solution: str
    stamp: str
    problems: tuple[tuple[str, str], ...] = ()

    def problem(self, field: str) -> str | None:
        """What is wrong with ``field``, or None."""
        return next((said for name, said in self.problems if name == field), None)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Literal["invalid", "prove", "busy", "done"]
    posted: Posted
    queued: int | None = None  # the signup kept, when a mail was queued
    why: str = ""  # for the log, never shown


def _clean(value: str, limit: int) -> str:
    """One line of text: control and format characters dropped, spaces collapsed."""
    kept = "".join(ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"))
    return " ".join(kept.split())[:limit]


def read_form(fields: Mapping[str, str], offered: Sequence[SignupList], referer: str) -> Posted:
    """The form's fields as a :class:`Posted`, each checked."""
    problems: list[tuple[str, str]] = []
    # Only the spaces around it go: an invisible character inside makes another address,
    # which the check below refuses rather than quietly mending.
    typed = fields.get("email", "").strip()[:320]
    email = typed
    if not typed:
        problems.append(("email", "Please give your email address."))
    else:
        try:
            email = normalise_address(typed, new=True)
        except ValueError:
            shown = _clean(typed, 320)
            problems.append(("email", f"“{shown}” is not an email address; please check it."))
    first_name = _clean(fields.get("first_name", ""), MAX_NAME + 1)
    if len(first_name) > MAX_NAME:
        problems.append(("first_name", f"Please keep your first name under {MAX_NAME} characters."))
        first_name = first_name[:MAX_NAME]
    names = [item.name for item in offered]
    chosen = [n for n in names if fields.get(f"list.{n}") in ("on", "yes", "1")]
    if not chosen and len(names) == 1:
        chosen = names  # one list: the form needs no box to tick
    if "lists" in fields:  # the society's own form may name them: lists=a,b
        chosen = [n for n in names if n in {v.strip() for v in fields["lists"].split(",")}]
    if not chosen:
        problems.append(("lists", "Please choose at least one newsletter."))
    return Posted(
        email=email,
        first_name=first_name,
        lists=tuple(chosen),
        form=_clean(fields["source"], 300) if fields.get("source") else _form_of(referer),
        honeypot=bool(fields.get(HONEYPOT, "").strip()),
        solution=fields.get("altcha", "")[:20_000],
        stamp=fields.get("stamp", "")[:200],
        problems=tuple(problems),
    )


OUR_PAGE = "the signup page (/subscribe)"


def _form_of(referer: str) -> str:
    """Where a form without a ``source`` field was: the page that posted it (its
    Referer, when its site sends one), without the query."""
    from urllib.parse import urlsplit

    parts = urlsplit(referer[:500])
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"form at {parts.scheme}://{parts.netloc}{parts.path}"[:300]
    return "form (no referrer)"


def form_stamp(key: bytes, now: float) -> str:
    """A signed time the form was shown at, with a random part (two visitors in one
    second get two stamps): the proof of waiting, each used once."""
    shown = f"{int(now)}.{secrets.token_hex(8)}"
    return f"{shown}.{_mac(key, 'stamp:' + shown)}"


def _stamp_age(key: bytes, stamp: str, now: float) -> float | None:
    shown, _, mac = stamp.rpartition(".")
    seconds, _, rest = shown.partition(".")
    if (
        not seconds.isdigit()
        or len(seconds) > 12
        or not rest
        or not hmac.compare_digest(mac.encode(), _mac(key, "stamp:" + shown).encode())
    ):
        return None
    return now - int(seconds)


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32]


def network_of(address: str) -> str:
    """What a rate limit counts: an IPv4 address, or an IPv6 address's /64 (one
    household or host has a whole /64 to pick addresses from)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)  # a dual-stack proxy's way of writing an IPv4 client
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def decide(
    posted: Posted,
    *,
    ip: str | None,
    policy: SignupPolicy,
    signups: Signups,
    subscribers: Subscribers,
    now: float | None = None,
) -> Decision:
    """What to answer to ``posted`` (module docstring); queues the mail when it should."""
    from newsletter.signup.challenge import check_solution

    at = time.time() if now is None else now
    if posted.problems:
        return Decision("invalid", posted, why="the form has problems")
    if posted.honeypot:
        log.info("signup: honeypot filled in; nothing kept")
        return Decision("done", posted, why="honeypot")
    if posted.solution:
        problem = check_solution(challenge_key(policy.key), posted.solution, signups, now=at)
        if problem is not None:
            return Decision("prove", posted, why=f"challenge: {problem}")
    elif policy.challenge == "work-or-wait":
        age = _stamp_age(policy.key, posted.stamp, at)
        if age is None or not WAIT_SECONDS <= age <= STAMP_VALID:
            return Decision("prove", posted, why="no challenge solved, no stamp old enough")
        if not signups.use_once("stamp", posted.stamp, at + STAMP_VALID, at):
            return Decision("prove", posted, why="a stamp used before")
    else:
        return Decision("prove", posted, why="no challenge solved")
    network = network_of(ip or "unknown")
    if not signups.allow(f"ip:{_mac(policy.key, 'ip:' + network)}", policy.ip_limit, HOUR, at):
        return Decision("busy", posted, why="this network's hourly limit")
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    since = (when - dt.timedelta(seconds=DAY)).isoformat(timespec="seconds")
    limit = 1 if _one_a_day(subscribers, posted) else policy.address_limit
    queued = signups.begin(
        NewSignup(
            email=posted.email,
            first_name=posted.first_name,
            lists=posted.lists,
            form=posted.form,
            consent_text=policy.consent_text,
            posted_at=when.isoformat(timespec="seconds"),
            posted_ip=ip,
            expires_at=(when + policy.confirm_valid).isoformat(timespec="seconds"),
            nonce=nonce(),
        ),
        limit=limit,
        since=since,
    )
    if queued is None:
        log.info("signup: the address had its mails for the day; nothing sent")
        return Decision("done", posted, why="the address's daily limit")
    log.info("signup #%d kept; its confirmation mail is queued", queued)
    return Decision("done", posted, queued=queued)


def challenge_key(key: bytes) -> bytes:
    """The proof-of-work challenges' HMAC key, derived from the secret key."""
    return hmac.new(key, b"newsletter altcha v1", hashlib.sha256).digest()


def _one_a_day(subscribers: Subscribers, posted: Posted) -> bool:
    """Whether the address gets one confirmation mail a day at most: it has all it asks
    for already, or it is suppressed (it complained, bounced or left everything: a
    stranger must not be able to mail it three times a day; the person, coming back,
    needs only one)."""
    if subscribers.suppression(posted.email) is not None:
        return True
    getting = {name for name, left in subscribers.lists_of(posted.email) if not left}
    return set(posted.lists) <= getting
