"""The one exception tree of the project.

Everything a user can cause (a bad issue file, a missing setting, a template
that does not render) is raised as a subclass of :class:`NewsletterError`
whose message is a whole sentence saying where and what to do next. The CLI
catches ``NewsletterError`` in one place for every command and prints it as
one error (a headline, perhaps with indented detail lines), so bugs keep
their traceback.

    NewsletterError
    ├── ConfigError          settings, the society file, missing folders
    │   ├── NobodyMailable   (sending) every member of the list has left it
    │   ├── IdAlreadyUsed    (provenance) another file was sent under this issue id
    │   └── CopiesRefused    (test_copies) an address for a test copy may not be mailed
    ├── ValidationFailed     input files: carries every Problem found at once
    ├── TemplateError        Jinja or MJML could not render a template
    ├── BuildCheckFailed     the rendered email breaks a rule (size, remote CSS...)
    ├── OutputError          the build folder could not be written
    ├── DraftRefused         (drafting) `new`: the file exists, its id is taken, a past day
    ├── CampaignAborted      the relay refuses the whole send (login, sender, TLS)
    ├── LockHeld             another live process holds the lock (a send, the schedule)
    ├── LeaseLost            a holder's renewal found its lease taken by another run
    ├── StorageError         the database failed because of the file or the machine
    │   ├── StorageBusy      another process holds it past the wait (the web: 503)
    │   │   └── SendLogBusy  (campaign) ... past a send's wait: names what went out unrecorded
    │   ├── StorageUnavailable  damaged, not ours, unreadable, full disk
    │   │   └── SendLogFailed   (campaign) ... during a send: names what went out unrecorded
    │   └── SendExists       a send of this issue to this list was frozen already
    └── SlotFailed           (scheduler) the due slot's issue could not be sent
        └── SlotIncomplete   some of its lists, or part of one, were not sent

    ConnectFailed            not a user's error: a transport could not open a
                             connection; the campaign retries or gives up on it

Errors whose message is made of their subsystem's own terms are defined there
(marked above with the module); the rest are here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input file, located as precisely as we can."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class NewsletterError(Exception):
    """Base of every error a user can cause; the message says what to do."""

    exit_code = 1
    # A line the CLI adds after the message. Set only by code that knows it is
    # true where the error is raised (a recorded send can be resumed; a failed
    # slot sent nothing), never by the error's class alone: the same refusal by
    # the relay is resumable in a send and not in a test copy.
    next_step: str | None = None


class ConfigError(NewsletterError):
    """A setting, the society file or a required folder is missing or wrong."""


class ValidationFailed(NewsletterError):
    """An input file has one or more problems; all of them are listed."""

    def __init__(self, problems: list[Problem], *, outcome: str = "nothing was written") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found; {outcome}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class TemplateError(NewsletterError):
    """A template failed to render (syntax, missing variable, MJML parse error)."""


class BuildCheckFailed(NewsletterError):
    """The rendered email breaks a rule it must keep; every broken rule is listed."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        super().__init__(
            "the rendered email did not pass its checks; nothing was written:\n"
            + "\n".join(f"  {f}" for f in self.failures)
        )


class OutputError(NewsletterError):
    """The output folder could not be written."""


class CampaignAborted(NewsletterError):
    """The relay refuses the whole campaign: stop, and say how to resume."""

    # How many of the send's recipients had been sent to (over all its runs) when
    # the relay refused: 0 means the refusal came before anything went out.
    sent = 0


class SendPaused(CampaignAborted):
    """The send paused itself (its bounce or complaint rate) and waits for a person: a
    scheduled run does not resume it; ``newsletter send`` by hand does."""

    exit_code = 3


class CanaryWaiting(SendPaused):
    """The canary went out (NEWSLETTER_CANARY_TO); the rest of the list waits for a
    person: ``newsletter send ... --go``."""


class LockHeld(NewsletterError):
    """Another live process holds the lock; the message says which one, since and until when."""

    def __init__(self, name: str, host: str, pid: str, since: float | None, until: float) -> None:
        self.name, self.host, self.pid, self.since, self.until = name, host, pid, since, until
        started = f" since {shown_time(since)}" if since is not None else ""
        super().__init__(
            f"another run (process {pid} on {host}) holds the {name!r} lock{started}; its "
            f"lease lasts until {shown_time(until)} and is renewed while that run is alive. This "
            "run does nothing: wait for that one to finish, or stop it, then run this again"
        )


class LeaseLost(NewsletterError):
    """The holder of a lease found that it is no longer its own: another run holds it, or
    no renewal succeeded for the lease's lifetime (the holder was paused, or its clock or
    its database stalled), so another run may have taken it.

    ``recorded`` says what the run recorded before it stopped (a send's counts), when
    the run that lost it says so; ``sent`` is how many of its messages went out, so a
    caller can tell a send that began from one that did not."""

    def __init__(
        self, name: str, holder: str | None, recorded: str | None = None, sent: int = 0
    ) -> None:
        self.name, self.holder, self.recorded, self.sent = name, holder, recorded, sent
        if recorded is None:
            by = f" by {holder}" if holder else ""
            super().__init__(
                f"this run lost the {name!r} lock{by}: it stopped taking new recipients and "
                "recorded what was in flight. Check that the other run is the only one, then "
                "run this again to resume"
            )
            return
        if holder and holder.startswith("whichever run"):
            # The holder's own renewals failed: it cannot know who, if anyone, took it.
            how = f"the {name!r} lock is no longer this run's ({holder})"
        else:
            how = f"this run lost the {name!r} lock to {holder or 'another run'}"
        super().__init__(
            f"{how}. It stopped taking new recipients, let the messages in flight finish "
            f"and recorded them: {recorded}. Run the same command again to resume once the "
            "other run is done; nobody is sent twice"
        )


class StorageError(NewsletterError):
    """The database cannot be used because of the file or the machine, not a query's bug.

    Raised by the stores in :mod:`newsletter.storage` instead of the driver's own
    errors; the message names the database and says what to do. A mistake in a
    query is not one of these: it stays the driver's exception, with its traceback."""


class StorageBusy(StorageError):
    """Another process held the database longer than we wait; trying again later helps."""


class StorageUnavailable(StorageError):
    """The database is damaged, not ours, not readable or writable, or its disk is full."""


class SendExists(StorageError):
    """A second freeze of one issue to one list: the first one's rows stand (another run
    froze it first, or the caller did not look for it)."""

    def __init__(self, issue_id: str, list_name: str) -> None:
        self.issue_id, self.list_name = issue_id, list_name
        super().__init__(
            f"the send of {issue_id} to the list {list_name!r} is recorded already (another "
            "run may have started it just now); run the same command again to resume it"
        )


def shown_time(when: float) -> str:
    """A Unix time as messages show it: UTC, to the second."""
    import datetime as dt

    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class ConnectFailed(Exception):
    """A connection could not be opened; nothing was sent on it (internal to sending)."""
