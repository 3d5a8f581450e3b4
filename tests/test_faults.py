"""Machines die mid-batch, hang and come back, restart: every record's result still reaches the
subscriber exactly once, in order. Real processes, real signals, ipc:// endpoints of the test's own."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from contextlib import closing

import pytest

from tests.checker import check, from_json_lines
from tests.helpers import wait_for
from zfan import Producer, ZfanError, query_status

pytestmark = pytest.mark.timeout(180)


def endpoint_args(ipc: dict[str, str], *names: str) -> list[str]:
    return [f"--{n}={ipc[n]}" for n in names]


def status(ipc, ctx) -> dict:
    return query_status(ipc["control"], timeout=2, context=ctx)


def status_or_none(ipc, ctx) -> dict | None:
    try:
        return query_status(ipc["control"], timeout=0.5, context=ctx)
    except ZfanError:
        return None  # the sink is down right now


class PacedProducer:
    """Streams records with ids 0, 1, 2, ... from a thread, a batch every `pace` seconds, so that
    faults land while producers are still sending. Keeps what the sink acknowledged."""

    def __init__(self, ipc, ctx, *, batches: int, batch_size: int, pace: float = 0.01) -> None:
        self.total = batches * batch_size
        # Batches sealed by count, never by the linger, so that the tests know their boundaries.
        self.prod = Producer(
            intake=ipc["intake"],
            control=ipc["control"],
            batch_size=batch_size,
            linger_ms=60_000,
            topic="readings",
            context=ctx,
        ).start()
        self.error: BaseException | None = None
        self._batches, self._size, self._pace = batches, batch_size, pace
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for b in range(self._batches):
                for i in range(b * self._size, (b + 1) * self._size):
                    self.prod.send({"id": i, "sensor": f"s{i % 7}", "value": i * 0.5})
                threading.Event().wait(self._pace)  # load shaping: a steady stream, not a wait
            self.prod.flush(timeout=120)
        except BaseException as exc:
            self.error = exc

    @property
    def streaming(self) -> bool:
        return self.thread.is_alive()

    def finish(self) -> None:
        self.thread.join(150)
        assert self.error is None, self.error
        assert self.prod.acked_records == self.total
        self.prod.close(timeout=5)


def delivered(sub) -> tuple[list, dict]:
    return from_json_lines(list(sub.out))


def test_workers_killed_mid_batch_again_and_again(tmp_path, ipc, roles, ctx):
    # Replayed batches go first, so the kills below hit some batches several times: allow it,
    # this test is about replay (dead letters have their own test).
    sink = roles(
        "sink",
        "--ledger",
        str(tmp_path / "z.db"),
        "--max-attempts",
        "100",
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--topic", "readings")
    sub.wait_ready()
    workers = {}

    def start_worker(i: int) -> None:
        name = f"w{i}"
        workers[name] = roles("worker", "--control", ipc["control"], "--app", "tests.apps:slow_ids", "--name", name)

    for i in range(3):
        start_worker(i)
    prod = PacedProducer(ipc, ctx, batches=400, batch_size=500)
    kills, streaming_kills = 0, 0
    while kills < 20:

        def busy() -> list[str]:
            return [
                w["name"]
                for w in status(ipc, ctx)["workers"]
                if w["in_flight"] and w["name"] in workers and workers[w["name"]].proc.poll() is None
            ]

        victim = workers.pop(wait_for(busy, timeout=30, what="a worker holding a batch")[0])
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        kills += 1
        streaming_kills += prod.streaming
        start_worker(kills + 2)
    prod.finish()
    n = prod.total
    wait_for(lambda: len(delivered(sub)[0]) >= n, timeout=60, what=f"{n} results at the subscriber")
    ids, seqs = delivered(sub)
    verdict = check(range(n), ids, seqs)
    assert verdict.ok, verdict
    assert streaming_kills >= 10, "most kills landed while producers were still streaming"
    info = status(ipc, ctx)
    assert info["replays"] >= kills, "every killed worker held a batch, and it was replayed"
    assert info["pending"] == 0 and info["leased"] == 0 and info["dead"] == 0


def test_a_stopped_worker_is_replayed_in_time_and_its_late_result_never_published(tmp_path, ipc, roles, ctx):
    sink = roles("sink", "--ledger", str(tmp_path / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    sink.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--topic", "readings")
    sub.wait_ready()
    workers = {
        name: roles("worker", "--control", ipc["control"], "--app", "tests.apps:hold", "--name", name)
        for name in ("a", "b")
    }
    wait_for(lambda: len(status(ipc, ctx)["workers"]) == 2, what="two workers")
    prod = PacedProducer(ipc, ctx, batches=6, batch_size=100, pace=0)
    prod.finish()
    held = wait_for(
        lambda: [w["name"] for w in status(ipc, ctx)["workers"] if w["in_flight"]], what="a worker holding batches"
    )
    victim = workers[held[0]]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(
            lambda: status(ipc, ctx).get("replays", 0) >= 1,
            timeout=5,
            interval=0.005,
            what="the stopped worker's batches replayed",
        )
        elapsed = time.monotonic() - stopped
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    # heartbeat 0.25 s x liveness 3, plus 250 ms
    assert elapsed < 0.25 * 3 + 0.25, f"replayed {elapsed * 1000:.0f} ms after SIGSTOP"
    n = prod.total
    wait_for(lambda: len(delivered(sub)[0]) >= n, timeout=30, what=f"{n} results at the subscriber")
    # The resumed worker finishes what it held and rejoins: give its late answers time to reach
    # the sink before looking for duplicates.
    wait_for(
        lambda: sorted(w["name"] for w in status(ipc, ctx)["workers"]) == ["a", "b"],
        timeout=15,
        what="the stopped worker back",
    )
    wait_for(lambda: all(w["in_flight"] == 0 for w in status(ipc, ctx)["workers"]), timeout=15)
    ids, seqs = delivered(sub)
    verdict = check(range(n), ids, seqs)
    assert verdict.ok, verdict
    info = status(ipc, ctx)
    assert info["done"] == 6 and info["published"] == 6, "each batch published once"


def test_sink_killed_at_random_points_and_restarted(backend, ipc, roles, ctx):
    """On each ledger backend: on PostgreSQL, the restarted sink takes the claim over from its
    dead predecessor at once (a process of this host that is gone)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    db = backend.location

    def start_sink():
        s = roles("sink", "--ledger", db, *endpoint_args(ipc, "intake", "control", "results"))
        s.wait_ready()
        return s

    sink = start_sink()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--topic", "readings")
    sub.wait_ready()
    for name in ("a", "b"):
        roles("worker", "--control", ipc["control"], "--app", "tests.apps:ids", "--name", name)
    prod = PacedProducer(ipc, ctx, batches=300, batch_size=200, pace=0.02)

    def stored() -> int:
        info = status_or_none(ipc, ctx)
        return -1 if info is None else info["pending"] + info["leased"] + info["done"] + info["dead"]

    kills = 10
    for _ in range(kills):
        target = max(stored(), 0) + rng.randint(3, 25)
        wait_for(
            lambda t=target: stored() >= t or not prod.streaming,
            timeout=30,
            what=f"{target} batches stored (seed {seed})",
        )
        sink.proc.send_signal(signal.SIGKILL)
        sink.proc.wait()
        sink = start_sink()
    prod.finish()
    n = prod.total
    wait_for(lambda: len(delivered(sub)[0]) >= n, timeout=90, what=f"{n} results at the subscriber (seed {seed})")
    ids, seqs = delivered(sub)
    verdict = check(range(n), ids, seqs)
    assert verdict.ok, f"seed {seed}: {verdict}"
    info = status(ipc, ctx)
    assert info["epoch"] == kills + 1
    assert info["pending"] == 0 and info["leased"] == 0 and info["done"] == 300
    assert sink.stop() == 0
    assert backend.open().integrity_check() == "ok"
    assert backend.peek("SELECT count(*) FROM batches") == [(300,)], "each batch stored once"


def run_with_a_poison_record(app: str, tmp_path, ipc, roles, ctx) -> dict:
    """A sink with 2 local workers running `app`, 5000 records of which 1234 is poison (its
    batch holds 1200..1299): checks that everything else arrives exactly once, returns the one
    dead letter."""
    sink = roles(
        "sink",
        "--workers",
        "2",
        "--app",
        app,
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"))
    sub.wait_ready()
    prod = PacedProducer(ipc, ctx, batches=50, batch_size=100, pace=0)
    prod.finish()
    wait_for(lambda: len(delivered(sub)[0]) >= prod.total, timeout=45, what="every record, one batch dead")
    dead = [m for m in map(json.loads, sub.out) if m["topic"] == "zfan.dead"]
    assert len(dead) == 1, dead
    assert [r["id"] for r in dead[0]["records"]] == list(range(1200, 1300))
    ids, seqs = from_json_lines(x for x in sub.out if '"zfan.dead"' not in x)
    verdict = check([i for i in range(prod.total) if not 1200 <= i < 1300], ids, seqs)
    assert verdict.ok, verdict
    assert status(ipc, ctx)["dead"] == 1
    return dead[0]


def test_a_poison_batch_is_dead_lettered_and_the_rest_delivered(tmp_path, ipc, roles, ctx):
    dead = run_with_a_poison_record("tests.apps:poison", tmp_path, ipc, roles, ctx)
    assert dead["attempts"] == 3 and "ValueError: record 1234 is poison" in dead["error"]


def test_a_batch_that_kills_every_worker_it_reaches_is_dead_lettered(tmp_path, ipc, roles, ctx):
    """Each death costs the batch an attempt (the other worker, restarted or not, and the
    subscriber are still heard): after three, it is dead-lettered and the rest flows; the
    batches the dying workers held beside it pay nothing."""
    dead = run_with_a_poison_record("tests.apps:crash", tmp_path, ipc, roles, ctx)
    assert dead["attempts"] == 3
    assert dead["error"].startswith("worker local-"), dead["error"]  # died on it: silent or unreachable


def test_a_producer_that_gave_up_on_a_stalled_sink_is_welcomed_at_once_when_it_goes_on(tmp_path, ipc, roles, ctx):
    """The sink's thread stalls for longer than the expiry (on a ledger another process holds
    locked; ZeroMQ's own threads go on), so the producer gives up on it and dials again. When
    the sink goes on, the producer is welcomed back within its backoff, never refused as a
    second producer with its own id. (Where the sink reads the new hello before it has judged
    the old connection silent, test_dispatch's probe tests show how it tells them apart.)"""
    ledger = str(tmp_path / "z.db")
    sink = roles("sink", "--ledger", ledger, *endpoint_args(ipc, "intake", "control", "results"))
    sink.wait_ready()
    with Producer(intake=ipc["intake"], control=ipc["control"], producer_id="p", context=ctx) as prod:
        wait_for(prod.connected.is_set, what="the producer welcomed")
        prod.send({"n": 1})
        prod.flush(10)
        with closing(sqlite3.connect(ledger, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the sink's next write waits for this lock
            stalled = time.monotonic()
            prod.send({"n": 2})
            # A stall of 1.5 s: twice the expiry, time for the producer to dial again.
            wait_for(
                lambda: not prod.connected.is_set() and time.monotonic() - stalled > 1.5,
                what="the producer giving up on the stalled sink",
            )
            other.execute("COMMIT")
        went_on = time.monotonic()
        wait_for(prod.connected.is_set, timeout=10, interval=0.005, what="the producer welcomed again")
        welcomed_after = time.monotonic() - went_on
        prod.flush(10)
    info = status(ipc, ctx)
    assert info["rejected"].get("producer id in use", 0) == 0, info["rejected"]
    assert info["done"] + info["pending"] + info["leased"] == 2
    # Its next hello comes within its backoff (at most 2 s), and is welcomed in the turn it arrives.
    assert welcomed_after < 2.5, f"welcomed {welcomed_after:.2f} s after the sink went on"
