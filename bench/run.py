"""Every benchmark in one run: zfan beside the raw pyzmq limit and the RabbitMQ design.

    python bench/run.py                    # the full run: about 10 minutes on 2 cores
    python bench/run.py --quick            # a smoke test: under a minute (RabbitMQ at one batch size only)
    python bench/run.py --update-readme    # and put the table and chart into README.md

What runs, all on this machine and in this one run, so that the ratios are fair:
1. Throughput with batches of 1000 records, median of 3: the limit (bench/throughput.py:
   raw pyzmq + msgpack, same hops, no guarantees), zfan through the embedded API with 1 and 2
   workers, zfan through the CLI processes once, and the RabbitMQ design (bench/rabbit.py)
   with 1 and 2 processors, skipped with a message where rabbitmq-server is not installed.
2. The same for batches of 1, 10, 100 and 10 000 records (limit, zfan and RabbitMQ, 1 worker).
3. Latency from send() to the subscriber at half of zfan's rate from step 1 (bench/latency.py).
4. Recovery after a worker's SIGKILL and SIGSTOP, and a sink restart on a ledger of 100 000
   batches (bench/recovery.py).
5. The sink's memory under a slow subscriber (bench/memory.py).

Every contender's subscriber counts every record: one lost or duplicated gets no score.
Writes bench/results/run.json, run.md (the tables) and throughput.png (the chart, with the
`bench` extra: pip install '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import latency, memory, rabbit, recovery  # noqa: E402
from bench.throughput import make_batches, median_of, run_raw, run_zfan  # noqa: E402

SIZES = (1, 10, 100, 1000, 10_000)
# Records per run by batch size: enough for a steady rate, few enough for the slowest contender.
RECORDS = {1: 20_000, 10: 100_000, 100: 300_000, 1000: 500_000, 10_000: 500_000}
QUICK_RECORDS = {1: 1_000, 10: 5_000, 100: 20_000, 1000: 60_000, 10_000: 60_000}
TARGETS = {"zfan_vs_limit": 0.6, "zfan_vs_rabbitmq": 2.0, "p99_ms": 10.0, "replay_ms": 1000.0, "restart_ms": 2000.0}
OUT = os.path.join(ROOT, "bench", "results")
LOADS = (0.25, 0.5)  # shares of zfan's measured rate at which latency is measured


def say(text: str) -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, quick: bool, runs: int) -> None:
        self.quick, self.runs = quick, runs
        self.records = QUICK_RECORDS if quick else RECORDS
        self.res: dict[str, Any] = {
            "machine": {
                "cores": os.cpu_count(),
                "cpu": _cpu(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "quick": quick,
            "runs": runs,
            "targets": TARGETS,
            "throughput": {},
            "sweep": {},
        }

    def measure(self, name: str, fn: Callable[[], dict[str, Any]], runs: int | None = None) -> dict[str, Any]:
        res = median_of([fn() for _ in range(runs or self.runs)])
        note = f"  LOST {res['lost']}, DUPLICATED {res['duplicated']}: no score" if not res["records_per_s"] else ""
        say(f"  {name:<34} {res['records_per_s']:>11,} records/s{note}")
        return res

    def contenders(self, size: int, broker: Any, *, headline: bool) -> dict[str, Any]:
        batches = make_batches(self.records[size], size)
        out = {
            "limit": self.measure("limit (raw pyzmq), 1 worker", lambda: run_raw(batches, 1)),
            "zfan": self.measure("zfan, 1 worker", lambda: run_zfan(batches, 1)),
        }
        if headline:
            out["limit 2 workers"] = self.measure("limit (raw pyzmq), 2 workers", lambda: run_raw(batches, 2))
            out["zfan 2 workers"] = self.measure("zfan, 2 workers", lambda: run_zfan(batches, 2))
            out["zfan cli"] = self.measure(
                "zfan CLI processes, 1 worker", lambda: run_zfan(batches, 1, cli=True), runs=1
            )
        if broker is not None and (headline or not self.quick):  # a smoke test: RabbitMQ once
            out["rabbitmq"] = self.measure("RabbitMQ design, 1 processor", lambda: rabbit.run(batches, broker.url, 1))
            if headline and not self.quick:
                out["rabbitmq 2 processors"] = self.measure(
                    "RabbitMQ design, 2 processors", lambda: rabbit.run(batches, broker.url, 2)
                )
        return out

    def throughput(self, broker: Any) -> None:
        say(f"throughput, batches of 1000 ({self.records[1000]:,} records, median of {self.runs}):")
        self.res["throughput"] = self.contenders(1000, broker, headline=True)
        for size in SIZES:
            if size != 1000:
                say(f"batches of {size} ({self.records[size]:,} records):")
                self.res["sweep"][str(size)] = self.contenders(size, broker, headline=False)
        self.res["sweep"]["1000"] = {
            k: v for k, v in self.res["throughput"].items() if k in ("limit", "zfan", "rabbitmq")
        }

    def latency(self) -> None:
        top = self.res["throughput"]["zfan"]["records_per_s"]
        self.res["latency"] = {}
        for share in LOADS:
            rate = top * share
            say(f"latency at {rate:,.0f} records/s ({share:.0%} of zfan's rate):")
            lat = self.res["latency"][f"{share:.0%}"] = latency.measure(rate, seconds=1.5 if self.quick else 10.0)
            say(
                f"  p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms "
                f"(lost {lat['lost']}, duplicated {lat['duplicated']})"
            )

    def recovery(self) -> None:
        say("recovery:")
        args = argparse.Namespace(
            quick=self.quick,
            runs=1 if self.quick else 5,
            restarts=1 if self.quick else 3,
            batches=10_000 if self.quick else 100_000,
        )
        try:
            self.res["recovery"] = recovery.run(args)
        finally:
            recovery.reap(recovery.Proc.started)

    def memory(self) -> None:
        seconds = 3.0 if self.quick else 30.0
        say(f"sink memory under a slow subscriber ({seconds:g} s):")
        mem = self.res["memory"] = memory.measure(seconds)
        say(
            f"  from {mem['start_mb']} MB to a peak of {mem['peak_mb']} MB; first half {mem['peak_first_half_mb']} "
            f"MB, second half {mem['peak_second_half_mb']} MB"
        )


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def rate(entry: dict[str, Any] | None) -> int:
    return entry["records_per_s"] if entry else 0


def ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def markdown(res: dict[str, Any]) -> str:
    m, t = res["machine"], res["throughput"]
    limit, zfan, rmq = rate(t.get("limit")), rate(t.get("zfan")), rate(t.get("rabbitmq"))
    lines = [
        f"Measured {res['date']} on {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), Python {m['python']}"
        f"{', quick run' if res['quick'] else ''}; records/s are the median of {res['runs']} runs.",
        "",
        "| batches of 1000 records | records/s | vs the limit | lost | duplicated |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "limit": "the limit: raw pyzmq + msgpack, 1 worker",
        "limit 2 workers": "the limit, 2 workers",
        "zfan": "**zfan**, embedded API, 1 worker",
        "zfan 2 workers": "**zfan**, embedded API, 2 workers",
        "zfan cli": "**zfan**, CLI processes, 1 worker (one run)",
        "rabbitmq": "RabbitMQ design, 1 processor",
        "rabbitmq 2 processors": "RabbitMQ design, 2 processors",
    }
    for key, label in names.items():
        if key in t:
            e = t[key]
            base = rate(t.get("limit 2 workers")) if "2" in key else limit
            lines.append(
                f"| {label} | {e['records_per_s']:,} | {ratio(e['records_per_s'], base)} | "
                f"{e['lost']} | {e['duplicated']} |"
            )
    if "rabbitmq" not in t:
        lines.append(f"| RabbitMQ design | skipped: {res.get('rabbitmq_skipped', '')} | | | |")
    lines += [
        "",
        f"zfan / limit = **{ratio(zfan, limit)}** (target ≥ {TARGETS['zfan_vs_limit']}); "
        f"zfan / RabbitMQ = **{ratio(zfan, rmq)}** (target ≥ {TARGETS['zfan_vs_rabbitmq']}).",
        "",
        "| batch size | limit | zfan | RabbitMQ | zfan / limit | zfan / RabbitMQ |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        s = res["sweep"].get(str(size), {})
        a, b, c = rate(s.get("limit")), rate(s.get("zfan")), rate(s.get("rabbitmq"))
        lines.append(f"| {size:,} | {a:,} | {b:,} | {f'{c:,}' if c else '–'} | {ratio(b, a)} | {ratio(b, c)} |")
    lines += [
        "",
        "| latency from `send()` to the subscriber | records/s | p50 | p99 | max | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for share, lat in res.get("latency", {}).items():
        lines.append(
            f"| at {share} of zfan's rate (batches of {lat.get('batch_size')}, linger "
            f"{lat.get('linger_ms')} ms) | {lat['rate']:,} | {lat.get('p50_ms')} ms | "
            f"**{lat.get('p99_ms')} ms** | {lat.get('max_ms')} ms | {lat['lost']} | {lat['duplicated']} |"
        )
    lines.append(f"\nTarget: p99 < {TARGETS['p99_ms']:g} ms at 50 % load.")
    rec = res.get("recovery")
    if rec:
        rp = rec["replay"]
        full = rec["restart"]["full"]
        lines += [
            "",
            "| recovery, at the defaults (heartbeat 250 ms × liveness 3) | median | max | target |",
            "|---|---:|---:|---:|",
        ]
        for key, label in (
            ("SIGKILL quiet", "replay after a worker's SIGKILL"),
            ("SIGSTOP quiet", "replay after a worker's SIGSTOP"),
        ):
            if key in rp:
                lines.append(
                    f"| {label} | {rp[key]['median_ms']:.0f} ms | {rp[key]['max_ms']:.0f} ms | "
                    f"< {TARGETS['replay_ms']:g} ms |"
                )
        lines.append(
            f"| sink restart on a ledger of {rec['restart']['ledger']['done']:,} done batches, serving "
            f"again | {full['serve_median_ms']:.0f} ms | {full['serve_max_ms']:.0f} ms | "
            f"< {TARGETS['restart_ms']:g} ms |"
        )
    mem = res.get("memory")
    if mem:
        lines += [
            "",
            f"Sink memory under a subscriber taking a fifth of the results, {mem['seconds']:g} s: from "
            f"{mem['start_mb']} MB to a peak of **{mem['peak_mb']} MB** (first half {mem['peak_first_half_mb']}"
            f" MB, second half {mem['peak_second_half_mb']} MB).",
        ]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: str) -> str | None:
    """A PNG of records/s against batch size; None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label, style in (
        ("limit", "limit: raw pyzmq, no guarantees", "k--"),
        ("zfan", "zfan", "C0-o"),
        ("rabbitmq", "RabbitMQ design, equal guarantees", "C1-s"),
    ):
        pts = [(size, rate(res["sweep"].get(str(size), {}).get(key))) for size in SIZES]
        pts = [(x, y) for x, y in pts if y]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="records per batch",
        ylabel="records/s, end to end",
        title=f"Fan-in, process, fan-out on {res['machine']['cores']} cores",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def update_readme(table: str) -> None:
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    chart_link = "![records/s against batch size](bench/results/throughput.png)"
    block = f"<!-- bench:start -->\n{table}\n{chart_link}\n<!-- bench:end -->"
    new, n = re.subn(r"<!-- bench:start -->.*?<!-- bench:end -->", lambda _: block, text, flags=re.S)
    if not n:
        raise SystemExit("README.md has no <!-- bench:start --> ... <!-- bench:end --> block to update")
    with open(path, "w") as f:
        f.write(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts and one run each: a smoke test")
    ap.add_argument("--runs", type=int, default=None, help="runs per throughput figure (default 3; 1 with --quick)")
    ap.add_argument("--out", default=OUT, help="folder for run.json, run.md and throughput.png")
    ap.add_argument("--update-readme", action="store_true", help="put the table and chart into README.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that every finally below reaps
    bench = Bench(args.quick, args.runs or (1 if args.quick else 3))
    res = bench.res
    res["date"] = time.strftime("%Y-%m-%d")
    t0 = time.monotonic()
    skipped = rabbit.unavailable()
    if skipped:
        res["rabbitmq_skipped"] = skipped
        say(f"RabbitMQ: skipped ({skipped})")
        bench.throughput(None)
    else:
        with rabbit.Broker() as broker:
            bench.throughput(broker)
    bench.latency()
    bench.recovery()
    bench.memory()
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    table = markdown(res)
    with open(os.path.join(args.out, "run.md"), "w") as f:
        f.write(table)
    why_not = chart(res, os.path.join(args.out, "throughput.png"))
    say("\n" + table)
    say(f"chart: {why_not}" if why_not else f"chart: {os.path.relpath(os.path.join(args.out, 'throughput.png'))}")
    say(f"({res['elapsed_s']} s; results in {os.path.relpath(args.out)})")
    if args.update_readme:
        update_readme(table)
    lost = [
        k
        for k, v in {
            **res["throughput"],
            **{f"{s}/{k}": v for s, d in res["sweep"].items() for k, v in d.items()},
        }.items()
        if not v["records_per_s"]
    ]
    if lost or any(lat.get("lost") or lat.get("duplicated") for lat in res["latency"].values()):
        raise SystemExit(f"bench/run.py: records lost or duplicated in {', '.join(lost) or 'the latency run'}")


if __name__ == "__main__":
    main()
