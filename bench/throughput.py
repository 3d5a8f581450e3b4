"""Records per second through zfan's full pipeline, against the raw pyzmq limit, in one run.

    python bench/throughput.py [--records N] [--batch-size B] [--workers W] [--runs R]

The limit: the same hops with nothing but pyzmq and msgpack (producer PUSH -> hop PULL/PUSH ->
worker -> hop PULL -> PUB -> SUB), no ledger, no acks, no heartbeats. zfan: the embedded API
with the SQLite ledger on disk, acks, heartbeats and per-topic sequence checks. Both run the
same records (5-field dicts of about 100 bytes) through the same function (bench/app.py), and
count at the subscriber that every record arrived once. The figure is the median of the runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.app import double  # noqa: E402
from zfan import Producer, Sink, Subscriber, query_status  # noqa: E402
from zfan.apps import readings  # noqa: E402


def make_batches(n: int, batch_size: int) -> list[list[dict]]:
    records = list(readings(n, sensors=16))
    return [records[i:i + batch_size] for i in range(0, n, batch_size)]


# --- the limit: raw pyzmq ------------------------------------------------------------------

def _raw_hop(ends: dict[str, str], subscribed: mp.Event) -> None:
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


def _raw_producer(ends: dict[str, str], batches: list[list[dict]], go: mp.Event) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(ends["intake"])
    go.wait()
    for i, batch in enumerate(batches):
        push.send_multipart([i.to_bytes(8, "big"), msgpack.packb(batch)])
    push.close(linger=-1)
    ctx.term()


def run_raw(n: int, batch_size: int, workers: int) -> tuple[float, int, int]:
    tmp = tempfile.mkdtemp(prefix="zfan-bench-")
    ends = {k: f"ipc://{tmp}/{k}" for k in ("intake", "work", "back", "results")}
    batches = make_batches(n, batch_size)
    go, subscribed = mp.Event(), mp.Event()
    procs = [mp.Process(target=_raw_hop, args=(ends, subscribed))]
    procs += [mp.Process(target=_raw_worker, args=(ends,), daemon=True) for _ in range(workers)]
    procs.append(mp.Process(target=_raw_producer, args=(ends, batches, go)))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ends["results"])
    for p in procs:
        p.start()
    if not subscribed.wait(30):
        raise SystemExit("the raw pipeline did not come up")
    ids: set[int] = set()
    got = 0
    start = time.perf_counter()
    go.set()
    while got < n and sub.poll(10_000):
        _, _, payload = sub.recv_multipart()
        for r in msgpack.unpackb(payload):
            ids.add(r["id"])
            got += 1
    elapsed = time.perf_counter() - start
    push = ctx.socket(zmq.PUSH)
    push.connect(ends["intake"])
    push.send_multipart([b"stop"])
    push.close(linger=1000)
    sub.close(linger=0)
    ctx.term()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    return elapsed, n - len(ids), got - len(ids)


# --- zfan --------------------------------------------------------------------------------

def _zfan_sink(ends: dict[str, str], ledger: str, workers: int, ready: mp.Event, stop: mp.Event) -> None:
    with Sink(ledger=ledger, workers=workers, app="bench.app:double", **ends):
        ready.set()
        stop.wait()


def _zfan_producer(ends: dict[str, str], batches: list[list[dict]], batch_size: int, go: mp.Event) -> None:
    with Producer(intake=ends["intake"], control=ends["control"], batch_size=batch_size) as prod:
        go.wait()
        for batch in batches:
            prod.send_many(batch)
        prod.flush(60)


def run_zfan(n: int, batch_size: int, workers: int) -> tuple[float, int, int]:
    tmp = tempfile.mkdtemp(prefix="zfan-bench-")
    ends = {k: f"ipc://{tmp}/{k}" for k in ("intake", "control", "results")}
    batches = make_batches(n, batch_size)
    ready, stop, go = mp.Event(), mp.Event(), mp.Event()
    sink = mp.Process(target=_zfan_sink, args=(ends, os.path.join(tmp, "zfan.db"), workers, ready, stop))
    sink.start()
    ready.wait(30)
    prod = mp.Process(target=_zfan_producer, args=(ends, batches, batch_size, go))
    prod.start()
    ids: set[int] = set()
    got = 0
    with Subscriber(results=ends["results"], hwm=1_000_000) as sub:
        sub.wait_ready(10)
        deadline = time.monotonic() + 30
        while len(query_status(ends["control"])["workers"]) < workers and time.monotonic() < deadline:
            threading.Event().wait(0.05)  # the clock starts once every worker has joined
        start = time.perf_counter()
        go.set()
        while got < n:
            msg = sub.recv(timeout=10)
            if msg is None:
                break
            for r in msg.records:
                ids.add(r["id"])
                got += 1
        elapsed = time.perf_counter() - start
        gaps = sub.gaps
    prod.join(30)
    stop.set()
    sink.join(30)
    return elapsed, n - len(ids) + gaps, got - len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"{args.records:,} records in batches of {args.batch_size}, {args.workers} worker(s), "
          f"median of {args.runs} runs, {os.cpu_count()} cores")
    results = {}
    for name, fn in (("raw pyzmq (the limit)", run_raw), ("zfan full pipeline", run_zfan)):
        rates = []
        for _ in range(args.runs):
            elapsed, lost, dup = fn(args.records, args.batch_size, args.workers)
            if lost or dup:
                print(f"  {name}: lost {lost}, duplicated {dup}: no score")
                rates = []
                break
            rates.append(args.records / elapsed)
        results[name] = statistics.median(rates) if rates else 0.0
        print(f"  {name:<24} {results[name]:>12,.0f} records/s")
    limit, zfan = results["raw pyzmq (the limit)"], results["zfan full pipeline"]
    if limit:
        print(f"  zfan / limit: {zfan / limit:.2f}")


if __name__ == "__main__":
    main()
