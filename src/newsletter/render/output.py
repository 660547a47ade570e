"""Output stage: a build result → ``<out>/<issue-id>/``, all files or none.

Input: a :class:`BuildResult` and the output folder. Output: the folder with
``index.html``, ``index.txt``, ``issue.mjml`` and ``preview.eml``. The files
are written into a temporary sibling folder and swapped in with renames, so
a reader (or a crash) never sees a half-written build, and a failed build
leaves the previous one in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from newsletter.errors import OutputError

if TYPE_CHECKING:
    from newsletter.build import BuildResult


def write_build(result: BuildResult, out_dir: Path) -> Path:
    target = out_dir / result.issue_id
    files: dict[str, bytes] = {
        "index.html": result.html.encode("utf-8"),
        "index.txt": result.text.encode("utf-8"),
        "issue.mjml": result.rendered.mjml.encode("utf-8"),
        "preview.eml": result.eml,
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{result.issue_id}.", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir}: {exc.strerror}") from None
    try:
        for name, data in files.items():
            with (staging / name).open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        staging.chmod(0o755)
        old = None
        if target.exists():
            old = out_dir / f".{result.issue_id}.old"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        try:
            staging.rename(target)
        except OSError:
            if old is not None:
                old.rename(target)  # put the previous build back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
