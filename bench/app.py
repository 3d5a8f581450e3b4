"""The processing functions the benchmarks run: touch every record, one result per record."""

from __future__ import annotations


def double(records: list[dict]) -> list[dict]:
    """What every contender runs for throughput."""
    return [{"id": r["id"], "sensor": r["sensor"], "v": r["value"] * 2} for r in records]


def stamped(records: list[dict]) -> list[dict]:
    """double(), carrying each record's send time through, for latency."""
    return [{"id": r["id"], "sensor": r["sensor"], "v": r["value"] * 2, "ts": r["ts"]} for r in records]
