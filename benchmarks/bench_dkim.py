"""DKIM benchmark: what a signature costs, and how fast a send goes with and without one.

Run from the repository root, as root on Debian (postfix is installed if missing,
for smtp-sink; see bench_send.py):

    python benchmarks/bench_dkim.py [--subscribers 10000] [--connections 16] [--rounds 2]

1. sign() alone, on the example issue's real message (issues/2020-12-23.yaml,
   personalised): dkimpy's dkim.sign (what signed before, pure-Python RSA)
   against delivery.dkim_sign.sign (OpenSSL through cryptography), ms per
   message, with the RSA operation and the body hash alone beside them.
2. A send through the real code (delivery.send_issue.send_issue, as `newsletter
   send` calls it) of N messages to smtp-sink on 127.0.0.1, unsigned and signed
   (an RSA-2048 key), the best of --rounds runs of each, alternated; checks that
   smtp-sink counted N each time.
   The signed send is run twice: signed in the send's own process, and signed
   in a helper process (delivery.sign_process, what `newsletter send` does on a
   machine with two or more CPUs: the loop composes, the helper signs). Prints
   msg/s, the ratios to unsigned and the target (at least 0.4, for the helper),
   and the helper's share of signatures.

Everything is written to a temporary directory (honours TMPDIR), removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_send import (  # noqa: E402
    ENVELOPE_SENDER,
    ISSUE,
    LIST,
    SENDER,
    Sink,
    ensure_tools,
    imported_db,
    make_build,
    verdict,
)
from newsletter.build import BuildResult  # noqa: E402
from newsletter.delivery import dkim_sign  # noqa: E402
from newsletter.delivery.campaign import SendOptions  # noqa: E402
from newsletter.delivery.message import MessageTemplate  # noqa: E402
from newsletter.delivery.send_issue import SendRequest, send_issue  # noqa: E402
from newsletter.delivery.sending import SendReport  # noqa: E402
from newsletter.delivery.sign_process import DkimSigner  # noqa: E402
from newsletter.delivery.transports import (  # noqa: E402
    SmtpConfig,
    SmtpTransport,
    Transport,
)
from newsletter.models import Recipient  # noqa: E402
from newsletter.storage import open_storage  # noqa: E402

RATIO_TARGET = 0.4
Signer = Callable[[bytes], bytes]


def make_key(folder: Path) -> dkim_sign.DkimKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "dkim.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return dkim_sign.load_key(path, "news", "example.org")


# ---------------------------------------------------------------------- sign() alone


def per_call_ms(call: Callable[[], object], seconds: float = 2.0) -> float:
    """Median ms of one call over batches run for about ``seconds``."""
    call()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(10):
            call()
        samples.append((time.perf_counter() - start) / 10 * 1e3)
    return statistics.median(samples)


def bench_sign(built: BuildResult, key: dkim_sign.DkimKey) -> None:
    import dkim
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    message = MessageTemplate(built.rendered, SENDER).personalise(
        Recipient("ann@example.org", "Ann", "Lee"), date=dt.datetime.now(dt.UTC)
    )
    body_at = message.index(b"\r\n\r\n") + 4
    old = per_call_ms(
        lambda: dkim.sign(
            message,
            b"news",
            b"example.org",
            key.private_key,
            include_headers=list(dkim_sign.SIGNED_HEADERS),
            canonicalize=(b"relaxed", b"relaxed"),
        ),
        seconds=3.0,
    )
    new = per_call_ms(lambda: dkim_sign.sign(message, key))
    rsa_alone = per_call_ms(
        lambda: key.rsa_key.sign(b"x" * 600, padding.PKCS1v15(), hashes.SHA256())
    )
    body = per_call_ms(lambda: dkim_sign._body_hash(message, body_at))
    print(f"sign() alone, the example issue's message ({len(message):,} bytes)")
    print(f"  dkimpy dkim.sign (before):        {old:7.3f} ms a message")
    print(f"  dkim_sign.sign (cryptography):    {new:7.3f} ms a message   {old / new:,.0f}x faster")
    print(f"    of which the RSA-2048 signature {rsa_alone:7.3f} ms, the body hash {body:.3f} ms")


# ---------------------------------------------------------------------- the send


def one_send(
    root: Path,
    built: BuildResult,
    n: int,
    connections: int,
    signer: Signer | None,
    wrap: Callable[[Transport], Transport] | None = None,
) -> float:
    folder = Path(tempfile.mkdtemp(dir=root))
    db = imported_db(folder, n)
    with Sink(root) as sink:
        smtp: Transport = SmtpTransport(
            SmtpConfig(host="127.0.0.1", port=sink.port, security="none", timeout=30)
        )
        transport = wrap(smtp) if wrap else smtp
        start = time.perf_counter()
        report = send_signed(db, built, transport, SendOptions(connections=connections), signer)
        elapsed = time.perf_counter() - start
        received = sink.stop()
    assert report.result.counts["sent"] == n, report.result.counts
    assert received == n, f"smtp-sink counted {received:,} messages, not {n:,}"
    print(
        f"    {n / elapsed:7,.0f} msg/s end to end, the run alone {report.result.rate:7,.0f} msg/s",
        flush=True,
    )
    return report.result.rate


def send_signed(
    db: Path, built: BuildResult, transport: Transport, options: SendOptions, signer: Signer | None
) -> SendReport:
    """bench_send.send, with the signer `newsletter send` gets from wiring.signer."""
    request = SendRequest(ISSUE, LIST, dry_run=False, outbox=db.parent / "outbox")
    return send_issue(
        request,
        build=lambda: built,
        open_storage=lambda: open_storage(db),
        transport=lambda: transport,
        sender=SENDER,
        options=options,
        envelope_sender=ENVELOPE_SENDER,
        templates_dir=REPO / "templates",
        out_dir=db.parent / "out",
        signer=lambda: signer,
    )


def bench_send(
    root: Path, built: BuildResult, key: dkim_sign.DkimKey, args: argparse.Namespace
) -> None:
    n, connections = args.subscribers, args.connections
    rates: dict[str, list[float]] = {"unsigned": [], "signed": [], "helper": []}
    for _ in range(args.rounds):
        rates["unsigned"].append(one_send(root, built, n, connections, None))
        alone = DkimSigner(key, processes=0)
        rates["signed"].append(one_send(root, built, n, connections, alone))
        helped = DkimSigner(key, processes=1)  # as wiring.signer makes it on 2+ CPUs
        rates["helper"].append(one_send(root, built, n, connections, helped))
        share = helped.by_helper / max(1, helped.by_helper + helped.in_process)
        print(f"    ({share:.1%} of the signatures made by the helper process)")
    best = {name: max(r) for name, r in rates.items()}

    def runs(name: str) -> str:
        return ", ".join(f"{r:,.0f}" for r in rates[name])

    print(
        f"send of {n:,} messages, {connections} connections, to smtp-sink "
        f"(best of {args.rounds}; {os.cpu_count()} CPU(s))"
    )
    print(f"  unsigned:                      {best['unsigned']:7,.0f} msg/s   ({runs('unsigned')})")
    alone_ratio = best["signed"] / best["unsigned"]
    print(
        f"  DKIM, signed in the send's process: {best['signed']:7,.0f} msg/s   ({runs('signed')})"
        f"   signed / unsigned {alone_ratio:.2f}"
    )
    ratio = best["helper"] / best["unsigned"]
    print(
        f"  DKIM, signed in a helper process: {best['helper']:7,.0f} msg/s   ({runs('helper')})"
        f"   signed / unsigned {ratio:.2f}   target >= {RATIO_TARGET}   "
        f"{verdict(ratio >= RATIO_TARGET)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    why = ensure_tools()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        sys.exit(2)
    import aiosmtplib  # noqa: F401  (imported by the first connection; not part of the timing)

    built = make_build()
    with tempfile.TemporaryDirectory(prefix="bench-dkim-") as tmp:
        root = Path(tmp)
        key = make_key(root)
        bench_sign(built, key)
        bench_send(root, built, key, args)


if __name__ == "__main__":
    main()
