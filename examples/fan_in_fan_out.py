"""Fan-in and fan-out: several nodes send readings to one central sink, workers summarise them,
and each node gets back only its own results. Exits 0 once every node has every summary it is
owed, exactly once.

    python examples/fan_in_fan_out.py [--nodes 4] [--readings 5000]

Each node is a Producer (its readings in) and a Subscriber (its results out), as it would be on
a machine of its own; here they share this process, on ipc:// endpoints in a temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time

from zfan import Producer, Sink, Subscriber, Worker


def summarise(records: list[dict]) -> dict[str, list[dict]]:
    """One summary per node in the batch, on that node's own topic: how results fan out."""
    by_node: dict[int, list[float]] = {}
    for r in records:
        by_node.setdefault(r["node"], []).append(r["value"])
    return {
        f"node.{node}.summary": [{"node": node, "readings": len(values), "total": sum(values)}]
        for node, values in by_node.items()
    }


def run_node(node: int, readings: int, sink: Sink, got: dict[int, list[dict]], ready: threading.Barrier) -> None:
    with Subscriber(results=sink.results, control=sink.control, topics=[f"node.{node}."]) as sub:
        if not sub.wait_ready(10):
            raise SystemExit(f"node {node}: the sink did not answer")
        ready.wait()
        with Producer(intake=sink.intake, control=sink.control, topic=f"node.{node}.readings", batch_size=100) as prod:
            prod.send_many({"node": node, "value": float(i % 10)} for i in range(readings))
            outcomes = prod.join(30)
        if not outcomes.ok:
            raise SystemExit(f"node {node}: {outcomes.first_error}")
        deadline = time.monotonic() + 30
        while sum(s["readings"] for s in got[node]) < readings and time.monotonic() < deadline:
            msg = sub.recv(0.5)
            if msg is not None:
                got[node] += msg.records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--readings", type=int, default=5000, help="per node")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="zfan-example-")
    ends = {k: f"ipc://{folder}/{k}" for k in ("intake", "control", "results")}
    got: dict[int, list[dict]] = {n: [] for n in range(args.nodes)}
    try:
        with (
            Sink(ledger=f"{folder}/zfan.db", **ends) as sink,
            Worker(summarise, control=sink.control),
            Worker(summarise, control=sink.control),
        ):
            ready = threading.Barrier(args.nodes)
            nodes = [
                threading.Thread(target=run_node, args=(n, args.readings, sink, got, ready)) for n in range(args.nodes)
            ]
            for t in nodes:
                t.start()
            for t in nodes:
                t.join()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ok = True
    for node, summaries in got.items():
        count = sum(s["readings"] for s in summaries)
        foreign = [s for s in summaries if s["node"] != node]
        print(f"node {node}: {count:,} readings summarised in {len(summaries)} result(s)")
        ok &= count == args.readings and not foreign
    print("every node got its own results, exactly once" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
