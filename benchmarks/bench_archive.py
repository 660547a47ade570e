"""Archive benchmark: requests per second of the public pages, and a one-click POST under load.

Run from the repository root:  python benchmarks/bench_archive.py [--seconds S] [--clients N]

Makes a project with 150 sent issues (150 issue files, a database where each
was delivered and frozen into the archive, and subscribers to unsubscribe),
then runs the real `newsletter serve` (uvicorn on 127.0.0.1, in its own
process) twice: with the code of this tree ("after"), and with the code of
the base commit b918dc3 ("before", taken with `git archive`; skipped when git
or that commit is missing). A client in this process, N threads on keep-alive
connections, hammers each page for S seconds and counts answers; then it
measures the latency of one-click unsubscribe POSTs (RFC 8058), first on an
idle server and then while N threads hammer /issues/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from newsletter import tokens  # noqa: E402
from newsletter.audience.csv_import import ParsedRow  # noqa: E402
from newsletter.render.loading import load_issue, load_society  # noqa: E402
from newsletter.render.pipeline import web_version  # noqa: E402
from newsletter.render.templating import load_templates  # noqa: E402
from newsletter.storage.sqlite.archive import ArchivedIssue, ArchiveStore, Source  # noqa: E402
from newsletter.storage.sqlite.connection import connect  # noqa: E402
from newsletter.storage.sqlite.subscribers import SubscriberStore  # noqa: E402

BASE_COMMIT = "b918dc3"
ISSUES = 150
SECRET = "bench-secret-0123456789-0123456789-abcdef"  # noqa: S105 - a throw-away database
EXAMPLE = REPO / "issues" / "2020-12-23.yaml"
SUBJECT = "MS Research News: stem cell therapy shows promise"
FIRST = dt.date(2018, 1, 4)
ONE = f"/issues/{FIRST + dt.timedelta(weeks=ISSUES // 2)}"  # an issue page in the middle


def make_project(root: Path, posts: int) -> Path:
    project = root / "project"
    shutil.copytree(REPO / "templates", project / "templates")
    shutil.copy(REPO / "society.yaml", project / "society.yaml")
    (project / "issues").mkdir()
    example = EXAMPLE.read_text(encoding="utf-8")
    society = load_society(project / "society.yaml").value
    issue = load_issue(EXAMPLE).value
    html = web_version(issue, society, load_templates(project / "templates"), PUBLIC_URL)
    db = project / "newsletter.sqlite3"
    with closing(connect(db, create=True)) as conn:
        store = SubscriberStore(conn)
        rows = [ParsedRow(i + 2, f"reader{i}@example.org", "", "") for i in range(posts)]
        store.import_rows("research-news", rows, skip_invalid=False)
        archive = ArchiveStore(conn)
        for n in range(ISSUES):
            day = FIRST + dt.timedelta(weeks=n)
            subject = f"{SUBJECT} (week {n + 1})"
            path = project / "issues" / f"{day.isoformat()}.yaml"
            path.write_text(
                example.replace("date: 2020-12-23", f"date: {day.isoformat()}").replace(
                    SUBJECT, subject
                ),
                encoding="utf-8",
            )
            send_id = conn.execute(
                "INSERT INTO sends (issue_id, list_name, created_at, audience, suppressed) "
                "VALUES (?, 'research-news', ?, 1, 0) RETURNING id",
                (day.isoformat(), f"{day.isoformat()}T09:00:00+00:00"),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO deliveries (send_id, seq, email, first_name, last_name, state) "
                "VALUES (?, 0, 'someone@example.org', '', '', 'sent')",
                (send_id,),
            )
            source = Source.of(path)
            archive.record_source(send_id, source)
            archive.freeze(
                ArchivedIssue(
                    issue_id=day.isoformat(),
                    subject=subject,
                    date=day.isoformat(),
                    preheader=issue.preheader or "",
                    html=html.replace(SUBJECT, subject),
                    source=source,
                    frozen_at=f"{day.isoformat()}T09:00:05+00:00",
                )
            )
    return project


PUBLIC_URL = "https://news.example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    """`newsletter serve` in its own process, with the code found on ``pythonpath``."""

    def __init__(self, project: Path, pythonpath: Path, log: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(
            PYTHONPATH=str(pythonpath),
            NEWSLETTER_DATABASE=str(project / "newsletter.sqlite3"),
            NEWSLETTER_SECRET_KEY=SECRET,
            NEWSLETTER_PUBLIC_URL=PUBLIC_URL,
        )
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "serve", "--port", str(self.port)],
            cwd=project,
            env=env,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if get(self.port, "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the server did not start; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


def get(
    port: int, path: str, conn: http.client.HTTPConnection | None = None, **headers: str
) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def hammer(
    port: int, path: str, seconds: float, clients: int, stop: threading.Event | None = None
) -> float:
    """Requests per second that ``clients`` keep-alive connections get through."""
    counts = [0] * clients
    until = time.monotonic() + seconds
    halt = stop or threading.Event()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < until and not halt.is_set():
            status, _ = get(port, path, conn)
            assert status in (200, 304), (path, status)
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def one_click_latency(port: int, emails: list[str]) -> list[float]:
    out = []
    for address in emails:
        token = tokens.sign(SECRET.encode(), "research-news", address)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start = time.perf_counter()
        conn.request(
            "POST",
            f"/unsubscribe/{token}",
            body=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        response.read()
        out.append((time.perf_counter() - start) * 1000)
        conn.close()
        assert response.status == 200, response.status
        time.sleep(0.02)
    return out


def measure(
    label: str, project: Path, pythonpath: Path, args: argparse.Namespace, emails: list[str]
) -> dict[str, float]:
    served = Served(project, pythonpath, project.parent / f"serve-{label}.log")
    try:
        port = served.port
        one = ONE
        for path in ("/issues/", "/feed.xml", one):  # warm-up: the first render
            assert get(port, path)[0] == 200, path
        result = {
            "/issues/": hammer(port, "/issues/", args.seconds, args.clients),
            "/feed.xml": hammer(port, "/feed.xml", args.seconds, args.clients),
            one: hammer(port, one, args.seconds, args.clients),
        }
        half = len(emails) // 2
        idle = one_click_latency(port, emails[:half])
        stop = threading.Event()
        load = threading.Thread(
            target=hammer, args=(port, "/issues/", 3600, args.clients, stop), daemon=True
        )
        load.start()
        time.sleep(0.5)
        busy = one_click_latency(port, emails[half:])
        stop.set()
        load.join()
        result["post idle ms"] = statistics.median(idle)
        result["post busy ms"] = statistics.median(busy)
        result["post busy p90 ms"] = statistics.quantiles(busy, n=10)[-1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/issues/")
        response = conn.getresponse()
        response.read()
        etag = response.getheader("etag") or ""
        conn.close()
        if etag:
            result["/issues/ 304"] = hammer_conditional(port, etag, args)
        return result
    finally:
        served.stop()


def hammer_conditional(port: int, etag: str, args: argparse.Namespace) -> float:
    counts = [0] * args.clients
    until = time.monotonic() + args.seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < until:
            status, _ = get(port, "/issues/", conn, **{"If-None-Match": etag})
            assert status == 304, status
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return float(sum(counts) / args.seconds)


def base_code(root: Path) -> Path | None:
    target = root / "before"
    target.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BASE_COMMIT, "src"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"before: skipped, cannot read {BASE_COMMIT} from git ({exc})")
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--posts", type=int, default=20, help="one-click POSTs idle and busy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        project = make_project(root, args.posts * 4)
        print(
            f"{ISSUES} sent issues in {time.perf_counter() - started:.1f} s; "
            f"{args.clients} client threads, {args.seconds:.0f} s per page"
        )
        emails = [f"reader{i}@example.org" for i in range(args.posts * 4)]
        results = {}
        old = base_code(root)
        if old is not None:
            results["before"] = measure("before", project, old, args, emails[: args.posts * 2])
        results["after"] = measure("after", project, REPO / "src", args, emails[args.posts * 2 :])
    names = list(results["after"])
    print(f"{'':26}" + "".join(f"{k:>12}" for k in results) + ("       ratio" if old else ""))
    for name in names:
        unit = "" if name.endswith("ms") else " req/s"
        row = f"{name + unit:26}"
        for figures in results.values():
            value = figures.get(name)
            row += f"{value:12.1f}" if value is not None else f"{'-':>12}"
        before, after = results.get("before", {}).get(name), results["after"][name]
        if before:
            ratio = after / before if not name.endswith("ms") else before / after
            row += f"{ratio:11.1f}x"
        print(row)
    if old is not None:
        print("ratio: after/before for req/s, before/after for latency (higher is better)")


if __name__ == "__main__":
    main()
