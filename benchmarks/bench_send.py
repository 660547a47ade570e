"""Send benchmark: how fast a real send goes over SMTP, and how much memory a dry run needs.

Run from the repository root, as root on Debian (postfix is installed if missing):

    python benchmarks/bench_send.py [--subscribers 20000] [--connections 16]
        [--dry-run-sizes 10000,1000000] [--dry-run-budget 600]

Needs Postfix's test tools smtp-sink (an SMTP server that accepts and discards
mail and advertises PIPELINING) and smtp-source (a C SMTP client). When they
are missing and this runs as root, `apt-get install postfix` with "No
configuration" puts them in /usr/sbin; the postfix daemon is not started.
Exit status 2 when they cannot be had.

1. Real send: builds issues/2020-12-23.yaml, imports N generated subscribers
   into a fresh database, then times the function `newsletter send` calls,
   delivery.send_issue.send_issue (the checks, the lease, the frozen audience,
   the archive's web version, the campaign) with the SMTP transport over C
   connections to smtp-sink on 127.0.0.1. Prints messages per second end to
   end (all of that included) and the run's own rate, and checks that the
   send log has all N sent and that smtp-sink counted N.
2. Reference: smtp-source sends max(N, 20000) messages of our mean message
   size over C connections, each kept open (-d), to a fresh smtp-sink; the
   median of 3 runs. Target: our end-to-end rate at least 0.5 of it.
3. Profile: where the time of a 3,000-message send goes (cProfile, top 15).
4. Memory: for each --dry-run-sizes, a child process runs `newsletter send
   --dry-run`'s function (send_issue with dry_run: the storage's scratch copy,
   the outbox transport) over a database of that many subscribers, and
   reports its peak RSS (VmHWM). Targets: under 150 MB for
   the largest size, and no more than 20 MB above the smallest. A run that
   takes longer than --dry-run-budget seconds (0: no limit) is stopped as
   Ctrl-C would stop it; it is then reported as incomplete, with its peak RSS
   so far and the time the whole run would take, extrapolated from its
   progress.

5. With --database postgresql://...: the same N-subscriber send through the
   real command, `newsletter send --yes --workers K` (K = 1, 2, 4 sender
   processes on this host, one PostgreSQL database), each K into a fresh
   schema of that database and a fresh smtp-sink, timed end to end; and the
   same command on SQLite (one process) beside it. Prints msg/s and the ratio
   to smtp-source. Target: the best K at or above 0.5 of smtp-source. Then
   the dry run's peak RSS on PostgreSQL for the smallest and largest
   --dry-run-sizes (`send --dry-run` in a child, VmHWM through /proc).

Everything is written to a temporary directory (honours TMPDIR), removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from newsletter.audience.csv_import import ParsedRow  # noqa: E402
from newsletter.build import BuildInputs, BuildResult, build  # noqa: E402
from newsletter.delivery.campaign import Campaign, Progress, SendOptions  # noqa: E402
from newsletter.delivery.message import MessageTemplate, Sender  # noqa: E402
from newsletter.delivery.send_issue import SendHooks, SendRequest, send_issue  # noqa: E402
from newsletter.delivery.sending import SendReport  # noqa: E402
from newsletter.delivery.transports import SmtpConfig, SmtpTransport, Transport  # noqa: E402
from newsletter.models import Recipient  # noqa: E402
from newsletter.storage import open_storage  # noqa: E402
from newsletter.storage.sqlite.connection import connect  # noqa: E402

ISSUE = REPO / "issues" / "2020-12-23.yaml"
LIST = "research-news"
ENVELOPE_SENDER = "bounces@example.org"
TOOLS = ("smtp-sink", "smtp-source")
RATIO_TARGET = 0.5
RSS_LARGEST_TARGET_MB = 150.0
RSS_GROWTH_TARGET_MB = 20.0
PROFILE_MESSAGES = 3000
SMTP_SOURCE_RUNS = 3
DRY_RUN_BUDGET_S = 600.0
INSERT_BATCH = 10_000
FIRST = ("Sam", "Ann", "Zoë", "José", "Li", "Fatima", "Ola", "Émile", "Kim", "Ravi")
LAST = ("Sample", "Müller", "O'Brien", "Nguyen", "Smith", "Kowalski", "Ito", "Dubois")


# ---------------------------------------------------------------------- postfix tools


def tool_path(name: str) -> Path | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def ensure_tools() -> str | None:
    """None once smtp-sink and smtp-source are there, else why they cannot be."""
    if all(tool_path(t) for t in TOOLS):
        return None
    if os.geteuid() != 0:
        return "smtp-sink/smtp-source are missing and this is not root: apt-get install postfix"
    if not (shutil.which("apt-get") and shutil.which("debconf-set-selections")):
        return "smtp-sink/smtp-source are missing and there is no apt-get to install postfix"
    print("installing postfix for smtp-sink and smtp-source (the daemon is not configured) ...")
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # perhaps no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"apt-get install postfix failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    missing = [t for t in TOOLS if tool_path(t) is None]
    return f"postfix is installed but {', '.join(missing)} not found" if missing else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """smtp-sink on a free port of 127.0.0.1; stop() says how many messages it received."""

    def __init__(self, folder: Path) -> None:
        tool = tool_path("smtp-sink")
        assert tool is not None
        self.port = free_port()
        self.out = folder / f"smtp-sink-{self.port}.out"
        # -c: count messages on stdout; -u: smtp-sink refuses to run as root without it.
        command = [str(tool), "-c"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        command += [f"127.0.0.1:{self.port}", "1000"]
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink did not start: {self.out.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        # -c writes "sess=N quit=N mesg=N" and a carriage return after each change.
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes())
        return int(found[-1]) if found else 0

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- the issue


SENDER = Sender(
    name="MS Research News",
    address="news@example.org",
    list_name=LIST,
    public_url="https://news.example.org",
    token_key=b"bench_send.py token key: 32 bytes or more",
    unsubscribe_mailto="unsubscribe@example.org",
)


def make_build() -> BuildResult:
    inputs = BuildInputs(
        issue_file=ISSUE,
        society_file=REPO / "society.yaml",
        templates_dir=REPO / "templates",
        sender=SENDER,
        preview_recipient=Recipient("sam.sample@example.org", "Sam", "Sample"),
    )
    return build(inputs)


def send(
    db: Path,
    built: BuildResult,
    transport: Transport | None,
    options: SendOptions,
    hooks: SendHooks | None = None,
) -> SendReport:
    """What `newsletter send` does, through the same function; no transport: a dry run."""
    request = SendRequest(ISSUE, LIST, dry_run=transport is None, outbox=db.parent / "outbox")
    return send_issue(
        request,
        build=lambda: built,
        open_storage=lambda: open_storage(db),
        transport=lambda: transport or _no_transport(),
        sender=SENDER,
        options=options,
        envelope_sender=ENVELOPE_SENDER,
        templates_dir=REPO / "templates",
        out_dir=db.parent / "out",
        hooks=hooks or SendHooks(),
    )


def _no_transport() -> Transport:
    raise AssertionError("a dry run never asks for the real transport")


def subscriber(i: int) -> tuple[str, str, str]:
    return f"reader{i:06d}@example.org", FIRST[i % len(FIRST)], LAST[i % len(LAST)]


def parsed_rows(n: int) -> Iterator[ParsedRow]:
    for i in range(1, n + 1):
        email, first, last = subscriber(i)
        yield ParsedRow(i + 1, email, first, last, {})


def mean_size(template: MessageTemplate, n: int) -> int:
    when = dt.datetime.now(dt.UTC)
    sample = [subscriber(i) for i in range(1, min(n, 1000) + 1)]
    sizes = [len(template.personalise(Recipient(*s), date=when)) for s in sample]
    return round(sum(sizes) / len(sizes))


def imported_db(folder: Path, n: int) -> Path:
    path = folder / "newsletter.sqlite3"
    storage = open_storage(path, create=True)
    report = storage.subscribers.import_rows(LIST, parsed_rows(n), skip_invalid=False)
    assert report.committed and report.added == n, report
    storage.close()
    return path


# ---------------------------------------------------------------------- real send


def smtp_send(db: Path, built: BuildResult, port: int, connections: int) -> SendReport:
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=30))
    return send(db, built, transport, SendOptions(connections=connections))


def bench_our_send(root: Path, built: BuildResult, n: int, connections: int) -> float:
    folder = root / "send"
    folder.mkdir()
    start = time.perf_counter()
    db = imported_db(folder, n)
    imported = time.perf_counter() - start
    print(f"  import of {n:,} subscribers (SubscriberStore.import_rows): {imported:.2f} s")
    with Sink(root) as sink:
        start = time.perf_counter()
        report = smtp_send(db, built, sink.port, connections)
        elapsed = time.perf_counter() - start
        received = sink.stop()
    counts = report.result.counts
    assert counts["sent"] == n, f"the send log does not say all {n:,} were sent: {counts}"
    assert received == n, f"smtp-sink counted {received:,} messages, not {n:,}"
    run = report.result
    print(
        f"  newsletter send  {n:,} messages, {connections} connections: {elapsed:.2f} s "
        f"end to end = {n / elapsed:,.0f} msg/s   (the run alone: {run.elapsed:.2f} s = "
        f"{run.rate:,.0f} msg/s; checks, freeze and archive {elapsed - run.elapsed:.2f} s)"
    )
    print(f"  send log: {counts['sent']:,} sent, smtp-sink received {received:,}")
    return n / elapsed


def bench_smtp_source(root: Path, n: int, connections: int, size: int) -> float:
    """Median rate of SMTP_SOURCE_RUNS runs, each against a fresh smtp-sink."""
    tool = tool_path("smtp-source")
    assert tool is not None
    rates = []
    for _ in range(SMTP_SOURCE_RUNS):
        with Sink(root) as sink:
            command = [str(tool), "-d", "-s", str(connections), "-l", str(size), "-m", str(n)]
            command += ["-f", ENVELOPE_SENDER, "-t", "reader@example.org"]
            command.append(f"127.0.0.1:{sink.port}")
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            received = sink.stop()
        assert received == n, f"smtp-sink counted {received:,} from smtp-source, not {n:,}"
        rates.append(n / elapsed)
    rate = statistics.median(rates)
    print(
        f"  smtp-source      {n:,} messages, {connections} connections, -d -l {size:,}: "
        f"median {rate:,.0f} msg/s of {SMTP_SOURCE_RUNS} runs "
        f"({', '.join(f'{r:,.0f}' for r in rates)})"
    )
    return rate


# ---------------------------------------------------------------------- profile


def profile_send(root: Path, built: BuildResult, connections: int) -> None:
    folder = root / "profile"
    folder.mkdir()
    db = imported_db(folder, PROFILE_MESSAGES)
    profiler = cProfile.Profile()
    with Sink(root) as sink:
        start = time.perf_counter()
        profiler.enable()
        report = smtp_send(db, built, sink.port, connections)
        profiler.disable()
        elapsed = time.perf_counter() - start
    assert report.result.counts["sent"] == PROFILE_MESSAGES, report.result.counts
    print(f"profile of a send of {PROFILE_MESSAGES:,} messages ({elapsed:.2f} s under cProfile)")
    stats = pstats.Stats(profiler, stream=io.StringIO())
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    table = stats.stats  # type: ignore[attr-defined]
    for key, title in ((3, "cumulative"), (2, "own (total) time")):
        print(f"  top 15 by {title}:  ncalls    own s    cum s  function")
        ranked = sorted(table.items(), key=lambda kv: kv[1][key], reverse=True)[:15]
        for (file, line, func), (_cc, nc, tt, ct, _callers) in ranked:
            where = func if file == "~" else f"{func} ({short(file)}:{line})"
            print(f"  {nc:>33,} {tt:8.3f} {ct:8.3f}  {where}")


def short(file: str) -> str:
    path = Path(file)
    for base in (REPO / "src", Path(sys.prefix), Path(sys.base_prefix)):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return path.name


# ---------------------------------------------------------------------- memory


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MB.

    Not getrusage's ru_maxrss: on Linux it survives fork and exec, so in a child
    it is at least the parent's peak (a parent of 300 MB gives a child of 300 MB).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_make_db(folder: Path, n: int) -> None:
    """Fill a new database with n members of LIST, fast (no validation, one transaction)."""
    conn = connect(folder / "newsletter.sqlite3", create=True)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    for low in range(1, n + 1, INSERT_BATCH):
        ids = range(low, min(low + INSERT_BATCH, n + 1))
        cur.executemany(
            "INSERT INTO subscribers (id, email, first_name, last_name, attributes, created_at) "
            "VALUES (?, ?, ?, ?, '{}', ?)",
            ((i, *subscriber(i), now) for i in ids),
        )
        cur.executemany(
            "INSERT INTO list_members (list_name, subscriber_id, added_at) VALUES (?, ?, ?)",
            ((LIST, i, now) for i in ids),
        )
    cur.execute("COMMIT")
    conn.close()
    print(json.dumps({"peak_rss_mb": rss_mb()}))


def child_dry_run(folder: Path, n: int, budget: float) -> None:
    """`newsletter send --dry-run`'s function, on the database made by child_make_db.

    The run is stopped (Campaign.stop, as Ctrl-C does) once it has taken ``budget`` seconds
    (0: never).
    """
    built = make_build()
    after_build = rss_mb("VmRSS")
    started = time.perf_counter()
    run_started = [started]  # when the campaign starts (after the copy and prepare)
    campaigns: list[Campaign] = []
    samples: list[tuple[int, float]] = []  # (messages done, seconds into the run)
    last = [started, 0.0]  # time and count of the last progress line

    def start(campaign: Campaign) -> None:
        campaigns.append(campaign)
        run_started[0] = last[0] = time.perf_counter()

    def progress(p: Progress) -> None:
        now = time.perf_counter()
        if budget and now - run_started[0] > budget and campaigns:
            campaigns[0].stop("time budget")
        if p.done % max(n // 10, 1) and now - last[0] < 30 and p.done != n:
            return
        samples.append((p.done, now - run_started[0]))
        rate = (p.done - last[1]) / (now - last[0]) if now > last[0] else 0.0
        print(
            f"    {p.done:>9,} / {n:,}  {now - run_started[0]:6.1f} s   {rate:7,.0f} msg/s since "
            f"the last line   RSS {rss_mb('VmRSS'):.1f} MB",
            file=sys.stderr,
            flush=True,
        )
        last[:] = [now, p.done]

    # The scratch copy is made, and deleted at the end, as the CLI's is.
    report = send(
        folder / "newsletter.sqlite3",
        built,
        None,
        SendOptions(),
        SendHooks(on_start=start, on_progress=progress),
    )
    run_s = time.perf_counter() - run_started[0]
    done = {
        "sent": report.result.counts["sent"],
        "stopped": report.result.stopped,
        "copy_prepare_s": run_started[0] - started,
        "run_s": run_s,
        "rss_after_build_mb": after_build,
        "peak_rss_mb": rss_mb(),
        "samples": samples,
    }
    print(json.dumps(done))


def run_child(mode: str, folder: Path, n: int, budget: float = 0.0) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(folder), str(n)]
    command += ["--dry-run-budget", str(budget)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def dry_run_one(root: Path, n: int, budget: float) -> dict[str, Any]:
    folder = root / f"dry-run-{n}"
    folder.mkdir()
    start = time.perf_counter()
    made = run_child("make-db", folder, n)
    print(
        f"  {n:>9,} subscribers: database made in {time.perf_counter() - start:.1f} s "
        f"(peak RSS {made['peak_rss_mb']:.1f} MB); dry run ...",
        flush=True,
    )
    start = time.perf_counter()
    done = run_child("dry-run", folder, n, budget)
    took = time.perf_counter() - start
    shutil.rmtree(folder)
    sent = done["sent"]
    print(
        f"  {n:>9,} subscribers: peak RSS {done['peak_rss_mb']:6.1f} MB "
        f"(after the build {done['rss_after_build_mb']:.1f} MB)   child {took:.1f} s: "
        f"copy + prepare {done['copy_prepare_s']:.1f} s, run {done['run_s']:.1f} s for "
        f"{sent:,} = {sent / done['run_s']:,.0f} msg/s"
    )
    if sent != n:
        assert done["stopped"] == "time budget", done
        print(
            f"  {n:>9,} subscribers: INCOMPLETE, stopped by --dry-run-budget {budget:g} s "
            f"after {sent:,} of {n:,} ({sent / n:.0%}); the peak RSS above is of that part"
        )
        a, b = fit_time(done["samples"])
        print(
            f"  {n:>9,} subscribers: the run's progress fits t = {a * 1e3:.3f} ms x k + "
            f"{b * 1e9:.2f} ns x k^2, which puts the whole run at ~{a * n + b * n * n:,.0f} s"
        )
    return done


def fit_time(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares fit of t = a*k + b*k^2 (k messages done, t seconds) to progress samples."""
    s2 = sum(k**2 for k, _ in samples)
    s3 = sum(k**3 for k, _ in samples)
    s4 = sum(k**4 for k, _ in samples)
    t1 = sum(k * t for k, t in samples)
    t2 = sum(k * k * t for k, t in samples)
    det = s2 * s4 - s3 * s3
    if not det:
        return (t1 / s2 if s2 else 0.0), 0.0
    return (t1 * s4 - t2 * s3) / det, (s2 * t2 - s3 * t1) / det


def bench_memory(root: Path, sizes: list[int], budget: float) -> None:
    print(
        "dry-run memory (peak RSS, VmHWM, of a child process doing what `send --dry-run` does; "
        + (f"each run stopped after {budget:g} s)" if budget else "no time limit)")
    )
    peaks: dict[int, float] = {}
    complete = True
    for n in sizes:
        done = dry_run_one(root, n, budget)
        peaks[n] = done["peak_rss_mb"]
        complete = complete and done["sent"] == n
    small, large = min(peaks), max(peaks)
    growth = peaks[large] - peaks[small]
    partial = "" if complete else "   (NOT a complete run, see above)"
    print(
        f"  {large:,}: {peaks[large]:.1f} MB   target < {RSS_LARGEST_TARGET_MB:.0f} MB   "
        f"ratio {peaks[large] / RSS_LARGEST_TARGET_MB:.2f}   "
        f"{verdict(peaks[large] < RSS_LARGEST_TARGET_MB)}{partial}"
    )
    print(
        f"  {large:,} minus {small:,}: {growth:+.1f} MB   target <= {RSS_GROWTH_TARGET_MB:.0f} MB"
        f"   ratio {growth / RSS_GROWTH_TARGET_MB:.2f}   "
        f"{verdict(growth <= RSS_GROWTH_TARGET_MB)}{partial}"
    )


# ---------------------------------------------------------------------- PostgreSQL


def fresh_schema(url: str, name: str) -> str:
    """``url`` pointed at an empty schema ``name`` of its database (made again if there)."""
    from urllib.parse import quote

    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")  # a name of ours, not input
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={name}')}"


def drop_schema(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def cli(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    return subprocess.run(
        [sys.executable, "-m", "newsletter", *args],
        cwd=REPO, env={**clean, **env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True, text=True, check=False, **kw,
    )  # fmt: skip


def cli_env(database: str, port: int, connections: int) -> dict[str, str]:
    return {
        "NEWSLETTER_DATABASE": database,
        "NEWSLETTER_SECRET_KEY": "benchmark-secret-key-0123456789abcdef",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(port),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SEND_CONNECTIONS": str(connections),
        "NEWSLETTER_UNSUBSCRIBE_MAILTO": "unsubscribe@example.org",
        "NEWSLETTER_LIST_NAME": LIST,
    }


def cli_send(root: Path, database: str, n: int, connections: int, workers: int) -> float:
    """msg/s of `newsletter send --yes --workers K` end to end, after a CLI import."""
    csv = root / f"subs-{n}.csv"
    if not csv.exists():
        lines = ["email,first_name,last_name"]
        lines += [",".join(subscriber(i)) for i in range(1, n + 1)]
        csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with Sink(root) as sink:
        env = cli_env(database, sink.port, connections)
        done = cli(["subscribers", "import", str(csv), "--list", LIST], env)
        assert done.returncode == 0, done.stderr
        start = time.perf_counter()
        args = ["send", str(ISSUE.relative_to(REPO)), "--list", LIST, "--yes"]
        done = cli([*args, "--workers", str(workers)] if workers > 1 else args, env)
        elapsed = time.perf_counter() - start
        received = sink.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"sent {n}," in done.stdout, done.stdout
    assert received == n, f"smtp-sink counted {received:,} messages, not {n:,}"
    return n / elapsed


def bench_processes(
    root: Path, url: str, n: int, connections: int, theirs: float, counts: list[int]
) -> None:
    print(
        f"send through the command (`newsletter send --yes [--workers K]`, {n:,} messages, "
        f"{connections} connections a process, {os.cpu_count()} CPU(s))"
    )
    folder = root / "cli-sqlite"
    folder.mkdir()
    lite = cli_send(root, str(folder / "newsletter.sqlite3"), n, connections, 1)
    print(f"  SQLite,     1 process : {lite:7,.0f} msg/s   ours / smtp-source {lite / theirs:.2f}")
    best = 0.0
    for k in counts:
        name = f"bench_send_{k}"
        database = fresh_schema(url, name)
        try:
            rate = cli_send(root, database, n, connections, k)
        finally:
            drop_schema(url, name)
        best = max(best, rate)
        print(
            f"  PostgreSQL, {k} process{'es' if k > 1 else '  '}: {rate:7,.0f} msg/s   "
            f"ours / smtp-source {rate / theirs:.2f}   vs SQLite {rate / lite:.2f}"
        )
    print(
        f"  PostgreSQL at its best / smtp-source: {best / theirs:.2f}   target >= "
        f"{RATIO_TARGET}   ratio {best / theirs / RATIO_TARGET:.2f}   "
        f"{verdict(best / theirs >= RATIO_TARGET)}"
    )


def bench_pg_dry_run(root: Path, url: str, sizes: list[int]) -> None:
    print("dry-run memory on PostgreSQL (`newsletter send --dry-run`, peak RSS of the command)")
    peaks = {}
    for n in sizes:
        name = f"bench_dry_{n}"
        database = fresh_schema(url, name)
        try:
            csv = root / f"dry-{n}.csv"
            with csv.open("w", encoding="utf-8") as out:
                out.write("email,first_name,last_name\n")
                out.writelines(",".join(subscriber(i)) + "\n" for i in range(1, n + 1))
            env = cli_env(database, 9, 8)
            done = cli(["subscribers", "import", str(csv), "--list", LIST], env)
            assert done.returncode == 0, done.stderr
            csv.unlink()
            # VmHWM, not getrusage's ru_maxrss: on Linux a child's ru_maxrss starts at
            # its parent's RSS at the fork (this benchmark's, which is large), so it
            # measured the benchmark instead of the command.
            probe = (
                "import re, runpy, sys; sys.argv = ['newsletter'] + sys.argv[1:]\n"
                "try:\n    runpy.run_module('newsletter', run_name='__main__')\n"
                "except SystemExit as e:\n    code = e.code\n"
                "status = open('/proc/self/status').read()\n"
                "print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', status).group(1), "
                "file=sys.stderr)\nsys.exit(code)"
            )
            outbox = root / f"outbox-{n}"
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", probe, "send", str(ISSUE.relative_to(REPO)),
                 "--list", LIST, "--dry-run", "--outbox", str(outbox)],
                cwd=REPO, capture_output=True, text=True, check=False,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
                     **env, "PYTHONPATH": str(REPO / "src")},
            )  # fmt: skip
            took = time.perf_counter() - start
            assert done.returncode == 0, done.stdout + done.stderr
            peak = int(re.findall(r"PEAK (\d+)", done.stderr)[-1]) / 1024
            peaks[n] = peak
            shutil.rmtree(outbox, ignore_errors=True)
            print(f"  {n:>9,} subscribers: peak RSS {peak:6.1f} MB, {took:.1f} s")
        finally:
            drop_schema(url, name)
    small, large = min(peaks), max(peaks)
    growth = peaks[large] - peaks[small]
    print(
        f"  {large:,} minus {small:,}: {growth:+.1f} MB   target <= {RSS_GROWTH_TARGET_MB:.0f} MB"
        f"   ratio {growth / RSS_GROWTH_TARGET_MB:.2f}   {verdict(growth <= RSS_GROWTH_TARGET_MB)}"
    )


# ---------------------------------------------------------------------- main


def verdict(met: bool) -> str:
    return "meets the target" if met else "MISSES the target"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--dry-run-sizes", default="10000,1000000")
    parser.add_argument(
        "--dry-run-budget",
        type=float,
        default=DRY_RUN_BUDGET_S,
        help="stop each dry run after this many seconds, 0 for never (default: %(default).0f)",
    )
    parser.add_argument(
        "--database",
        help="also run the send with 1, 2 and 4 processes on this PostgreSQL database",
    )
    parser.add_argument("--process-counts", default="1,2,4")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, folder, n = args.child
        if mode == "make-db":
            child_make_db(Path(folder), int(n))
        else:
            child_dry_run(Path(folder), int(n), args.dry_run_budget)
        return
    sizes = sorted({int(s) for s in args.dry_run_sizes.split(",") if s.strip()})
    # Line by line, so that what the children write to stderr comes in order.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    began = time.perf_counter()
    why = ensure_tools()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        sys.exit(2)
    import aiosmtplib  # noqa: F401  (imported by the first connection; not part of the timing)

    built = make_build()
    n, connections = args.subscribers, args.connections
    size = mean_size(MessageTemplate(built.rendered, SENDER), n)
    print(f"send of {ISSUE.relative_to(REPO)} ({size:,} bytes per message on average)")
    with tempfile.TemporaryDirectory(prefix="bench-send-") as tmp:
        root = Path(tmp)
        ours = bench_our_send(root, built, n, connections)
        theirs = bench_smtp_source(root, max(n, 20_000), connections, size)
        print(
            f"  ours / smtp-source: {ours / theirs:.2f}   target >= {RATIO_TARGET}   "
            f"ratio {ours / theirs / RATIO_TARGET:.2f}   {verdict(ours / theirs >= RATIO_TARGET)}"
        )
        if args.database:
            counts = [int(k) for k in args.process_counts.split(",") if k.strip()]
            bench_processes(root, args.database, n, connections, theirs, counts)
            if sizes:
                bench_pg_dry_run(root, args.database, [min(sizes), max(sizes)])
        profile_send(root, built, connections)
        if sizes:
            bench_memory(root, sizes, args.dry_run_budget)
    print(f"whole benchmark: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
