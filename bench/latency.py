"""Latency from a producer's send() to the subscriber, through zfan's full pipeline, at a set
rate (bench/run.py uses half of the maximum it measured in the same run).

    python bench/latency.py --rate 150000 [--seconds 5] [--batch-size 1000] [--linger-ms 5]

A producer process sends at the rate, in steps of a millisecond, stamping each record with
time.monotonic() (CLOCK_MONOTONIC, one clock for every process of the machine) as it hands it to
send(). The sink runs one local worker with bench.app:stamped, which carries the stamp through;
the subscriber here takes the difference when the record reaches it. The first half second is
warm-up and not counted. Batches are sealed at `batch_size` records or after `linger_ms`, so at
a low rate the linger, not the pipeline, is most of the figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.recovery import endpoints  # noqa: E402
from bench.throughput import WAIT, Count, join_or_kill  # noqa: E402
from zfan import Producer, Sink, Subscriber  # noqa: E402
from zfan.apps import readings  # noqa: E402

WARMUP = 0.5  # seconds at the start whose records are not counted
STEP = 0.001  # seconds between the producer's sends


def _sink(ends: dict[str, str], ledger: str, ready: Any, stop: Any) -> None:
    with Sink(ledger=ledger, workers=1, app="bench.app:stamped", **ends):
        ready.set()
        stop.wait()


def _producer(ends: dict[str, str], rate: float, n: int, batch_size: int, linger_ms: float, go: Any) -> None:
    template = list(readings(min(n, 100_000), sensors=16))
    with Producer(intake=ends["intake"], control=ends["control"], batch_size=batch_size, linger_ms=linger_ms) as prod:
        go.wait()
        start = time.monotonic()
        sent = 0
        while sent < n:
            now = time.monotonic()
            due = min(n, int(rate * (now - start))) - sent
            if due > 0:
                chunk = [template[i % len(template)] for i in range(sent, sent + due)]
                for i, r in enumerate(chunk, sent):  # reused dicts: send_many packs them before it returns
                    r["id"], r["ts"] = i, now
                prod.send_many(chunk)
                sent += due
            else:
                time.sleep(STEP)  # pacing: the next records are not due yet
        prod.flush(60)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(rate: float, seconds: float = 5.0, batch_size: int = 1000, linger_ms: float = 5.0) -> dict[str, Any]:
    n = int(rate * seconds)
    tmp = tempfile.mkdtemp(prefix="zfan-lat-")
    ends = endpoints(tmp)
    ready, stop, go = mp.Event(), mp.Event(), mp.Event()
    sink = mp.Process(target=_sink, args=(ends, os.path.join(tmp, "zfan.db"), ready, stop))
    prod = mp.Process(target=_producer, args=(ends, rate, n, batch_size, linger_ms, go))
    count = Count(n)
    lat: list[float] = []
    try:
        sink.start()
        if not ready.wait(WAIT):
            raise RuntimeError("the sink did not come up")
        prod.start()
        with Subscriber(results=ends["results"], hwm=1_000_000) as sub:
            if not sub.wait_ready(WAIT):
                raise RuntimeError("the subscriber could not reach the sink")
            t0 = time.monotonic()
            go.set()
            while not count.done and (msg := sub.recv(timeout=WAIT)) is not None:
                now = time.monotonic()
                count.add(msg.records)
                lat.extend(now - r["ts"] for r in msg.records if r["ts"] - t0 >= WARMUP)
            gaps = sub.gaps
    finally:
        join_or_kill([prod])
        stop.set()
        join_or_kill([sink])
        shutil.rmtree(tmp, ignore_errors=True)
    lat.sort()
    res = count.result(seconds, gaps)
    return (
        {
            "rate": round(rate),
            "seconds": seconds,
            "batch_size": batch_size,
            "linger_ms": linger_ms,
            "counted": len(lat),
            "lost": res["lost"],
            "duplicated": res["duplicated"],
            "p50_ms": round(percentile(lat, 0.50) * 1000, 2),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
            "max_ms": round(lat[-1] * 1000, 2),
        }
        if lat
        else {"rate": round(rate), "counted": 0, **res}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, required=True, help="records per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--linger-ms", type=float, default=5.0)
    args = ap.parse_args()
    print(measure(args.rate, args.seconds, args.batch_size, args.linger_ms))


if __name__ == "__main__":
    main()
