"""Enhanced status codes in words: text → the RFC 3463 codes it holds.

Input: a diagnostic, a DSN's Status field or an SMTP reply. Output:
:data:`IN_WORDS`, the one pattern for a code such as ``5.1.1`` standing alone
in text (not part of a version number or an address), that the DSN reader, the
non-standard bounce reader and our own SMTP refusals all read codes with.
"""

from __future__ import annotations

import re

__all__ = ["IN_WORDS"]

IN_WORDS = re.compile(r"(?<![0-9.])([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.])", re.ASCII)
