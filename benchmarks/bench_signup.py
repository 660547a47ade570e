"""Signup benchmark: what the public signup costs the server, per form and per mail.

Run from the repository root:

    python benchmarks/bench_signup.py [--signups 2000]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]

For SQLite (a new file), and with --postgres for PostgreSQL too (a schema of its
own, dropped at the end):

1. forms: N posted forms through signup.joining.decide, each with a solved proof of
   work (challenges made easy beforehand: checking one costs the same whatever its
   difficulty), each from its own network and address: the check of the solution
   and its single use, the two rate limits and the signup kept with its mail queued;
   prints forms per second;
2. confirmations: each signup confirmed (the address on its list, a consent record);
   prints confirmations per second;
3. mail: the mailer composes each confirmation (Jinja, MJML, the inliner) and hands it
   to the in-memory transport, recording its fate before and after; prints mails per
   second, composing being nearly all of it.

Checks the database after: N members, N consent records, N mails sent, else exit 1.
The browser's side (solving the challenge) is in tests/test_signup_challenge.py's
timing: about 1 s on a mid-range phone.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from altcha import v1 as altcha_v1  # noqa: E402

from newsletter import wiring  # noqa: E402
from newsletter.delivery.transports import MemoryTransport  # noqa: E402
from newsletter.render.loading import load_society  # noqa: E402
from newsletter.settings import load_settings  # noqa: E402
from newsletter.signup.challenge import new_challenge  # noqa: E402
from newsletter.signup.joining import Posted, challenge_key, decide  # noqa: E402
from newsletter.signup.mailer import Mailer  # noqa: E402
from newsletter.storage import open_storage  # noqa: E402
from newsletter.storage.signups import erasure_hash, erasure_key  # noqa: E402

SECRET = "bench-secret-for-the-signup-0123456789"  # noqa: S105 - a benchmark's own key


def solved_payloads(key: bytes, n: int, now: float) -> list[str]:
    payloads = []
    for _ in range(n):
        made = new_challenge(challenge_key(key), now=now, max_number=200)
        found = altcha_v1.solve_challenge(made.challenge, made.salt, "SHA-256", 200, 0)
        assert found is not None
        body = {"algorithm": made.algorithm, "challenge": made.challenge,
                "number": found.number, "salt": made.salt, "signature": made.signature}  # fmt: skip
        payloads.append(base64.b64encode(json.dumps(body).encode()).decode())
    return payloads


def run(name: str, location: str, n: int) -> dict[str, float]:
    society = load_society(REPO / "society.yaml").value
    settings = load_settings(
        database=location, secret_key=SECRET, public_url="https://news.example.org",
        templates_dir=REPO / "templates", smtp_host="127.0.0.1", smtp_security="none",
    )  # fmt: skip
    policy = wiring.signup_policy(settings, society)
    assert policy is not None
    key = settings.token_key
    now = time.time()
    payloads = solved_payloads(key, n, now)
    rates: dict[str, float] = {}
    with closing(open_storage(location, create=True)) as db:
        started = time.perf_counter()
        ids = []
        for i, payload in enumerate(payloads):
            posted = Posted(f"reader{i:06d}@example.org", "Ada", ("research-news",),
                            "the signup page (/subscribe)", False, payload, "")  # fmt: skip
            done = decide(posted, ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                          policy=policy, signups=db.signups, subscribers=db.subscribers,
                          now=now)  # fmt: skip
            assert done.kind == "done" and done.queued is not None, done.why
            ids.append(done.queued)
        rates["forms"] = n / (time.perf_counter() - started)

        ekey = erasure_key(key)
        started = time.perf_counter()
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds")
        for signup_id in ids:
            pending = db.signups.signup(signup_id)
            assert pending is not None
            confirmed = db.signups.confirm(
                signup_id, pending.nonce, confirmed_ip="10.0.0.1", now=stamp,
                email_hash=erasure_hash(ekey, pending.email), welcome=False,
            )  # fmt: skip
            assert confirmed is not None
        rates["confirmations"] = n / (time.perf_counter() - started)

        transport = MemoryTransport()
        mailer = Mailer(open_storage(location), wiring.signup_composer(settings, society, policy),
                        transport, "bounces@example.org")  # fmt: skip
        try:
            started = time.perf_counter()
            handled = mailer.run_once(now=now)
            rates["mails"] = handled / (time.perf_counter() - started)
        finally:
            mailer.storage.close()
        members = db.subscribers.count("research-news")[0]
        consents = sum(len(db.signups.consents(f"reader{i:06d}@example.org")) for i in range(n))
        sent = sum(1 for m in db.signups.outbox() if m.state == "sent")
    wrong = (members, consents, sent, len(transport.sent)) != (n, n, n, n)
    print(f"{name}: {n:,} forms {rates['forms']:,.0f}/s, confirmations "
          f"{rates['confirmations']:,.0f}/s, mails {rates['mails']:,.1f}/s "
          f"(members {members:,}, consent records {consents:,}, mails sent {sent:,})")  # fmt: skip
    if wrong:
        print(f"{name}: the database does not hold what was done", file=sys.stderr)
        sys.exit(1)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signups", type=int, default=2000)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL to run on too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        lite = run("SQLite", str(Path(folder) / "newsletter.sqlite3"), args.signups)
    if args.postgres:
        import psycopg

        schema = f"bench_signup_{os.getpid()}"
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            joiner = "&" if "?" in args.postgres else "?"
            url = f"{args.postgres}{joiner}options={quote(f'-csearch_path={schema}')}"
            pg = run("PostgreSQL", url, args.signups)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        print("PostgreSQL / SQLite: " + ", ".join(
            f"{k} {pg[k] / lite[k]:.2f}" for k in ("forms", "confirmations", "mails")))  # fmt: skip


if __name__ == "__main__":
    main()
