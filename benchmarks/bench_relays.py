"""Relays benchmark: what spreading a send over two relays costs against one.

Run from the repository root (Postfix's smtp-sink is needed; see bench_send.py):

    python benchmarks/bench_relays.py [--subscribers 10000] [--connections 8] [--runs 3]

Sends N generated subscribers the bundled issue through the real send path
(delivery.send_issue.send_issue, as bench_send does), alternately

1. to one smtp-sink through the SMTP transport, C connections, and
2. to two smtp-sinks through a RelayPool of weights 1 and 1, C/2 connections each
   (so the same C connections in all),

each into a fresh database and fresh sinks; prints each run's msg/s, the median of
each, their ratio, and how the pool split the messages (counted by the sinks). The pool
opens a session a message (the next relay is chosen there), so the ratio is the cost
of that; target: at least 0.8 of one relay's rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from bench_send import (  # noqa: E402
    Sink,
    ensure_tools,
    imported_db,
    make_build,
    send,
)
from newsletter.build import BuildResult  # noqa: E402
from newsletter.delivery.campaign import SendOptions  # noqa: E402
from newsletter.delivery.transports import (  # noqa: E402
    Relay,
    RelayPool,
    SmtpConfig,
    SmtpTransport,
    Transport,
)

TARGET = 0.8


def smtp(port: int) -> SmtpTransport:
    return SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=30))


def one_run(root: Path, built: BuildResult, n: int, connections: int, relays: int) -> float:
    """msg/s of one send of ``n`` through ``relays`` sinks (1: the SMTP transport)."""
    folder = Path(tempfile.mkdtemp(dir=root))
    db = imported_db(folder, n)
    sinks = [Sink(folder) for _ in range(relays)]
    try:
        transport: Transport
        if relays == 1:
            transport = smtp(sinks[0].port)
        else:
            each = max(1, connections // relays)
            transport = RelayPool([Relay(smtp(s.port), connections=each) for s in sinks])
        start = time.perf_counter()
        report = send(db, built, transport, SendOptions(connections=connections))
        elapsed = time.perf_counter() - start
    finally:
        received = [s.stop() for s in sinks]
    assert report.result.counts["sent"] == n, report.result.counts
    assert sum(received) == n, f"the sinks counted {received}, not {n} in all"
    split = " + ".join(f"{r:,}" for r in received)
    print(f"  {relays} relay(s): {n / elapsed:,.0f} msg/s ({elapsed:.2f} s; the sinks got {split})")
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    problem = ensure_tools()
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    built = make_build()
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-relays-") as tmp:
        for _ in range(args.runs):
            for relays in (1, 2):  # alternated: drift on the machine hits both alike
                rates[relays].append(
                    one_run(Path(tmp), built, args.subscribers, args.connections, relays)
                )
    one, two = (statistics.median(rates[k]) for k in (1, 2))
    ratio = two / one
    met = "met" if ratio >= TARGET else "NOT met"
    print(f"median: one relay {one:,.0f} msg/s, two relays {two:,.0f} msg/s")
    print(f"ratio two/one: {ratio:.2f} (target at least {TARGET}: {met})")


if __name__ == "__main__":
    main()
