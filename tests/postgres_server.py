"""A PostgreSQL server for the tests, and a fresh schema on it for each test.

Where the server comes from, in order: ``NEWSLETTER_TEST_POSTGRES_URL``; a server
answering at 127.0.0.1:5432 (user postgres, database test, trust auth, as the
machine and CI have it); a throwaway cluster made with Debian's ``initdb`` and
``pg_ctl`` in a temporary folder, started on a free port and stopped at the end
of the session. When none of them is possible, :func:`server` says why, and the
PostgreSQL tests are skipped with that reason (``.ci/run`` makes sure CI always
has a server, so CI never skips them).

Each test gets its own schema (``search_path`` set in the URL's ``options``), so
tests never see each other's rows and a dropped schema cleans up everything.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

# The server found, once per test session: (URL or None, why there is none).
_found: list[tuple[str | None, str]] = []


def _answers(url: str) -> str | None:
    """None when ``url`` takes a connection, else what went wrong."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _pg_bin() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _throwaway_cluster() -> tuple[str | None, str]:
    binaries = _pg_bin()
    if binaries is None:
        return None, "no PostgreSQL server answers and Debian's initdb/pg_ctl are not installed"
    folder = Path(tempfile.mkdtemp(prefix="newsletter-pg-"))
    data, port = folder / "data", _free_port()
    user = []
    if os.geteuid() == 0:
        # initdb refuses to run as root: the cluster belongs to the postgres user.
        shutil.chown(folder, "postgres")
        user = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run(
            [*user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [*user, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"),
             "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "-w", "start"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"a throwaway PostgreSQL cluster could not be started: {exc}"

    def stop() -> None:
        subprocess.run(
            [*user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    problem = _answers(url)
    return (url, "") if problem is None else (None, f"the throwaway cluster failed: {problem}")


def server() -> tuple[str | None, str]:
    """(the URL of a server to test against, or None; why there is none)."""
    if not _found:
        given = os.environ.get("NEWSLETTER_TEST_POSTGRES_URL")
        if given:
            problem = _answers(given)
            _found.append(
                (given, "")
                if problem is None
                else (None, f"NEWSLETTER_TEST_POSTGRES_URL does not answer: {problem}")
            )
        elif _answers(DEFAULT_URL) is None:
            _found.append((DEFAULT_URL, ""))
        else:
            _found.append(_throwaway_cluster())
    return _found[0]


def with_schema(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (libpq's options, percent-encoded)."""
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def fresh_schema(url: str):  # type: ignore[no-untyped-def]
    """A new, empty schema on the server at ``url``; yields the URL that uses it, and
    drops the schema (with every table in it) afterwards."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # a name made here, not input
    try:
        yield with_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            try:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            except psycopg.errors.LockNotAvailable:
                # A session the test left open (a stopped process's) holds a lock on
                # it; the tests run one at a time, so every other one of ours is done.
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid != pg_backend_pid() AND application_name = 'newsletter'"
                )
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
