"""The processing function every contender runs: touch every record, one result per record."""

from __future__ import annotations


def double(records: list[dict]) -> list[dict]:
    return [{"id": r["id"], "sensor": r["sensor"], "v": r["value"] * 2} for r in records]
