"""Apps the fault tests run in real worker processes (`--app tests.apps:NAME`)."""

from __future__ import annotations

import asyncio
import os
import time


def ids(records):
    """One result per record: its id."""
    return [r["id"] for r in records]


def echo(records):
    """Each record as it came (partitioned tests read its key and id)."""
    return records


def slow_ids(records):
    """Like ids(), taking long enough that a kill lands mid-batch."""
    time.sleep(0.03)
    return [r["id"] for r in records]


def hold(records):
    """Holds each batch half a second: a worker stopped now is stopped mid-batch."""
    time.sleep(0.5)
    return [r["id"] for r in records]


def poison(records):
    """Fails on one particular record, every time."""
    if any(r["id"] == 1234 for r in records):
        raise ValueError("record 1234 is poison")
    return [r["id"] for r in records]


def crash(records):
    """Kills the worker process on one particular record, every time: a segfault, in effect."""
    if any(r["id"] == 1234 for r in records):
        os._exit(1)
    return [r["id"] for r in records]


def tagged_orders(records):
    """Each record's id, marked as processed by the orders app (routing tests)."""
    return [{"id": r["id"], "app": "orders"} for r in records]


def tagged_sensors(records):
    return [{"id": r["id"], "app": "sensors"} for r in records]


def tagged_default(records):
    return [{"id": r["id"], "app": "default"} for r in records]


async def async_ids(records):
    """ids(), as an async def function: what it awaits yields to the worker's event loop."""
    await asyncio.sleep(0)
    return [r["id"] for r in records]


class AsyncPoison:
    """poison(), as an object whose __call__ is async."""

    async def __call__(self, records):
        await asyncio.sleep(0)
        if any(r["id"] == 1234 for r in records):
            raise ValueError("record 1234 is poison")
        return [r["id"] for r in records]


async_poison = AsyncPoison()
