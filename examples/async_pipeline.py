"""A whole zfan pipeline in one asyncio program: a sink, a worker running an ``async def``
function, an AsyncProducer and an AsyncSubscriber, on ipc:// endpoints in a temporary folder.

    python examples/async_pipeline.py [RECORDS]

Exits 0 once every record has come back exactly once, each topic in order; 1 if not.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections import Counter
from typing import Any

from zfan import Sink, Worker
from zfan.aio import AsyncProducer, AsyncSubscriber

TOPICS = 4


async def process(records: list[dict[str, Any]]) -> dict[str, list[dict[str, int]]]:
    """Runs on the worker, on an event loop of its own: await an HTTP call or a query here."""
    await asyncio.sleep(0)
    out: dict[str, list[dict[str, int]]] = {}
    for r in records:  # fan out: one topic per remainder
        out.setdefault(f"squares.{r['id'] % TOPICS}", []).append({"id": r["id"], "square": r["id"] ** 2})
    return out


async def pipeline(folder: str, n: int) -> bool:
    ipc = {name: f"ipc://{folder}/{name}" for name in ("intake", "control", "results")}
    # The sink and the worker run threads of their own; entering and leaving them blocks briefly.
    with Sink(**ipc, ledger=f"{folder}/zfan.db") as sink, Worker(process, control=sink.control):
        async with AsyncSubscriber(results=sink.results, control=sink.control, topics=["squares."]) as sub:
            if not await sub.wait_ready(timeout=10):
                print("the sink did not take our subscription in time")
                return False
            async with AsyncProducer(intake=sink.intake, control=sink.control, topic="numbers") as prod:
                for i in range(n):
                    await prod.send({"id": i})  # waits only while the window of unacknowledged batches is full
                outcomes = await prod.join(timeout=30)  # every batch processed, or dead-lettered
            print(f"{outcomes.done_records} records processed, {outcomes.dead_records} dead-lettered")
            seen: Counter[int] = Counter()
            last: dict[str, int] = {}  # each topic's last seq
            in_order = True
            while sum(seen.values()) < n:
                msg = await sub.recv(timeout=10)
                if msg is None:
                    break
                in_order = in_order and msg.seq == last.get(msg.topic, 0) + 1
                last[msg.topic] = msg.seq
                seen.update(r["id"] for r in msg.records)
    once = sorted(seen) == list(range(n)) and all(count == 1 for count in seen.values())
    print(f"{sum(seen.values())} results on {len(last)} topics: each record once: {once}, in order: {in_order}")
    return outcomes.ok and once and in_order


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory(prefix="zfan-") as folder:
        return 0 if asyncio.run(pipeline(folder, n)) else 1


if __name__ == "__main__":
    sys.exit(main())
