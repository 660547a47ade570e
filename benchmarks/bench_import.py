"""Import benchmark: rows per second of a CSV import, and peak memory of a large one.

Run from the repository root:

    python benchmarks/bench_import.py [--rows 100000] [--memory-rows 1000000]

Writes a generated CSV (email, first_name, last_name, city) of each size to a
temporary directory, then, in a fresh child process per size, runs the code
path of `newsletter subscribers import` (read_csv, then
SubscriberStore.import_rows into a new database) and prints the rows per
second and the child's peak RSS (VmHWM from /proc/self/status). A second
import of the same file into the same database (the "week after": every row
already there) is timed too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("email,first_name,last_name,city\r\n")
        for i in range(rows):
            fh.write(f"reader{i:07d}@example.org,Reader{i},Test,Leeds\r\n")


def child(csv_path: Path, db_path: Path, rounds: int) -> None:
    from newsletter.audience.csv_import import read_csv
    from newsletter.storage.sqlite.connection import connect
    from newsletter.storage.sqlite.subscribers import SubscriberStore

    store = SubscriberStore(connect(db_path, create=True))
    for n in range(rounds):
        start = time.perf_counter()
        report = store.import_rows("bench", read_csv(csv_path), skip_invalid=False)
        took = time.perf_counter() - start
        rows = report.added + report.updated
        assert report.committed and not report.problems, report.problems[:3]
        label = "first import" if n == 0 else "again (all known)"
        print(f"    {label}: {rows:,} rows in {took:.2f} s = {rows / took:,.0f} rows/s")
    # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's RSS
    # at the fork, so it would show this benchmark's memory, not the import's.
    status = Path("/proc/self/status").read_text()
    peak_kb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    print(f"    peak RSS {peak_kb / 1024:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--memory-rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for rows, rounds in ((args.rows, 2), (args.memory_rows, 1)):
            if rows <= 0:
                continue
            csv_path = Path(tmp) / f"{rows}.csv"
            write_csv(csv_path, rows)
            size = csv_path.stat().st_size / 1e6
            print(f"{rows:,} rows ({size:.1f} MB):", flush=True)
            db = Path(tmp) / f"{rows}.sqlite3"
            cmd = [sys.executable, __file__, "--child", str(csv_path), str(db), str(rounds)]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
