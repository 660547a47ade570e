"""Web stage: the pages behind the links in every email (``newsletter serve``).

Input: HTTP requests carrying a signed token from :mod:`newsletter.tokens`.
Output: small server-rendered pages, and changes to the subscriber store.

- ``POST /unsubscribe/<token>`` with ``List-Unsubscribe=One-Click`` (RFC 8058,
  as Gmail and Yahoo send it: no cookies, no login) takes the address off
  that list at once and answers 200.
- ``GET /unsubscribe/<token>`` only shows what would happen, with a button:
  corporate link scanners open every link in an email, and a GET must never
  unsubscribe anyone.
- ``POST /unsubscribe/<token>`` from that button unsubscribes and offers
  ``POST /unsubscribe/<token>/undo`` to come back.

A forged, altered or malformed token gets a 404 page and changes nothing;
no page says anything about any address but the token's own. Every action
is logged with its time and list. Forms post back to the same signed URL
and need no cookie, so there is no session to forge (CSRF); the pages carry
a strict Content-Security-Policy and no JavaScript.
"""

from __future__ import annotations

import email
import email.policy
import html
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newsletter import tokens
from newsletter.archive import Archive, ArchiveEntry, Page
from newsletter.archive_store import ArchiveStore
from newsletter.database import connect
from newsletter.errors import ConfigError
from newsletter.models import Society
from newsletter.subscribers import SubscriberStore

log = logging.getLogger("newsletter.web")
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


@dataclass(frozen=True, slots=True)
class WebConfig:
    token_key: bytes
    society: Society
    store: Callable[[], SubscriberStore]  # a store on a connection for this thread
    archive: Archive | None = None


def store_per_thread(db_path: Path, *, busy_seconds: float = 20.0) -> Callable[[], SubscriberStore]:
    """SQLite connections belong to one thread: one store per thread that asks."""
    local = threading.local()

    def store() -> SubscriberStore:
        if not hasattr(local, "store"):
            local.store = SubscriberStore(connect(db_path, busy_seconds=busy_seconds))
        found: SubscriberStore = local.store
        return found

    return store


def _guarded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Clear answers for a busy database or an oversized body, instead of a 500."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except _TooLarge:
            return PlainTextResponse("Request too large.\n", status_code=413)
        except (sqlite3.OperationalError, ConfigError):
            log.warning("database busy; answered 503")
            return PlainTextResponse(
                "Busy, nothing was changed; please try again in a minute.\n",
                status_code=503,
                headers={"retry-after": "60"},
            )

    return run


def create_app(config: WebConfig) -> ASGIApp:
    pages = _Pages(config)
    app = Starlette(
        routes=[
            Route("/unsubscribe/{token}", _guarded(pages.unsubscribe), methods=["GET", "POST"]),
            Route("/unsubscribe/{token}/undo", _guarded(pages.undo), methods=["POST"]),
            Route("/unsubscribe", _guarded(pages.no_token), methods=["GET"]),
            Route("/preferences/{token}", _guarded(pages.preferences), methods=["GET", "POST"]),
            Route("/preferences", _guarded(pages.no_token), methods=["GET"]),
            Route("/issues/", _guarded(pages.issues), methods=["GET"]),
            Route("/issues/{issue_id}", _guarded(pages.issue), methods=["GET"]),
            Route("/feed.xml", _guarded(pages.feed), methods=["GET"]),
            Route("/healthz", lambda request: PlainTextResponse("ok"), methods=["GET"]),
        ],
    )
    return _SecurityHeaders(app)


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                # Public archive pages set their own Cache-Control; the rest stay no-store.
                own_cache = any(k.lower() == b"cache-control" for k, _ in headers)
                headers += [
                    (k.encode(), v.encode())
                    for k, v in SECURITY_HEADERS.items()
                    if not (own_cache and k == "cache-control")
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class _Pages:
    def __init__(self, config: WebConfig) -> None:
        self.config = config

    def _subject(self, request: Request) -> tokens.TokenSubject | None:
        return tokens.verify(self.config.token_key, str(request.path_params["token"]))

    async def unsubscribe(self, request: Request) -> Response:
        subject = self._subject(request)
        if subject is None:
            return self._not_found()
        if request.method == "GET":
            # Shows, never changes: link scanners fetch every URL in an email.
            return self._page(
                "Unsubscribe",
                f"<p>Stop sending <strong>{_e(self._newsletter(subject))}</strong> to "
                f"<strong>{_e(subject.email)}</strong>?</p>"
                f'<form method="post"><input type="hidden" name="confirm" value="yes">'
                f'<button type="submit">Unsubscribe</button></form>',
            )
        form = await _form(request)
        one_click = form.get("List-Unsubscribe") == "One-Click"
        if not one_click and form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)
        changed = await self._db(lambda store: store.opt_out(subject.list_name, subject.email))
        log.info(
            "unsubscribe list=%s via=%s changed=%s",
            subject.list_name,
            "one-click" if one_click else "page",
            changed,
        )
        if one_click:
            return PlainTextResponse("Unsubscribed.\n")
        return self._page(
            "Unsubscribed",
            f"<p><strong>{_e(subject.email)}</strong> will get no more "
            f"<strong>{_e(self._newsletter(subject))}</strong> emails.</p>"
            f'<form method="post" action="{_e(str(request.url.path))}/undo">'
            '<input type="hidden" name="confirm" value="yes">'
            '<button type="submit">Undo: keep sending it to me</button></form>',
        )

    async def undo(self, request: Request) -> Response:
        subject = self._subject(request)
        if subject is None:
            return self._not_found()
        form = await _form(request)
        if form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)
        changed = await self._db(lambda store: store.opt_in(subject.list_name, subject.email))
        log.info("resubscribe list=%s changed=%s", subject.list_name, changed)
        return self._page(
            "Welcome back",
            f"<p><strong>{_e(subject.email)}</strong> will keep getting "
            f"<strong>{_e(self._newsletter(subject))}</strong>.</p>",
        )

    async def preferences(self, request: Request) -> Response:
        subject = self._subject(request)
        if subject is None:
            return self._not_found()
        form = await _form(request) if request.method == "POST" else {}
        if request.method == "POST" and form.get("confirm") != "yes":
            return self._page("Nothing changed", "<p>The request was incomplete.</p>", 400)

        def apply(store: SubscriberStore) -> tuple[list[tuple[str, bool]], str | None]:
            if request.method == "POST":
                for list_name, _left in store.lists_of(subject.email):
                    if form.get(f"list:{list_name}") == "on":
                        store.opt_in(list_name, subject.email)
                    else:
                        store.opt_out(list_name, subject.email)
            return store.lists_of(subject.email), store.suppression(subject.email)

        lists, suppressed = await self._db(apply)
        if request.method == "POST":
            log.info("preferences saved lists=%s", ",".join(n for n, _ in lists))
        boxes = "".join(
            f'<p><label><input type="checkbox" name="list:{_e(name)}"'
            f"{'' if left else ' checked'}> {_e(name)}</label></p>"
            for name, left in lists
        )
        saved = "<p><strong>Saved.</strong></p>" if request.method == "POST" else ""
        if suppressed:
            # Ticks cannot override the do-not-mail list (bounces, complaints, a
            # request to stop everything): say so rather than look subscribed.
            saved += (
                f"<p>This address is on our do-not-mail list ({_e(suppressed)}), so it gets "
                "none of these emails whatever is ticked. Reply to any of our emails to "
                "change that.</p>"
            )
        return self._page(
            "Your newsletters",
            f"{saved}<p>Emails to <strong>{_e(subject.email)}</strong>. Untick a list to leave "
            f"it; untick them all to leave everything.</p>"
            f'<form method="post">{boxes}<input type="hidden" name="confirm" value="yes">'
            f'<button type="submit">Save</button></form>',
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

        page = await self._db(lambda store: archive.index_page(_archive_store(store), render))
        return _public(request, page)

    async def issue(self, request: Request) -> Response:
        archive = self.config.archive
        issue_id = str(request.path_params["issue_id"])
        if archive is None:
            return self._page("Not found", "<p>There is no issue by that name.</p>", 404)
        page = await self._db(lambda store: archive.issue_page(_archive_store(store), issue_id))
        if page is None:
            return self._page("Not found", "<p>There is no issue by that name.</p>", 404)
        return _public(request, page)

    async def feed(self, request: Request) -> Response:
        archive = self.config.archive
        if archive is None:
            return PlainTextResponse("no archive\n", status_code=404)
        page = await self._db(lambda store: archive.feed_page(_archive_store(store)))
        return _public(request, page)

    async def _db(self, work: Callable[[SubscriberStore], T]) -> T:
        """Database work off the event loop: a write waiting for a send's lock must not
        stall every other request."""
        return await run_in_threadpool(lambda: work(self.config.store()))

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
        society = self.config.society
        return HTMLResponse(
            f"""<!doctype html>
<html lang="{_e(society.language)}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} - {_e(society.newsletter_name)}</title>
<style>body{{font:16px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;
color:#1f2933;max-width:36rem;margin:2rem auto;padding:0 1rem}}h1{{color:#1d3b6f}}
button{{font:inherit;padding:.6rem 1.2rem;background:#1d3b6f;color:#fff;border:0;
border-radius:4px;cursor:pointer}}button:focus{{outline:3px solid #f0b400}}</style>
</head><body><main><h1>{_e(title)}</h1>{body}
<p><a href="{_e(society.website)}">{_e(society.name)}</a></p></main></body></html>
""",
            status_code=status,
        )


_ARCHIVE_STORES = threading.local()


def _archive_store(store: SubscriberStore) -> ArchiveStore:
    """One archive store per thread's connection: it remembers the last version it read."""
    found: ArchiveStore | None = getattr(_ARCHIVE_STORES, "store", None)
    if found is None or found.conn is not store.conn:
        found = _ARCHIVE_STORES.store = ArchiveStore(store.conn)
    return found


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
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


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
