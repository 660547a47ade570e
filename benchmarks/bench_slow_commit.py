"""Slow-commit benchmark: how the SMTP rate of a campaign holds up when each commit is slow.

Run from the repository root (no server, no root needed):

    python benchmarks/bench_slow_commit.py [--messages 1500] [--connections 8]
        [--relay-ms 5,10,20] [--delays-ms 0,10,50] [--against main]

A real SQLite send log in a temporary directory, wrapped so that each commit
(claim, record, release) first sleeps the commit delay, as a database across
a network or a slow disk would; a relay in memory that takes ``--relay-ms``
per message on each of the connections (the in-memory transport plus
asyncio.sleep). For every relay time and commit delay, prints the campaign's
messages per second (its own rate: attempted / elapsed) and the ratio to the
same code with no delay. ``--against REV`` also runs delivery/campaign.py as
it is at git revision REV (loaded from ``git show``, so the old path needs no
copy in the tree), for the old code's ratios beside the new ones.

Everything is written to a temporary directory (honours TMPDIR), removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from newsletter.audience.csv_import import ParsedRow  # noqa: E402
from newsletter.build import BuildInputs, build  # noqa: E402
from newsletter.delivery import campaign as new_campaign  # noqa: E402
from newsletter.delivery.message import MessageTemplate, Sender  # noqa: E402
from newsletter.delivery.sending import prepare  # noqa: E402
from newsletter.delivery.transports import Envelope, MemoryTransport, Session  # noqa: E402
from newsletter.models import Recipient  # noqa: E402
from newsletter.storage.caps import Caps, Claim  # noqa: E402
from newsletter.storage.sqlite import SqliteStorage  # noqa: E402
from newsletter.storage.sqlite.send_log import Outcome, SendLog  # noqa: E402

ISSUE = REPO / "issues" / "2020-12-23.yaml"
LIST = "research-news"


class SlowLog(SendLog):
    """The real send log; each commit sleeps ``delay`` seconds first."""

    def __init__(self, conn: Any, delay: float) -> None:
        super().__init__(conn)
        self.delay = delay

    def claim(
        self, send_id: int, limit: int, now: float, *, holder: str = "", caps: Caps | None = None
    ) -> Claim:
        time.sleep(self.delay)
        return super().claim(send_id, limit, now, holder=holder, caps=caps)

    def record(
        self, send_id: int, outcomes: Iterable[tuple[int, Outcome]], *, holder: str = ""
    ) -> None:
        time.sleep(self.delay)
        super().record(send_id, outcomes, holder=holder)

    def release(self, send_id: int, seqs: Iterable[int], *, holder: str = "") -> None:
        time.sleep(self.delay)
        super().release(send_id, seqs, holder=holder)


@dataclass(slots=True)
class Relay:
    """The in-memory transport, ``seconds`` per message on each session."""

    seconds: float
    box: MemoryTransport = field(default_factory=MemoryTransport)
    description: str = "a relay in memory"

    async def open(self) -> Session:
        return _RelaySession(self.seconds, await self.box.open())


@dataclass(slots=True)
class _RelaySession:
    seconds: float
    inner: Session

    @property
    def usable(self) -> bool:
        return self.inner.usable

    async def send(self, envelope: Envelope) -> Outcome:
        await asyncio.sleep(self.seconds)
        return await self.inner.send(envelope)

    async def close(self) -> None:
        await self.inner.close()


def make_template() -> MessageTemplate:
    sender = Sender(
        name="MS Research News",
        address="news@example.org",
        list_name=LIST,
        public_url="https://news.example.org",
        token_key=b"bench_slow_commit.py token key: 32 bytes or more",
        unsubscribe_mailto="unsubscribe@example.org",
    )
    inputs = BuildInputs(
        issue_file=ISSUE,
        society_file=REPO / "society.yaml",
        templates_dir=REPO / "templates",
        sender=sender,
        preview_recipient=Recipient("sam.sample@example.org", "Sam", "Sample"),
    )
    return MessageTemplate(build(inputs).rendered, sender)


def campaign_at(revision: str, folder: Path) -> ModuleType:
    """delivery/campaign.py as it is at ``revision``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/newsletter/delivery/campaign.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = folder / "campaign_at_revision.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("campaign_at_revision", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def one_run(
    code: ModuleType,
    folder: Path,
    template: MessageTemplate,
    messages: int,
    connections: int,
    relay_s: float,
    delay_s: float,
) -> float:
    """Messages per second of one campaign run over a fresh database."""
    path = folder / "send.sqlite3"
    for leftover in folder.glob("send.sqlite3*"):
        leftover.unlink()
    storage = SqliteStorage.open(path, create=True)
    conn = storage.conn
    try:
        rows = (
            ParsedRow(i + 2, f"reader{i:06d}@example.org", "Reader", "Bench")
            for i in range(messages)
        )
        assert storage.subscribers.import_rows(LIST, rows, skip_invalid=False).committed
        record = prepare(storage, template.rendered.issue_id, LIST).record
        relay = Relay(relay_s)
        run = code.Campaign(
            SlowLog(conn, delay_s),
            record.id,
            template,
            relay,
            code.SendOptions(connections=connections),
            envelope_sender="bounces@example.org",
        )
        result = asyncio.run(run.run())
        assert result.counts["sent"] == messages == len(relay.box.sent), result.counts
        return float(result.rate)
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--relay-ms", default="5,10,20", help="per message and connection")
    parser.add_argument("--delays-ms", default="0,10,50", help="per commit; the first is the base")
    parser.add_argument("--against", metavar="REV", help="also run campaign.py as at this revision")
    args = parser.parse_args()
    relays = [float(x) / 1000 for x in args.relay_ms.split(",")]
    delays = [float(x) / 1000 for x in args.delays_ms.split(",")]
    template = make_template()
    root = Path(tempfile.mkdtemp(prefix="bench_slow_commit-"))
    try:
        codes: dict[str, ModuleType] = {"new": new_campaign}
        if args.against:
            codes[args.against] = campaign_at(args.against, root)
        print(
            f"campaign rate, {args.messages:,} messages, {args.connections} connections, "
            "a relay in memory; each commit of the send log sleeps the delay first"
        )
        for relay_s in relays:
            if relay_s > 0:
                ideal = f"at most {args.connections / relay_s:,.0f} msg/s"
            else:
                ideal = "no wait: the campaign's own cost"
            print(f"relay {relay_s * 1000:g} ms a message ({ideal}):")
            for name, code in codes.items():
                base = 0.0
                for delay_s in delays:
                    rate = one_run(
                        code, root, template, args.messages, args.connections, relay_s, delay_s
                    )
                    base = base or rate
                    print(
                        f"  {name:>8}  commit {delay_s * 1000:4g} ms: {rate:7,.0f} msg/s"
                        f"   ratio {rate / base:.2f}"
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
