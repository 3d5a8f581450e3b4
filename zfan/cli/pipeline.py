"""`zfan up`: a whole local pipeline in one command, counted end to end.

A sink (its ledger in a temporary folder) with local workers runs as a child process;
producers stream synthetic sensor readings from threads of this process; a subscriber takes
every roll-up. At the end the records each sensor sent are compared with the counts the
roll-ups report for it: records lost and duplicated are counted, not assumed.

Asked to stop (`stopping`), the producers stop, what they sent is left to drain through the
pipeline, and the report says it was interrupted. The sink child ends with this process, even
one killed outright, and removes the temporary folder as it ends.
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
        self.seen: set[tuple[int, str]] = set()
        self.results = 0
        self.duplicated = 0
        self.last = 0.0

    @property
    def delivered(self) -> int:
        return sum(self.per_sensor.values())


def run(
    *,
    seconds: float | None = 5.0,
    records: int | None = None,
    producers: int = 4,
    workers: int = 2,
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
    tmp = tempfile.mkdtemp(prefix="zfan-up-")
    ends = {name: f"ipc://{tmp}/{name}" for name in ("intake", "control", "results")}
    ctx = zmq.Context()
    sink = None
    # The sink's stderr, unnamed: nothing of it is left behind, however this process ends.
    with tempfile.TemporaryFile("w+") as log:
        try:
            sink = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "zfan",
                    "sink",
                    "--log-level",
                    "warning",
                    "--workers",
                    str(workers),
                    "--app",
                    "zfan.apps:rollup",
                    "--ledger",
                    os.path.join(tmp, "zfan.db"),
                    *(f"--{k}={v}" for k, v in ends.items()),
                    "--drain-timeout",
                    str(SINK_DRAIN),
                    *(["--http", http] if http else []),
                    # It ends when this process does, and then removes the folder: a `zfan up`
                    # killed outright leaves neither a sink nor a folder behind.
                    "--parent",
                    str(os.getpid()),
                    "--remove-folder",
                    tmp,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=child_environment(),
                # Ctrl-C at the terminal is for this process, which stops the sink in order.
                start_new_session=True,
            )
            if not _wait_for_workers(sink, ends["control"], workers, log, ctx, stopping):
                return _nothing_run(producers, workers)
            try:
                report = _stream(
                    ends,
                    ctx,
                    seconds=seconds,
                    records=records,
                    producers=producers,
                    sensors=sensors,
                    batch_size=batch_size,
                    workers=workers,
                    settle=settle,
                    progress=progress,
                    sink_alive=lambda: sink is not None and sink.poll() is None,
                    stopping=stopping,
                )
            except ZfanError as exc:
                raise _sink_stopped(sink, log) or exc from None
            if (stopped := _sink_stopped(sink, log)) is not None:
                raise stopped
            return report
        finally:
            if sink is not None:
                stop_processes([sink], timeout=SINK_DRAIN + 10)
            ctx.term()
            shutil.rmtree(tmp, ignore_errors=True)


SINK_DRAIN = 5.0  # seconds the sink waits, as it stops, for its workers to finish their batches


def _nothing_run(producers: int, workers: int) -> Report:
    return Report(producers, workers, 0, 0, 0, 0, 0, 0, 0, 0.0, interrupted=True)


def _wait_for_workers(
    sink: subprocess.Popen[bytes],
    control: str,
    workers: int,
    log: IO[str],
    ctx: Ctx,
    stopping: Flag,
    timeout: float = 30.0,
) -> bool:
    """True once the sink and its workers are up; False if asked to stop first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (stopped := _sink_stopped(sink, log)) is not None:
            raise stopped
        if stopping.is_set():
            return False
        try:
            if len(query_status(control, timeout=0.5, context=ctx)["workers"]) >= workers:
                return True
        except ZfanError:
            pass
    raise ZfanError(f"the sink and its {workers} workers did not come up within {timeout:g} s")


def _sink_stopped(sink: subprocess.Popen[bytes], log: IO[str]) -> ZfanError | None:
    """Why the sink stopped, if it has: a ledger's error (a full disk) as a LedgerError, so that
    `zfan up` exits as `zfan sink` did."""
    code = sink.poll()
    if code is None:
        return None
    log.seek(0)
    said = log.read().strip()
    if code == 5:  # the sink's exit code for a ledger it cannot use
        return LedgerError(said.rsplit(": error: ", 1)[-1])
    return ZfanError(f"the sink exited early: {said}")


class _Fleet:
    """Producer threads streaming sensor readings, each counting what it sent per sensor."""

    def __init__(
        self,
        ends: dict[str, str],
        ctx: Ctx,
        *,
        producers: int,
        sensors: int,
        batch_size: int,
        records: int | None,
        settle: float,
    ) -> None:
        self.prods = [
            Producer(
                intake=ends["intake"],
                control=ends["control"],
                producer_id=f"node{i}",
                topic="readings",
                batch_size=batch_size,
                context=ctx,
            ).start()
            for i in range(producers)
        ]
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
    ends: dict[str, str],
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
    sink_alive: Callable[[], bool],
    stopping: Flag,
) -> Report:
    tally = _Tally()
    stop_sub = threading.Event()
    sub = Subscriber(results=ends["results"], control=ends["control"], topics=("sensor.",), context=ctx)
    deadline = time.monotonic() + 10
    while not sub.wait_ready(0.2):
        if stopping.is_set() or time.monotonic() > deadline:
            sub.close()
            if stopping.is_set():
                return _nothing_run(producers, workers)
            raise ZfanError("the subscriber could not reach the sink's results")
    sub_thread = threading.Thread(target=_subscribe, args=(sub, tally, stop_sub), daemon=True)
    sub_thread.start()

    start = time.monotonic()
    fleet = _Fleet(
        ends, ctx, producers=producers, sensors=sensors, batch_size=batch_size, records=records, settle=settle
    )

    def report_progress() -> None:
        if progress is not None:
            progress(Progress(time.monotonic() - start, fleet.records_sent, fleet.records_acked, tally.delivered))

    try:
        while fleet.alive() and sink_alive():
            if stopping.is_set() or (seconds is not None and time.monotonic() - start >= seconds):
                fleet.stopping.set()
            report_progress()
            fleet.join(0.2)
        # What was sent drains through the pipeline, interrupted or not: the count is of it all.
        expected = fleet.per_sensor()
        total = sum(expected.values())
        deadline = time.monotonic() + settle
        while tally.delivered < total and time.monotonic() < deadline and sink_alive():
            report_progress()
            with tally.lock:
                tally.lock.wait_for(lambda: tally.delivered >= total, timeout=0.2)
        report_progress()
    finally:
        # Every thread done with its sockets before the caller ends the context.
        stop_sub.set()
        sub_thread.join(5)
        fleet.stopping.set()
        fleet.close(timeout=1.0 if sink_alive() else 0.0)  # no sink, no ack to wait for
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
    )


def _subscribe(sub: Subscriber, tally: _Tally, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            msg = sub.recv(timeout=0.1)
            if msg is None:
                continue
            key = (msg.batch_id, msg.topic)
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
