"""Web stage: the public signup pages on ``newsletter serve`` → signups and confirmations.

Input: requests to ``/subscribe`` (GET: the form; POST: our form or the society's own
posted to it), ``/confirm/<token>`` (GET: a page with a button that changes nothing,
as mail scanners open every link; POST: the confirmation) and ``/static/signup.js``
(the proof-of-work script, from the package); a :class:`SignupPages` with the
:class:`~newsletter.signup.joining.SignupPolicy`, each server thread's storage and the
page frame of :mod:`newsletter.web.app`. Output: the pages, a signup kept and its
confirmation mail queued (the mailer thread sends it), or the address on its lists with
its consent record.

The answer to a POST is the same page whatever the address's state; a token that is
forged, altered, expired or used gets the same 404 as one that never existed. Nothing
on these pages comes from another site; the form page alone runs a script, our own
(``script-src 'self'``), and works without it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from newsletter.render import markdown
from newsletter.signup import links
from newsletter.signup.joining import (
    HONEYPOT,
    OUR_PAGE,
    WAIT_SECONDS,
    Decision,
    Posted,
    SignupPolicy,
    challenge_key,
    decide,
    form_stamp,
    read_form,
)
from newsletter.storage.base import Storage
from newsletter.storage.signups import erasure_hash, erasure_key

__all__ = ["SCRIPT_CSP", "SignupPages"]

log = logging.getLogger("newsletter.web.signup")
T = TypeVar("T")

# The form page's own policy: the common one, plus our script and its worker.
SCRIPT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# Every answer to a posted form takes at least this long: the work behind it differs
# by the address's state (a mail queued or not), and its time must not tell.
ANSWER_FLOOR = 0.25
_HIDDEN = "position:absolute;left:-10000px;width:1px;height:1px;overflow:hidden"

Page = Callable[[str, str, int], HTMLResponse]
Form = Callable[[Request], Awaitable[dict[str, str]]]


@dataclass
class SignupPages:
    policy: SignupPolicy
    base: str  # the public URL, no trailing /
    storage: Callable[[], Storage]  # this server thread's own
    page: Page  # the society's page frame (title, body, status)
    form: Form  # a small form's fields, size-capped
    wake: Callable[[], None] = lambda: None  # tell the mailer a mail is queued
    clock: Callable[[], float] = time.time

    def routes(self) -> list[Route]:
        return [
            Route("/subscribe", self.subscribe, methods=["GET", "POST"]),
            Route("/confirm/{token}", self.confirm, methods=["GET", "POST"]),
            Route("/static/signup.js", self.script, methods=["GET"]),
        ]

    async def _db(self, work: Callable[[Storage], T]) -> T:
        return await run_in_threadpool(lambda: work(self.storage()))

    # ------------------------------------------------------------ /subscribe

    async def subscribe(self, request: Request) -> Response:
        if request.method != "POST":
            return self._form_page(None, status=200)
        started = time.monotonic()
        try:
            return await self._posted(request)
        finally:
            await asyncio.sleep(max(0.0, ANSWER_FLOOR - (time.monotonic() - started)))

    async def _posted(self, request: Request) -> Response:
        fields = await self.form(request)
        posted = read_form(fields, self.policy.lists, request.headers.get("referer", ""))
        ip = request.client.host if request.client else None

        def work(storage: Storage) -> Decision:
            return decide(posted, ip=ip, policy=self.policy, signups=storage.signups,
                          subscribers=storage.subscribers, now=self.clock())  # fmt: skip

        decision = await self._db(work)
        log.info("signup form: %s (%s)", decision.kind, decision.why)
        if decision.kind == "invalid":
            return self._form_page(posted, status=400)
        if decision.kind == "prove":
            return self._form_page(posted, status=200, prove=True)
        if decision.kind == "busy":
            return self.page(
                "Please try again later",
                "<p>We have had many signups from your network in the last hour, so we "
                "are taking no more for now. Please try again in an hour.</p>",
                429,
            )
        if decision.queued is not None:
            self.wake()
        hours = round(self.policy.confirm_valid.total_seconds() / 3600)
        return self.page(
            "Check your inbox",
            f"<p>If <strong>{_e(posted.email)}</strong> can receive our emails, a message "
            "is on its way to it with a link to confirm your subscription. Nothing else is "
            "sent until you confirm.</p>"
            f"<p>The link works for {hours} hours. Nothing there? Look in your spam or "
            "junk folder, or fill in the form again later.</p>",
            200,
        )

    def _form_page(self, posted: Posted | None, *, status: int, prove: bool = False) -> Response:
        from newsletter.signup.challenge import new_challenge

        now = self.clock()
        challenge = new_challenge(challenge_key(self.policy.key), now=now)
        notes = ""
        if posted is not None and posted.problems:
            # A summary that links to each field, and each field marked and described
            # by its own message (WCAG 3.3.1): a screen reader hears it at the field.
            items = "".join(
                f'<li><a href="#{_FIRST_INPUT[field]}">{_e(said)}</a></li>'
                for field, said in posted.problems
            )
            notes = f'<div role="alert"><p>Please check the form:</p><ul>{items}</ul></div>'
        elif prove and self.policy.challenge == "work":
            notes = (
                '<div role="alert"><p>One more step: please press <strong>Subscribe</strong> '
                "again. This form needs JavaScript for a check that keeps software from "
                "signing up other people's addresses; if it is off in your browser, please "
                "turn it on for this page.</p></div>"
            )
        elif prove:
            notes = (
                '<div role="alert"><p>One more step: please press <strong>Subscribe</strong> '
                f"again (without JavaScript, wait {int(WAIT_SECONDS)} seconds first). This "
                "check keeps software from signing up other people's addresses.</p></div>"
            )
        chosen = set(posted.lists) if posted is not None else set()
        offered = self.policy.lists
        marks = {field: _marked(posted, field) for field in _FIRST_INPUT}
        if len(offered) == 1:
            only = offered[0]
            choice = (
                f'<input type="hidden" name="list.{_e(only.name)}" value="on">'
                f"<p>You are signing up for <strong>{_e(only.title)}</strong>."
                + (f" {_e(only.description)}" if only.description else "")
                + "</p>"
            )
        else:
            invalid = ' aria-invalid="true"' if marks["lists"][1] else ""
            boxes = "".join(
                f'<p class="choice"><input type="checkbox" id="list-{i}" '
                f'name="list.{_e(item.name)}"'
                f"{' checked' if item.name in chosen else ''}"
                f"{invalid}>"
                f' <label for="list-{i}">{_e(item.title)}</label>'
                + (f"<br><span>{_e(item.description)}</span>" if item.description else "")
                + "</p>"
                for i, item in enumerate(offered)
            )
            # The group is described by the message; the boxes are what is invalid
            # (aria-invalid is not a group's attribute in ARIA 1.2).
            said = marks["lists"][1]
            described = ' aria-describedby="lists-error"' if said else ""
            choice = (
                f"<fieldset{described}><legend>Which emails would you like?</legend>{said}"
                f"{boxes}</fieldset>"
            )
        # Where the form came from stays with it when it is shown again (the society's own).
        source = posted.form if posted is not None else OUR_PAGE
        email = _e(posted.email) if posted is not None else ""
        name = _e(posted.first_name) if posted is not None else ""
        # Markdown, as every text in society.yaml (sanitised: links and emphasis only);
        # the record keeps the text as written.
        consent = markdown.to_html(self.policy.consent_text)
        body = (
            f"{notes}"
            f'<form method="post" action="{_e(self.base)}/subscribe" '
            f"data-altcha-challenge='{_e(challenge.to_json())}'>"
            f'<p><label for="email">Email address</label>{marks["email"][1]}'
            f'<input id="email" name="email" type="email" autocomplete="email" required '
            f'maxlength="254" value="{email}"{marks["email"][0]}></p>'
            f'<p><label for="first_name">First name (optional)</label>{marks["first_name"][1]}'
            f'<input id="first_name" name="first_name" autocomplete="given-name" '
            f'maxlength="100" value="{name}"{marks["first_name"][0]}></p>'
            f"{choice}"
            f'<div style="{_HIDDEN}" aria-hidden="true"><label for="{HONEYPOT}">Leave this '
            f'empty</label><input id="{HONEYPOT}" name="{HONEYPOT}" tabindex="-1" '
            'autocomplete="off"></div>'
            f'<input type="hidden" name="stamp" value="{_e(form_stamp(self.policy.key, now))}">'
            f'<input type="hidden" name="source" value="{_e(source)}">'
            '<input type="hidden" name="altcha" value="">'
            f'<div id="consent">{consent}</div>'
            '<p><button type="submit" aria-describedby="consent">Subscribe</button></p>'
            "</form>"
            "<p>We will send you an email to confirm: nothing is sent until you do.</p>"
            f'<script src="{_e(self.base)}/static/signup.js"></script>'
        )
        response = self.page("Sign up", body, status)
        response.headers["content-security-policy"] = SCRIPT_CSP
        return response

    async def script(self, request: Request) -> Response:
        source = resources.files("newsletter.web").joinpath("static/signup.js").read_bytes()
        return Response(
            source,
            media_type="text/javascript",
            headers={"cache-control": "public, max-age=3600"},
        )

    # ------------------------------------------------------------ /confirm

    async def confirm(self, request: Request) -> Response:
        found = links.read(self.policy.key, str(request.path_params["token"]))
        if found is None:
            return self._not_found()
        signup_id, nonce = found
        here = f"{self.base}/confirm/{request.path_params['token']}"
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC).isoformat(timespec="seconds")
        # A link used, expired or not ours gets the 404 first, whatever else was sent.
        waiting = await self._db(lambda s: s.signups.signup(signup_id))
        if waiting is None or not waiting.confirmable(nonce, now):
            return self._not_found()
        if request.method != "POST":
            # GET and HEAD only show: mail scanners open every link in an email.
            titles = _titles(self.policy, waiting.lists)
            return self.page(
                "Confirm your subscription",
                f"<p>Send <strong>{titles}</strong> to <strong>{_e(waiting.email)}</strong>?"
                "</p>"
                f'<form method="post" action="{_e(here)}">'
                '<input type="hidden" name="confirm" value="yes">'
                '<button type="submit">Yes, subscribe me</button></form>'
                "<p>If you did not ask for this, close this page: nothing will be sent.</p>",
                200,
            )
        form = await self.form(request)
        if form.get("confirm") != "yes":
            return self.page("Nothing changed", "<p>The request was incomplete.</p>", 400)
        ip = request.client.host if request.client else None
        key = erasure_key(self.policy.key)

        email_hash = erasure_hash(key, waiting.email)  # the address is the signup's own
        done = await self._db(lambda storage: storage.signups.confirm(
            signup_id, nonce, confirmed_ip=ip, now=now, email_hash=email_hash,
            welcome=self.policy.welcome,
        ))  # fmt: skip
        if done is None:
            return self._not_found()
        log.info("signup #%d confirmed: %d list(s)", signup_id, len(done.signup.lists))
        if done.welcome_queued:
            self.wake()
        titles = _titles(self.policy, done.signup.lists)
        return self.page(
            "You are subscribed",
            f"<p>Thank you. <strong>{_e(done.signup.email)}</strong> will get "
            f"<strong>{titles}</strong> from now on.</p>"
            "<p>Every email we send has a link to change your choice or unsubscribe.</p>",
            200,
        )

    def _not_found(self) -> Response:
        log.info("rejected a confirmation link that is not valid")
        return self.page(
            "Link not recognised",
            "<p>This confirmation link is not valid: it may have been used already, have "
            "expired, or been cut short. Sign up again to get a new one.</p>"
            f'<p><a href="{_e(self.base)}/subscribe">Sign up</a></p>',
            404,
        )


# Where each field's problem sends the summary's link (the lists: their first box).
_FIRST_INPUT = {"email": "email", "first_name": "first_name", "lists": "list-0"}


def _marked(posted: Posted | None, field: str) -> tuple[str, str]:
    """The attributes that mark ``field`` as wrong, and its message, or ("", "")."""
    said = None if posted is None else posted.problem(field)
    if said is None:
        return "", ""
    return (
        f' aria-invalid="true" aria-describedby="{field}-error"',
        f'<span class="error" id="{field}-error">{_e(said)}</span>',
    )


def _titles(policy: SignupPolicy, names: tuple[str, ...]) -> str:
    return " and ".join(_e(policy.title(n)) for n in names)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
