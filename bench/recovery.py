"""How fast zfan recovers, at its default settings (heartbeat 250 ms x liveness 3), in one run.

    python bench/recovery.py [--runs N] [--quick] [--batches N] [--json PATH]

1. Replay after a worker's death: a `zfan sink` and two `zfan worker` processes (app
   bench.slow:hold, which holds each batch 2 s, so the signal lands mid-batch), on ipc://
   endpoints and a ledger on disk in a temporary folder; a producer sends 3 batches to the first
   worker, a second one joins idle; the first gets SIGKILL, and the clock runs until a status
   answer (polled every 5 ms) shows one of its batches leased to the other worker. (A worker that
   dies holding several batches may have been killed by any of them, so the sink leases them
   again one at a time, each alone on an idle worker: the first one is the replay's latency.)
   A fresh sink and workers for every run.
2. The same with SIGSTOP (a hung worker: its connection stays open, only its silence tells);
   it gets SIGCONT and is reaped at the end of the run. The floor, measured beside them: SIGTERM
   to a worker with --drain-timeout 0, a clean exit that hands its batches back at once (a
   worker stopped with the default finishes them first), whose goodbye lets the sink replay.
   Every status query wakes the sink's loop, so polling can hide a wait in it; each signal is
   therefore also measured "quiet": nobody asks the sink anything after the signal (sent at a
   random phase of the heartbeat), and the survivor's app stamps on stderr when the first
   replayed batch reached it.
3. Sink restart on a ledger of 100 000 done batches (with their 100 000 results, all within the
   default retention) and 1000 open ones (half left leased by the previous sink, so recovery has
   work to do): time from starting `python -m zfan sink --ledger ...` to its "ready" line on
   stderr, and to a `query_status` answer (serving again), on a fresh copy of the ledger each
   time. The floor: the same start on an empty ledger, which is Python and zfan starting.

Every figure is a median (and max) over the runs; the goals are printed beside them. Results
also go to a JSON file (--json, default bench/results/recovery.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zfan import Producer, Timing, ZfanError, query_status  # noqa: E402
from zfan import protocol as p  # noqa: E402
from zfan.apps import readings  # noqa: E402
from zfan.ledger import SqliteLedger  # noqa: E402

HOLD = 2.0  # seconds bench.slow:hold keeps a batch: far longer than any replay measured here
BATCHES = 3  # sent per replay run, all leased to the worker that will be killed
POLL = 0.005  # seconds between status queries while waiting for a replay
GOAL_REPLAY_MS = 1000
GOAL_RESTART_MS = 2000
# (key, signal, quiet): polled runs ask the sink every 5 ms; quiet ones do not ask it anything.
REPLAYS = [
    ("SIGKILL", signal.SIGKILL, False),
    ("SIGKILL quiet", signal.SIGKILL, True),
    ("SIGSTOP", signal.SIGSTOP, False),
    ("SIGSTOP quiet", signal.SIGSTOP, True),
    ("SIGTERM", signal.SIGTERM, False),
]
LABELS = {"SIGKILL": "dies", "SIGSTOP": "hangs", "SIGTERM": "stops, handing its batches back"}


class BenchError(Exception):
    pass


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A `python -m zfan ...` subprocess; its stderr lines are kept with when each arrived
    (time.monotonic(), which is CLOCK_MONOTONIC, the clock bench.slow stamps with)."""

    started: list[Proc] = []  # every process this run started, for reap()

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        env = {**os.environ, "ZFAN_BENCH_HOLD": str(HOLD), "PYTHONPATH": ROOT}
        self.t0 = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "zfan", *args],
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        Proc.started.append(self)
        self.lines: list[tuple[float, str]] = []
        self.ready_at: float | None = None
        self._ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            now = time.monotonic()
            self.lines.append((now, line.rstrip()))
            if self.ready_at is None and ": ready " in line:
                self.ready_at = now
                self._ready.set()
        self._ready.set()  # the process ended: whoever waits for "ready" learns it now

    def wait_ready(self, timeout: float = 30.0) -> float:
        """time.monotonic() at which the "ready" line arrived."""
        self._ready.wait(timeout)
        if self.ready_at is None:
            raise BenchError(f"{self.name} did not print its ready line within {timeout:g} s; {self.tail()}")
        return self.ready_at

    def find(self, pattern: str) -> list[re.Match[str]]:
        return [m for _, line in list(self.lines) if (m := re.search(pattern, line))]

    def tail(self, n: int = 5) -> str:
        code = self.popen.poll()
        lines = " | ".join(line for _, line in self.lines[-n:]) or "(nothing on stderr)"
        return f"{'running' if code is None else f'exit {code}'}: {lines}"


def reap(procs: list[Proc], timeout: float = 5.0) -> None:
    """SIGCONT and SIGTERM each live process, wait, then SIGKILL what is left; reap them all."""
    alive = [pr for pr in procs if pr.popen.poll() is None]
    for pr in alive:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                pr.popen.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for pr in procs:
        try:
            pr.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pr.popen.kill()
            pr.popen.wait()
        pr.reader.join(1.0)  # the pipe's end reached, the stream can be closed under no one
        if pr.popen.stderr is not None and not pr.reader.is_alive():
            pr.popen.stderr.close()


def endpoints(folder: str, tag: str = "") -> dict[str, str]:
    return {k: f"ipc://{folder}/{tag}{k}" for k in ("intake", "control", "results")}


def start_sink(ends: dict[str, str], ledger: str) -> Proc:
    return Proc(
        "sink",
        "sink",
        "--ledger",
        ledger,
        "--intake",
        ends["intake"],
        "--control",
        ends["control"],
        "--results",
        ends["results"],
    )


def start_worker(control: str, name: str) -> Proc:
    # --drain-timeout 0: a SIGTERM hands what the worker holds back at once (the replay measured
    # here), instead of finishing it first, as a worker stopped on purpose does by default.
    return Proc(
        name,
        "worker",
        "--control",
        control,
        "--app",
        "bench.slow:hold",
        "--name",
        name,
        "--drain-timeout",
        "0",
        "--log-level",
        "warning",
    )


def status_until(control: str, condition: Any, timeout: float, what: str, procs: Any = ()) -> dict[str, Any]:
    """Ask the sink until its status satisfies `condition`; give up early if one of `procs` ended."""
    deadline = time.monotonic() + timeout
    while True:
        info = query_status(control, timeout=max(0.5, deadline - time.monotonic()))
        if condition(info):
            return info
        for pr in procs:
            if pr.popen.poll() is not None:
                raise BenchError(f"{what}: {pr.name} ended ({pr.tail()})")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s (status: {info})")
        time.sleep(0.02)


def in_flight(info: dict[str, Any]) -> dict[str, int]:
    return {w["name"]: w["in_flight"] for w in info["workers"]}


# --- 1 and 2: replay after a worker's death --------------------------------------------------


def produce(ends: dict[str, str], n: int) -> None:
    """n batches of one record each, every one acknowledged."""
    prod = Producer(intake=ends["intake"], control=ends["control"], topic="hold", batch_size=1, linger_ms=0)
    prod.start()
    try:
        for i in range(n):
            prod.send({"i": i})
        prod.flush(10)
    finally:
        prod.stop()
        prod.wait(5)


def holds(worker: Proc) -> list[float]:
    """CLOCK_MONOTONIC stamps at which the worker's app (bench.slow:hold) started a batch."""
    return [float(m.group(1)) for m in worker.find(r"bench\.slow: hold start ([0-9.]+)")]


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(0.002)
    return result


def replay_run(folder: str, sig: signal.Signals, quiet: bool) -> dict[str, Any]:
    """A fresh sink and a worker holding every batch, then an idle second worker; `sig` to the
    first (mid-batch); ms until one of its batches is leased to the other.

    Polled (as a person watching `zfan status` would see it): a status answer every 5 ms says when
    the survivor holds one of the victim's batches. Quiet: nobody asks the sink anything after the
    signal, and the survivor's app stamps when the first replayed batch reached it."""
    ends = endpoints(folder)
    sink = start_sink(ends, os.path.join(folder, "zfan.db"))
    workers = {"w1": start_worker(ends["control"], "w1")}
    try:
        sink.wait_ready()
        status_until(
            ends["control"],
            lambda i: len(i["workers"]) == len(workers),
            30,
            "workers joined",
            [sink, *workers.values()],
        )
        produce(ends, BATCHES)
        info = status_until(
            ends["control"], lambda i: sum(in_flight(i).values()) == BATCHES, 10, f"{BATCHES} batches leased"
        )
        workers["w2"] = start_worker(ends["control"], "w2")  # joins once the victim holds everything
        info = status_until(
            ends["control"], lambda i: len(i["workers"]) == 2, 30, "survivor joined", [sink, *workers.values()]
        )
        held = in_flight(info)
        victim, survivor = "w1", "w2"
        wait_until(lambda: holds(workers[victim]), 10, f"{victim} started a batch")  # so the signal lands mid-batch
        replays0 = info.get("replays", 0)
        if quiet:
            result = _quiet(workers[victim], workers[survivor], sig)
        else:
            result = _polled(ends["control"], workers[victim], survivor, sig, replays0)
        info = query_status(ends["control"])
        gone = [(t, line) for t, line in list(sink.lines) if f"worker {victim} gone (" in line]
        return {
            **result,
            "batches": held[victim],
            "replays": info.get("replays", 0) - replays0,
            "detected": gone[0][1].split(" gone (")[1].split(")")[0] if gone else None,
            # when the sink logged the worker gone (its stderr line reached us), from the signal
            "gone_logged_ms": round((gone[0][0] - result.pop("start")) * 1000, 1) if gone else None,
        }
    finally:
        reap([sink, *workers.values()])


def _polled(control: str, victim: Proc, survivor: str, sig: signal.Signals, replays0: int) -> dict[str, Any]:
    start = time.monotonic()
    victim.popen.send_signal(sig)
    polls, first_replay = 0, None
    while True:
        info = query_status(control, timeout=2)
        now = time.monotonic()
        polls += 1
        if first_replay is None and info.get("replays", 0) > replays0:
            first_replay = now
        if in_flight(info).get(survivor, 0) >= 1 and victim.name not in in_flight(info):
            break
        if now - start > 10:
            raise BenchError(f"{sig.name}: no batch of {victim.name} leased again within 10 s (status: {info})")
        time.sleep(max(0.0, start + polls * POLL - time.monotonic()))
    return {
        "ms": round((now - start) * 1000, 1),
        "polls": polls,
        "start": start,
        "replays_seen_ms": round((first_replay - start) * 1000, 1) if first_replay else None,
    }


def _quiet(victim: Proc, survivor: Proc, sig: signal.Signals) -> dict[str, Any]:
    # The survivor has just said hello, and its heartbeats (which wake the sink) follow from
    # it: signal at a random phase of the heartbeat, as a real death would come.
    phase = random.uniform(0, Timing().heartbeat)
    time.sleep(phase)
    start = time.monotonic()
    victim.popen.send_signal(sig)
    stamp = wait_until(lambda: holds(survivor), 10, f"{sig.name}: a replayed batch reaching {survivor.name}")[0]
    return {"ms": round((stamp - start) * 1000, 1), "start": start, "phase_ms": round(phase * 1000, 1)}


def replays(sig: signal.Signals, runs: int, quiet: bool) -> dict[str, Any]:
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="zfan-rec-") as folder:
            out.append(replay_run(folder, sig, quiet))
    ms = [r["ms"] for r in out]
    return {"signal": sig.name, "quiet": quiet, "median_ms": statistics.median(ms), "max_ms": max(ms), "runs": out}


# --- 3: sink restart on a big ledger ---------------------------------------------------------


def build_ledger(path: str, done: int, open_: int, topics: int = 16) -> dict[str, Any]:
    """`done` finished batches, one result each on `topics` topics, all published; then `open_`
    batches of 100 readings, every other one left leased as a sink that died would leave it."""
    t0 = time.monotonic()
    led = SqliteLedger(path)
    try:
        result = p.encode_records([{"sensor": "p-000", "count": 1000, "mean": 22.5, "min": 20.0, "max": 25.0}])
        seqs: dict[str, int] = {}
        last = 0
        for i in range(done):
            bid = led.insert_batch(f"producer-{i % 4}", i // 4 + 1, "readings", 1000, b"\x90")
            assert bid is not None
            led.lease([(bid, 1)])
            topic = f"sensor.{i % topics}"
            seqs[topic] = seqs.get(topic, 0) + 1
            last = led.store_results(bid, [(topic, seqs[topic], 1, result)])[-1].id
            if i % 20_000 == 19_999:
                led.commit()
        if last:
            led.mark_published(last)
        payload = p.encode_records(list(readings(100)))
        for j in range(open_):
            bid = led.insert_batch("producer-open", j + 1, "readings", 100, payload)
            assert bid is not None
            if j % 2:
                led.lease([(bid, 1)])
        led.commit()
    finally:
        led.close()
    return {
        "done": done,
        "open": open_,
        "left_leased": open_ // 2,
        "results": done,
        "bytes": os.path.getsize(path),
        "build_s": round(time.monotonic() - t0, 2),
    }


def restart_run(folder: str, template: str | None, tag: str) -> dict[str, Any]:
    """Start a sink on a copy of `template` (None: a new ledger); ms to "ready" and to an answer."""
    ledger = os.path.join(folder, f"{tag}.db")
    if template is not None:
        shutil.copyfile(template, ledger)
    ends = endpoints(folder, tag)
    sink = start_sink(ends, ledger)
    try:
        ready = sink.wait_ready(60)
        info = query_status(ends["control"], timeout=30)
        served = time.monotonic()
        recovered = sink.find(r"recovered (\d+) leased")
        return {
            "ready_ms": round((ready - sink.t0) * 1000, 1),
            "serve_ms": round((served - sink.t0) * 1000, 1),
            "recovered": int(recovered[0].group(1)) if recovered else 0,
            "counts": {k: info.get(k) for k in ("pending", "leased", "done", "dead")},
        }
    finally:
        reap([sink])


def restarts(folder: str, template: str | None, runs: int, tag: str, expect: dict[str, int]) -> dict[str, Any]:
    out = [restart_run(folder, template, f"{tag}{i}") for i in range(runs)]
    for r in out:
        if any(r["counts"].get(k) != v for k, v in expect.items()):
            raise BenchError(f"sink on {tag} ledger answered counts {r['counts']}, expected {expect}")
    return {
        "ready_median_ms": statistics.median(r["ready_ms"] for r in out),
        "serve_median_ms": statistics.median(r["serve_ms"] for r in out),
        "serve_max_ms": max(r["serve_ms"] for r in out),
        "runs": out,
    }


# --- report ----------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    def row(label: str, median: float, worst: float, goal: int | None) -> str:
        verdict = "" if goal is None else ("  ok" if median < goal else "  MISSED")
        goal_s = f"< {goal} ms" if goal else "(floor)"
        return f"  {label:<50} {median:>8.0f} ms {worst:>8.0f} ms   {goal_s:<10}{verdict}".rstrip()

    t = res["timing"]
    lines = [
        f"zfan recovery: heartbeat {t['heartbeat_ms']} ms x liveness {t['liveness']} "
        f"(expiry {t['expiry_ms']} ms), {res['machine']['cores']} cores, "
        f"{res['settings']['runs']} replay runs, {res['settings']['restarts']} restarts",
        f"  {'':<50} {'median':>11} {'max':>11}   goal",
    ]
    for key, sig, quiet in REPLAYS:
        r = res["replay"][key]
        label = f"replay after {sig.name} ({LABELS[sig.name]}), {'quiet' if quiet else 'polled'}"
        lines.append(row(label, r["median_ms"], r["max_ms"], None if sig == signal.SIGTERM else GOAL_REPLAY_MS))
    ledger = res["restart"]["ledger"]
    empty, big = res["restart"]["empty"], res["restart"]["full"]
    lines.append(row("sink start, empty ledger: serving", empty["serve_median_ms"], empty["serve_max_ms"], None))
    name = f"{ledger['done']:,} done + {ledger['open']:,} open"
    lines.append(f"  {'sink restart, ' + name + ': ready':<50} {big['ready_median_ms']:>8.0f} ms")
    lines.append(row(f"sink restart, {name}: serving", big["serve_median_ms"], big["serve_max_ms"], GOAL_RESTART_MS))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t = Timing()
    res: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "timing": {
            "heartbeat_ms": round(t.heartbeat * 1000),
            "liveness": t.liveness,
            "expiry_ms": round(t.expiry * 1000),
        },
        "settings": {
            "runs": args.runs,
            "restarts": args.restarts,
            "quick": args.quick,
            "hold_s": HOLD,
            "batches_per_replay_run": BATCHES,
            "poll_ms": POLL * 1000,
        },
        "goals": {"replay_ms": GOAL_REPLAY_MS, "restart_ms": GOAL_RESTART_MS},
        "replay": {},
    }
    for key, sig, quiet in REPLAYS:
        r = replays(sig, args.runs, quiet)
        res["replay"][key] = r
        runs = ", ".join(str(round(x["ms"])) for x in r["runs"])
        detected = ", ".join(sorted({str(x["detected"]) for x in r["runs"]}))
        print(f"  {key}: {runs} ms (sink saw the worker: {detected})", flush=True)
    with tempfile.TemporaryDirectory(prefix="zfan-rec-") as folder:
        template = os.path.join(folder, "template.db")
        n_open = max(1, args.batches // 100)
        res["restart"] = {"ledger": build_ledger(template, args.batches, n_open)}
        print(
            f"  ledger: {args.batches:,} done + {n_open:,} open batches, "
            f"{res['restart']['ledger']['bytes'] / 1e6:.0f} MB, built in {res['restart']['ledger']['build_s']} s",
            flush=True,
        )
        res["restart"]["empty"] = restarts(folder, None, args.restarts, "empty", {"done": 0, "pending": 0})
        res["restart"]["full"] = restarts(
            folder, template, args.restarts, "full", {"done": args.batches, "pending": n_open, "leased": 0}
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=None, help="replay runs per signal (default 5; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="2 runs, 2 restarts, a ledger of 10 000 batches")
    ap.add_argument(
        "--batches",
        type=int,
        default=None,
        help="done batches in the restart ledger (default 100000; 10000 with --quick)",
    )
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "recovery.json"))
    args = ap.parse_args()
    args.runs = args.runs or (2 if args.quick else 5)
    args.restarts = 2 if args.quick else 3
    args.batches = args.batches if args.batches is not None else (10_000 if args.quick else 100_000)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below reaps
    t0 = time.monotonic()
    try:
        res = run(args)
    except (BenchError, ZfanError) as exc:
        raise SystemExit(f"bench/recovery.py: {exc}") from None
    finally:
        reap(Proc.started)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(table(res))
    print(f"  ({res['elapsed_s']} s; results in {os.path.relpath(args.json)})")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
