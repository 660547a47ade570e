"""Findings: what each doctor check concluded, and the verdict of them all.

Input: the checks' conclusions. Output: :class:`Finding` (one check's status, what
was seen, and the one-line fix) and :class:`Diagnosis` (all of them; ``ok`` when
none failed), each with its JSON form for ``newsletter doctor --json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["pass", "warn", "fail", "info"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "info")


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # a stable id for scripts: "spf.record", "dkim.key", ...
    title: str  # what was checked, for people: "SPF record of example.org"
    status: Status
    detail: str  # what was found
    fix: str = ""  # one line: what to change; empty when there is nothing to do

    def as_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """No check failed (warnings and information do not stop a send)."""
        return not any(f.status == "fail" for f in self.findings)

    def counts(self) -> dict[Status, int]:
        return {s: sum(f.status == s for f in self.findings) for s in STATUSES}

    def by_check(self) -> dict[str, Finding]:
        return {f.check: f for f in self.findings}

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "counts": self.counts(),
            "findings": [f.as_json() for f in self.findings],
        }
