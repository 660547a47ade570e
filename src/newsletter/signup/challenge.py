"""Signup stage, proof of work: a challenge for the signup form, and the check of its answer.

Input: an HMAC key (derived by the caller from the deployment's secret key; nothing here
reads the settings), the clock (``now``, seconds since the epoch) and, for the check, the
form field ``altcha`` and a :class:`UsedOnce` store. Output: a :class:`Challenge` for
the page to embed (:meth:`Challenge.data_attributes`), then ``None`` when the answer is
good or a short reason (for the log, never for the visitor) when it is not.

The protocol is ALTCHA's version 1, through the ``altcha`` library: the server picks a
random ``salt`` (holding its expiry, ``?expires=<seconds>&``) and a secret number at
most ``maxnumber``, and sends SHA-256(salt + number) as ``challenge`` with an HMAC of it
as ``signature``. The browser (``web/static/signup.js``) tries numbers from 0 until
the hash matches, about ``maxnumber / 2`` hashes, and posts the base64 JSON of
algorithm, challenge, number, salt and signature. The check needs no record of what was
issued: the signature proves it was ours, the salt its expiry. It does need a record of
what was *used*: a solution may be posted once (kind ``"altcha"``, keyed by the
challenge's signature, kept until the challenge expires), since the library does not
stop replays itself.

What the library would trip over (a field of the wrong type, a JSON array, a huge
number) is checked here before it is called, so that nothing a visitor sends raises.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import heapq
import json
import math
import re
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from altcha import v1 as altcha
from altcha.v1 import PayloadType

ALGORITHM: Final[Literal["SHA-256"]] = "SHA-256"
# maxnumber / 2 hashes on average. signup.js on a freshly opened page in Chromium, slowed
# 4x as DevTools' mid-tier phone (about 21,000 hashes a second), takes 1.1 s on average
# and 2.3 s at worst; slowed 6x (the low-end phone), 1.7 s; unslowed on one server core
# (80,000-120,000 a second), 0.2-0.3 s. tests/test_signup_challenge.py prints it (-s).
DEFAULT_MAX_NUMBER = 50_000
# A good payload is about 330 characters; refuse anything much longer unread.
MAX_PAYLOAD = 1000
USED_KIND = "altcha"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SECONDS = re.compile(r"[0-9]{1,12}")
_SALT = re.compile(r"[\x21-\x7e]{1,200}")  # ours is hex, ?expires=...&; never spaces
_FIELDS = ("algorithm", "challenge", "number", "salt", "signature")


class UsedOnce(Protocol):
    """What has been used already: a solved challenge, a confirmation link."""

    def use_once(self, kind: str, key: str, expires: float, now: float) -> bool:
        """True the first time (kind, key) is used; False if it was used before and has
        not expired."""
        ...


class MemoryUsedOnce:
    """:class:`UsedOnce` in this process's memory, safe across threads.

    Each key is kept until its ``expires`` has passed (``now > expires``), so a key is
    refused for as long as what it stands for is valid. At most ``most`` are kept; past
    that the one expiring first is forgotten, and from then on a key expiring no later
    than the last one forgotten is refused, as nobody can say any more whether it was
    used. Under that load (``most`` solved challenges within their validity) only the
    oldest challenges are refused. A key that has expired already is refused too: it
    could not be remembered. Several server processes each have their own memory: they
    need a shared store instead.
    """

    def __init__(self, most: int = 100_000) -> None:
        if most < 1:
            raise ValueError(f"most must be at least 1 (got {most})")
        self.most = most
        self._expires: dict[tuple[str, str], float] = {}
        self._queue: list[tuple[float, str, str]] = []  # a heap: the first to expire first
        self._forgotten = -math.inf  # the expiry of the last key forgotten for room
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._expires)

    def use_once(self, kind: str, key: str, expires: float, now: float) -> bool:
        with self._lock:
            while self._queue and self._queue[0][0] < now:
                _, old_kind, old_key = heapq.heappop(self._queue)
                del self._expires[old_kind, old_key]
            if (kind, key) in self._expires or expires < now or expires <= self._forgotten:
                return False
            while len(self._expires) >= self.most:
                self._forgotten, old_kind, old_key = heapq.heappop(self._queue)
                del self._expires[old_kind, old_key]
            self._expires[kind, key] = expires
            heapq.heappush(self._queue, (expires, kind, key))
            return True


@dataclass(frozen=True)
class Challenge:
    """What the signup form carries: ``salt`` ends with ``?expires=<seconds>&``."""

    algorithm: str
    challenge: str
    salt: str
    signature: str
    max_number: int

    @property
    def expires(self) -> int:
        """When it expires, in seconds since the epoch (from the salt)."""
        return int(urllib.parse.parse_qs(self.salt.partition("?")[2])["expires"][0])

    def to_json(self) -> str:
        """The challenge as ``signup.js`` reads it (ALTCHA's names: ``maxnumber``)."""
        return json.dumps(
            {
                "algorithm": self.algorithm,
                "challenge": self.challenge,
                "maxnumber": self.max_number,
                "salt": self.salt,
                "signature": self.signature,
            },
            separators=(",", ":"),
        )

    def data_attributes(self) -> dict[str, str]:
        """The form's attributes, unescaped (the template escapes them):
        ``<form data-altcha-challenge="...">``."""
        return {"data-altcha-challenge": self.to_json()}


def new_challenge(
    key: bytes, *, now: float, max_number: int = DEFAULT_MAX_NUMBER, valid_seconds: float = 1800
) -> Challenge:
    """A new challenge signed with ``key``, valid for ``valid_seconds`` from ``now``."""
    if max_number < 1:
        raise ValueError(f"max_number must be at least 1 (got {max_number})")
    if not valid_seconds > 0:
        raise ValueError(f"valid_seconds must be positive (got {valid_seconds})")
    expires = dt.datetime.fromtimestamp(math.floor(now + valid_seconds), dt.UTC)
    made = altcha.create_challenge(
        altcha.ChallengeOptions(
            algorithm=ALGORITHM, max_number=max_number, hmac_key=key, expires=expires
        )
    )
    return Challenge(made.algorithm, made.challenge, made.salt, made.signature, made.max_number)


def check_solution(key: bytes, payload: str, used: UsedOnce, *, now: float) -> str | None:
    """None when ``payload`` (the form field ``altcha``: base64 of JSON) solves a
    challenge signed with ``key``, not expired at ``now`` and not used before (it is
    then used); else a short reason, for the log. Never raises on what a visitor sends."""
    if not isinstance(payload, str) or not payload:
        return "no proof of work (the form came without JavaScript, or unsolved)"
    if len(payload) > MAX_PAYLOAD:
        return f"the proof of work is longer than {MAX_PAYLOAD} characters"
    fields = _decode(payload)
    if isinstance(fields, str):
        return fields
    good, error = altcha.verify_solution(fields, key, check_expires=False)
    if error is not None:
        return f"the proof of work was refused: {error}"
    if not good:
        return "the proof of work does not solve a challenge we signed (altered or forged)"
    expires = altcha.extract_params(fields).get("expires", [])
    if len(expires) != 1 or not _SECONDS.fullmatch(expires[0]):
        return "the proof of work's challenge has no expiry"
    if now > int(expires[0]):
        return "the proof of work's challenge has expired"
    if not used.use_once(USED_KIND, fields["signature"], float(expires[0]), now):
        return "the proof of work's challenge was used before (a replay)"
    return None


def _decode(payload: str) -> PayloadType | str:
    """The payload's fields, each of the type the library expects, or why not."""
    try:
        data = json.loads(base64.b64decode(payload, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError):
        return "the proof of work is not base64 of JSON"
    if not isinstance(data, dict):
        return "the proof of work is not a JSON object"
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        return f"the proof of work has no {', '.join(missing)}"
    algorithm, challenge, number, salt, signature = (data[f] for f in _FIELDS)
    if not all(isinstance(v, str) for v in (algorithm, challenge, salt, signature)):
        return "the proof of work has a field that is not text"
    if algorithm != ALGORITHM:
        return f"the proof of work is not {ALGORITHM}"
    # bool is an int to Python; a number beyond 10**12 was never issued.
    if type(number) is not int or not 0 <= number < 10**12:
        return "the proof of work's number is not a whole number in range"
    if not _HEX64.fullmatch(challenge) or not _HEX64.fullmatch(signature):
        return "the proof of work's challenge or signature is not SHA-256 hex"
    # The library encodes the salt as UTF-8, which a lone surrogate ("\ud800") fails.
    if not _SALT.fullmatch(salt):
        return "the proof of work's salt is not printable ASCII of at most 200 characters"
    return {
        "algorithm": ALGORITHM,
        "challenge": challenge,
        "number": number,
        "salt": salt,
        "signature": signature,
    }
