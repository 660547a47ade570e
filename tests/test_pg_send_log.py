"""The send log shared by several processes: claims, leases and dead claimants, on a real
PostgreSQL server (and the parts every backend shares, on both)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from newsletter.errors import SendExists
from newsletter.models import Outcome, Recipient
from newsletter.storage import Storage, open_storage


def people(n: int) -> list[Recipient]:
    return [Recipient(f"p{i:05d}@example.org", f"P{i}", "") for i in range(n)]


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Storage]:
    storage = open_storage(postgres_url, create=True)
    yield storage
    storage.close()


def test_claims_record_and_count_the_same_on_both_backends(any_db: Storage) -> None:
    log = any_db.send_log
    record = log.freeze("2026-12-03", "news", people(12), suppressed=2)
    assert (record.audience, record.suppressed, record.duplicates) == (12, 2, 0)
    first = log.claim(record.id, 5, time.time(), holder="h1").deliveries
    assert [d.seq for d in first] == [0, 1, 2, 3, 4] and all(d.attempts == 1 for d in first)
    assert first[0].recipient == Recipient("p00000@example.org", "P0", "")
    log.record(
        record.id,
        [(0, Outcome("sent", 250, "ok")), (1, Outcome("deferred", 451, "later", retry_at=1.0))],
        holder="h1",
    )
    log.release(record.id, [4])
    counts = log.counts(record.id)
    assert (counts["sent"], counts["deferred"], counts["sending"], counts["pending"]) == (
        1,
        1,
        2,
        8,
    )
    # The due deferred one comes after the pending ones, with its attempts counted.
    rest = log.claim(record.id, 20, time.time(), holder="h1").deliveries
    assert [d.seq for d in rest][-1] == 1 and rest[-1].attempts == 2
    assert log.next_retry(record.id) is None
    with pytest.raises(SendExists):
        log.freeze("2026-12-03", "news", people(3), suppressed=0)
    assert log.find("2026-12-03", "news") == record


def test_someone_who_left_after_the_freeze_is_marked_suppressed_not_claimed(
    any_db: Storage,
) -> None:
    log = any_db.send_log
    record = log.freeze("i", "news", people(4), suppressed=0)
    # From another connection, as the pages on the web host write them.
    web = any_db.reopen()
    try:
        web.subscribers.suppress("p00001@example.org", "unsubscribed")
        web.subscribers.opt_out("news", "p00003@example.org")
    finally:
        web.close()
    got = log.claim(record.id, 10, time.time()).deliveries
    assert [d.seq for d in got] == [0, 2]
    assert [e for e, _ in log.in_state(record.id, "suppressed")] == [
        "p00001@example.org",
        "p00003@example.org",
    ]


def test_two_processes_claiming_at_once_never_get_the_same_recipient(
    postgres_url: str, pg: Storage
) -> None:
    record = pg.send_log.freeze("i", "news", people(5000), suppressed=0)
    got: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        storage = open_storage(postgres_url)
        mine = got.setdefault(name, [])
        try:
            while batch := storage.send_log.claim(
                record.id, 37, time.time(), holder=name
            ).deliveries:
                mine.extend(d.seq for d in batch)
        finally:
            storage.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [seq for seqs in got.values() for seq in seqs]
    assert sorted(every) == list(range(5000))  # nobody skipped, nobody twice
    assert all(got.values())  # they really did share the work
    assert pg.send_log.counts(record.id)["sending"] == 5000


def test_only_rows_of_a_claimant_whose_lease_ran_out_become_unknown(pg: Storage) -> None:
    log = pg.send_log
    record = log.freeze("i", "news", people(30), suppressed=0)
    alive = pg.send_lease("i", "news", ttl=30)
    alive.acquire(time.time())
    short = pg.send_lease("i", "news", ttl=1)
    short.acquire(time.time())
    short._stop.set()  # it stops renewing, as a process that froze would
    try:
        log.claim(record.id, 10, time.time(), holder=alive.owner)
        log.claim(record.id, 10, time.time(), holder=short.owner)
        log.claim(record.id, 5, time.time(), holder="nobody-with-a-lease")
        assert log.mark_interrupted(record.id) == 5  # no lease at all: dead
        assert [w.claimed for w in log.workers(record.id)] == [10, 10]
        time.sleep(1.3)
        assert log.mark_interrupted(record.id) == 10  # its lease ran out
        counts = log.counts(record.id)
        assert (counts["sending"], counts["unknown"], counts["pending"]) == (10, 15, 5)
        assert [w.claimed for w in log.workers(record.id)] == [10]
        # A claimant counted dead that was only slow still records what it knows.
        stale = list(range(10, 20))
        log.record(record.id, [(s, Outcome("sent", 250, "ok")) for s in stale], holder=short.owner)
        assert log.counts(record.id)["sent"] == 10
        # And nobody else's record changes rows that are not theirs.
        log.record(record.id, [(0, Outcome("rejected", 550, "no"))], holder=short.owner)
        assert log.counts(record.id)["rejected"] == 0
    finally:
        alive.release()
        short.release()


def test_a_claimant_dead_on_this_machine_is_dead_at_once(pg: Storage) -> None:
    import subprocess
    import sys

    log = pg.send_log
    record = log.freeze("i", "news", people(4), suppressed=0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease = pg.send_lease("i", "news", ttl=60)
    lease.acquire(time.time())
    lease._stop.set()
    # The same lease row, as the dead process would have left it.
    host, _, rest = lease.owner.partition(":")
    _, _, tail = rest.partition(":")
    dead = f"{host}:{gone.pid}:{tail}"
    pg.conn.execute(  # type: ignore[attr-defined]
        "UPDATE locks SET owner = %s WHERE owner = %s", (dead, lease.owner)
    )
    log.claim(record.id, 4, time.time(), holder=dead)
    assert log.mark_interrupted(record.id) == 4


def test_two_processes_freezing_one_send_at_once_freeze_it_once(
    postgres_url: str, pg: Storage
) -> None:
    results: list[object] = []
    barrier = threading.Barrier(3)

    def freeze() -> None:
        storage = open_storage(postgres_url)
        try:
            barrier.wait()
            results.append(storage.send_log.freeze("i", "news", people(2000), suppressed=0))
        except SendExists as exc:
            results.append(exc)
        finally:
            storage.close()

    threads = [threading.Thread(target=freeze) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, SendExists) for r in results) == 2
    record = pg.send_log.find("i", "news")
    assert record is not None and pg.send_log.counts(record.id)["pending"] == 2000


def test_two_lists_of_one_issue_frozen_at_once_never_share_an_address(
    postgres_url: str, pg: Storage
) -> None:
    everyone = people(3000)
    barrier = threading.Barrier(2)

    def freeze(name: str, members: list[Recipient]) -> None:
        storage = open_storage(postgres_url)
        try:
            barrier.wait()
            storage.send_log.freeze("i", name, members, suppressed=0)
        finally:
            storage.close()

    threads = [
        threading.Thread(target=freeze, args=("a", everyone[:2000])),
        threading.Thread(target=freeze, args=("b", everyone[1000:])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = pg.send_log.find("i", "a"), pg.send_log.find("i", "b")
    assert a is not None and b is not None
    assert a.audience + b.audience == 3000 and a.duplicates + b.duplicates == 1000


def test_a_stopping_process_hands_back_only_its_own_rows(pg: Storage) -> None:
    log = pg.send_log
    record = log.freeze("i", "news", people(4), suppressed=0)
    log.claim(record.id, 2, time.time(), holder="slow")
    log.claim(record.id, 2, time.time(), holder="other")
    log.release(record.id, [0, 1, 2, 3], holder="slow")
    counts = log.counts(record.id)
    assert (counts["pending"], counts["sending"]) == (2, 2)


def test_a_zombie_claimant_is_dead() -> None:
    import os
    import signal
    import subprocess
    import sys

    from newsletter.storage.renewal import MACHINE, dead_here

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        owner = f"{__import__('socket').gethostname()}:{child.pid}:1:{MACHINE}"
        while not dead_here(owner) and time.monotonic() < deadline:
            time.sleep(0.02)  # not reaped: a zombie, which still answers signal 0
        assert dead_here(owner)
    finally:
        child.wait()


def test_a_search_path_naming_no_schema_is_a_clear_error(postgres_url: str) -> None:
    from newsletter.errors import StorageUnavailable
    from newsletter.storage import migrate

    missing = postgres_url.rsplit("search_path%3D", 1)[0] + "search_path%3Dno_such_schema"
    with pytest.raises(StorageUnavailable, match="the schema its search_path names"):
        migrate(missing)


def test_a_gone_process_of_this_machine_is_no_live_worker(pg: Storage) -> None:
    """A helper killed before it could hand back its lease is not shown as live (nor
    counted in the rate's share) while its lease runs out."""
    import socket
    import subprocess

    from newsletter.storage.renewal import MACHINE

    log = pg.send_log
    record = log.freeze("i", "news", people(3), suppressed=0)
    live = pg.send_lease("i", "news", ttl=30)
    live.acquire(time.time())
    ended = subprocess.Popen(["true"])
    ended.wait()
    owner = f"{socket.gethostname()}:{ended.pid}:1:{MACHINE}"
    now = time.time()
    pg.conn.execute(  # type: ignore[attr-defined]
        "INSERT INTO locks (name, owner, expires, since, renewed) VALUES (%s, %s, %s, %s, %s)",
        ("send:i:news/" + owner, owner, now + 60, now, now),
    )
    try:
        assert [w.pid for w in log.workers(record.id)] == [str(os.getpid())]
    finally:
        live.release()
