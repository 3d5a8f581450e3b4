"""Latency from a producer's send() to the subscriber, through zfan's full pipeline, at a set
rate (bench/run.py uses 10 %, 50 % and 80 % of each contender's own rate, measured in the same
run; the peer designs in bench/peers/ measure theirs with the pieces here).

    python bench/latency.py --rate 150000 [--seconds 5] [--batch-size 1000] [--linger-ms 5]

A producer process sends at the rate, in steps of a millisecond, stamping each record with
time.monotonic() (CLOCK_MONOTONIC, one clock for every process of the machine) as it hands it on
(`Pacer`). The sink runs one local worker with bench.app:stamped, which carries the stamp through;
the subscriber here takes the difference when the record reaches it (`Stamps`). The first half
second is warm-up and not counted. Batches are sealed at `batch_size` records or after
`linger_ms` (zfan's producer does that itself; a peer's producer with `Sealer`), so at a low rate
the linger, not the pipeline, is most of the figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import msgpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.recovery import endpoints  # noqa: E402
from bench.throughput import WAIT, Count, join_or_kill  # noqa: E402
from zfan import Producer, Sink, Subscriber  # noqa: E402
from zfan.apps import readings  # noqa: E402

# Every party starts in a fresh interpreter, as it would on its own machine and as the peers'
# parties do: a forked child would inherit this process's heap, the records to send included,
# and pay copy-on-write faults for it when its garbage collector first walks those pages.
mp = multiprocessing.get_context("spawn")
WARMUP = 0.5  # seconds at the start whose records are not counted
STEP = 0.001  # seconds between the producer's sends
LINGER_MS = 5.0  # a batch is sealed once its first record is this old, if not full before


class Pacer:
    """`n` records at `rate` records/s from start(): due() hands out those due by now, stamped
    with now in "ts". The dicts are reused (one per record of a 100 000-record template), so a
    caller packs them before another 100 000 records have come due."""

    def __init__(self, rate: float, n: int) -> None:
        self.rate, self.n = rate, n
        self.template = list(readings(min(n, 100_000) or 1, sensors=16))
        self.sent = 0
        self.start = 0.0

    def begin(self) -> None:
        self.start = time.monotonic()

    @property
    def done(self) -> bool:
        return self.sent >= self.n

    def due(self, now: float) -> list[dict]:
        # At most one template's worth at a time: a longer chunk (catching up after a stall)
        # would hold one dict twice, the second stamp overwriting the first's id.
        due = min(self.n, int(self.rate * (now - self.start)), self.sent + len(self.template)) - self.sent
        if due <= 0:
            return []
        template = self.template
        chunk = [template[i % len(template)] for i in range(self.sent, self.sent + due)]
        for i, r in enumerate(chunk, self.sent):
            r["id"], r["ts"] = i, now
        self.sent += due
        return chunk


class Sealer:
    """Packs records into batches as zfan's producer seals them: at `batch_size` records, or
    once the first record of the open batch is `linger` seconds old."""

    def __init__(self, batch_size: int, linger: float = LINGER_MS / 1000) -> None:
        self.batch_size, self.linger = batch_size, linger
        self.open: list[dict] = []
        self.born = 0.0

    def add(self, records: list[dict], now: float) -> list[bytes]:
        sealed = []
        for r in records:
            if not self.open:
                self.born = now
            self.open.append(r)
            if len(self.open) >= self.batch_size:
                sealed.append(self._seal())
        return sealed

    def due(self, now: float, *, last: bool = False) -> list[bytes]:
        """The open batch, packed, if it has lingered long enough (or `last`: nothing more comes)."""
        if self.open and (last or now - self.born >= self.linger):
            return [self._seal()]
        return []

    def _seal(self) -> bytes:
        body: bytes = msgpack.packb(self.open)
        self.open = []
        return body


class Stamps:
    """Each record's time from its stamp to now, at the subscriber, past the warm-up. Beside the
    percentiles, the median of the first and of the last second of stamps: a pipeline that does
    not keep up with the rate has a backlog that grows, and the second is later than the first."""

    def __init__(self) -> None:
        self.lat: list[tuple[float, float]] = []  # (stamp, latency)

    def add(self, records: list[dict], now: float, t0: float) -> None:
        self.lat.extend((r["ts"], now - r["ts"]) for r in records if r["ts"] - t0 >= WARMUP)

    def summary(self) -> dict[str, Any]:
        if not self.lat:
            return {"counted": 0}
        lat = sorted(d for _, d in self.lat)
        first = min(ts for ts, _ in self.lat)
        last = max(ts for ts, _ in self.lat)

        def p50_of(lo: float, hi: float) -> float:
            return round(percentile(sorted(d for ts, d in self.lat if lo <= ts <= hi), 0.50) * 1000, 2)

        return {
            "counted": len(lat),
            "p50_ms": round(percentile(lat, 0.50) * 1000, 2),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
            "max_ms": round(lat[-1] * 1000, 2),
            "p50_first_s_ms": p50_of(first, first + 1.0),
            "p50_last_s_ms": p50_of(last - 1.0, last),
        }


def _sink(ends: dict[str, str], ledger: str, ready: Any, stop: Any) -> None:
    with Sink(ledger=ledger, workers=1, app="bench.app:stamped", **ends):
        ready.set()
        stop.wait()


def _producer(ends: dict[str, str], rate: float, n: int, batch_size: int, linger_ms: float, go: Any) -> None:
    pacer = Pacer(rate, n)
    with Producer(intake=ends["intake"], control=ends["control"], batch_size=batch_size, linger_ms=linger_ms) as prod:
        go.wait()
        pacer.begin()
        while not pacer.done:
            chunk = pacer.due(time.monotonic())
            if chunk:
                prod.send_many(chunk)  # packs them before it returns: the dicts may be reused
            else:
                time.sleep(STEP)  # pacing: the next records are not due yet
        prod.flush(60)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def result(
    rate: float, seconds: float, batch_size: int, linger_ms: float, counted: dict[str, Any], stamps: dict[str, Any]
) -> dict[str, Any]:
    """One latency figure: `counted` is a Count.result (lost, duplicated), `stamps` a Stamps.summary."""
    out = {"rate": round(rate), "seconds": seconds, "batch_size": batch_size, "linger_ms": linger_ms}
    return {**out, "lost": counted["lost"], "duplicated": counted["duplicated"], **stamps}


def measure(
    rate: float, seconds: float = 5.0, batch_size: int = 1000, linger_ms: float = LINGER_MS, ledger: str | None = None
) -> dict[str, Any]:
    """`ledger`: where the sink keeps it [default: an SQLite file in a temporary folder]."""
    n = int(rate * seconds)
    tmp = tempfile.mkdtemp(prefix="zfan-lat-")
    ends = endpoints(tmp)
    ready, stop, go = mp.Event(), mp.Event(), mp.Event()
    sink = mp.Process(target=_sink, args=(ends, ledger or os.path.join(tmp, "zfan.db"), ready, stop))
    prod = mp.Process(target=_producer, args=(ends, rate, n, batch_size, linger_ms, go))
    count = Count(n)
    stamps = Stamps()
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
                stamps.add(msg.records, now, t0)
            gaps = sub.gaps
    finally:
        join_or_kill([prod])
        stop.set()
        join_or_kill([sink])
        shutil.rmtree(tmp, ignore_errors=True)
    return result(rate, seconds, batch_size, linger_ms, count.result(seconds, gaps), stamps.summary())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, required=True, help="records per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--linger-ms", type=float, default=LINGER_MS)
    args = ap.parse_args()
    print(measure(args.rate, args.seconds, args.batch_size, args.linger_ms))


if __name__ == "__main__":
    main()
