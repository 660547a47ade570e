"""The signup mailer: the outbox → each confirmation and welcome mail over SMTP, once.

Input: a :class:`~newsletter.storage.base.Storage` of its own (the mailer runs in a
thread of ``newsletter serve``), a composer (outbox entry and its signup → the
message's bytes, :mod:`newsletter.signup.mails` through :mod:`newsletter.wiring`), a
:class:`~newsletter.delivery.transports.Transport` and the envelope sender. Output:
each mail's fate in the outbox, recorded as the newsletter's sends record theirs:
``sending`` (committed) before its SMTP transaction, then ``sent``, ``rejected``,
``deferred`` (tried again later, doubling the wait, given up after
:data:`~newsletter.storage.signups.MAIL_ATTEMPTS`) or ``unknown`` (the connection broke
once the message was out: perhaps delivered, so never sent again). A mail found
``sending`` when the mailer starts belonged to a server that stopped mid-transaction:
it becomes ``unknown``. The person can always post the form again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from newsletter.delivery.transports import Envelope, Transport
from newsletter.errors import NewsletterError
from newsletter.models import Outcome
from newsletter.storage.base import Storage
from newsletter.storage.signups import MAIL_ATTEMPTS, OutboxMail, PendingSignup

__all__ = ["Compose", "Mailer"]

log = logging.getLogger("newsletter.signup.mailer")

Compose = Callable[[OutboxMail, PendingSignup], bytes]
# A mail left `sending` longer than this when a mailer starts was a stopped server's.
STALE_SENDING = dt.timedelta(minutes=10)


class Mailer:
    def __init__(
        self,
        storage: Storage,
        compose: Compose,
        transport: Transport,
        envelope_sender: str,
        *,
        poll: float = 5.0,
        retry_after: float = 60.0,
    ) -> None:
        self.storage = storage
        self.compose = compose
        self.transport = transport
        self.envelope_sender = envelope_sender
        self.poll = poll
        self.retry_after = retry_after
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self, now: dt.datetime | None = None) -> int:
        """Mails a stopped server left ``sending``: ``unknown`` (module docstring)."""
        at = now or dt.datetime.now(dt.UTC)
        older = (at - STALE_SENDING).isoformat(timespec="seconds")
        return self.storage.signups.mail_interrupted(older)

    def run_once(self, now: float | None = None) -> int:
        """Send every mail due now; how many were handled."""
        signups = self.storage.signups
        handled = 0
        while not self._stop.is_set():
            at = time.time() if now is None else now
            mail = signups.claim_mail(at)
            if mail is None:
                return handled
            handled += 1
            signup = signups.signup(mail.signup_id)
            try:
                if signup is None:
                    raise ValueError(f"signup #{mail.signup_id} is gone")
                data = self.compose(mail, signup)
            except (ValueError, NewsletterError) as exc:
                # Nothing went out: a template or setting at fault, said in the log.
                log.error("mail #%d (%s) could not be composed: %s", mail.id, mail.kind, exc)
                signups.mail_done(mail.id, "rejected", f"not composed: {exc}")
                continue
            outcome = asyncio.run(self._send(Envelope(self.envelope_sender, mail.email, data)))
            self._record(mail, outcome, at)
        return handled

    def _record(self, mail: OutboxMail, outcome: Outcome, at: float) -> None:
        said = f"{outcome.code} {outcome.detail}".strip() if outcome.code else outcome.detail
        state = outcome.state
        retry_at = None
        if state == "deferred":
            if mail.attempts >= MAIL_ATTEMPTS:
                state, said = "rejected", f"given up after {mail.attempts} attempts: {said}"
            else:
                retry_at = outcome.retry_at or at + self.retry_after * 2 ** (mail.attempts - 1)
        self.storage.signups.mail_done(mail.id, state, said, retry_at=retry_at)
        log.info("mail #%d (%s): %s", mail.id, mail.kind, state)

    async def _send(self, envelope: Envelope) -> Outcome:
        try:
            session = await self.transport.open()
        except (NewsletterError, OSError) as exc:
            return Outcome("deferred", None, f"the relay could not be reached: {exc}")
        try:
            return await session.send(envelope)
        finally:
            await session.close()

    # ------------------------------------------------------------ the thread

    def wake(self) -> None:
        """A mail was queued: look now, not at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="signup-mailer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except NewsletterError as exc:  # the database busy or gone: the mail waits
                log.error("the signup mailer: %s; trying again shortly", exc)
            self._wake.wait(self.poll)
            self._wake.clear()
