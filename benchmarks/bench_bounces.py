"""Bounce benchmark: messages per second of bounce processing, and its memory over a mailbox.

Run from the repository root:

    python benchmarks/bench_bounces.py [--messages 10000]
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--profile]

For SQLite (a new file), and with --postgres for PostgreSQL too (a schema of its
own in that database, dropped at the end):

1. the send log: one send of N recipients, frozen through SendLogStore.freeze
   (one transaction; COPY on PostgreSQL), then marked sent as a send leaves it
   (one UPDATE);
2. a mailbox: N messages written as files to a Maildir-like folder (new/), made
   from the samples of tests/data/feedback, each for a distinct recipient and
   returned to that delivery's own VERP address: 60% hard bounces (Postfix and
   Exchange), 15% soft (a 4.x.x DSN the MTA gave up on), 10% delays, 5% spam
   complaints (ARF), 5% out-of-office replies, 5% for review (half a bounce to a
   VERP address with a forged signature, half a person's reply);
3. in a fresh child process, what `newsletter bounces process FILE...` does with
   each file, one at a time: read it, bounces.processing.process it into the
   storage's FeedbackStore (each committed before the next). Prints messages per
   second overall and per kind, and the child's peak RSS (VmHWM from
   /proc/self/status) after 1,000 messages and after N, with their ratio: memory
   should stay flat whatever the mailbox's size;
4. checks every message's decision against what was generated (its kind, its
   action, its suppression, the address it names), then the database itself
   (feedback rows by action, suppressions by reason, the suppression log): the
   numbers suppressed, soft-counted, noted and kept for review must be exactly
   the generated ones, else exit status 1. Prints the database's size.

--profile runs the child under cProfile and prints where the time goes (the
rates it measures then include the profiler's overhead).

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
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from newsletter.models import Recipient  # noqa: E402
from newsletter.storage import open_storage  # noqa: E402
from newsletter.storage.evidence import SoftBounces  # noqa: E402
from newsletter.verp import Delivered, Verp  # noqa: E402

SAMPLES = REPO / "tests" / "data" / "feedback"
BOUNCES = "bounces@bounce.example.org"
KEY = b"bench_bounces.py secret key, 32 bytes or more"
ISSUE = "2020-12-23"
LIST = "research-news"
SOFT = SoftBounces(limit=3, days=30)
SEED = 20261202
FIRST_SAMPLE = 1000  # the peak RSS is read after this many messages, and at the end

# The mailbox's mix: kind -> (its share, its variants, made in turn).
MIX: dict[str, tuple[float, tuple[str, ...]]] = {
    "hard": (0.60, ("postfix", "exchange")),
    "soft": (0.15, ("failed-4xx",)),
    "delayed": (0.10, ("still-retrying",)),
    "complaint": (0.05, ("arf",)),
    "auto-reply": (0.05, ("out-of-office",)),
    "review": (0.05, ("forged-token", "reply")),
}
# What processing each variant must give: the reader's kind, the action, the
# suppression made, whether the decision names the recipient's address, and whether
# the message names its delivery (send id and seq, from the VERP address).
EXPECTED: dict[tuple[str, str], tuple[str, str, str | None, bool, bool]] = {
    ("hard", "postfix"): ("hard", "suppress", "bounced", True, True),
    ("hard", "exchange"): ("hard", "suppress", "bounced", True, True),
    ("soft", "failed-4xx"): ("soft", "soft", None, True, True),
    ("delayed", "still-retrying"): ("soft", "note", None, True, True),
    ("complaint", "arf"): ("complaint", "suppress", "complained", True, True),
    ("auto-reply", "out-of-office"): ("auto_reply", "note", None, True, True),
    ("review", "forged-token"): ("hard", "review", None, False, False),
    # Ours (a valid VERP address) but no report: read, not understood.
    ("review", "reply"): ("unknown", "review", None, False, True),
}
_SAMPLE_ADDRESSES = rb"reader000[0-9]@example\.(?:org|net)|someone@example\.com"


def reader(seq: int) -> str:
    return f"reader{seq:07d}@example.org"


def vm_kb(field: str = "VmHWM") -> int:
    # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's RSS
    # at the fork, so it would show this benchmark's memory, not the processing's.
    status = Path("/proc/self/status").read_text()
    found = re.search(rf"{field}:\s+(\d+)", status)
    assert found is not None
    return int(found.group(1))


# ---------------------------------------------------------------------- the databases


class Database:
    """One backend under test: where open_storage finds it, its size, its own SQL."""

    def __init__(self, name: str, location: str, *, schema: str = "") -> None:
        self.name = name
        self.location = location
        self.schema = schema

    @classmethod
    def sqlite(cls, folder: Path) -> Database:
        return cls("SQLite", str(folder / "newsletter.sqlite3"))

    @classmethod
    def postgres(cls, url: str) -> Database:
        import psycopg

        schema = f"bench_bounces_{os.getpid()}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # a name of ours
            conn.execute(f"CREATE SCHEMA {schema}")
        joiner = "&" if "?" in url else "?"
        location = f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"
        return cls("PostgreSQL", location, schema=schema)

    def drop(self, url: str) -> None:
        if not self.schema:
            return
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    @contextlib.contextmanager
    def sql(self) -> Iterator[Any]:
        """A connection of its own (not the storage's), autocommit; ``?`` placeholders."""
        if not self.schema:
            conn = sqlite3.connect(self.location, isolation_level=None)
            try:
                yield conn
            finally:
                conn.close()
            return
        import psycopg

        with psycopg.connect(self.location, autocommit=True) as pg:
            yield _Qmark(pg)

    def query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.sql() as conn:
            return [tuple(r) for r in conn.execute(statement, params).fetchall()]

    def size(self) -> tuple[int, int | None]:
        """(bytes of the whole database, bytes of the feedback table and its indexes)."""
        if self.schema:
            rows = self.query(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = ? AND c.relkind = 'r'",
                (self.schema,),
            )
            sizes = {str(name): int(size) for name, size in rows}
            return sum(sizes.values()), sizes.get("feedback")
        path = Path(self.location)
        total = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
        try:
            ((feedback,),) = self.query(
                "SELECT sum(pgsize) FROM dbstat WHERE name = 'feedback' "
                "OR name IN (SELECT name FROM sqlite_schema WHERE tbl_name = 'feedback')"
            )
        except sqlite3.OperationalError:  # an SQLite built without the dbstat table
            return total, None
        return total, int(feedback or 0)


class _Qmark:
    """A psycopg connection that takes the ``?`` placeholders sqlite3 takes."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(statement.replace("?", "%s"), params)


def make_send_log(db: Database, n: int) -> int:
    """One send of ``n`` recipients, frozen and then marked sent; its id."""
    start = time.perf_counter()
    storage = open_storage(db.location, create=True)
    try:
        people = (Recipient(reader(seq), "Reader", f"No. {seq}") for seq in range(n))
        record = storage.send_log.freeze(ISSUE, LIST, people, suppressed=0)
    finally:
        storage.close()
    assert record.audience == n, record
    frozen = time.perf_counter() - start
    # As a send leaves its rows: one UPDATE, what SendLogStore.record does row by row.
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with db.sql() as conn:
        conn.execute(
            "UPDATE deliveries SET state = 'sent', attempts = 1, code = 250, "
            "detail = '250 2.0.0 Ok: queued', updated_at = ? WHERE send_id = ?",
            (stamp, record.id),
        )
    took = time.perf_counter() - start
    print(
        f"  send log: {n:,} recipients frozen (SendLogStore.freeze) in {frozen:.2f} s "
        f"= {n / frozen:,.0f} rows/s; marked sent: {took:.2f} s in all"
    )
    return record.id


# ---------------------------------------------------------------------- the mailbox


def mix(n: int) -> dict[str, int]:
    """How many messages of each kind: the shares of MIX, rounded to add up to ``n``."""
    exact = {kind: share * n for kind, (share, _) in MIX.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    by_remainder = sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)
    for kind in by_remainder[: n - sum(counts.values())]:
        counts[kind] += 1
    return counts


def templates() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in SAMPLES.glob("*.eml")}


def message(samples: dict[str, bytes], verp: Verp, send_id: int, seq: int, variant: str) -> bytes:
    """The ``variant`` message (MIX) as it comes back for recipient ``seq`` of the send."""
    to = verp.sender(send_id, seq)
    name = {
        "postfix": "postfix-unknown-user.eml",
        "exchange": "exchange-hard.eml",
        "failed-4xx": "postfix-delayed.eml",
        "still-retrying": "postfix-delayed.eml",
        "arf": "yahoo-arf.eml",
        "out-of-office": "out-of-office.eml",
        "forged-token": "postfix-unknown-user.eml",
    }.get(variant)
    if name is None:  # "reply": a person answers the newsletter, to its envelope sender
        return (
            f"From: Reader <{reader(seq)}>\nTo: {to}\nSubject: Re: Research news this week\n"
            f"Message-ID: <reply.{seq}@example.org>\nContent-Type: text/plain\n\n"
            "Thank you, very interesting. Could you send me last year's issues too?\n"
        ).encode()
    if variant == "forged-token":
        # Another MAC in the token: well formed, but not signed with our key.
        local, _, domain = to.partition("@")
        i = len(local) - 3
        to = f"{local[:i]}{'b' if local[i] == 'a' else 'a'}{local[i + 1 :]}@{domain}"
        assert verp.read(to) is None, to
    raw = samples[name].replace(b"{verp}", to.encode())
    raw = re.sub(_SAMPLE_ADDRESSES, reader(seq).encode(), raw)
    raw = re.sub(rb"(?i)message-id: <", f"Message-ID: <{seq}.".encode(), raw, count=1)
    if variant == "failed-4xx":
        raw = raw.replace(b"Action: delayed", b"Action: failed")
        raw = raw.replace(b"Delayed Mail (still being retried)", b"Undelivered Mail Returned")
    return raw


def write_mailbox(folder: Path, n: int, send_id: int) -> dict[str, int]:
    """N messages in folder/new, one file each, named SEQ.KIND.VARIANT; counts by kind."""
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True)
    counts = mix(n)
    kinds: list[tuple[str, str]] = []
    for kind, number in counts.items():
        variants = MIX[kind][1]
        kinds += [(kind, variants[i % len(variants)]) for i in range(number)]
    # Shuffled, seeded: any 1,000 of them are about the same mix as the whole.
    random.Random(SEED).shuffle(kinds)  # noqa: S311 - a repeatable order, not a secret
    samples = templates()
    verp = Verp(BOUNCES, KEY)
    size = 0
    start = time.perf_counter()
    for seq, (kind, variant) in enumerate(kinds):
        raw = message(samples, verp, send_id, seq, variant)
        size += len(raw)
        (folder / "new" / f"{seq:07d}.{kind}.{variant}").write_bytes(raw)
    print(
        f"  mailbox: {n:,} files, {size / 1e6:.1f} MB ({size / max(n, 1):,.0f} bytes each on "
        f"average), written in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{kind} {c:,}" for kind, c in counts.items())
    )
    return counts


# ---------------------------------------------------------------------- the child


def child(location: str, folder: Path, send_id: int, profile: bool) -> None:
    """Process every file of folder/new, as `newsletter bounces process FILE...` does."""
    from newsletter.bounces.processing import process

    storage = open_storage(location)
    verp = Verp(BOUNCES, KEY)
    spent = dict.fromkeys(MIX, 0.0)  # seconds by kind
    done_by: Counter[str] = Counter()  # messages by kind
    actions: Counter[str] = Counter()
    wrong: list[str] = []
    wrong_count = 0
    peak_first = 0
    profiler = cProfile.Profile() if profile else None
    started_rss = vm_kb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    with os.scandir(folder / "new") as entries:  # directory order, no list of names held
        for count, entry in enumerate(entries, 1):
            seq_text, kind, variant = entry.name.split(".")
            began = time.perf_counter()
            raw = Path(entry.path).read_bytes()
            done = process(raw, storage.feedback, verp=verp, source="file", soft=SOFT)
            spent[kind] += time.perf_counter() - began
            done_by[kind] += 1
            actions[done.decision.action] += 1
            seq = int(seq_text)
            got = (
                done.feedback.kind,
                done.decision.action,
                done.recorded.suppressed,
                done.decision.email == reader(seq),
                done.feedback.delivery == Delivered(send_id, seq),
            )
            if (
                got != EXPECTED[kind, variant]
                or not done.recorded.new
                or (not got[3] and done.decision.email is not None)
            ):
                wrong_count += 1
                if len(wrong) < 10:
                    wrong.append(f"{entry.name}: expected {EXPECTED[kind, variant]}, got {got} "
                                 f"({done.decision.why}; {done.recorded.outcome})")  # fmt: skip
            if count == FIRST_SAMPLE:
                peak_first = vm_kb()
            if count % max(10_000, FIRST_SAMPLE) == 0:
                rate, rss = count / (time.perf_counter() - start), vm_kb("VmRSS") / 1024
                print(f"    {count:>9,} done, {rate:,.0f} msg/s, RSS {rss:.1f} MB",
                      file=sys.stderr, flush=True)  # fmt: skip
    if profiler:
        profiler.disable()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    storage.close()
    if profiler:
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(20)
            print(f"  profile, by {order}:", file=sys.stderr)
            text = out.getvalue()
            print(text[text.index("   ncalls") :].rstrip() + "\n", file=sys.stderr)
    result = {
        "elapsed": elapsed,
        "cpu": cpu,
        "messages": sum(done_by.values()),
        "spent": spent,
        "done_by": done_by,
        "actions": actions,
        "wrong": wrong,
        "wrong_count": wrong_count,
        "rss_start_kb": started_rss,
        "peak_first_kb": peak_first,
        "peak_kb": vm_kb(),
    }
    print(json.dumps(result))


def run_child(db: Database, folder: Path, send_id: int, profile: bool) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", db.location,
               str(folder), str(send_id)] + (["--profile"] if profile else [])  # fmt: skip
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


# ---------------------------------------------------------------------- one backend


def expected_actions(counts: dict[str, int]) -> dict[str, int]:
    """The number of each action the generated mailbox must give (EXPECTED)."""
    found: Counter[str] = Counter()
    for kind, number in counts.items():
        variants = MIX[kind][1]
        for i in range(number):
            found[EXPECTED[kind, variants[i % len(variants)]][1]] += 1
    return {action: found[action] for action in ("suppress", "soft", "note", "review")}


def check(db: Database, counts: dict[str, int], done: dict[str, Any]) -> list[str]:
    """What differs between the generated mailbox, the child's decisions and the database."""
    problems = [f"misprocessed: {w}" for w in done["wrong"]]
    if done["wrong_count"] > len(done["wrong"]):
        problems.append(f"... {done['wrong_count']:,} misprocessed messages in all")
    want = expected_actions(counts)
    n = sum(counts.values())
    stored = dict(db.query("SELECT action, count(*) FROM feedback GROUP BY action"))
    reasons = dict(db.query("SELECT reason, count(*) FROM suppressions GROUP BY reason"))
    ((logged,),) = db.query("SELECT count(*) FROM suppression_log WHERE action = 'suppress'")
    ((soft_counted,),) = db.query(
        "SELECT count(*) FROM feedback WHERE action = 'soft' AND outcome = ?",
        (f"soft bounce: 1 of {SOFT.limit} sends within {SOFT.days:g} days",),
    )
    wanted_reasons = {"bounced": counts["hard"], "complained": counts["complaint"]}
    comparisons = [
        ("messages processed", n, done["messages"]),
        ("feedback rows", n, sum(stored.values())),
        ("suppression log entries", want["suppress"], logged),
        ("soft bounces counted 1 of 3", want["soft"], soft_counted),
    ]
    comparisons += [(f"decided {a}", want[a], done["actions"].get(a, 0)) for a in want]
    comparisons += [(f"feedback rows {a}", want[a], stored.get(a, 0)) for a in want]
    comparisons += [(f"suppressed {r}", c, reasons.get(r, 0)) for r, c in wanted_reasons.items()]
    problems += [f"{what}: {got:,}, expected {wanted:,}" for what, wanted, got in comparisons
                 if got != wanted]  # fmt: skip
    extra = set(reasons) - set(wanted_reasons)
    if extra:
        problems.append(f"suppressions for reasons nobody gave: {sorted(extra)}")
    return problems


def bench(db: Database, root: Path, n: int, profile: bool) -> dict[str, Any]:
    print(f"{db.name}:", flush=True)
    folder = root / db.name.lower()
    folder.mkdir()
    send_id = make_send_log(db, n)
    before, _ = db.size()
    counts = write_mailbox(folder / "Maildir", n, send_id)
    print("  processing in a child process, one file at a time ...", flush=True)
    done = run_child(db, folder / "Maildir", send_id, profile)
    after, feedback = db.size()
    elapsed, messages = done["elapsed"], done["messages"]
    rate = messages / elapsed if elapsed else 0.0
    print(f"  {messages:,} messages in {elapsed:.1f} s = {rate:,.0f} msg/s"
          + ("  (under cProfile)" if profile else ""))  # fmt: skip
    cpu = done["cpu"]
    print(f"  CPU of the child {cpu:.1f} s ({cpu / max(messages, 1) * 1e3:.2f} ms a message); "
          f"the other {max(elapsed - cpu, 0):.1f} s waiting (syncs, the server)")  # fmt: skip
    for kind in MIX:
        number, spent = done["done_by"].get(kind, 0), done["spent"].get(kind, 0.0)
        if number:
            print(f"    {kind:<11} {number:>8,}  {number / spent:7,.0f} msg/s  "
                  f"{spent / number * 1e3:6.2f} ms each")  # fmt: skip
    first, peak = done["peak_first_kb"] / 1024, done["peak_kb"] / 1024
    start_rss = done["rss_start_kb"] / 1024
    if messages > FIRST_SAMPLE:
        print(f"  peak RSS (VmHWM): after {FIRST_SAMPLE:,} messages {first:.1f} MB, after "
              f"{messages:,} {peak:.1f} MB, ratio {peak / first:.3f} ({peak - first:+.1f} MB; "
              f"{start_rss:.1f} MB before the first)")  # fmt: skip
    else:
        print(f"  peak RSS (VmHWM): {peak:.1f} MB after {messages:,} messages "
              f"(fewer than {FIRST_SAMPLE:,}: no ratio)")  # fmt: skip
    want = expected_actions(counts)
    got = done["actions"]
    print(
        "  decided: "
        + ", ".join(
            f"{label} {got.get(a, 0):,} (expected {want[a]:,})"
            for label, a in (("suppressed", "suppress"), ("soft-counted", "soft"),
                             ("noted", "note"), ("kept for review", "review"))
        )
    )  # fmt: skip
    shown = f"; the feedback table {feedback / 1e6:.1f} MB" if feedback is not None else ""
    print(f"  database: {before / 1e6:.1f} MB with the send log, {after / 1e6:.1f} MB after "
          f"({(after - before) / max(messages, 1):,.0f} bytes a message){shown}")  # fmt: skip
    problems = check(db, counts, done)
    for problem in problems:
        print(f"  WRONG: {problem}")
    if not problems:
        print("  every message decided as generated; the database agrees")
    return {"rate": rate, "problems": problems, "peak": peak, "first": first}


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="default: %(default)s")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also on this PostgreSQL database (in a schema of its own, dropped after)",
    )
    parser.add_argument("--profile", action="store_true", help="run the child under cProfile")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        location, folder, send_id = args.child
        child(location, Path(folder), int(send_id), args.profile)
        return
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    began = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bounces-") as tmp:
        root = Path(tmp)
        results["SQLite"] = bench(Database.sqlite(root), root, args.messages, args.profile)
        if args.postgres:
            db = Database.postgres(args.postgres)
            try:
                results["PostgreSQL"] = bench(db, root, args.messages, args.profile)
            finally:
                db.drop(args.postgres)
    if len(results) == 2:
        ratio = results["PostgreSQL"]["rate"] / results["SQLite"]["rate"]
        print(f"PostgreSQL / SQLite msg/s: {ratio:.2f}")
    print(f"whole benchmark: {time.perf_counter() - began:.0f} s")
    if any(r["problems"] for r in results.values()):
        print("FAILED: the processing did not decide the mailbox as generated", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
