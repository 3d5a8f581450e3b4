"""Every benchmark in one run: zfan beside the raw pyzmq limit and the designs a user would pick
instead, each with zfan's guarantees (bench/peers/: RabbitMQ, Redis Streams, NATS JetStream).

    python bench/run.py                    # the full run: about 15 minutes on 2 cores
    python bench/run.py --quick            # a smoke test: about 2 minutes with every peer installed
    python bench/run.py --update-readme    # and put the table and chart into README.md

What runs, all on this machine and in this one run, so that the ratios are fair:
1. Throughput with batches of 1000 records, median of 3: the limit (bench/throughput.py:
   raw pyzmq + msgpack, same hops, no guarantees), zfan through the embedded API with 1 and 2
   workers, zfan through the CLI processes once, and each peer design with 1 and 2 workers, on
   a private server it starts here and stops at the end. A peer whose server or Python client
   is not installed is skipped with a one-line reason.
2. The same for batches of 1, 10, 100 and 10 000 records (limit, zfan and the peers, 1 worker).
   With --quick: one run each, small counts, and the peers at batches of 1000 and 10 only.
3. Latency from send() to the subscriber at 10 %, 50 %, 80 % and 90 % of each contender's own
   rate from step 1 (bench/latency.py, and each peer's latency()); at 90 %, whether a backlog
   grows (the median latency of the run's last second against its first). Then one record every
   20 ms with linger 0, each sealed at once: the floor of latency.
4. Recovery after a worker's SIGKILL and SIGSTOP, and a sink restart on a ledger of 100 000
   batches (bench/recovery.py).
5. The sink's memory under a slow subscriber (bench/memory.py).
6. Throughput with 1, 2 and 4 key-partitioned sinks, the same 2 producers and 2 workers, and the
   CPU each sink used (bench/sinks.py), at batches of 1000.

Every contender's subscriber counts every record: one lost or duplicated gets no score. Each
target is reported as met or not met, with its figures. Writes bench/results/run.json, run.md
(the tables), throughput.png (the chart, with the `bench` extra: pip install '.[bench]') and,
but for --quick, sinks.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import latency, memory, recovery, sinks  # noqa: E402
from bench.peers import nats_jetstream, rabbitmq, redis_streams  # noqa: E402
from bench.throughput import make_batches, median_of, run_raw, run_zfan  # noqa: E402

SIZES = (1, 10, 100, 1000, 10_000)
QUICK_PEER_SIZES = (1000, 10)  # a smoke test runs the peers at these batch sizes only
# Records per run by batch size: enough for a steady rate, few enough for the slowest contender.
RECORDS = {1: 20_000, 10: 100_000, 100: 300_000, 1000: 500_000, 10_000: 500_000}
QUICK_RECORDS = {1: 1_000, 10: 5_000, 100: 20_000, 1000: 60_000, 10_000: 60_000}
PEERS: tuple[ModuleType, ...] = (rabbitmq, redis_streams, nats_jetstream)
TWO = {"rabbitmq": "rabbitmq 2 processors"}  # a peer's 2-worker key, when not "<key> 2 workers"
TARGETS = {
    "zfan_vs_limit": 0.9,  # at batches of 1000
    "zfan_vs_rabbitmq": 1.5,  # at 1000
    "zfan_vs_redis_streams": 1.2,  # at 1000 and at 10
    "zfan_vs_nats_jetstream": 1.2,  # at 1000
    "zfan_2_workers_vs_1": 1.0,  # more than this: 2 workers faster than 1
    "p99_ms_at_50": 10.0,  # zfan's latency at 50 % of its rate
    "p99_ms_at_80": 20.0,  # and at 80 %
    "backlog_ms_at_90": 20.0,  # at 90 %, the median of the last second at most this much above the first's
    "one_p50_ms": 2.0,  # one record every 20 ms with linger 0
    "one_p99_ms": 5.0,
    "replay_ms": 1000.0,
    "restart_ms": 2000.0,
}
RATIO_SIZES = {"redis streams": (1000, 10)}  # batch sizes a peer's target is checked at, if not 1000 only
OUT = os.path.join(ROOT, "bench", "results")
LOADS = (0.1, 0.5, 0.8, 0.9)  # shares of each contender's measured rate at which latency is measured
ONE_RATE = 50.0  # records/s for the latency of one record at a time, with linger 0
LABELS = {"limit": "the limit", "zfan": "zfan", **{p.KEY: p.LABEL for p in PEERS}}


def say(text: str) -> None:
    print(text, flush=True)


def two(key: str) -> str:
    return TWO.get(key, f"{key} 2 workers")


class Bench:
    def __init__(self, quick: bool, runs: int) -> None:
        self.quick, self.runs = quick, runs
        self.records = QUICK_RECORDS if quick else RECORDS
        self.peers: list[tuple[ModuleType, str]] = []  # (module, server url) of each peer that runs
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
            "skipped": {},
            "throughput": {},
            "sweep": {},
        }

    def start_peers(self, stack: contextlib.ExitStack) -> None:
        """A private server for each peer that can run here; a one-line reason for each that cannot."""
        for peer in PEERS:
            reason = peer.unavailable()
            if reason is None:
                t = time.monotonic()
                try:
                    server = stack.enter_context(peer.Server())
                except RuntimeError as exc:
                    reason = f"its server did not start: {exc}"
                else:
                    say(f"{peer.LABEL}: server up in {time.monotonic() - t:.1f} s")
                    self.peers.append((peer, server.url))
                    continue
            self.res["skipped"][peer.KEY] = reason
            say(f"{peer.LABEL}: skipped ({reason})")

    def measure(self, name: str, fn: Callable[[], dict[str, Any]], runs: int | None = None) -> dict[str, Any]:
        res = median_of([fn() for _ in range(runs or self.runs)])
        note = f"  LOST {res['lost']}, DUPLICATED {res['duplicated']}: no score" if not res["records_per_s"] else ""
        say(f"  {name:<34} {res['records_per_s']:>11,} records/s{note}")
        return res

    def contenders(self, size: int, *, headline: bool) -> dict[str, Any]:
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
        if self.quick and size not in QUICK_PEER_SIZES:
            return out
        for peer, url in self.peers:
            out[peer.KEY] = self.measure(f"{peer.LABEL}, 1 worker", lambda p=peer, u=url: p.run(batches, u, 1))
            if headline and not self.quick:
                out[two(peer.KEY)] = self.measure(
                    f"{peer.LABEL}, 2 workers", lambda p=peer, u=url: p.run(batches, u, 2)
                )
        return out

    def throughput(self) -> None:
        say(f"throughput, batches of 1000 ({self.records[1000]:,} records, median of {self.runs}):")
        self.res["throughput"] = self.contenders(1000, headline=True)
        for size in SIZES:
            if size != 1000:
                say(f"batches of {size} ({self.records[size]:,} records):")
                self.res["sweep"][str(size)] = self.contenders(size, headline=False)
        keys = ("limit", "zfan", *(p.KEY for p in PEERS))
        self.res["sweep"]["1000"] = {k: v for k, v in self.res["throughput"].items() if k in keys}

    def latency(self) -> None:
        seconds = 1.5 if self.quick else 10.0
        self.res["latency"] = {}
        runs: list[tuple[str, Callable[[float], dict[str, Any]]]] = [
            ("zfan", lambda rate: latency.measure(rate, seconds=seconds))
        ]
        runs += [(p.KEY, lambda rate, p=p, u=url: p.latency(rate, seconds, 1000, u)) for p, url in self.peers]
        for key, measure in runs:
            top = rate(self.res["throughput"].get(key))
            if not top:
                continue  # no rate of its own to take shares of
            out = self.res["latency"][key] = {}
            for share in LOADS:
                lat = out[f"{share:.0%}"] = measure(top * share)
                say(
                    f"latency, {LABELS[key]} at {lat['rate']:,} records/s ({share:.0%} of its rate): "
                    f"p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms "
                    f"(lost {lat['lost']}, duplicated {lat['duplicated']})"
                )

    def one_at_a_time(self) -> None:
        """One record every 20 ms, each batch sealed at once (linger 0): the floor of latency."""
        seconds = 1.5 if self.quick else 10.0
        runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("zfan", lambda: latency.measure(ONE_RATE, seconds=seconds, linger_ms=0))
        ]
        runs += [
            (p.KEY, lambda p=p, u=url: p.latency(ONE_RATE, seconds, 1000, u, linger_ms=0)) for p, url in self.peers
        ]
        out = self.res["one"] = {}
        for key, measure in runs:
            lat = out[key] = measure()
            say(
                f"latency, {LABELS[key]}, one record every {1000 / ONE_RATE:g} ms with linger 0: "
                f"p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms "
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

    def partitioned(self) -> None:
        n = self.records[1000]
        say(f"key-partitioned sinks, batches of 1000 ({n:,} records, median of {self.runs} interleaved rounds):")
        res = self.res["sinks"] = sinks.measure(1000, n, self.runs)
        for c, e in res["by_sinks"].items():
            note = f"  LOST {e['lost']}, DUPLICATED {e['duplicated']}: no score" if not e["records_per_s"] else ""
            cpu = ", ".join(f"{p} %" for p in e["sink_core_pct"])
            say(
                f"  {c} sink(s): {e['records_per_s']:>11,} records/s, {e['ratio']:.2f} of 1 sink; "
                f"each sink {cpu} of a core; {e['cores_busy']} cores busy{note}"
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


def verdicts(res: dict[str, Any]) -> list[str]:
    """One line per target: met or not met, with the figures it was judged on."""
    t, sweep, lines = res["throughput"], res["sweep"], []

    def line(what: str, met: bool | None, figures: str) -> None:
        lines.append(f"- {what}: {'not measured' if met is None else 'met' if met else '**not met**'} ({figures})")

    def versus(key: str, size: int, target: float) -> None:
        what = f"zfan / {LABELS[key]} ≥ {target:g} at batches of {size:,}"
        a, b = rate(sweep.get(str(size), {}).get("zfan")), rate(sweep.get(str(size), {}).get(key))
        if not (a and b):
            why = res["skipped"].get(key) or ("lost or duplicated records" if key in sweep.get(str(size), {}) else "")
            line(what, None, f"skipped: {why}" if why else "no figure")
        else:
            line(what, a / b >= target, f"{a / b:.2f}: {a:,} against {b:,} records/s")

    versus("limit", 1000, TARGETS["zfan_vs_limit"])
    for peer in PEERS:
        for size in RATIO_SIZES.get(peer.KEY, (1000,)):
            versus(peer.KEY, size, TARGETS[f"zfan_vs_{peer.KEY.replace(' ', '_')}"])
    one, both = rate(t.get("zfan")), rate(t.get("zfan 2 workers"))
    line(
        "zfan with 2 workers faster than with 1",
        both / one > TARGETS["zfan_2_workers_vs_1"] if one and both else None,
        f"{ratio(both, one)}: {both:,} against {one:,} records/s",
    )
    zlat = res.get("latency", {}).get("zfan", {})
    for share, key in (("50%", "p99_ms_at_50"), ("80%", "p99_ms_at_80")):
        p99 = zlat.get(share, {}).get("p99_ms")
        figures = f"{p99} ms at {zlat[share]['rate']:,} records/s" if p99 is not None else "no figure"
        line(
            f"zfan's p99 < {TARGETS[key]:g} ms at {share} of its rate",
            None if p99 is None else p99 < TARGETS[key],
            figures,
        )
    paced = zlat.get("90%")
    if paced:
        first, last = paced.get("p50_first_s_ms"), paced.get("p50_last_s_ms")
        line(
            f"zfan paced at 90 % of its rate without a growing backlog (median of the last second "
            f"< {TARGETS['backlog_ms_at_90']:g} ms above the first's)",
            None if first is None or last is None else last - first < TARGETS["backlog_ms_at_90"],
            f"{first} ms, then {last} ms at {paced['rate']:,} records/s",
        )
    one = res.get("one", {}).get("zfan")
    if one:
        p50, p99 = one.get("p50_ms"), one.get("p99_ms")
        line(
            f"zfan's p50 < {TARGETS['one_p50_ms']:g} ms and p99 < {TARGETS['one_p99_ms']:g} ms for one record "
            f"every {1000 / ONE_RATE:g} ms with linger 0",
            None if p50 is None or p99 is None else p50 < TARGETS["one_p50_ms"] and p99 < TARGETS["one_p99_ms"],
            f"p50 {p50} ms, p99 {p99} ms",
        )
    rec = res.get("recovery")
    if rec:
        for sig in ("SIGKILL", "SIGSTOP"):
            r = rec["replay"].get(f"{sig} quiet")
            if r:
                line(
                    f"replay after a worker's {sig} < {TARGETS['replay_ms']:g} ms",
                    r["max_ms"] < TARGETS["replay_ms"],
                    f"median {r['median_ms']:.0f} ms, max {r['max_ms']:.0f} ms",
                )
        full = rec["restart"]["full"]
        line(
            f"sink serving again after a restart < {TARGETS['restart_ms']:g} ms",
            full["serve_max_ms"] < TARGETS["restart_ms"],
            f"median {full['serve_median_ms']:.0f} ms, max {full['serve_max_ms']:.0f} ms",
        )
    return lines


def one_table(res: dict[str, Any]) -> list[str]:
    """The latency of one record at a time with linger 0, for each contender, as table lines."""
    if not res.get("one"):
        return []
    lines = [
        "",
        f"| latency of one record every {1000 / ONE_RATE:g} ms, linger 0 | p50 | p99 | max | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, lat in res["one"].items():
        lines.append(
            f"| {LABELS[key]} | {lat.get('p50_ms')} ms | **{lat.get('p99_ms')} ms** | {lat.get('max_ms')} ms | "
            f"{lat['lost']} | {lat['duplicated']} |"
        )
    return lines


def markdown(res: dict[str, Any]) -> str:
    m, t = res["machine"], res["throughput"]
    limit, zfan = rate(t.get("limit")), rate(t.get("zfan"))
    lines = [
        f"Measured {res['date']} on {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), Python {m['python']}"
        f"{', quick run' if res['quick'] else ''}; records/s are the median of {res['runs']} runs.",
        "",
        "| batches of 1000 records | records/s | vs the limit | zfan / it | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "limit": "the limit: raw pyzmq + msgpack, 1 worker",
        "limit 2 workers": "the limit, 2 workers",
        "zfan": "**zfan**, embedded API, 1 worker",
        "zfan 2 workers": "**zfan**, embedded API, 2 workers",
        "zfan cli": "**zfan**, CLI processes, 1 worker (one run)",
    }
    for peer in PEERS:
        names[peer.KEY] = f"{peer.LABEL}, 1 worker"
        names[two(peer.KEY)] = f"{peer.LABEL}, 2 workers"
    for key, label in names.items():
        if key in t:
            e, pair = t[key], "2 workers" in key or "2 processors" in key
            base = rate(t.get("limit 2 workers")) if pair else limit
            mine = rate(t.get("zfan 2 workers")) if pair else zfan
            versus = ratio(mine, e["records_per_s"]) if not key.startswith(("zfan", "limit")) else "–"
            lines.append(
                f"| {label} | {e['records_per_s']:,} | {ratio(e['records_per_s'], base)} | {versus} | "
                f"{e['lost']} | {e['duplicated']} |"
            )
    for key, why in res["skipped"].items():
        lines.append(f"| {LABELS[key]} | skipped: {why} | | | | |")
    keys = ["limit", "zfan", *(p.KEY for p in PEERS if p.KEY not in res["skipped"])]
    head = [LABELS[k].replace(" design", "") for k in keys]
    lines += [
        "",
        "| batch size | " + " | ".join(head) + " | " + " | ".join(f"zfan / {h}" for h in head[:1] + head[2:]) + " |",
        "|---:|" + "---:|" * (2 * len(keys) - 1),
    ]
    for size in SIZES:
        s = res["sweep"].get(str(size), {})
        rates = [rate(s.get(k)) for k in keys]
        cells = [f"{r:,}" if r else "–" for r in rates] + [ratio(rates[1], r) for r in rates[:1] + rates[2:]]
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| latency from send to the subscriber (batches of 1000, linger 5 ms) | load | records/s | p50 | p99 | max "
        "| lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, loads in res.get("latency", {}).items():
        for share, lat in loads.items():
            lines.append(
                f"| {LABELS[key]} | {share} | {lat['rate']:,} | {lat.get('p50_ms')} ms | **{lat.get('p99_ms')} ms** | "
                f"{lat.get('max_ms')} ms | {lat['lost']} | {lat['duplicated']} |"
            )
    lines += one_table(res)
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
    if res.get("sinks"):
        lines += ["", *sinks.table([res["sinks"]])]
    lines += ["", "Targets:", "", *verdicts(res)]
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
        ("redis streams", "Redis Streams design, equal guarantees", "C3-^"),
        ("nats jetstream", "NATS JetStream design, equal guarantees", "C2-D"),
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
    ax.legend(fontsize="small")
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
    with contextlib.ExitStack() as servers:  # every peer's server is stopped and removed on the way out
        bench.start_peers(servers)
        bench.throughput()
        bench.latency()
        bench.one_at_a_time()
    bench.recovery()
    bench.memory()
    bench.partitioned()
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    table = markdown(res)
    with open(os.path.join(args.out, "run.md"), "w") as f:
        f.write(table)
    if not args.quick:  # a smoke test's small counts do not replace the measured table
        with open(os.path.join(args.out, "sinks.txt"), "w") as f:
            f.write("\n".join(sinks.report([res["sinks"]], "python bench/run.py (its sinks step)")) + "\n")
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
    lost += [
        f"latency/{key}/{share}"
        for key, loads in res["latency"].items()
        for share, lat in loads.items()
        if lat.get("lost") or lat.get("duplicated")
    ]
    lost += [f"one/{key}" for key, lat in res.get("one", {}).items() if lat.get("lost") or lat.get("duplicated")]
    lost += [f"sinks/{c}" for c, e in res["sinks"]["by_sinks"].items() if not e["records_per_s"]]
    if lost:
        raise SystemExit(f"bench/run.py: records lost or duplicated in {', '.join(lost)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every server and process has been stopped on the way out
        sys.exit("bench/run.py: interrupted")
