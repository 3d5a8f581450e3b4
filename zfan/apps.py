"""Apps that ship with zfan: the default sensor roll-up, and the readings it expects.

An app is any callable ``process(records: list) -> list | dict[str, list] | None``; name one
on the command line as ``module:function``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any


def rollup(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per sensor in the batch: count, mean, min and max of its readings, published on
    ``sensor.<id>`` so that each node subscribes to the sensors it cares about."""
    acc: dict[str, list[float]] = {}
    for r in records:
        value = float(r["value"])
        a = acc.get(r["sensor"])
        if a is None:
            acc[r["sensor"]] = [1, value, value, value]
        else:
            a[0] += 1
            a[1] += value
            if value < a[2]:
                a[2] = value
            if value > a[3]:
                a[3] = value
    return {
        f"sensor.{sensor}": [{"sensor": sensor, "count": n, "mean": total / n, "min": lo, "max": hi}]
        for sensor, (n, total, lo, hi) in acc.items()
    }


def echo(records: list[Any]) -> list[Any]:
    """Publish every record as it came, on the batch's topic."""
    return records


def readings(
    count: int | None = None, *, sensors: int = 16, start: int = 0, source: str = "p", seed: int | None = None
) -> Iterator[dict[str, Any]]:
    """Synthetic sensor readings, about 100 bytes each: ``{"id", "sensor", "ts", "value", "unit"}``."""
    rng = random.Random(seed)
    ts = 1_700_000_000.0
    i = start
    while count is None or i < start + count:
        s = rng.randrange(sensors)
        yield {
            "id": i,
            "sensor": f"{source}-{s:03d}",
            "ts": round(ts + i * 0.001, 3),
            "value": round(20.0 + 5.0 * rng.random() + s * 0.1, 3),
            "unit": "celsius",
        }
        i += 1
