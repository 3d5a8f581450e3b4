"""Several sinks, each owning a slice of the devices: one producer sends every device's readings
to the sink that owns that device, one worker spans every sink, one subscriber takes every
sink's results. Exits 0 once every reading came back exactly once, each device's in order.

    python examples/partitioned_sinks.py [--sinks 3] [--devices 12] [--readings 3000]

On machines of their own the sinks would be named by host (`sinks="sink-a,sink-b,sink-c"`);
here they share this process, each on ipc:// endpoints in a folder of its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from contextlib import ExitStack

from zfan import Producer, Sink, Subscriber, Worker
from zfan.partitions import parse_sinks


def stamp(records: list[dict]) -> list[dict]:
    """Each reading, marked as seen: results are published on the batch's topic, in order."""
    return [{**r, "seen": True} for r in records]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sinks", type=int, default=3)
    ap.add_argument("--devices", type=int, default=12)
    ap.add_argument("--readings", type=int, default=3000, help="in all, the devices taking turns")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="zfan-example-")
    sinks = ",".join(f"ipc://{folder}/sink{i}" for i in range(args.sinks))
    per_device: dict[str, list[int]] = defaultdict(list)  # each device's reading numbers, as they came
    partitions: dict[str, set[int]] = defaultdict(set)  # which sinks published each device's
    try:
        with ExitStack() as stack:
            for i, part in enumerate(parse_sinks(sinks)):
                os.mkdir(f"{folder}/sink{i}")  # (an ipc:// sink's folder: its three socket files)
                stack.enter_context(
                    Sink(
                        intake=part.intake,
                        control=part.control,
                        results=part.results,
                        ledger=f"{folder}/sink{i}.db",
                    )
                )
            sub = stack.enter_context(Subscriber(sinks=sinks, topics=["readings"]))
            if not sub.wait_ready(10):
                raise SystemExit("the sinks did not answer")
            stack.enter_context(Worker(stamp, sinks=sinks))
            with Producer(sinks=sinks, key="device", topic="readings", batch_size=50) as prod:
                prod.send_many({"device": f"dev-{n % args.devices}", "n": n} for n in range(args.readings))
                outcomes = prod.join(30)
            if not outcomes.ok:
                raise SystemExit(f"a batch failed: {outcomes.first_error}")
            received = 0
            while received < args.readings and (msg := sub.recv(10)) is not None:
                for r in msg.records:
                    per_device[r["device"]].append(r["n"])
                    partitions[r["device"]].add(msg.partition)
                received += len(msg.records)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    owners: dict[int, list[str]] = defaultdict(list)
    for device in sorted(partitions, key=lambda d: int(d.split("-")[1])):
        owners[min(partitions[device])].append(device)
    for sink, devices in sorted(owners.items()):
        print(f"sink {sink}: {', '.join(devices)}")
    every = sorted(n for ns in per_device.values() for n in ns)
    ok = (
        every == list(range(args.readings))
        and all(len(p) == 1 for p in partitions.values())  # each device through one sink
        and all(ns == sorted(ns) for ns in per_device.values())  # each device's readings in order
    )
    print("every reading once, each device's in order through its own sink" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
