"""Web stage: providers' webhooks on ``newsletter serve`` → bounces, complaints, notes.

Input: ``POST /webhooks/ses`` (Amazon SES through an SNS HTTP/S subscription),
``/webhooks/mailgun``, ``/webhooks/sendgrid`` and ``/webhooks/postmark``, with a
:class:`WebhookConfig` (keys, allowed SNS topics, the SNS fetcher, the VERP
addresses and the soft-bounce policy) and each server thread's storage. Output: each
event of an authenticated request read (:mod:`newsletter.bounces.providers`),
decided and kept as evidence with its decision
(:func:`newsletter.bounces.processing.process_event`: the same suppressions and
soft-bounce counting as mailed bounces), and a short plain-text answer.

An endpoint whose setting is not set answers 404. A body over
:attr:`WebhookConfig.max_body` gets 413 without more being read. Bad JSON, a bad
signature, a wrong login, a stale timestamp or a replay gets a 4xx with a short body
and a log line, and changes nothing; what such a request said is not kept (nothing
in it can be trusted, and anyone can send any number). Every accepted event is kept,
understood or not; a provider's retry of an event already kept is answered 200 and
changes nothing. A database that cannot take it answers 503, which providers retry.
The log names the provider, the decision and the evidence id, never an address.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from newsletter.bounces.processing import Processed, process_event
from newsletter.bounces.providers import (
    ProviderEvent,
    canonical,
    read_mailgun,
    read_postmark,
    read_sendgrid,
    read_ses,
)
from newsletter.bounces.signatures import (
    MAX_AGE,
    TOLERANCE,
    HttpsSnsFetcher,
    Refused,
    SnsFetcher,
    SnsVerifier,
    check_basic_auth,
    check_mailgun,
    check_sendgrid,
    load_sendgrid_key,
    sns_url_problem,
)
from newsletter.storage.base import Storage
from newsletter.storage.evidence import SoftBounces
from newsletter.verp import Verp

__all__ = ["MAX_WEBHOOK_BODY", "WebhookConfig", "Webhooks"]

log = logging.getLogger("newsletter.web.webhooks")

MAX_WEBHOOK_BODY = 1024 * 1024  # a batch of SendGrid events is well under this
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Which webhooks are on, and what checks them (each off while its part is unset)."""

    verp: Verp | None  # our VERP addresses, which SES and Mailgun report as the sender
    soft: SoftBounces = field(default_factory=SoftBounces)
    ses_topics: frozenset[str] = frozenset()  # SNS topic ARNs whose messages are taken
    sns_fetcher: SnsFetcher = field(default_factory=HttpsSnsFetcher)
    mailgun_key: bytes | None = field(default=None, repr=False)  # the webhook signing key
    sendgrid_key: str | None = None  # the verification key, base64 DER (public)
    postmark_login: tuple[str, str] | None = field(default=None, repr=False)
    max_body: int = MAX_WEBHOOK_BODY


class _TooLarge(Exception):
    pass


class StoredTokens:
    """Mailgun tokens remembered in the database's single-use keys, shared by every
    process on it: a token's first use, and the digest of the body it came with, kept
    as long as its signature is accepted (a day and five minutes)."""

    def __init__(self, storage: Callable[[], Storage]) -> None:
        self.storage = storage

    def check(self, token: str, signed: float, body: bytes, now: float) -> None:
        store = self.storage().signups
        expires = signed + MAX_AGE + TOLERANCE
        with_body = f"{token}:{hashlib.sha256(body).hexdigest()}"
        if store.use_once("mailgun", token, expires, now):
            store.use_once("mailgun-body", with_body, expires, now)
            return
        # Seen before: the same body again is Mailgun retrying; another is a replay (and
        # is not written down: it must not pass as a retry later).
        if not store.was_used("mailgun-body", with_body, now):
            raise Refused(409, "a Mailgun token seen before, with another body (a replay)")


class Webhooks:
    """The four routes' handlers (module docstring)."""

    def __init__(
        self,
        config: WebhookConfig,
        storage: Callable[[], Storage],
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.config = config
        self.storage = storage  # this server thread's own storage
        self.clock = clock
        self.sns = SnsVerifier(config.sns_fetcher)
        # In the database, so that a token seen by one server (or before a restart) is
        # known to all: its signature does not cover the body, and is good for a day.
        self.seen = StoredTokens(storage)
        self.sendgrid_key = (
            load_sendgrid_key(config.sendgrid_key) if config.sendgrid_key is not None else None
        )

    def routes(self) -> list[tuple[str, Handler]]:
        return [
            ("/webhooks/ses", self.ses),
            ("/webhooks/mailgun", self.mailgun),
            ("/webhooks/sendgrid", self.sendgrid),
            ("/webhooks/postmark", self.postmark),
        ]

    async def ses(self, request: Request) -> Response:
        topics = self.config.ses_topics
        if not topics:
            return _off()
        try:
            body = await _body(request, self.config.max_body)
            message = _object(body)
            topic = message.get("TopicArn")
            kind = message.get("Type")
            if not isinstance(topic, str) or topic not in topics:
                what = "subscription to" if kind == "SubscriptionConfirmation" else "message from"
                raise Refused(
                    403,
                    f"an SNS {what} topic {str(topic)[:200]!r}, which is not in "
                    "NEWSLETTER_WEBHOOK_SES_TOPICS",
                )
            # Fetches the certificate the first time: off the event loop.
            await run_in_threadpool(self.sns.verify, message)
        except _TooLarge:
            return _too_large("ses")
        except Refused as refused:
            return _refused("ses", refused)
        if kind == "SubscriptionConfirmation":
            url = str(message.get("SubscribeURL", ""))
            problem = sns_url_problem(url, certificate=False)
            if problem:
                return _refused("ses", Refused(403, f"SubscribeURL refused: {problem}"))
            try:
                await run_in_threadpool(self.config.sns_fetcher.confirm, url)
            except Refused as refused:
                return _refused("ses", refused)
            log.info("webhook ses: confirmed the SNS subscription to %s", topic)
            return PlainTextResponse("subscription confirmed\n")
        if kind == "UnsubscribeConfirmation":
            log.warning("webhook ses: SNS says %s was unsubscribed from this endpoint", topic)
            return PlainTextResponse("noted\n")
        if kind != "Notification":
            return _refused("ses", Refused(400, f"an SNS message of Type {str(kind)[:40]!r}"))
        event_id = str(message.get("MessageId", ""))[:200]
        try:
            inner = json.loads(str(message.get("Message", "")))
        except ValueError:
            event = ProviderEvent("ses", "unknown", body, event_id=event_id,
                                  why="an SNS notification whose Message is not "
                                  "JSON")  # fmt: skip
        else:
            event = read_ses(inner, body, event_id)
        return await self._record("ses", [event])

    async def mailgun(self, request: Request) -> Response:
        key = self.config.mailgun_key
        if key is None:
            return _off()
        try:
            body = await _body(request, self.config.max_body)
            payload = _object(body)
            signature = payload.get("signature")
            now = self.clock().timestamp()
            given = signature if isinstance(signature, dict) else {}
            await run_in_threadpool(lambda: check_mailgun(key, given, body, self.seen, now))
        except _TooLarge:
            return _too_large("mailgun")
        except Refused as refused:
            return _refused("mailgun", refused)
        return await self._record("mailgun", [read_mailgun(payload, body)])

    async def sendgrid(self, request: Request) -> Response:
        key = self.sendgrid_key
        if key is None:
            return _off()
        try:
            body = await _body(request, self.config.max_body)
            check_sendgrid(key, request.headers, body, self.clock().timestamp())
            events = _json(body)
            if not isinstance(events, list):
                raise Refused(400, "not a JSON array of events")
        except _TooLarge:
            return _too_large("sendgrid")
        except Refused as refused:
            return _refused("sendgrid", refused)
        return await self._record("sendgrid", [read_sendgrid(e, canonical(e)) for e in events])

    async def postmark(self, request: Request) -> Response:
        login = self.config.postmark_login
        if login is None:
            return _off()
        try:
            # Before the body is read: a stranger gets nothing read or parsed.
            check_basic_auth(request.headers.get("authorization", ""), *login)
            body = await _body(request, self.config.max_body)
            payload = _object(body)
        except _TooLarge:
            return _too_large("postmark")
        except Refused as refused:
            headers = {"www-authenticate": 'Basic realm="webhooks"'}
            return _refused("postmark", refused, headers if refused.status == 401 else None)
        return await self._record("postmark", [read_postmark(payload, body)])

    async def _record(self, provider: str, events: list[ProviderEvent]) -> Response:
        config = self.config

        def work() -> list[Processed]:
            feedback = self.storage().feedback
            return [process_event(e, feedback, verp=config.verp, soft=config.soft) for e in events]

        done = await run_in_threadpool(work)
        before = 0
        for each in done:
            recorded = each.recorded
            before += not recorded.new
            log.info(
                "webhook %s: %s -> %s: %s [evidence #%d]",
                provider,
                each.feedback.kind,
                each.decision.action,
                recorded.outcome,
                recorded.id,
            )
        said = f" ({before} recorded before)" if before else ""
        return PlainTextResponse(f"recorded {len(done)} event(s){said}\n")


def _off() -> Response:
    return PlainTextResponse("Not Found\n", status_code=404)


def _too_large(provider: str) -> Response:
    log.warning("webhook %s refused (413): the body is over the limit", provider)
    return PlainTextResponse("request too large\n", status_code=413)


def _refused(provider: str, refused: Refused, headers: Mapping[str, str] | None = None) -> Response:
    log.warning("webhook %s refused (%d): %s", provider, refused.status, refused.reason)
    return PlainTextResponse(f"refused: {refused.reason}\n", refused.status, headers)


async def _body(request: Request, most: int) -> bytes:
    """The body, read up to ``most`` bytes and no further (_TooLarge beyond)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > most:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > most:
            raise _TooLarge
    return bytes(body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused(400, "the body is not JSON") from None


def _object(body: bytes) -> dict[str, Any]:
    found = _json(body)
    if not isinstance(found, dict):
        raise Refused(400, "the body is not a JSON object")
    return found
