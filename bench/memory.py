"""The sink's memory while a subscriber cannot keep up: it must level off, not grow with the run.

    python bench/memory.py [--seconds 30]

`zfan sink` with one local worker (bench.app:double) runs as a process; a producer process
sends 100 000 records a second (batches of 1000: well within what one worker processes, so that
no backlog of batches builds up and the results are the only thing that could); a subscriber
process takes one result every 50 ms (20 a second, a fifth of the rate they are published) and
never asks for a replay.
The sink's resident memory (VmRSS of the sink process alone) is sampled every 100 ms. Reported:
its peak, and its peak in the first and in the second half of the run. A sink that buffered for
the slow subscriber without bound would show the second half well above the first.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.recovery import Proc, endpoints, reap  # noqa: E402
from bench.throughput import join_or_kill  # noqa: E402
from zfan import Producer, Subscriber, ZfanError, query_status  # noqa: E402
from zfan.apps import readings  # noqa: E402

SAMPLE = 0.1  # seconds between two readings of the sink's memory
SLOW = 0.05  # seconds the slow subscriber spends on each result
RATE = 100_000  # records a second the producer sends


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _producer(ends: dict[str, str], stop: Any) -> None:
    records = list(readings(1000, sensors=16))
    with Producer(intake=ends["intake"], control=ends["control"]) as prod:
        start, sent = time.monotonic(), 0
        while not stop.is_set():
            prod.send_many(records)
            sent += len(records)
            stop.wait(max(0.0, start + sent / RATE - time.monotonic()))  # pacing to RATE
        prod.flush(30)


def _slow_subscriber(ends: dict[str, str], ready: Any, stop: Any, taken: Any) -> None:
    # No control: it never asks for replays. A small queue of its own, so that within the run
    # the results it cannot take back up into the sink.
    with Subscriber(results=ends["results"], hwm=100) as sub:
        ready.set()
        while not stop.is_set():
            if sub.recv(timeout=0.1) is not None:
                taken.value += 1
                stop.wait(SLOW)  # a subscriber that is busy with each result


def measure(seconds: float = 30.0) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="zfan-mem-")
    ends = endpoints(tmp)
    sink = Proc(
        "sink",
        "sink",
        "--ledger",
        os.path.join(tmp, "zfan.db"),
        "--workers",
        "1",
        "--app",
        "bench.app:double",
        *(f"--{k}={v}" for k, v in ends.items()),
    )
    stop, sub_ready = mp.Event(), mp.Event()
    taken = mp.Value("q", 0)
    sub = mp.Process(target=_slow_subscriber, args=(ends, sub_ready, stop, taken))
    prod = mp.Process(target=_producer, args=(ends, stop))
    samples: list[tuple[float, float]] = []
    try:
        sink.wait_ready()
        sub.start()
        if not sub_ready.wait(30):
            raise ZfanError("the slow subscriber did not start")
        prod.start()
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < seconds:
            samples.append((now - t0, rss_mb(sink.popen.pid)))
            threading.Event().wait(SAMPLE)  # sampling at a fixed interval is the point here
        info = query_status(ends["control"])
    finally:
        stop.set()
        join_or_kill([prod, sub], 30)
        reap([sink])
        shutil.rmtree(tmp, ignore_errors=True)
    first = [mb for t, mb in samples if t < seconds / 2]
    second = [mb for t, mb in samples if t >= seconds / 2]
    return {
        "seconds": seconds,
        "results_published": info.get("published", 0),
        "results_taken": taken.value,
        "records_in": info.get("records_in", 0),
        "start_mb": round(samples[0][1], 1),
        "peak_mb": round(max(mb for _, mb in samples), 1),
        "peak_first_half_mb": round(max(first), 1),
        "peak_second_half_mb": round(max(second), 1),
        "grew_in_second_half_mb": round(max(second) - max(first), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    print(measure(args.seconds))


if __name__ == "__main__":
    main()
