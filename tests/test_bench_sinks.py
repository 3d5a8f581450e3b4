"""bench/sinks.py in small: every record through 1 and 2 key-partitioned sinks exactly once, and
the CPU figures read for every sink. (Its speed is measured by the script, never asserted here.)"""

from __future__ import annotations

import pytest

from bench import sinks as bench_sinks


@pytest.mark.timeout(120)
def test_the_sinks_benchmark_counts_every_record_once_through_partitioned_sinks():
    r = bench_sinks.measure(1000, records=20_000, runs=1, counts=(1, 2))
    for c in ("1", "2"):
        e = r["by_sinks"][c]
        assert (e["lost"], e["duplicated"]) == (0, 0), c
        assert e["records_per_s"] > 0 and e["ratio"] > 0  # 0 would mean records lost or twice
        assert len(e["sink_cpu_s"]) == len(e["sink_core_pct"]) == int(c)
        assert all(s >= 0 for s in e["sink_cpu_s"])


def test_the_keys_are_spread_evenly_over_2_and_4_sinks():
    keys = bench_sinks.even_keys()
    assert len(set(keys)) == 64
    for n in (2, 4):
        owned = [sum(bench_sinks.partition_of(k, n) == i for k in keys) for i in range(n)]
        assert owned == [64 // n] * n
