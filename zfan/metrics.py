"""What the sink measures about itself, for `/metrics`, the dashboard and `zfan status`: socket-free,
owned by the sink's thread, read by others only through snapshot() copies.

Counters that the sink's parts keep already (records in, batches done, rejected messages...) stay
where they are; this holds what none of them does: the commit and end-to-end latency histograms,
records published, per-second history for rates and the dashboard's chart, the last dead letters,
and the subscribers connected.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Bucket bounds in seconds: a commit takes 0.1 ms to a second, a record's trip 1 ms to minutes.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
END_TO_END_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTORY = 600  # seconds of per-second history kept (10 minutes)
RATE_OVER = 10  # seconds that the rates in a snapshot are averaged over
DEAD_KEPT = 20  # the last dead letters kept, with their errors
PREFIXES = 32  # topic prefixes counted apart; the others are counted under "other"
ARRIVALS = 100_000  # batches whose arrival is remembered for the end-to-end latency at most


@dataclass
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense: counts[i] observations <= bounds[i]
    (the last count is +Inf), their sum, and their number."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def snapshot(self) -> dict[str, Any]:
        cumulative, running = [], 0
        for c in self.counts:
            running += c
            cumulative.append(running)
        return {"bounds": list(self.bounds), "cumulative": cumulative, "sum": self.total, "count": self.n}


def by_prefix(by_topic: dict[str, int]) -> dict[str, int]:
    """Counts by topic summed by the topic's first dot-separated part; past PREFIXES of them (the
    largest kept), the rest under "other", so that a label's values stay few."""
    sums: Counter[str] = Counter()
    for topic, n in by_topic.items():
        sums[topic.split(".", 1)[0]] += n
    if len(sums) <= PREFIXES:
        return dict(sums)
    kept = dict(sums.most_common(PREFIXES))
    kept["other"] = sum(sums.values()) - sum(kept.values())
    return kept


class SinkMetrics:
    def __init__(self, clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self._clock = clock
        self.started = clock()
        self.started_wall = wall()
        self.commit = Histogram(COMMIT_BUCKETS)
        self.end_to_end = Histogram(END_TO_END_BUCKETS)
        self.records_out = 0
        self.results_out = 0
        self._in_by_topic: dict[str, int] = {}
        self._out_by_topic: dict[str, int] = {}
        self.dead: deque[dict[str, Any]] = deque(maxlen=DEAD_KEPT)
        self.dead_total = 0
        self.subscribers: set[str] = set()
        self._arrived: dict[int, float] = {}  # batch id -> when it was stored, in this run
        # One row per second: (second, records in, records out, trips observed, their sum)
        self._history: deque[list[float]] = deque(maxlen=HISTORY)

    # --- events, from the sink's parts ----------------------------------------------------
    def committed(self, seconds: float) -> None:
        self.commit.observe(seconds)

    # Both below run for every batch and every result: plain dicts and one clock read per call,
    # since every microsecond here is one the sink's thread does not spend on records.
    def arrived(self, batches: list[tuple[int, str, int]]) -> None:
        """Batches stored: (batch id, topic, records) each."""
        now = self._clock()
        arrived, by_topic = self._arrived, self._in_by_topic
        records = 0
        for batch_id, topic, count in batches:
            if len(arrived) < ARRIVALS:  # past it (a backlog of millions), a sample is enough
                arrived[batch_id] = now
            by_topic[topic] = by_topic.get(topic, 0) + count
            records += count
        self._second(now)[1] += records

    def published(self, results: list[Any]) -> None:
        """Stored results handed to the results socket (dead letters, kind 1, are passed over)."""
        now = self._clock()
        row = self._second(now)
        arrived, by_topic = self._arrived, self._out_by_topic
        for s in results:
            if s.kind:
                continue
            self.results_out += 1
            self.records_out += s.count
            by_topic[s.topic] = by_topic.get(s.topic, 0) + s.count
            row[2] += s.count
            began = arrived.pop(s.batch_id, None)  # a batch's first result ends its trip
            if began is not None:
                trip = now - began
                self.end_to_end.observe(trip)
                row[3] += 1
                row[4] += trip

    def dead_lettered(self, batch_id: int, error: str) -> None:
        self._arrived.pop(batch_id, None)
        self.dead_total += 1
        self.dead.append({"batch_id": batch_id, "error": error[-500:], "at": self._clock()})

    def subscribed(self, token: str, joined: bool) -> None:
        """A subscriber's private sync topic came or went (the results socket tells both)."""
        if joined:
            self.subscribers.add(token)
        else:
            self.subscribers.discard(token)

    # --- reading ------------------------------------------------------------------------
    def snapshot_rates(self) -> tuple[float, float]:
        """Records per second in and out, over the last RATE_OVER seconds (or the uptime)."""
        now = self._clock()
        self._second(now)  # so that quiet seconds read as zero
        recent = [r for r in self._history if r[0] > int(now) - RATE_OVER]
        span = max(1.0, min(RATE_OVER, now - self.started))
        return round(sum(r[1] for r in recent) / span, 1), round(sum(r[2] for r in recent) / span, 1)

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        self._second(now)
        return {
            "started_at": self.started_wall,
            "results_out": self.results_out,
            "records_in_by_prefix": by_prefix(self._in_by_topic),
            "records_out_by_prefix": by_prefix(self._out_by_topic),
            "commit_seconds": self.commit.snapshot(),
            "end_to_end_seconds": self.end_to_end.snapshot(),
            "dead_total": self.dead_total,
            "dead_letters": [{**d, "ago_s": round(now - d["at"], 1)} for d in reversed(self.dead)],
            "subscribers": len(self.subscribers),
            # Per second, oldest first: [seconds ago, records in, records out, mean trip in ms]
            "history": [
                [int(now) - int(r[0]), int(r[1]), int(r[2]), round(r[4] / r[3] * 1000, 2) if r[3] else None]
                for r in self._history
            ],
        }

    def _second(self, now: float) -> list[float]:
        """This second's row, after a row of zeros for each quiet second since the last one."""
        second = int(now)
        if self._history and self._history[-1][0] == second:
            return self._history[-1]
        last = int(self._history[-1][0]) if self._history else second - 1
        for s in range(max(last + 1, second - HISTORY + 1), second + 1):
            self._history.append([s, 0, 0, 0, 0.0])
        return self._history[-1]


BATCH_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)


class WorkerMetrics:
    """What a worker measures: updated by its function's thread, read by its HTTP thread, so
    every access holds the lock (once per batch: nothing next to running the function)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches = self._records = self._errors = 0
        self._seconds = Histogram(BATCH_BUCKETS)

    def ran(self, records: int, seconds: float, failed: bool) -> None:
        with self._lock:
            self._batches += 1
            self._records += records
            self._errors += failed
            self._seconds.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self._batches,
                "records": self._records,
                "errors": self._errors,
                "batch_seconds": self._seconds.snapshot(),
            }
