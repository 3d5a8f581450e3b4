"""Records per second through zfan's whole pipeline with 1, 2 and 4 key-partitioned sinks, the
same producers and workers for each, in interleaved rounds in one run.

    python bench/sinks.py [--runs 3] [--sizes 1000] [--records N] [--sinks 1,2,4] [--out FILE]

Each sink is a `zfan sink` process with its SQLite ledger on disk in a temporary folder of its
own and no local workers. Two `zfan worker --sinks ...` processes span every sink. Two producer
processes send records (zfan.apps.readings, about 100 bytes each) keyed by their "sensor" field:
64 keys, chosen so that each of 2 or 4 sinks owns the same number of them, and each record takes
one at random, so every sink gets an even share. A subscriber here takes every sink's results
(`Subscriber(sinks=...)`) and counts every record id: a run that loses or duplicates one has no
score. The clock starts once every sink is up with both workers joined, both producers welcomed
by every sink and the subscriber ready; it stops when the last record arrives.

The CPU time each process used between those two moments comes from /proc/PID/stat (user +
system, every thread): each sink's, as seconds and as a share of one core over the run, and the
workers', producers' and this process's (the subscriber) in total, with how many of the machine's
cores were busy on average. It shows which bound the rate: sinks at 100 % of a core each, or the
machine's cores all busy.

Rounds alternate the order of the sink counts (1, 2, 4 then 4, 2, 1...); records/s is the median
over the rounds, the ratio the median of each round's rate against that round's 1 sink.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.recovery import Proc, reap, status_until  # noqa: E402
from bench.throughput import WAIT, Count, join_or_kill, mp  # noqa: E402
from zfan import Producer, Subscriber  # noqa: E402
from zfan.apps import readings  # noqa: E402
from zfan.partitions import partition_of  # noqa: E402

COUNTS = (1, 2, 4)  # sinks
PRODUCERS = 2
WORKERS = 2
KEYS = 64
KEY = "sensor"
RECORDS = {10: 100_000, 100: 300_000, 1000: 1_000_000, 10_000: 1_000_000}  # a few seconds per run
QUICK_RECORDS = {10: 5_000, 100: 20_000, 1000: 60_000, 10_000: 60_000}
TICK = os.sysconf("SC_CLK_TCK")


def even_keys(n: int = KEYS, counts: tuple[int, ...] = (2, 4)) -> list[str]:
    """`n` key names that each sink of every count in `counts` owns an equal share of. 64 names
    taken as they come would be split 37 / 27 between 2 sinks by the hash: the runs would measure
    that imbalance, not what more sinks do. Names are grouped by their owner under each count;
    the sinks of the largest count get n / count names each, spread evenly over the groups that
    end at that sink (jump hashing only moves keys to added sinks, so this evens out the smaller
    counts too: with 2 and 4 sinks, 16 names a sink of 4 and 32 a sink of 2). Names are as long as
    readings()'s ("p-000"), so records keep their size."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for i in range(10_000):
        name = f"s{i:04d}"
        groups.setdefault(tuple(partition_of(name, c) for c in counts), []).append(name)
    sharing = Counter(owners[-1] for owners in groups)
    keys = [name for owners, names in groups.items() for name in names[: n // counts[-1] // sharing[owners[-1]]]]
    return sorted(keys)


def keyed_records(n: int, start: int, seed: int, keys: list[str]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = list(readings(n, sensors=len(keys), start=start, seed=seed))
    for r in records:
        r[KEY] = keys[rng.randrange(len(keys))]
    return records


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15


def _producer(
    spec: str, batch_size: int, part: tuple[int, int, int], keys: list[str], ready: Any, go: Any, done: Any
) -> None:
    start, n, seed = part
    # Made here, not in the bench process: the subscriber there would otherwise share its
    # heap with every record, and its garbage collector would walk them in the timed part.
    records = keyed_records(n, start, seed, keys)
    with Producer(sinks=spec, key=KEY, batch_size=batch_size, producer_id=f"bench-p{seed}") as prod:
        if prod.connected.wait(WAIT):
            ready.set()
        go.wait()
        if done.is_set():
            return  # the run failed before its start
        prod.send_many(records)
        prod.flush(WAIT * 2)
        # Alive until the run's figures are read: its CPU time is read from /proc/PID/stat.
        done.wait(WAIT * 4)


def run(sinks: int, batch_size: int, records: int, keys: list[str] | None = None) -> dict[str, Any]:
    """One run: `sinks` sink processes, WORKERS workers spanning them, PRODUCERS producers;
    every record counted at a subscriber here. Returns the rate (0 if a record was lost or came
    twice) and each process's CPU seconds over the timed part."""
    keys = keys or even_keys()
    tmp = tempfile.mkdtemp(prefix="zfan-bench-sinks-")
    folders = [os.path.join(tmp, f"s{i}") for i in range(sinks)]
    spec = ",".join(f"ipc://{folder}" for folder in folders)
    share = -(-records // PRODUCERS)
    parts = [(k * share, min(share, records - k * share)) for k in range(PRODUCERS)]
    count = Count(sum(n for _, n in parts))
    go, done = mp.Event(), mp.Event()
    ready = [mp.Event() for _ in parts]
    producers = [
        mp.Process(target=_producer, args=(spec, batch_size, (start, n, k), keys, ready[k], go, done))
        for k, (start, n) in enumerate(parts)
    ]
    procs: list[Proc] = []
    try:
        for folder in folders:
            os.makedirs(folder)
            procs.append(_sink(folder))
        for pr in procs:
            pr.wait_ready(WAIT)
        workers = [_worker(spec, i) for i in range(WORKERS)]
        procs += workers
        for folder, pr in zip(folders, procs[:sinks], strict=True):
            status_until(
                f"ipc://{folder}/control",
                lambda info: len(info["workers"]) >= WORKERS,
                WAIT,
                f"{WORKERS} workers at {pr.name}",
                procs,
            )
        for prod in producers:
            prod.start()
        with Subscriber(sinks=spec, hwm=1_000_000) as sub:
            if not sub.wait_ready(WAIT):
                raise RuntimeError("the subscriber could not reach every sink")
            _welcomed(producers, ready)
            pids = {"sinks": [pr.popen.pid for pr in procs[:sinks]], "workers": [pr.popen.pid for pr in workers]}
            pids["producers"] = [prod.pid for prod in producers if prod.pid is not None]
            cpu0 = {k: [cpu_seconds(pid) for pid in v] for k, v in pids.items()}
            mine0 = time.process_time()
            start = time.perf_counter()
            go.set()
            while not count.done and (msg := sub.recv(timeout=WAIT)) is not None:
                count.add(msg.records)
            elapsed = time.perf_counter() - start
            cpu = {k: [cpu_seconds(pid) - c0 for pid, c0 in zip(v, cpu0[k], strict=True)] for k, v in pids.items()}
            mine = time.process_time() - mine0
            gaps = sub.gaps
    finally:
        done.set()
        go.set()  # a producer still waiting for the start now ends
        join_or_kill(producers, 10)
        reap(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    res = count.result(elapsed, gaps)
    if res["lost"] or res["duplicated"]:
        res["records_per_s"] = 0
    res.update(
        sinks=sinks,
        sink_cpu_s=[round(c, 2) for c in cpu["sinks"]],
        workers_cpu_s=round(sum(cpu["workers"]), 2),
        producers_cpu_s=round(sum(cpu["producers"]), 2),
        subscriber_cpu_s=round(mine, 2),
    )
    res["cores_busy"] = round((sum(map(sum, cpu.values())) + mine) / elapsed, 2)
    return res


def _welcomed(producers: list[Any], ready: list[Any]) -> None:
    """Wait until every producer has been welcomed by every sink; raise if one ends first."""
    deadline = time.monotonic() + WAIT
    for prod, ev in zip(producers, ready, strict=True):
        while not ev.wait(0.1):
            if prod.exitcode is not None:
                raise RuntimeError(f"producer {prod.name} ended (exit {prod.exitcode}) before its start")
            if time.monotonic() > deadline:
                raise RuntimeError("a producer was not welcomed by every sink")


def _sink(folder: str) -> Proc:
    return Proc(
        f"sink {os.path.basename(folder)}",
        "sink",
        "--intake",
        f"ipc://{folder}/intake",
        "--control",
        f"ipc://{folder}/control",
        "--results",
        f"ipc://{folder}/results",
        "--ledger",
        os.path.join(folder, "zfan.db"),
        "--workers",
        "0",
    )


def _worker(spec: str, i: int) -> Proc:
    return Proc(
        f"worker {i}",
        "worker",
        "--sinks",
        spec,
        "--app",
        "bench.app:double",
        "--name",
        f"w{i}",
        "--log-level",
        "warning",
    )


def measure(
    batch_size: int = 1000, records: int | None = None, runs: int = 3, counts: tuple[int, ...] = COUNTS
) -> dict[str, Any]:
    """Every count of sinks, `runs` interleaved rounds; the median of each figure, and each
    count's rate against the same round's 1 sink (the first count)."""
    n = records or RECORDS.get(batch_size, 300_000)
    keys = even_keys(counts=tuple(sorted({c for c in counts if c > 1})) or (1,))
    rounds: list[dict[int, dict[str, Any]]] = []
    for r in range(runs):
        rounds.append({c: run(c, batch_size, n, keys) for c in (counts if r % 2 == 0 else counts[::-1])})
    base = counts[0]
    out: dict[str, Any] = {"batch_size": batch_size, "records": n, "runs": runs, "by_sinks": {}}
    for c in counts:
        mine = [rd[c] for rd in rounds]
        lost, dup = sum(m["lost"] for m in mine), sum(m["duplicated"] for m in mine)
        rates = [m["records_per_s"] for m in mine]
        ratios = [rd[c]["records_per_s"] / rd[base]["records_per_s"] for rd in rounds if rd[base]["records_per_s"]]
        med = statistics.median
        out["by_sinks"][str(c)] = {
            "records_per_s": round(med(rates)) if not (lost or dup) else 0,
            "runs": rates,
            "ratio": round(med(ratios), 2) if ratios and not (lost or dup) else 0,
            "lost": lost,
            "duplicated": dup,
            "seconds": round(med(m["seconds"] for m in mine), 3),
            "sink_cpu_s": [round(med(m["sink_cpu_s"][i] for m in mine), 2) for i in range(c)],
            "sink_core_pct": [round(med(100 * m["sink_cpu_s"][i] / m["seconds"] for m in mine)) for i in range(c)],
            **{k: round(med(m[k] for m in mine), 2) for k in ("workers_cpu_s", "producers_cpu_s", "subscriber_cpu_s")},
            "cores_busy": round(med(m["cores_busy"] for m in mine), 2),
        }
    return out


def table(results: list[dict[str, Any]]) -> list[str]:
    """The figures of measure() for each batch size, as markdown table lines."""
    lines = [
        f"| sinks (batches of 1000 unless said; {PRODUCERS} producers, {WORKERS} workers) | records/s | vs 1 sink "
        "| each sink's CPU s (% of a core) | workers' CPU s | producers' CPU s | subscriber CPU s | cores busy "
        "| lost | duplicated |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        size = "" if res["batch_size"] == 1000 else f", batches of {res['batch_size']:,}"
        for c, e in res["by_sinks"].items():
            each = ", ".join(f"{s:.2f} ({p} %)" for s, p in zip(e["sink_cpu_s"], e["sink_core_pct"], strict=True))
            lines.append(
                f"| {c}{size} | {e['records_per_s']:,} | {e['ratio']:.2f} | {each} | {e['workers_cpu_s']:.2f} | "
                f"{e['producers_cpu_s']:.2f} | {e['subscriber_cpu_s']:.2f} | {e['cores_busy']:.2f} of "
                f"{os.cpu_count()} | {e['lost']} | {e['duplicated']} |"
            )
    return lines


def report(results: list[dict[str, Any]], command: str) -> list[str]:
    """A header line saying what ran where, then the table."""
    runs, sizes = results[0]["runs"], ", ".join(f"{r['records']:,} at batches of {r['batch_size']:,}" for r in results)
    head = (
        f"# {command} at {_commit()}, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; median of {runs} "
        f"interleaved round(s); records a run: {sizes}"
    )
    return [head, "", *table(results)]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds; each figure is their median")
    ap.add_argument("--sizes", default="1000", help="batch sizes, comma-separated")
    ap.add_argument("--records", type=int, default=None, help="records per run [default: by batch size]")
    ap.add_argument("--sinks", default=",".join(map(str, COUNTS)), help="sink counts, the first the baseline")
    ap.add_argument("--quick", action="store_true", help="one round of few records: a smoke test")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that every finally reaps
    runs = 1 if args.quick else args.runs
    counts = tuple(int(c) for c in args.sinks.split(","))
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        records = args.records or (QUICK_RECORDS.get(size, 20_000) if args.quick else None)
        print(f"batches of {size:,}, sinks {args.sinks}, {runs} round(s)...", flush=True)
        results.append(measure(size, records, runs, counts))
    command = f"python bench/sinks.py --runs {runs} --sizes {args.sizes} --sinks {args.sinks}"
    lines = report(results, command + (f" --records {args.records}" if args.records else ""))
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if any(not e["records_per_s"] for res in results for e in res["by_sinks"].values()):
        raise SystemExit("bench/sinks.py: records lost or duplicated")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process has been reaped and every folder removed on the way out
        sys.exit("bench/sinks.py: interrupted")
