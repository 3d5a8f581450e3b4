"""Records per second through zfan's full pipeline, against the raw pyzmq limit, in one run.

    python bench/throughput.py [--records N] [--batch-size B] [--workers W] [--runs R] [--cli]

The limit: the same hops with nothing but pyzmq and msgpack (producer PUSH -> hop PULL/PUSH ->
worker -> hop PULL -> PUB -> SUB), no ledger, no acks, no heartbeats. zfan: the embedded API
with the SQLite ledger on disk, acks, heartbeats and per-topic sequence checks; with `cli=True`
the sink and workers are `zfan sink` and `zfan worker` processes instead. Both run the same
records (5-field dicts of about 100 bytes) through the same function (bench/app.py), and count
at the subscriber that every record arrived once. bench/run.py runs these among the others.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import zfan.dispatch  # noqa: E402
from bench.app import double  # noqa: E402
from bench.recovery import Proc, endpoints, reap, start_sink  # noqa: E402
from zfan import Producer, Sink, Subscriber, query_status  # noqa: E402
from zfan.apps import readings  # noqa: E402
from zfan.metrics import SinkMetrics  # noqa: E402

# Every party starts in a fresh interpreter, as it would on its own machine and as the peers'
# parties do: a forked child would inherit this process's heap, the records to send included,
# and pay copy-on-write faults for it when its garbage collector first walks those pages.
mp = multiprocessing.get_context("spawn")
WAIT = 30.0  # seconds without a single result before a run is called stuck


def join_or_kill(procs: Iterable[Any], timeout: float = WAIT) -> None:
    """Wait for each process to end; kill the ones that do not in time. Every one is reaped
    (one never started, when a run failed before it, is passed over)."""
    for pr in procs:
        if pr.pid is None:
            continue
        pr.join(timeout)
        if pr.is_alive():
            pr.kill()
            pr.join()


def make_batches(n: int, batch_size: int) -> list[list[dict]]:
    records = list(readings(n, sensors=16))
    return [records[i : i + batch_size] for i in range(0, n, batch_size)]


class Count:
    """Result records seen at the subscriber, by id: what was lost and what came twice."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ids: set[int] = set()
        self.got = 0

    def add(self, records: Iterable[dict]) -> None:
        for r in records:
            self.ids.add(r["id"])
            self.got += 1

    @property
    def done(self) -> bool:
        return self.got >= self.n

    def result(self, seconds: float, gaps: int = 0) -> dict[str, Any]:
        lost = self.n - len(self.ids) + gaps
        return {
            "records": self.n,
            "seconds": round(seconds, 4),
            "records_per_s": round(self.n / seconds),
            "lost": lost,
            "duplicated": self.got - len(self.ids),
        }


# --- the limit: raw pyzmq ------------------------------------------------------------------


def _raw_hop(ends: dict[str, str], subscribed: Any) -> None:
    ctx = zmq.Context()
    intake, to_workers, from_workers, pub = (ctx.socket(t) for t in (zmq.PULL, zmq.PUSH, zmq.PULL, zmq.XPUB))
    intake.bind(ends["intake"])
    to_workers.bind(ends["work"])
    from_workers.bind(ends["back"])
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(ends["results"])
    poller = zmq.Poller()
    poller.register(intake, zmq.POLLIN)
    poller.register(from_workers, zmq.POLLIN)
    poller.register(pub, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if pub in ready:
            pub.recv()  # XPUB shows the subscription has arrived: start the clock only then
            subscribed.set()
        if intake in ready:
            frames = intake.recv_multipart()
            if frames[0] == b"stop":
                break
            to_workers.send_multipart(frames)  # the payload is forwarded, not decoded
        if from_workers in ready:
            pub.send_multipart([b"r", *from_workers.recv_multipart()])
    for s in (intake, to_workers, from_workers, pub):
        s.close(linger=0)
    ctx.term()


def _raw_worker(ends: dict[str, str]) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(ends["work"])
    push.connect(ends["back"])
    while True:
        header, payload = pull.recv_multipart()
        push.send_multipart([header, msgpack.packb(double(msgpack.unpackb(payload)))])


def _raw_producer(ends: dict[str, str], batches: list[list[dict]], go: Any, done: Any) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(ends["intake"])
    go.wait()
    for i, batch in enumerate(batches):
        push.send_multipart([i.to_bytes(8, "big"), msgpack.packb(batch)])
    # Stay connected until everything has arrived: libzmq drops what its peer has not read
    # yet when a connection closes (with nothing to resend it, that is data lost).
    done.wait(WAIT * 4)
    push.close(linger=-1)
    ctx.term()


def run_raw(batches: list[list[dict]], workers: int = 1) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="zfan-bench-")
    ends = {k: f"ipc://{tmp}/{k}" for k in ("intake", "work", "back", "results")}
    go, subscribed, done = mp.Event(), mp.Event(), mp.Event()
    procs = [mp.Process(target=_raw_hop, args=(ends, subscribed))]
    procs += [mp.Process(target=_raw_worker, args=(ends,), daemon=True) for _ in range(workers)]
    procs.append(mp.Process(target=_raw_producer, args=(ends, batches, go, done)))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ends["results"])
    count = Count(sum(map(len, batches)))
    try:
        for pr in procs:
            pr.start()
        if not subscribed.wait(WAIT):
            raise RuntimeError("the raw pipeline did not come up")
        start = time.perf_counter()
        go.set()
        while not count.done and sub.poll(WAIT * 1000):
            count.add(msgpack.unpackb(sub.recv_multipart()[2]))
        elapsed = time.perf_counter() - start
        done.set()
        push = ctx.socket(zmq.PUSH)
        push.connect(ends["intake"])
        push.send_multipart([b"stop"])
        push.close(linger=1000)
    finally:
        done.set()
        sub.close(linger=0)
        ctx.term()
        join_or_kill(procs, 5)
        shutil.rmtree(tmp, ignore_errors=True)
    return count.result(elapsed)


# --- zfan --------------------------------------------------------------------------------


class _Uncounted(SinkMetrics):
    """The sink's metrics with the hooks that run for every batch and result doing nothing: the
    baseline that bench/metrics_cost.py measures metrics against."""

    def arrived(self, batches: list[tuple[int, str, int]]) -> None:
        pass

    def published(self, results: list[Any]) -> None:
        pass

    def committed(self, seconds: float) -> None:
        pass


def _zfan_sink(
    ends: dict[str, str], ledger: str, workers: int, ready: Any, stop: Any, http: str | None, counted: bool = True
) -> None:
    if not counted:
        zfan.dispatch.SinkMetrics = _Uncounted  # type: ignore[misc]  # this process only
    with Sink(ledger=ledger, workers=workers, app="bench.app:double", http=http, **ends):
        ready.set()
        stop.wait()


def _zfan_producer(ends: dict[str, str], batches: list[list[dict]], batch_size: int, go: Any) -> None:
    with Producer(intake=ends["intake"], control=ends["control"], batch_size=batch_size) as prod:
        go.wait()
        for batch in batches:
            prod.send_many(batch)
        prod.flush(60)


def _start_api(
    ends: dict[str, str],
    folder: str,
    workers: int,
    http: str | None = None,
    counted: bool = True,
    ledger: str | None = None,
) -> Callable[[], None]:
    ready, stop = mp.Event(), mp.Event()
    db = ledger or os.path.join(folder, "zfan.db")
    sink = mp.Process(target=_zfan_sink, args=(ends, db, workers, ready, stop, http, counted))
    sink.start()
    if not ready.wait(WAIT):
        raise RuntimeError("the sink did not come up")

    def end() -> None:
        stop.set()
        join_or_kill([sink])

    return end


def _start_cli(ends: dict[str, str], folder: str, workers: int) -> Callable[[], None]:
    procs = [start_sink(ends, os.path.join(folder, "zfan.db"))]
    procs += [
        Proc(
            f"worker-{i}", "worker", "--control", ends["control"], "--app", "bench.app:double", "--log-level", "warning"
        )
        for i in range(workers)
    ]
    procs[0].wait_ready()
    return lambda: reap(procs)


def run_zfan(
    batches: list[list[dict]],
    workers: int = 1,
    *,
    cli: bool = False,
    scraped: bool = False,
    counted: bool = True,
    ledger: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline: a producer process, the sink (embedded, or the `zfan sink` and `zfan
    worker` processes), and a subscriber here that checks every topic's seqs. `scraped`: the
    sink serves HTTP, and a thread here reads its /metrics and /api/status every second, as
    Prometheus and an open dashboard would. `counted=False`: the embedded sink's per-batch
    metrics hooks do nothing (both for bench/metrics_cost.py). `ledger`: where the embedded
    sink keeps it [default: an SQLite file in a temporary folder] (bench/ledgers.py)."""
    tmp = tempfile.mkdtemp(prefix="zfan-bench-")
    ends = endpoints(tmp)
    count = Count(sum(map(len, batches)))
    http = f"127.0.0.1:{free_port()}" if scraped else None
    end = _start_cli(ends, tmp, workers) if cli else _start_api(ends, tmp, workers, http, counted, ledger)
    scraping = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(f"http://{http}/", scraping), daemon=True) if http else None
    go = mp.Event()
    prod = mp.Process(target=_zfan_producer, args=(ends, batches, len(batches[0]), go))
    try:
        prod.start()
        with Subscriber(results=ends["results"], hwm=1_000_000) as sub:
            if not sub.wait_ready(WAIT):
                raise RuntimeError("the subscriber could not reach the sink")
            deadline = time.monotonic() + WAIT
            while len(query_status(ends["control"])["workers"]) < workers and time.monotonic() < deadline:
                threading.Event().wait(0.05)  # the clock starts once every worker has joined
            if scraper is not None:
                scraper.start()
            start = time.perf_counter()
            go.set()
            while not count.done and (msg := sub.recv(timeout=WAIT)) is not None:
                count.add(msg.records)
            elapsed = time.perf_counter() - start
            gaps = sub.gaps
    finally:
        scraping.set()
        if scraper is not None and scraper.ident is not None:
            scraper.join()
        join_or_kill([prod])
        end()
        shutil.rmtree(tmp, ignore_errors=True)
    return count.result(elapsed, gaps)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(base: str, stop: threading.Event) -> None:
    """Read /metrics and /api/status every second until `stop`."""
    while not stop.wait(1.0):
        for path in ("metrics", "api/status"):
            with urllib.request.urlopen(base + path, timeout=10) as r:
                r.read()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by rate; a contender that lost or duplicated a record in any run scores 0."""
    rates = [r["records_per_s"] for r in runs]
    lost, dup = sum(r["lost"] for r in runs), sum(r["duplicated"] for r in runs)
    return {
        "records_per_s": round(statistics.median(rates)) if not (lost or dup) else 0,
        "runs": rates,
        "lost": lost,
        "duplicated": dup,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cli", action="store_true", help="zfan's sink and workers as CLI processes")
    args = ap.parse_args()
    print(
        f"{args.records:,} records in batches of {args.batch_size}, {args.workers} worker(s), "
        f"median of {args.runs} runs, {os.cpu_count()} cores"
    )
    batches = make_batches(args.records, args.batch_size)
    results = {}
    for name, fn in (
        ("raw pyzmq (the limit)", lambda: run_raw(batches, args.workers)),
        ("zfan full pipeline", lambda: run_zfan(batches, args.workers, cli=args.cli)),
    ):
        res = results[name] = median_of([fn() for _ in range(args.runs)])
        note = f"  (lost {res['lost']}, duplicated {res['duplicated']}: no score)" if not res["records_per_s"] else ""
        print(f"  {name:<24} {res['records_per_s']:>12,} records/s{note}")
    limit, zfan = (r["records_per_s"] for r in results.values())
    if limit:
        print(f"  zfan / limit: {zfan / limit:.2f}")


if __name__ == "__main__":
    main()
