"""The one exception tree of the project.

Everything a user can cause (a bad issue file, a missing setting, a template
that does not render) is raised as a subclass of :class:`NewsletterError`
whose message is a whole sentence saying where and what to do next. The CLI
catches ``NewsletterError`` in one place for every command and prints it as
one error (a headline, perhaps with indented detail lines), so bugs keep
their traceback.

    NewsletterError
    ├── ConfigError          settings, the society file, missing folders
    ├── ValidationFailed     input files: carries every Problem found at once
    ├── TemplateError        Jinja or MJML could not render a template
    ├── BuildCheckFailed     the rendered email breaks a rule (size, remote CSS...)
    └── OutputError          the build folder could not be written
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
