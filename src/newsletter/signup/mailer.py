"""The signup mailer: the outbox → each confirmation and welcome mail over SMTP, once.

Input: a :class:`~newsletter.storage.base.Storage` of its own (the mailer runs in a
thread of ``newsletter serve``), a composer (outbox entry and its signup → the
message's bytes, :mod:`newsletter.signup.mails` through :mod:`newsletter.wiring`), a
:class:`~newsletter.delivery.transports.Transport` and the envelope sender. Output:
each mail's fate in the outbox, recorded as the newsletter's sends record theirs:
``sending`` (committed) before its SMTP transaction, then ``sent``, ``rejected``,
``deferred`` (the relay unreachable, refusing the login or answering 4xx: tried again,
the wait doubling up to an hour, until the mail's link has expired) or ``unknown``
(the connection broke once the message was out: perhaps delivered, so never sent
again). A mail still ``sending`` :data:`STALE_SENDING` after it was claimed belonged to
a server that died mid-transaction (at each poll, by any server on the database): it
becomes ``unknown``; a server that is stopped finishes the mail in hand first. Signups
never confirmed are forgotten a day after their link expired. The person can always
post the form again.
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
from newsletter.storage.signups import OutboxMail, PendingSignup

__all__ = ["Compose", "Mailer"]

log = logging.getLogger("newsletter.signup.mailer")

Compose = Callable[[OutboxMail, PendingSignup], bytes]
# A mail `sending` longer than this was a dead server's: a transaction lasts at most
# the transport's message timeout (two minutes) and a connection's setup.
STALE_SENDING = dt.timedelta(minutes=10)
PURGE_AFTER = dt.timedelta(days=1)  # after its link expired: a signup never confirmed
MAX_WAIT = 3600.0  # between tries of a deferred mail


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
        """Mails a dead server left ``sending``: ``unknown`` (module docstring); and
        signups never confirmed, a day past their link's expiry, forgotten."""
        at = now or dt.datetime.now(dt.UTC)
        older = (at - STALE_SENDING).isoformat(timespec="seconds")
        self.storage.signups.purge_unconfirmed((at - PURGE_AFTER).isoformat(timespec="seconds"))
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
            except Exception as exc:  # noqa: BLE001 - whatever it was, nothing went out
                # A template or setting at fault: said in the log, and on the mail.
                log.error("mail #%d (%s) could not be composed: %s", mail.id, mail.kind, exc)
                signups.mail_done(mail.id, "rejected", f"not composed: {exc}")
                continue
            outcome = asyncio.run(self._send(Envelope(self.envelope_sender, mail.email, data)))
            self._record(mail, signup, outcome, at)
        return handled

    def _record(self, mail: OutboxMail, signup: PendingSignup, outcome: Outcome, at: float) -> None:
        said = f"{outcome.code} {outcome.detail}".strip() if outcome.code else outcome.detail
        state = outcome.state
        retry_at = None
        if state == "deferred":
            wait = min(self.retry_after * 2 ** (mail.attempts - 1), MAX_WAIT)
            retry_at = outcome.retry_at or at + wait
            # A confirmation is of no use once its link has expired; a welcome, two days on.
            until = signup.expires_at if mail.kind == "confirm" else mail.created_at
            expires = dt.datetime.fromisoformat(until).timestamp() + (
                0 if mail.kind == "confirm" else 2 * 86400
            )
            if retry_at >= expires:
                state, retry_at = "rejected", None
                said = f"given up after {mail.attempts} attempt(s), its link expiring: {said}"
        self.storage.signups.mail_done(mail.id, state, said, retry_at=retry_at)
        log.info("mail #%d (%s): %s", mail.id, mail.kind, state)

    async def _send(self, envelope: Envelope) -> Outcome:
        try:
            session = await self.transport.open()
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, TLS, login: not sent
            return Outcome("deferred", None, f"the relay: {exc}")
        try:
            return await session.send(envelope)
        finally:
            await session.close()

    # ------------------------------------------------------------ the thread

    def wake(self) -> None:
        """A mail was queued: look now, not at the next poll."""
        self._wake.set()

    def start(self) -> None:
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
                self.recover()
                self.run_once()
            except NewsletterError as exc:  # the database busy or gone: the mail waits
                log.error("the signup mailer: %s; trying again shortly", exc)
            except Exception:  # a bug: logged in full, and the thread goes on
                log.exception("the signup mailer failed; trying again shortly")
            self._wake.wait(self.poll)
            self._wake.clear()
