"""Prometheus metrics from a sink's or a worker's snapshot: custom collectors for
prometheus-client, which reads them at each scrape (the snapshot is built on the node's own
thread; nothing here touches its state).

Names follow Prometheus' conventions: `_total` counters, base units (`_seconds`, `_bytes`), and
labels only where their values stay few (workers, rejection reasons, topic prefixes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__

Snapshot = Callable[[], "dict[str, Any] | None"]

# (name without _total, what it counts, the snapshot's key)
SINK_COUNTERS = (
    ("zfan_records_in", "Records in batches stored and acknowledged to producers.", "records_in"),
    ("zfan_records_out", "Records in results published to subscribers.", "records_out"),
    ("zfan_batches_in", "Batches stored (a batch sent again is not counted twice).", "batches_in"),
    ("zfan_batches_done", "Batches whose results were stored.", "batches_done"),
    ("zfan_batches_dead", "Batches dead-lettered after their last attempt.", "dead_total"),
    ("zfan_batches_replayed", "Leases that ended without a result, their batch leased again.", "replays"),
    ("zfan_batches_failed", "Batches whose function raised (each attempt counted).", "batches_failed"),
    (
        "zfan_batches_duplicate",
        "Batches a producer sent again, stored once and acknowledged again.",
        "duplicate_batches",
    ),
    ("zfan_results_fenced", "Results of leases that were no longer the worker's, not published.", "fenced_results"),
    ("zfan_results_published", "Results published (one per batch and topic, dead letters included).", "published"),
    ("zfan_batches_requeued", "Dead-lettered batches requeued (zfan dead requeue).", "batches_requeued"),
    ("zfan_batches_purged", "Dead-lettered batches purged (zfan dead purge).", "batches_purged"),
    ("zfan_batches_not_retried", "Batches dead-lettered at once: their exception is not retried.", "not_retried"),
)
SINK_LEDGER = ("pending", "leased", "done", "dead", "purged")


def histogram(name: str, doc: str, snap: dict[str, Any]) -> HistogramMetricFamily:
    bounds = [*(_le(b) for b in snap["bounds"]), "+Inf"]
    return HistogramMetricFamily(
        name, doc, buckets=list(zip(bounds, snap["cumulative"], strict=True)), sum_value=snap["sum"]
    )


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def build_info(role: str) -> InfoMetricFamily:
    return InfoMetricFamily(
        "zfan_build", "zfan's version and this node's role.", value={"version": __version__, "role": role}
    )


def _routes(routes: dict[str, dict[str, int]]) -> Iterator[Metric]:
    """Per route: batches ready to lease (those of a route with no worker wait here), batches
    waiting out a retry's backoff, and the workers serving it."""
    series = {
        "pending": GaugeMetricFamily(
            "zfan_route_pending_batches", "Batches of a route ready to lease.", labels=["route"]
        ),
        "backoff": GaugeMetricFamily(
            "zfan_route_backoff_batches", "Failed batches of a route waiting out their backoff.", labels=["route"]
        ),
        "workers": GaugeMetricFamily("zfan_route_workers", "Workers serving a route.", labels=["route"]),
    }
    for name, r in sorted(routes.items()):
        for key, family in series.items():
            family.add_metric([name], r[key])
    yield from series.values()


class SinkCollector(Collector):
    """The sink's metrics, from `snapshot()` (None while the sink is not serving: then only
    the build info)."""

    def __init__(self, snapshot: Snapshot, active: Callable[[], bool] | None = None) -> None:
        self._snapshot = snapshot
        self._active = active

    def collect(self) -> Iterator[Metric]:
        yield build_info("sink")
        if self._active is not None:
            # On a shared ledger: alert when no sink of a pipeline says 1, or two do.
            yield GaugeMetricFamily(
                "zfan_sink_active", "1 if this sink serves, 0 while it stands by.", value=int(self._active())
            )
        s = self._snapshot()
        if s is None:
            return
        for name, doc, key in SINK_COUNTERS:
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))
        for direction in ("in", "out"):
            by = CounterMetricFamily(
                f"zfan_topic_records_{direction}",
                f"Records {direction}, by topic prefix (the topic up to its first dot; past 32 prefixes, 'other').",
                labels=["prefix"],
            )
            for label, n in sorted(s.get(f"records_{direction}_by_prefix", {}).items()):
                by.add_metric([label], n)
            yield by
        for state in SINK_LEDGER:
            yield GaugeMetricFamily(
                f"zfan_ledger_{state}_batches", f"Batches in the ledger now {state}.", value=s[state]
            )
        yield GaugeMetricFamily("zfan_ledger_size_bytes", "The ledger's files on disk.", value=s["ledger_bytes"])
        yield from _routes(s.get("routes", {}))
        yield histogram("zfan_commit_seconds", "Time of the sink's ledger commits.", s["commit_seconds"])
        yield histogram(
            "zfan_end_to_end_seconds",
            "Time from a batch's storing to its first result's publishing, for batches stored by this sink.",
            s["end_to_end_seconds"],
        )
        yield from _peers(s)
        rejected = CounterMetricFamily("zfan_rejected_messages", "Messages refused, by reason.", labels=["reason"])
        for reason, n in sorted(s.get("rejected", {}).items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily("zfan_topics", "Topics results were published on.", value=s.get("topics", 0))
        yield GaugeMetricFamily("zfan_uptime_seconds", "Seconds since the sink started.", value=s["uptime_s"])
        yield GaugeMetricFamily(
            "zfan_start_time_seconds", "When the sink started, in seconds since the epoch.", value=s["started_at"]
        )


def _peers(s: dict[str, Any]) -> Iterator[Metric]:
    workers = s.get("workers", [])
    yield GaugeMetricFamily("zfan_workers", "Workers connected.", value=len(workers))
    in_flight = GaugeMetricFamily("zfan_worker_in_flight_batches", "Batches a worker holds.", labels=["worker"])
    credit = GaugeMetricFamily("zfan_worker_credit_batches", "Batches a worker may hold.", labels=["worker"])
    age = GaugeMetricFamily(
        "zfan_worker_heartbeat_age_seconds", "Seconds since the sink last heard from a worker.", labels=["worker"]
    )
    for w in workers:
        in_flight.add_metric([w["name"]], w["in_flight"])
        credit.add_metric([w["name"]], w["credit"])
        if w.get("idle_ms") is not None:
            age.add_metric([w["name"]], w["idle_ms"] / 1000)
    yield from (in_flight, credit, age)
    yield GaugeMetricFamily("zfan_producers", "Producers connected.", value=s.get("producers", 0))
    yield GaugeMetricFamily(
        "zfan_subscribers", "Subscribers connected to the results socket.", value=s.get("subscribers", 0)
    )
    lag = GaugeMetricFamily(
        "zfan_subscriber_lag_results",
        "Results published after a durable subscriber's committed cursor, over its topics.",
        labels=["subscriber"],
    )
    for name, n in sorted(s.get("cursor_lag", {}).items()):
        lag.add_metric([name], n)
    yield lag


class WorkerCollector(Collector):
    """A worker's own metrics, from `snapshot()` (see WorkerMetrics.snapshot)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield build_info("worker")
        s = self._snapshot()
        if s is None:
            return
        yield CounterMetricFamily("zfan_worker_batches", "Batches the function ran on.", value=s["batches"])
        yield CounterMetricFamily("zfan_worker_records", "Records the function ran on.", value=s["records"])
        yield CounterMetricFamily(
            "zfan_worker_app_errors",
            "Batches whose function raised, or returned what cannot be sent.",
            value=s["errors"],
        )
        yield histogram("zfan_worker_batch_seconds", "Time the function took per batch.", s["batch_seconds"])
        yield GaugeMetricFamily("zfan_worker_in_flight_batches", "Leases held now.", value=s["in_flight"])
        yield GaugeMetricFamily(
            "zfan_worker_connected", "1 while a sink has welcomed this worker.", value=s["connected"]
        )


def registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own per node, so that several nodes in one process never collide."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
