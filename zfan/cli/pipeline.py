"""`zfan up`: a whole local pipeline in one command, counted end to end.

A sink (its ledger in a temporary folder) with local workers runs as a child process, or
with `sinks` > 1, that many key-partitioned sinks and worker processes that span them;
producers stream synthetic sensor readings from threads of this process (with partitions,
each sensor's to the sink that owns it); a subscriber takes every roll-up. At the end the
records each sensor sent are compared with the counts the roll-ups report for it: records lost
and duplicated are counted, not assumed.

Asked to stop (`stopping`), the producers stop, what they sent is left to drain through the
pipeline, and the report says it was interrupted. The children end with this process, even
one killed outright, and the sinks remove the temporary folder as they end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import IO, Protocol

import zmq

from ..apps import readings
from ..config import ProducerSettings, SubscriberSettings
from ..config_file import child_environment
from ..errors import LedgerError, ZfanError
from ..nodes.local import stop_processes
from ..nodes.producer import Producer
from ..nodes.status import query_status
from ..nodes.subscriber import Subscriber
from ..nodes.transport import Ctx


class Flag(Protocol):
    """What asks the run to stop: a threading.Event, or the CLI's signal flag."""

    def is_set(self) -> bool: ...


CHUNK = 500  # readings each producer thread hands to send_many() at once


@dataclass
class Progress:
    elapsed: float
    sent: int  # records handed to producers
    acked: int  # records the sink has committed
    delivered: int  # records accounted for by roll-ups received


@dataclass
class Report:
    producers: int
    workers: int
    sent: int
    acked: int
    delivered: int
    results: int  # published roll-ups received
    topics: int
    lost: int
    duplicated: int
    elapsed: float
    interrupted: bool = False  # asked to stop before the run was over
    sinks: int = 1

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed if self.elapsed else 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.delivered == self.sent


class _Tally:
    """What the subscriber saw, per sensor, with repeats of a (batch, topic) counted apart."""

    def __init__(self) -> None:
        self.lock = threading.Condition()  # notified at every result
        self.per_sensor: Counter[str] = Counter()
        self.seen: set[tuple[int | None, int, str]] = set()
        self.results = 0
        self.duplicated = 0
        self.last = 0.0

    @property
    def delivered(self) -> int:
        return sum(self.per_sensor.values())


@dataclass(frozen=True)
class Layout:
    """Where a local pipeline's sinks listen: one sink's endpoints, or (`sinks` > 1) a folder
    per partition, named to every client as --sinks names them."""

    folder: str
    sinks: int

    def part(self, i: int) -> str:
        return os.path.join(self.folder, f"p{i}") if self.sinks > 1 else self.folder

    def ends(self, i: int) -> dict[str, str]:
        return {name: f"ipc://{self.part(i)}/{name}" for name in ("intake", "control", "results")}

    @property
    def spec(self) -> str:
        return ",".join(f"ipc://{self.part(i)}" for i in range(self.sinks))

    def producer(self, producer_id: str, batch_size: int) -> ProducerSettings:
        """A producer's settings: to one sink, or each sensor's readings to the sink owning it."""
        if self.sinks > 1:
            return ProducerSettings(
                sinks=self.spec, key="sensor", producer_id=producer_id, topic="readings", batch_size=batch_size
            )
        ends = self.ends(0)
        return ProducerSettings(
            intake=ends["intake"],
            control=ends["control"],
            producer_id=producer_id,
            topic="readings",
            batch_size=batch_size,
        )

    def subscriber(self) -> SubscriberSettings:
        """A subscriber's settings: one sink's results, or every partition's."""
        if self.sinks > 1:
            return SubscriberSettings(sinks=self.spec, topics=("sensor.",))
        ends = self.ends(0)
        return SubscriberSettings(results=ends["results"], control=ends["control"], topics=("sensor.",))


def run(
    *,
    seconds: float | None = 5.0,
    records: int | None = None,
    producers: int = 4,
    workers: int = 2,
    sinks: int = 1,
    sensors: int = 8,
    batch_size: int = 1000,
    settle: float = 30.0,
    progress: Callable[[Progress], None] | None = None,
    stopping: Flag | None = None,
    http: str | None = None,
) -> Report:
    if seconds is None and records is None:
        raise ZfanError("zfan up needs --seconds or --records to know when to stop")
    stopping = stopping or threading.Event()
    layout = Layout(tempfile.mkdtemp(prefix="zfan-up-"), sinks)
    ctx = zmq.Context()
    procs: list[subprocess.Popen[bytes]] = []
    # The roles' stderr, unnamed: nothing of it is left behind, however this process ends.
    with tempfile.TemporaryFile("w+") as log:
        try:
            _start(procs, layout, workers=workers, http=http, log=log)
            if not _wait_for_workers(procs, layout, workers, log, ctx, stopping):
                return _nothing_run(producers, workers, sinks)
            try:
                report = _stream(
                    layout,
                    ctx,
                    seconds=seconds,
                    records=records,
                    producers=producers,
                    sensors=sensors,
                    batch_size=batch_size,
                    workers=workers,
                    settle=settle,
                    progress=progress,
                    alive=lambda: all(proc.poll() is None for proc in procs),
                    stopping=stopping,
                )
            except ZfanError as exc:
                raise _stopped(procs, log, layout.sinks) or exc from None
            if (stopped := _stopped(procs, log, layout.sinks)) is not None:
                raise stopped
            return report
        finally:
            # Workers first, so that none is left dialling a sink that has gone.
            stop_processes(procs[sinks:], timeout=SINK_DRAIN + 10)
            stop_processes(procs[:sinks], timeout=SINK_DRAIN + 10)
            ctx.term()
            shutil.rmtree(layout.folder, ignore_errors=True)


def _start(
    procs: list[subprocess.Popen[bytes]], layout: Layout, *, workers: int, http: str | None, log: IO[str]
) -> None:
    """Start the sinks (the first with the dashboard), then, for several sinks, the workers
    that span them (one sink runs its workers itself), each added to `procs` as it starts.
    Each ends when this process does, and each sink then removes its folder (the first, the
    whole run's): a `zfan up` killed outright leaves neither a process nor a folder."""
    spanning = layout.sinks > 1
    for i in range(layout.sinks):
        os.makedirs(layout.part(i), exist_ok=True)
        procs.append(
            _child(
                "sink",
                "--workers",
                "0" if spanning else str(workers),
                "--app",
                "zfan.apps:rollup",
                "--ledger",
                os.path.join(layout.part(i), "zfan.db"),
                *(f"--{k}={v}" for k, v in layout.ends(i).items()),
                "--drain-timeout",
                str(SINK_DRAIN),
                *(["--http", http] if http and i == 0 else []),
                "--remove-folder",
                layout.folder if i == 0 else layout.part(i),
                log=log,
            )
        )
    for _ in range(workers if spanning else 0):
        procs.append(_child("worker", "--sinks", layout.spec, "--app", "zfan.apps:rollup", log=log))


def _child(role: str, *args: str, log: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "zfan", role, "--log-level", "warning", *args, "--parent", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=child_environment(),
        # Ctrl-C at the terminal is for this process, which stops the children in order.
        start_new_session=True,
    )


SINK_DRAIN = 5.0  # seconds the sink waits, as it stops, for its workers to finish their batches


def _nothing_run(producers: int, workers: int, sinks: int) -> Report:
    return Report(producers, workers, 0, 0, 0, 0, 0, 0, 0, 0.0, interrupted=True, sinks=sinks)


def _wait_for_workers(
    procs: list[subprocess.Popen[bytes]],
    layout: Layout,
    workers: int,
    log: IO[str],
    ctx: Ctx,
    stopping: Flag,
    timeout: float = 30.0,
) -> bool:
    """True once every sink is up with every worker; False if asked to stop first."""
    deadline = time.monotonic() + timeout
    waiting = list(range(layout.sinks))
    while time.monotonic() < deadline:
        if (stopped := _stopped(procs, log, layout.sinks)) is not None:
            raise stopped
        if stopping.is_set():
            return False
        try:
            while waiting and _workers_at(layout.ends(waiting[0])["control"], ctx) >= workers:
                waiting.pop(0)
        except ZfanError:
            pass
        if not waiting:
            return True
    raise ZfanError(f"the sinks and their {workers} workers did not come up within {timeout:g} s")


def _stopped(procs: list[subprocess.Popen[bytes]], log: IO[str], sinks: int) -> ZfanError | None:
    """Why a sink or a worker stopped, if one has: a ledger's error (a full disk) as a
    LedgerError, so that `zfan up` exits as `zfan sink` did."""
    ended = [(i, code) for i, proc in enumerate(procs) if (code := proc.poll()) is not None]
    if not ended:
        return None
    i, code = ended[0]
    log.seek(0)
    said = log.read().strip()
    if code == 5:  # the sink's exit code for a ledger it cannot use
        return LedgerError(said.rsplit(": error: ", 1)[-1])
    return ZfanError(f"the {'sink' if i < sinks else 'worker'} exited early: {said}")


def _workers_at(control: str, ctx: Ctx) -> int:
    return len(query_status(control, timeout=0.5, context=ctx)["workers"])


class _Fleet:
    """Producer threads streaming sensor readings, each counting what it sent per sensor."""

    def __init__(
        self,
        layout: Layout,
        ctx: Ctx,
        *,
        producers: int,
        sensors: int,
        batch_size: int,
        records: int | None,
        settle: float,
    ) -> None:
        self.prods = [Producer(layout.producer(f"node{i}", batch_size), context=ctx).start() for i in range(producers)]
        self.sent: list[Counter[str]] = [Counter() for _ in self.prods]
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._quota = (
            None if records is None else [records // producers + (i < records % producers) for i in range(producers)]
        )
        self._sensors = sensors
        self._settle = settle
        self._threads = [threading.Thread(target=self._produce, args=(i,), daemon=True) for i in range(producers)]
        for t in self._threads:
            t.start()

    def _produce(self, i: int) -> None:
        try:
            quota = None if self._quota is None else self._quota[i]
            source = readings(quota, sensors=self._sensors, source=f"node{i}", seed=i)
            while not self.stopping.is_set() and (chunk := list(islice(source, CHUNK))):
                self.prods[i].send_many(chunk)
                self.sent[i].update(r["sensor"] for r in chunk)
            self.prods[i].flush(timeout=self._settle)
        except BaseException as exc:
            self.errors.append(exc)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout / len(self._threads))

    @property
    def records_sent(self) -> int:
        return sum(p.sent_records for p in self.prods)

    @property
    def records_acked(self) -> int:
        return sum(p.acked_records for p in self.prods)

    def per_sensor(self) -> Counter[str]:
        return sum(self.sent, Counter())

    def close(self, timeout: float = 1.0) -> None:
        for prod in self.prods:
            try:
                prod.close(timeout=timeout)
            except ZfanError as exc:
                self.errors.append(exc)


def _stream(
    layout: Layout,
    ctx: Ctx,
    *,
    seconds: float | None,
    records: int | None,
    producers: int,
    sensors: int,
    batch_size: int,
    workers: int,
    settle: float,
    progress: Callable[[Progress], None] | None,
    alive: Callable[[], bool],
    stopping: Flag,
) -> Report:
    tally = _Tally()
    stop_sub = threading.Event()
    sub = Subscriber(layout.subscriber(), context=ctx)
    deadline = time.monotonic() + 10
    while not sub.wait_ready(0.2):
        if stopping.is_set() or time.monotonic() > deadline:
            sub.close()
            if stopping.is_set():
                return _nothing_run(producers, workers, layout.sinks)
            raise ZfanError("the subscriber could not reach the sink's results")
    sub_thread = threading.Thread(target=_subscribe, args=(sub, tally, stop_sub), daemon=True)
    sub_thread.start()

    start = time.monotonic()
    fleet = _Fleet(
        layout, ctx, producers=producers, sensors=sensors, batch_size=batch_size, records=records, settle=settle
    )

    def report_progress() -> None:
        if progress is not None:
            progress(Progress(time.monotonic() - start, fleet.records_sent, fleet.records_acked, tally.delivered))

    try:
        while fleet.alive() and alive():
            if stopping.is_set() or (seconds is not None and time.monotonic() - start >= seconds):
                fleet.stopping.set()
            report_progress()
            fleet.join(0.2)
        # What was sent drains through the pipeline, interrupted or not: the count is of it all.
        expected = fleet.per_sensor()
        total = sum(expected.values())
        deadline = time.monotonic() + settle
        while tally.delivered < total and time.monotonic() < deadline and alive():
            report_progress()
            with tally.lock:
                tally.lock.wait_for(lambda: tally.delivered >= total, timeout=0.2)
        report_progress()
    finally:
        # Every thread done with its sockets before the caller ends the context.
        stop_sub.set()
        sub_thread.join(5)
        fleet.stopping.set()
        fleet.close(timeout=1.0 if alive() else 0.0)  # no sink, no ack to wait for
        fleet.join(5.0)
    if fleet.errors:
        err = fleet.errors[0]
        raise err if isinstance(err, ZfanError) else ZfanError(f"a producer failed: {err!r}")
    lost = sum(max(0, n - tally.per_sensor[s]) for s, n in expected.items())
    extra = sum(max(0, tally.per_sensor[s] - expected[s]) for s in tally.per_sensor)
    return Report(
        producers=producers,
        workers=workers,
        sent=total,
        acked=fleet.records_acked,
        delivered=tally.delivered,
        results=tally.results,
        topics=len(tally.per_sensor),
        lost=lost,
        duplicated=tally.duplicated + extra,
        elapsed=max(tally.last - start, 1e-9),
        interrupted=stopping.is_set(),
        sinks=layout.sinks,
    )


def _subscribe(sub: Subscriber, tally: _Tally, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            msg = sub.recv(timeout=0.1)
            if msg is None:
                continue
            key = (msg.partition, msg.batch_id, msg.topic)  # batch ids are each sink's own
            with tally.lock:
                tally.results += 1
                tally.last = time.monotonic()
                if key in tally.seen:
                    tally.duplicated += sum(r["count"] for r in msg.records)
                    continue
                tally.seen.add(key)
                for r in msg.records:
                    tally.per_sensor[r["sensor"]] += r["count"]
                tally.lock.notify_all()
    finally:
        sub.close()
