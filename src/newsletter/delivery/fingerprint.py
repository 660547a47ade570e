"""What a send froze: the built issue → a fingerprint, kept with the send, checked at resumes.

Input: a :class:`~newsletter.build.BuildResult` (the rendered issue every message is
filled from, and the files it was built from) and the sender. Output: a
:class:`Fingerprint`: the SHA-256 of what every message is made of (subject,
preheader, HTML and text with their per-recipient slots and what each merge-field
slot stands for, the From and Reply-To),
and of each input file: the issue file, society.yaml (the footer) and the
templates folder. The send log keeps the first one (``sends.frozen``); a resume
compares with it, so that half a list does not get one version and half another
without somebody saying so (``send --accept-changes``).

A file that changed without changing what is sent (a comment, a template's
whitespace that MJML drops) is not a change; a rendering that changed while every
file stayed the same names the other inputs (the settings, newsletter's version).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from newsletter.build import BuildResult
    from newsletter.delivery.message import Sender

__all__ = ["Fingerprint", "fingerprint"]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    rendered: str  # SHA-256 of what every message is filled from
    parts: dict[str, str] = field(default_factory=dict)  # input name → SHA-256 of its bytes

    def to_json(self) -> str:
        return json.dumps({"rendered": self.rendered, "parts": self.parts}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        data = json.loads(text)
        return cls(str(data["rendered"]), {str(k): str(v) for k, v in data["parts"].items()})

    def changed_since(self, frozen: Fingerprint) -> list[str]:
        """What differs from ``frozen`` in what is sent, in words; empty: nothing."""
        if self.rendered == frozen.rendered:
            return []
        named = [name for name, digest in self.parts.items() if frozen.parts.get(name) != digest]
        return named or ["the settings it is rendered with (the public URL, the From "
                         "address) or newsletter's version"]  # fmt: skip


def fingerprint(built: BuildResult, sender: Sender) -> Fingerprint:
    """The fingerprint of ``built`` as ``sender`` sends it."""
    rendered = built.rendered
    made_of = hashlib.sha256()
    for part in (
        rendered.subject, rendered.preheader or "", rendered.html, rendered.text,
        sender.name, sender.address, sender.reply_to or "",
    ):  # fmt: skip
        made_of.update(part.encode("utf-8"))
        made_of.update(b"\x00")  # a boundary no part contains
    # What each merge-field slot stands for (the field, its fallback): the rendered text
    # holds only the slots' numbers.
    made_of.update(repr(rendered.merge_fields).encode("utf-8"))
    parts = {}
    if built.inputs is not None:
        read = built.inputs
        parts = {
            str(read.issue_file): _file(read.issue_file),
            str(read.society_file): _file(read.society_file),
            f"{read.templates_dir}/": _folder(read.templates_dir),
        }
    return Fingerprint(made_of.hexdigest(), parts)


def _file(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _folder(path: Path) -> str:
    """The SHA-256 of every file under ``path``: names (relative, sorted) and bytes."""
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(item.relative_to(path).as_posix().encode("utf-8") + b"\x00")
            digest.update(_file(item).encode("ascii"))
    return digest.hexdigest()
