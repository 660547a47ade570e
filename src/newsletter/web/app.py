"""Web stage: the pages behind the links in every email (``newsletter serve``).

Input: HTTP requests carrying a token from :mod:`newsletter.tokens`, and a
:class:`~newsletter.storage.base.Storage` that each server thread reopens for
itself. Output: small server-rendered pages, and changes to the subscriber store.

- ``POST /unsubscribe/<token>`` with ``List-Unsubscribe=One-Click`` (RFC 8058,
  as Gmail and Yahoo send it: no cookies, no login) takes the address off
  that list at once and answers 200.
- ``GET /unsubscribe/<token>`` (and HEAD) only shows what would happen, with a
  button: corporate link scanners open every link in an email, and a GET must
  never unsubscribe anyone.
- ``POST /unsubscribe/<token>`` from that button unsubscribes and, when it
  changed something, offers ``POST /undo/<undo token>`` for the next hour;
  ``GET /undo/<undo token>`` (a reload, a copied address) only explains.
- ``/preferences/<token>`` shows and saves which lists the address gets;
  leaving every list puts it on the suppression list.
- A token for an address under ``.invalid`` (``newsletter doctor``'s check,
  :func:`tokens.is_check`) gets the one-click answer with an
  ``X-Newsletter-Check`` header and opens no store: it changes nothing.
- ``POST /webhooks/<provider>``: bounces and complaints from sending providers
  (:mod:`newsletter.web.webhooks`).

Unsubscribe links never expire (they sit in mail already sent); a
preferences link expires :data:`tokens.PREFERENCES_VALID` after its message
and then offers only to unsubscribe from its list; a version 1 token (older
mail) unsubscribes and does nothing else. A forged, altered or malformed
token gets a 404 page and changes nothing; no page says anything about any
address but the token's own. Forms post to signed URLs and need no cookie,
so there is no session to forge (CSRF); pages carry a strict
Content-Security-Policy and no JavaScript.

Every link, form action and redirect is built from the public URL (which may
have a path, behind a proxy that strips it), never from the request's Host
header. Each request is logged by :class:`_AccessLog` with tokens replaced by
``<token>``; uvicorn's own access log, which prints them, is to stay off.
:func:`check_listen` refuses, before the server starts, an address it could not
listen on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import html
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newsletter import tokens
from newsletter.errors import ConfigError, StorageBusy, StorageError
from newsletter.models import Society
from newsletter.signup.joining import SignupPolicy
from newsletter.storage.base import IssueArchive, Storage, Subscribers
from newsletter.web.archive import Archive, ArchiveEntry, Page
from newsletter.web.signup import SignupPages
from newsletter.web.webhooks import WebhookConfig, Webhooks

log = logging.getLogger("newsletter.web")
access_log = logging.getLogger("newsletter.web.access")
T = TypeVar("T")

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src https:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
MAX_BODY = 4096
# Path segments that are followed by a token: the access log never shows those.
TOKEN_PATHS = frozenset({"unsubscribe", "preferences", "undo", "confirm"})

# What the do-not-mail list's reasons mean, as the pages say it.
_WHY = {
    "unsubscribed": "this address asked to get none of our emails",
    "bounced": "our emails to it could not be delivered (they bounced)",
    "complained": "one of our emails to it was reported as spam",
}


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class WebConfig:
    token_key: bytes
    society: Society
    # The database; each server thread works on its own storage.reopen() of it.
    storage: Storage
    archive: Archive | None = None
    # The https base of every link, form and redirect (NEWSLETTER_PUBLIC_URL); it
    # may have a path, such as https://host/news, behind a proxy that strips it.
    public_url: str = "https://news.example.org"
    clock: Callable[[], dt.datetime] = field(default=_utc_now)
    # Providers' webhooks (/webhooks/...); each is off (404) until configured.
    webhooks: WebhookConfig = field(default_factory=lambda: WebhookConfig(verp=None))
    # The public signup (/subscribe, /confirm/...); off (404) without it.
    signup: SignupPolicy | None = None
    # Called when a signup queued a mail: the mailer thread looks at once.
    mail_queued: Callable[[], None] = field(default=lambda: None)
    # Called as the server shuts down, before it exits (the mailer finishes its mail).
    on_shutdown: Callable[[], None] = field(default=lambda: None)


def _guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Clear answers for a busy database or an oversized body, instead of a 500."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except _TooLarge:
            return PlainTextResponse("Request too large.\n", status_code=413)
        except StorageBusy:
            # A writer (a send freezing its audience, an import) holds it.
            log.warning("database busy; answered 503")
            return PlainTextResponse(
                "Busy, nothing was changed; please try again in a minute.\n",
                status_code=503,
                headers={"retry-after": "60"},
            )
        except (StorageError, ConfigError) as exc:
            # Not a lock that will pass: a database from a newer version, a full disk, a
            # missing file. The operator needs to know which; the messages hold no address.
            log.error("database unusable, answered 503: %s", exc)
            return PlainTextResponse(
                "Temporarily unavailable, nothing was changed; please try again later.\n",
                status_code=503,
            )

    return run


def create_app(config: WebConfig) -> ASGIApp:
    pages = _Pages(config)
    hooks = Webhooks(config.webhooks, pages._storage, config.clock)
    signup: list[Route] = []
    if config.signup is not None:
        joining = SignupPages(
            config.signup,
            pages.base,
            pages._storage,
            page=pages._page,
            form=_form,
            wake=config.mail_queued,
            clock=lambda: config.clock().timestamp(),
        )
        signup = [Route(r.path, _guarded(r.endpoint), methods=r.methods) for r in joining.routes()]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # uvicorn raises SIGTERM again once this is done: what runs after it never runs.
        await run_in_threadpool(config.on_shutdown)

    app = Starlette(
        lifespan=lifespan,
        routes=[
            *signup,
            *(Route(path, _guarded(handler), methods=["POST"]) for path, handler in hooks.routes()),
            Route("/unsubscribe/{token}", _guarded(pages.unsubscribe), methods=["GET", "POST"]),
            Route("/unsubscribe/{token}/undo", _guarded(pages.old_undo), methods=["POST"]),
            Route("/undo/{token}", _guarded(pages.undo), methods=["GET", "POST"]),
            Route("/unsubscribe", _guarded(pages.no_token), methods=["GET"]),
            Route("/preferences/{token}", _guarded(pages.preferences), methods=["GET", "POST"]),
            Route("/preferences", _guarded(pages.no_token), methods=["GET"]),
            Route("/issues/", _guarded(pages.issues), methods=["GET"]),
            Route("/issues/{issue_id}", _guarded(pages.issue), methods=["GET"]),
            Route("/feed.xml", _guarded(pages.feed), methods=["GET"]),
            Route("/healthz", lambda request: PlainTextResponse("ok"), methods=["GET"]),
        ],
    )
    return _AccessLog(_SecurityHeaders(app, config.public_url))


class _SecurityHeaders:
    """The security headers on every response; ``no-store`` unless a page chose its own
    caching (public archive pages may; personal pages never do); and every redirect
    pointed at the public URL, whatever Host header the request came with."""

    def __init__(self, app: ASGIApp, public_url: str) -> None:
        self.app = app
        self.public_url = public_url.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [
                    (k.encode(), v.encode())
                    for k, v in SECURITY_HEADERS.items()
                    if k.encode() not in present
                ]
                if 300 <= message["status"] < 400:
                    headers = [
                        (k, self._ours(v) if k.lower() == b"location" else v) for k, v in headers
                    ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)

    def _ours(self, location: bytes) -> bytes:
        # Starlette's router builds its trailing-slash redirects from the Host
        # header; keep only the path and query and put them under our own URL.
        parts = urlsplit(location.decode("latin-1"))
        query = f"?{parts.query}" if parts.query else ""
        return f"{self.public_url}{parts.path}{query}".encode("latin-1")


class _AccessLog:
    """One line per request: method, path with tokens replaced, status, time taken.

    Never the query string, the client's address or a header: the log is kept
    longer than anything else and must hold no subscriber's data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            access_log.info(
                "%s %s %d %.1fms",
                _printable(str(scope.get("method", "")), 16),
                loggable_path(str(scope.get("path", ""))),
                status,
                (time.perf_counter() - started) * 1000,
            )


def loggable_path(path: str) -> str:
    """``path`` with every token replaced by ``<token>``, safe to write to a log."""
    segments = path.split("/")
    for i in range(1, len(segments)):
        if segments[i - 1] in TOKEN_PATHS and segments[i]:
            segments[i] = "<token>"
        elif len(segments[i]) > 40:
            # A token, or part of one, pasted where it does not belong.
            segments[i] = f"<{len(segments[i])} characters>"
    return _printable("/".join(segments), 300)


def _printable(text: str, limit: int) -> str:
    # The path arrives percent-decoded: CR, LF and the like would forge log lines.
    # unicode_escape writes a backslash as two, so an escape cannot be faked either.
    text = "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode() for c in text
    )
    return text if len(text) <= limit else text[:limit] + "..."


class _Pages:
    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.base = config.public_url.rstrip("/")
        self._local = threading.local()  # each server thread's own storage

    def _subject(self, request: Request, *kinds: tokens.Kind) -> tokens.TokenSubject | None:
        subject = tokens.read(self.config.token_key, str(request.path_params["token"]))
        return subject if subject is not None and subject.kind in kinds else None

    def _url(self, kind: tokens.Kind, subject: tokens.TokenSubject) -> str:
        """A fresh link of ``kind`` for the same list and address, issued now."""
        token = tokens.make(
            self.config.token_key, kind, subject.list_name, subject.email, self.config.clock()
        )
        path = {tokens.Kind.UNSUBSCRIBE: "unsubscribe", tokens.Kind.UNDO: "undo"}[kind]
        return f"{self.base}/{path}/{token}"

    def _expired(self, subject: tokens.TokenSubject, valid: dt.timedelta) -> bool:
        return subject.issued is None or self.config.clock() - subject.issued > valid

    async def unsubscribe(self, request: Request) -> Response:
        subject = self._subject(request, tokens.Kind.UNSUBSCRIBE, tokens.Kind.LEGACY)
        if subject is None:
            return self._not_found()
        if tokens.is_check(subject):
            return await self._check(request)
        here = f"{self.base}/unsubscribe/{request.path_params['token']}"
        if request.method != "POST":
            # GET and HEAD show, never change: link scanners fetch every URL in an email.
            left, suppressed = await self._db(lambda store: _state(store, subject))
            if left:
                return self._page(
                    "Already unsubscribed",
                    f"<p><strong>{_e(subject.email)}</strong> already gets no "
                    f"<strong>{_e(self._newsletter(subject))}</strong> emails. "
                    f"Nothing to do.</p>{self._suppressed(suppressed)}",
                )
            return self._page(
                "Unsubscribe",
                f"<p>Stop sending <strong>{_e(self._newsletter(subject))}</strong> to "
                f"<strong>{_e(subject.email)}</strong>?</p>{self._suppressed(suppressed)}"
                f'<form method="post" action="{_e(here)}">'
                '<input type="hidden" name="confirm" value="yes">'
                '<button type="submit">Unsubscribe</button></form>',
            )
        form = await _form(request)
        one_click = form.get("List-Unsubscribe") == "One-Click"
        if not one_click and form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)

        def apply(store: Subscribers) -> tuple[bool, str | None]:
            return store.opt_out(subject.list_name, subject.email), store.suppression(subject.email)

        changed, suppressed = await self._db(apply)
        log.info(
            "unsubscribe list=%s via=%s changed=%s",
            subject.list_name,
            "one-click" if one_click else "page",
            changed,
        )
        if one_click:
            return PlainTextResponse("Unsubscribed.\n")
        newsletter = f"<strong>{_e(self._newsletter(subject))}</strong>"
        # True only when no suppression covers every list: then _suppressed says it all.
        others = (
            ""
            if suppressed
            else "<p>Any other lists of ours this address is on are not affected; the "
            "preferences link in each of our emails manages those.</p>"
        )
        if not changed:
            # Nothing to undo, and no undo button: holding an old email must not
            # let anyone bring back someone who left long ago.
            return self._page(
                "Already unsubscribed",
                f"<p><strong>{_e(subject.email)}</strong> had already left {newsletter}; "
                f"nothing changed.</p>{self._suppressed(suppressed)}{others}",
            )
        if suppressed:
            # An undo would bring no email back: offering one would mislead.
            return self._page(
                "Unsubscribed",
                f"<p><strong>{_e(subject.email)}</strong> will get no more {newsletter} "
                f"emails.</p>{self._suppressed(suppressed)}{others}",
            )
        minutes = int(tokens.UNDO_VALID.total_seconds() // 60)
        return self._page(
            "Unsubscribed",
            f"<p><strong>{_e(subject.email)}</strong> will get no more {newsletter} "
            f"emails.</p>{self._suppressed(suppressed)}{others}"
            f"<p>Changed your mind? This button works for the next {minutes} minutes.</p>"
            f'<form method="post" action="{_e(self._url(tokens.Kind.UNDO, subject))}">'
            '<input type="hidden" name="confirm" value="yes">'
            '<button type="submit">Undo: keep sending it to me</button></form>',
        )

    async def _check(self, request: Request) -> Response:
        """`newsletter doctor`'s test link (an address under .invalid): answered as a real
        one would be, but no store is opened, so no list or suppression can change."""
        if request.method != "POST":
            return self._page(
                "A test link",
                "<p>This link checks that unsubscribing works; it belongs to nobody and "
                "changes nothing.</p>",
            )
        form = await _form(request)
        if form.get("List-Unsubscribe") != "One-Click" and form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)
        log.info("unsubscribe check answered; nothing changed")
        return PlainTextResponse(
            "One-click unsubscribe works; this check changed nothing.\n",
            headers={tokens.CHECK_HEADER: "one-click"},
        )

    async def undo(self, request: Request) -> Response:
        subject = self._subject(request, tokens.Kind.UNDO)
        if subject is None:
            return self._not_found()
        if self._expired(subject, tokens.UNDO_VALID):
            return await self._too_late_to_undo(subject)
        if request.method != "POST":
            return await self._undo_shown(subject, request)
        form = await _form(request)
        if form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)

        def apply(store: Subscribers) -> tuple[bool, bool, str | None]:
            changed = store.opt_in(subject.list_name, subject.email)
            member = any(name == subject.list_name for name, _ in store.lists_of(subject.email))
            return changed, member, store.suppression(subject.email)

        changed, member, suppressed = await self._db(apply)
        log.info("resubscribe list=%s changed=%s", subject.list_name, changed)
        newsletter = f"<strong>{_e(self._newsletter(subject))}</strong>"
        if suppressed == "unsubscribed":
            # Left everything (the preferences page) since: ticking a list there is
            # what brings mail back, and it works; a reply would wait for a person.
            return self._page(
                "Unsubscribe undone, but no emails will come",
                f"<p>The unsubscribe from {newsletter} is undone, but "
                f"<strong>{_e(subject.email)}</strong> has since left everything: we "
                "send it none of our emails, and undoing this unsubscribe does not "
                "change that. To get our emails again, open the preferences link in "
                "our email, tick the lists you want and save.</p>",
            )
        if suppressed:
            return self._page(
                "Unsubscribe undone, but no emails will come",
                f"<p>The unsubscribe from {newsletter} is undone, but "
                f"<strong>{_e(subject.email)}</strong> is on our do-not-mail list: "
                f"{_e(_WHY.get(suppressed, suppressed))}. We send it none of our emails, "
                "and undoing an unsubscribe does not change that. To get our emails "
                "again, reply to one of the emails we sent you and we will look into "
                "it.</p>",
            )
        if not member:
            return self._page(
                "Unsubscribe undone, but no emails will come",
                f"<p>The unsubscribe from {newsletter} is undone, but "
                f"<strong>{_e(subject.email)}</strong> is no longer on that list, so it "
                "will not get those emails. Reply to one of our emails to be added "
                "again.</p>",
            )
        return self._page(
            "Welcome back",
            f"<p><strong>{_e(subject.email)}</strong> will keep getting {newsletter}.</p>",
        )

    async def _undo_shown(self, subject: tokens.TokenSubject, request: Request) -> Response:
        """GET (a refresh, a copied address): say what the button does; change nothing."""
        left, suppressed = await self._db(lambda store: _state(store, subject))
        newsletter = f"<strong>{_e(self._newsletter(subject))}</strong>"
        address = f"<strong>{_e(subject.email)}</strong>"
        opening = (
            "<p>Opening or reloading this address changes nothing: only the undo button does.</p>"
        )
        if not left:
            return self._page(
                "Nothing to undo",
                f"{opening}<p>{address} is not unsubscribed from {newsletter}.</p>"
                f"{self._suppressed(suppressed)}",
            )
        if suppressed:
            # As after the unsubscribe: an undo would bring no email back.
            return self._page(
                "Nothing to undo here",
                f"{opening}<p>{address} is unsubscribed from {newsletter}, and undoing "
                f"that would bring no email back.</p>{self._suppressed(suppressed)}",
            )
        here = f"{self.base}/undo/{request.path_params['token']}"
        minutes = int(tokens.UNDO_VALID.total_seconds() // 60)
        return self._page(
            "Undo the unsubscribe?",
            f"{opening}<p>{address} is unsubscribed from {newsletter}. The button below "
            f"works for {minutes} minutes after the unsubscribe.</p>"
            f'<form method="post" action="{_e(here)}">'
            '<input type="hidden" name="confirm" value="yes">'
            '<button type="submit">Undo: keep sending it to me</button></form>',
        )

    async def old_undo(self, request: Request) -> Response:
        # The undo address of pages served before undo had its own token: those
        # carry an unsubscribe token, which never expires, so they undo nothing.
        subject = self._subject(request, tokens.Kind.UNSUBSCRIBE, tokens.Kind.LEGACY)
        if subject is None:
            return self._not_found()
        # Its page may be a minute old: say the button no longer works, not that its
        # hour is over.
        return await self._too_late_to_undo(
            subject, "This undo button comes from an older page of ours and no longer works"
        )

    async def _too_late_to_undo(
        self, subject: tokens.TokenSubject, why: str | None = None
    ) -> Response:
        left, suppressed = await self._db(lambda store: _state(store, subject))
        minutes = int(tokens.UNDO_VALID.total_seconds() // 60)
        why = why or (
            f"This undo button worked for {minutes} minutes after the unsubscribe, "
            "and that time is over"
        )
        newsletter = f"<strong>{_e(self._newsletter(subject))}</strong>"
        address = f"<strong>{_e(subject.email)}</strong>"
        if not left:
            now = f"{address} is not unsubscribed from {newsletter}."
        elif suppressed:
            now = f"{address} still gets no {newsletter} emails."  # _suppressed says why
        else:
            now = (
                f"{address} still gets no {newsletter} emails. To get them again, open the "
                "preferences link in one of our emails from the last "
                f"{tokens.PREFERENCES_VALID.days} days, tick {_e(subject.list_name)} and save."
            )
        return self._page(
            "Too late to undo here",
            f"<p>{why}, so it changed nothing. {now}</p>{self._suppressed(suppressed)}",
            410,
        )

    async def preferences(self, request: Request) -> Response:
        subject = self._subject(request, tokens.Kind.PREFERENCES, tokens.Kind.LEGACY)
        if subject is None:
            return self._not_found()
        if subject.kind is tokens.Kind.LEGACY or self._expired(subject, tokens.PREFERENCES_VALID):
            return await self._preferences_expired(subject)
        saving = request.method == "POST"
        form = await _form(request) if saving else {}
        if saving and form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)
        wanted = {
            k.removeprefix("list:") for k, v in form.items() if k.startswith("list:") and v == "on"
        }

        def apply(store: Subscribers) -> tuple[list[tuple[str, bool]], str | None]:
            if saving:
                suppressed = store.choose_lists(subject.email, wanted, actor="web")
                return store.lists_of(subject.email), suppressed
            return store.lists_of(subject.email), store.suppression(subject.email)

        lists, suppressed = await self._db(apply)
        staying = [name for name, left in lists if not left]
        if saving:
            log.info(
                "preferences saved lists=%s staying=%d suppressed=%s",
                ",".join(n for n, _ in lists),
                len(staying),
                suppressed,
            )
        # Someone who left everything gets nothing whatever a list says: every
        # box is unticked, and ticking one is what brings them back.
        everything_left = suppressed == "unsubscribed"
        boxes = "".join(
            f'<p class="choice"><label><input type="checkbox" name="list:{_e(name)}"'
            f"{' checked' if not left and not everything_left else ''}> {_e(name)}</label></p>"
            for name, left in lists
        )
        address = f"<strong>{_e(subject.email)}</strong>"
        if suppressed == "unsubscribed":
            state = (
                f"<p>{'Saved. ' if saving else ''}You have left everything: we send no "
                f"emails to {address}, from these lists or from any list created or "
                "imported later. To come back, tick the lists you want and save: you will "
                "then get those lists only.</p>"
            )
        elif suppressed:
            state = (
                f"<p>{'Saved. ' if saving else ''}{address} is on our do-not-mail list "
                f"({_e(suppressed)}: {_e(_WHY.get(suppressed, suppressed))}), so it gets "
                "none of these emails, whatever is ticked here; ticking a list does not "
                "change that. To get our emails again, reply to one of the emails we "
                "sent you and we will look into it.</p>"
            )
        elif saving:
            state = (
                f"<p>Saved. {address} gets: {_e(', '.join(staying))}. It gets no emails "
                "from a list left unticked.</p>"
            )
        elif not lists:
            state = (
                f"<p>{address} is on none of our lists. Save to make sure that no list, "
                "including lists created or imported later, ever emails it.</p>"
            )
        elif not staying:
            state = (
                f"<p>{address} has left every list below, so it gets none of them. Save "
                "with nothing ticked to make sure that no list created or imported later "
                "emails it either, or tick lists and save to come back to them.</p>"
            )
        else:
            state = (
                f"<p>Emails to {address}. Untick a list and save to leave it. If you untick "
                "them all and save, we will send this address no emails at all, including "
                "from lists created or imported later.</p>"
            )
        return self._page(
            "Your newsletters",
            f'{state}<form method="post" action="{_e(self.base)}/preferences/'
            f'{_e(str(request.path_params["token"]))}">{boxes}'
            '<input type="hidden" name="confirm" value="yes">'
            '<button type="submit">Save</button></form>',
        )

    async def _preferences_expired(self, subject: tokens.TokenSubject) -> Response:
        left, suppressed = await self._db(lambda store: _state(store, subject))
        if subject.kind is tokens.Kind.LEGACY:
            # A version 1 link has no date: it may be from last week, so no age is claimed.
            why = (
                "This preferences link comes from an older email of ours and no longer "
                "works, so it can no longer show or change your lists."
            )
        else:
            why = (
                f"Preferences links work for {tokens.PREFERENCES_VALID.days} days after the "
                "email they came in, so this one can no longer show or change your lists."
            )
        newsletter = f"<strong>{_e(self._newsletter(subject))}</strong>"
        address = f"<strong>{_e(subject.email)}</strong>"
        if left:
            offer = f"<p>{address} already gets no {newsletter} emails.</p>"
        else:
            offer = (
                f"<p>You can still stop {newsletter} emails to {address} here.</p>"
                f'<form method="post" action="{_e(self._url(tokens.Kind.UNSUBSCRIBE, subject))}">'
                '<input type="hidden" name="confirm" value="yes">'
                '<button type="submit">Unsubscribe</button></form>'
            )
        return self._page(
            "This link has expired",
            f"<p>{why} Nothing was changed. The preferences link in a recent email of ours "
            f"works.</p>{offer}{self._suppressed(suppressed)}",
            410,
        )

    def _suppressed(self, reason: str | None) -> str:
        """What a suppression means for every list, and the way back that works for it."""
        if reason is None:
            return ""
        if reason == "unsubscribed":
            # choose_lists lifts this one when a list is ticked: say so, not "reply".
            return (
                "<p>This address has left everything: we send it none of our emails, "
                "from any list. To come back, open the preferences link in one of our "
                f"emails from the last {tokens.PREFERENCES_VALID.days} days, tick a list "
                "and save.</p>"
            )
        return (
            f"<p>This address is on our do-not-mail list "
            f"({_e(reason)}: {_e(_WHY.get(reason, reason))}): we send it none of our "
            "emails, from any list, and the preferences page cannot change that. To get "
            "our emails again, reply to one of the emails we sent you and we will look "
            "into it.</p>"
        )

    async def no_token(self, request: Request) -> Response:
        return self._page(
            "Use the link in your email",
            "<p>Each email we send has its own unsubscribe and preferences links at the "
            "bottom. Please use those, or reply to the email and we will help.</p>",
        )

    async def issues(self, request: Request) -> Response:
        archive = self.config.archive
        if archive is None:
            return self._page("Not found", "<p>There is no archive here.</p>", 404)

        def render(entries: tuple[ArchiveEntry, ...]) -> bytes:
            items = "".join(
                f'<li><a href="{_e(archive.url(e.issue_id))}">{_e(e.subject)}</a> '
                f"<small>{e.date:%d %B %Y}</small></li>"
                for e in entries
            )
            return bytes(
                self._page(
                    "Past issues",
                    f"<ul>{items or '<li>No issue has been sent yet.</li>'}</ul>"
                    f'<p><a href="{_e(archive.public_url)}/feed.xml">Atom feed</a></p>',
                ).body
            )

        page = await self._archive_db(lambda store: archive.index_page(store, render))
        return _public(request, page)

    async def issue(self, request: Request) -> Response:
        archive = self.config.archive
        issue_id = str(request.path_params["issue_id"])
        if archive is None:
            return self._page("Not found", "<p>There is no issue by that name.</p>", 404)
        page = await self._archive_db(lambda store: archive.issue_page(store, issue_id))
        if page is None:
            return self._page("Not found", "<p>There is no issue by that name.</p>", 404)
        return _public(request, page)

    async def feed(self, request: Request) -> Response:
        archive = self.config.archive
        if archive is None:
            return PlainTextResponse("no archive\n", status_code=404)
        page = await self._archive_db(archive.feed_page)
        return _public(request, page)

    async def _db(self, work: Callable[[Subscribers], T]) -> T:
        """Database work off the event loop: a write waiting for a send's lock must not
        stall every other request."""
        return await run_in_threadpool(lambda: work(self._storage().subscribers))

    async def _archive_db(self, work: Callable[[IssueArchive], T]) -> T:
        return await run_in_threadpool(lambda: work(self._storage().archive))

    def _storage(self) -> Storage:
        """This thread's own connection to the database, opened at its first request.

        Never created: a database gone missing answers 503, it is not replaced by an
        empty one that would answer "already unsubscribed". Each has its own archive
        store, which remembers the last version it read."""
        found: Storage | None = getattr(self._local, "storage", None)
        # Checked before each request: a database removed while serving answers 503
        # (StorageUnavailable), one replaced by another file is served from the new one;
        # an opt-out never goes into a file nobody reads.
        found = self.config.storage.reopen() if found is None else found.current()
        self._local.storage = found
        return found

    def _newsletter(self, subject: tokens.TokenSubject) -> str:
        return f"{self.config.society.newsletter_name} ({subject.list_name})"

    def _not_found(self) -> Response:
        log.info("rejected a token that is not valid")
        return self._page(
            "Link not recognised",
            "<p>This link is not valid: it may have been cut short or changed. Use the "
            "unsubscribe link in a recent email, or reply to it and we will help.</p>",
            404,
        )

    def _page(self, title: str, body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(page_frame(self.config.society, title, body), status_code=status)


# The emails' own look (templates/email.mjml.j2: masthead, card, footer colours), for the
# pages a reader reaches from them. Inline, like everything on these pages: nothing is
# fetched from another site (the society's logo lives on its own site, so it is not
# shown here). Inputs are 16 px and controls at least 44 px high, so that a phone
# neither zooms in on focus nor asks for a fingertip's precision (WCAG 2.5.8).
_STYLE = (
    "body{margin:0;background:#f2f4f7;color:#1f2933;"
    "font:16px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif}"
    "header{background:#1d3b6f;color:#fff;padding:1.25rem 1rem}"
    "header p{margin:0 auto;max-width:36rem;font-size:1.25rem;font-weight:700}"
    "main{background:#fff;max-width:36rem;margin:0 auto;padding:1rem 1.25rem 1.5rem}"
    "h1{color:#1d3b6f;font-size:1.6rem;line-height:1.25}"
    "a{color:#1d3b6f}"
    "label{font-weight:600}"
    "input[type=email],input:not([type]){display:block;box-sizing:border-box;"
    "width:100%;min-height:44px;margin-top:.25rem;padding:.5rem .75rem;font:inherit;"
    "border:1px solid #7b8794;border-radius:4px}"
    ".choice input{width:1.5rem;height:1.5rem;margin:0 .5rem 0 0;"
    "vertical-align:middle}"
    ".choice label{display:inline-block;min-height:44px;line-height:44px}"
    "fieldset{border:1px solid #d9dee5;border-radius:4px;padding:.5rem 1rem}"
    "[aria-invalid=true]{border-color:#b00020!important;outline:1px solid #b00020}"
    ".error{display:block;color:#b00020;font-weight:600}"
    "[role=alert]{border-left:4px solid #b00020;padding:.25rem 1rem;background:#fdf2f3}"
    "button{font:inherit;font-weight:700;min-height:44px;padding:.6rem 1.4rem;"
    "background:#1d3b6f;color:#fff;border:0;border-radius:6px;cursor:pointer}"
    "button:focus,input:focus,a:focus{outline:3px solid #f0b400;outline-offset:2px}"
    "footer{max-width:36rem;margin:0 auto;padding:1rem 1.25rem 2rem;color:#4a5560;"
    "font-size:.875rem}"
)


def page_frame(society: Society, title: str, body: str) -> str:
    """A whole page in the society's look: its newsletter's masthead, ``body`` under
    ``title``, and the footer the emails have (who we are, the postal address)."""
    return f"""<!doctype html>
<html lang="{_e(society.language)}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} - {_e(society.newsletter_name)}</title>
<style>{_STYLE}</style>
</head><body><header><p>{_e(society.newsletter_name)}</p></header>
<main><h1>{_e(title)}</h1>{body}</main>
<footer><p><a href="{_e(society.website)}">{_e(society.name)}</a><br>
{_e(", ".join(society.address))}<br>{_e(society.registration)}</p></footer></body></html>
"""


def _public(request: Request, page: Page) -> Response:
    """A public archive page: cacheable, with validators; 304 when the client has it."""
    headers = page.headers()
    if page.not_modified(
        request.headers.get("if-none-match"), request.headers.get("if-modified-since")
    ):
        return Response(status_code=304, headers=headers)
    return Response(page.body, headers={**headers, "content-type": page.media_type})


class _TooLarge(Exception):
    pass


async def _form(request: Request) -> dict[str, str]:
    """The fields of a small form, urlencoded or multipart/form-data (RFC 8058 allows both).

    The body is read up to MAX_BODY and no further: these forms hold a field
    or two, and nobody gets to make the server buffer a large upload."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _TooLarge
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _TooLarge
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        return _multipart(ctype, body)
    # A form on a page in another charset posts its escapes in that charset (the
    # society's own page in ISO-8859-1, say): the declared one is honoured, UTF-8 if none.
    charset = _declared_charset(ctype)
    fields = parse_qs(
        body.decode(charset, "replace"), keep_blank_values=True, encoding=charset, errors="replace"
    )
    return {k: v[0] for k, v in fields.items()}


def _declared_charset(ctype: str) -> str:
    """The charset a Content-Type names, if Python knows it and it keeps ASCII as it
    is (the form's names and escapes are ASCII: the rule a CSV import's --encoding
    follows); else UTF-8."""
    from newsletter.audience.csv_import import check_encoding

    found = re.search(r";\s*charset=\"?([A-Za-z0-9_.:-]{1,40})", ctype)
    if found is None:
        return "utf-8"
    try:
        return check_encoding(found.group(1))
    except ValueError:
        return "utf-8"


def _multipart(ctype: str, body: bytes) -> dict[str, str]:
    # The stdlib MIME parser reads multipart/form-data (RFC 7578) well enough
    # for a body capped at a few kilobytes.
    message = email.message_from_bytes(
        b"Content-Type: " + ctype.encode("latin-1", "replace") + b"\r\n\r\n" + body,
        policy=email.policy.HTTP,
    )
    fields: dict[str, str] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields.setdefault(name, payload.decode("utf-8", "replace").strip())
    return fields


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _state(store: Subscribers, subject: tokens.TokenSubject) -> tuple[bool, str | None]:
    """Whether the address has left the token's list, and why it is suppressed, if it is."""
    left = any(name == subject.list_name and out for name, out in store.lists_of(subject.email))
    return left, store.suppression(subject.email)


def check_listen(host: str, port: int) -> None:
    """Refuse an address that cannot be listened on now (ConfigError), so the CLI says it as
    one error line: uvicorn would log it its own way and exit 3. (Taken in the moment
    between, uvicorn's own message is what remains.)"""
    try:
        # Every address the name stands for, as uvicorn binds them.
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; give another --host or "
            "--port (or NEWSLETTER_SERVE_HOST, NEWSLETTER_SERVE_PORT)"
        ) from None
