"""What the peer designs share: a private server, and a run's parties each in its own process.

A run: the consumer, the worker(s) and the producer start (spawned: they share nothing with the
caller's state), each connects and says it is ready; the clock starts when all have (`go`), and
stops when the consumer has seen every record id. The consumer reports a `Count.result` (with
latencies when the records are stamped). A run past its deadline is stopped: the consumer reports
what it has, and the rest counts as lost. Every process is reaped, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.latency import Stamps, result  # noqa: E402
from bench.throughput import Count, make_batches  # noqa: E402

START_TIMEOUT = 60.0  # seconds for a server, or every party of a run, to come up
STOP_TIMEOUT = 30.0  # seconds for a server to stop on SIGTERM before it is killed
DEADLINE = 120.0  # seconds for a throughput run; past it the run stops and reports what was lost
LATE = 30.0  # seconds past the deadline for the consumer's report before the run is called broken


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]  # held open together, so the ports differ
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find(binary: str) -> str | None:
    """A server binary on PATH or in the sbin folders Debian puts servers in."""
    return shutil.which(binary, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))


# --- the server ----------------------------------------------------------------------------


class Server:
    """A private server for one benchmark: free loopback port(s) and a temporary folder for its
    data and output, which is removed on exit. The server runs in its own session (a Ctrl-C in
    the terminal reaches us, and we stop it in order) and is stopped on exit whatever happened,
    Ctrl-C and errors included: SIGTERM, then SIGKILL to its whole group if it lingers."""

    name = "server"

    def __init__(self, start_timeout: float = START_TIMEOUT) -> None:
        self.start_timeout = start_timeout
        self.url = ""
        self.dir = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # what a server says about itself
    def unavailable(self) -> str | None:
        """Why it cannot run here, in one line, or None."""
        raise NotImplementedError

    def prepare(self) -> list[str]:
        """Ports, url and files in self.dir; the command that starts the server."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    def probe(self) -> None:
        """Returns once the server serves clients; raises while it does not yet."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Whatever else the server left running, once it has stopped."""

    # the lifecycle
    def __enter__(self) -> Server:
        reason = self.unavailable()
        if reason:
            raise RuntimeError(reason)
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"zfanbench-{self.name}-")
        command = self.prepare()
        with open(os.path.join(self.dir, "server.out"), "wb") as out:
            self._proc = subprocess.Popen(
                command,
                env=self.environment(),
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}: {self.tail()}")
            try:
                self.probe()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not serve within {self.start_timeout:.0f} s: {self.tail()}"
                    ) from None
                time.sleep(0.05)  # polling, within the deadline

    def tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "server.out"), "rb") as f:
            return f.read()[-600:].decode(errors="replace").strip()
        return ""

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the server and whatever it started
                proc.wait()
            self.cleanup()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


# --- the parties ---------------------------------------------------------------------------


@dataclass
class Control:
    """A party's view of its run: `ready` is its own; the rest is shared by every party."""

    stop: Any  # set: leave now (the run is over, or past its deadline)
    go: Any  # set: the clock has started
    ready: Any
    out: Any  # the consumer's report goes here
    t0: Any  # when the clock started (time.monotonic(), one clock for every process)

    def wait_go(self) -> bool:
        """Block until the clock starts (True) or the run is stopped first (False)."""
        while not self.go.wait(0.05):
            if self.stop.is_set():
                return False
        return True


@dataclass
class Paced:
    """A producer's job for latency: `n` stamped records at `rate`, sealed as zfan's producer
    seals them (latency.Pacer and latency.Sealer)."""

    rate: float
    n: int
    batch_size: int
    linger: float


class Tally:
    """The consumer's count of every record id, and with `stamps` each record's latency; its
    report goes to the run once (when every record is in, or when the run is stopped)."""

    def __init__(self, ctl: Control, n: int, stamps: bool) -> None:
        self.ctl = ctl
        self.count = Count(n)
        self.stamps = Stamps() if stamps else None
        self.reported = False

    def add(self, records: list[dict]) -> None:
        now = time.monotonic()
        self.count.add(records)
        if self.stamps is not None:
            self.stamps.add(records, now, self.ctl.t0.value)

    @property
    def done(self) -> bool:
        return self.count.done

    def report(self) -> None:
        if not self.reported:
            self.reported = True
            res = self.count.result(time.monotonic() - self.ctl.t0.value)
            if self.stamps is not None:
                res["stamps"] = self.stamps.summary()
            self.ctl.out.put(res)


def _serve(target: Callable[..., None], ctl: Control, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops us, in order
    target(ctl, *args)


Party = tuple[Callable[..., None], tuple[Any, ...]]  # target(ctl, *args), run in its own process


def reap(procs: list[Any]) -> None:
    for p in procs:
        if p.pid is not None:
            p.join(10)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def run_parties(consumer: Party, workers: list[Party], producer: Party, deadline: float) -> dict[str, Any]:
    """Start every party, start the clock once all are ready, return the consumer's report."""
    ctx = mp.get_context("spawn")
    stop, go, out, t0 = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("d", 0.0, lock=False)
    parties = [consumer, *workers, producer]
    names = ["the consumer", *(f"worker {i + 1}" for i in range(len(workers))), "the producer"]
    ctls = [Control(stop, go, ctx.Event(), out, t0) for _ in parties]
    procs = [ctx.Process(target=_serve, args=(fn, ctl, *args)) for (fn, args), ctl in zip(parties, ctls, strict=True)]
    try:
        for p in procs:
            p.start()
        until = time.monotonic() + START_TIMEOUT
        for ctl, name, p in zip(ctls, names, procs, strict=True):
            while not ctl.ready.wait(0.05):
                if not p.is_alive():
                    raise RuntimeError(f"{name} exited with {p.exitcode} before it was ready")
                if time.monotonic() > until:
                    raise RuntimeError(f"{name} was not ready within {START_TIMEOUT:.0f} s")
        start = t0.value = time.monotonic()
        go.set()
        while True:
            try:
                report: dict[str, Any] = out.get(timeout=0.1)
                return report
            except queue.Empty:
                late = time.monotonic() - start - deadline
                if not procs[0].is_alive():
                    raise RuntimeError(f"the consumer exited with {procs[0].exitcode}") from None
                if late > LATE:
                    raise RuntimeError("the consumer did not report after the deadline") from None
                if late > 0:
                    stop.set()  # the consumer reports what it has, then stops
    finally:
        stop.set()
        reap(procs)


def throughput(report: dict[str, Any]) -> dict[str, Any]:
    """A throughput run's figure: the consumer's Count.result."""
    return {k: v for k, v in report.items() if k != "stamps"}


def latency(report: dict[str, Any], job: Paced, seconds: float) -> dict[str, Any]:
    """A latency run's figure, shaped as bench/latency.py's."""
    return result(job.rate, seconds, job.batch_size, job.linger * 1000, report, report["stamps"])


def paced(rate: float, seconds: float, batch_size: int, linger: float) -> Paced:
    return Paced(rate, int(rate * seconds), batch_size, linger)


@contextlib.contextmanager
def serving(server: type[Server], url: str | None) -> Any:
    """The url given, or a private server's for the duration."""
    if url:
        yield url
    else:
        with server() as s:
            yield s.url


# --- the command line ----------------------------------------------------------------------


def main(
    doc: str | None, label: str, unavailable: Callable[[], str | None], server: type[Server], run: Any, lat: Any
) -> None:
    """A peer module run as a script: its throughput (median of --runs) or its latency."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--latency", type=float, metavar="RATE", help="measure latency at RATE records/s instead")
    ap.add_argument("--seconds", type=float, default=5.0, help="of a latency run")
    ap.add_argument("--json", action="store_true", help="print one JSON dict instead of lines")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the server is stopped too
    try:
        _main(args, label, unavailable, server, run, lat)
    except KeyboardInterrupt:  # the server and every party have been stopped on the way out
        print(f"{label}: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(
    args: Any, label: str, unavailable: Callable[[], str | None], server: type[Server], run: Any, lat: Any
) -> None:
    reason = unavailable()
    if reason:
        raise SystemExit(f"{label}: skipped ({reason})")
    t = time.monotonic()
    with server() as s:
        up = time.monotonic() - t
        if args.latency:
            res = lat(args.latency, args.seconds, args.batch_size, s.url)
            print(json.dumps(res) if args.json else f"{label}, latency: {res}")
            return
        batches = make_batches(args.records, args.batch_size)
        if not args.json:
            print(
                f"{label}: {args.records:,} records in batches of {args.batch_size}, {args.workers} "
                f"worker(s), server up in {up:.1f} s"
            )
        runs = []
        for i in range(args.runs):
            r = run(batches, s.url, args.workers)
            runs.append(r)
            if not args.json:
                print(
                    f"  run {i + 1}: {r['records_per_s']:>12,} records/s  ({r['seconds']:.2f} s, "
                    f"lost {r['lost']}, duplicated {r['duplicated']})"
                )
    median = round(statistics.median(r["records_per_s"] for r in runs))
    if args.json:
        keep = ("records", "batch_size", "workers")
        print(json.dumps({**{k: getattr(args, k) for k in keep}, "runs": runs, "median_records_per_s": median}))
    else:
        print(f"  median: {median:>11,} records/s")
