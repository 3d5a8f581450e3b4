"""bench/ledgers.py on both ledgers, in small: every record through once on SQLite and on
PostgreSQL, and a latency figure for each. (Their speed is measured by the script, never
asserted here.)"""

from __future__ import annotations

import pytest

from bench import ledgers as bench_ledgers
from tests import ledgers


@pytest.mark.timeout(120)
def test_the_ledger_benchmark_runs_on_sqlite_and_postgres_and_loses_nothing():
    base = ledgers.need_postgres()
    r = bench_ledgers.throughput(base, 100, pairs=1, records=20_000)
    assert r["sqlite"] > 0 and r["postgres"] > 0 and r["ratio"] > 0  # 0 would mean records lost or twice
    lat = bench_ledgers.latencies(base, 5000, seconds=1.5)
    for kind in ("sqlite", "postgres"):
        assert (lat[kind]["lost"], lat[kind]["duplicated"]) == (0, 0), kind
        assert lat[kind]["counted"] > 0 and lat[kind]["p50_ms"] <= lat[kind]["p99_ms"]
