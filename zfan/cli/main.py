"""Subcommands: each parses its options, builds a role from the library, and runs it."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from typing import Any, TextIO

import click

from .. import __version__
from ..apps import readings
from ..config import Curve, ProducerSettings, SinkSettings, SubscriberSettings, Timing, WorkerSettings, parse_retention
from ..errors import ConfigError
from ..feeds import JsonLines
from ..loading import load_app
from ..nodes import security
from ..nodes.local import die_with_parent
from ..nodes.producer import Producer
from ..nodes.sink import Sink
from ..nodes.status import query_status
from ..nodes.subscriber import Subscriber
from ..nodes.worker import Worker
from ..sequencing import RetentionGap
from . import pipeline
from .options import RET_ERROR, RET_OK, curve, endpoints, on_stop, ready, role, timing
from .show import Live, status_table, summary


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zfan")
def cli() -> None:
    """Brokerless fan-in / fan-out: producers -> sink -> workers -> subscribers.

    Start with `zfan up` for a whole local pipeline in one command.
    """


@cli.command()
@role("sink")
@endpoints("intake", "control", "results")
@click.option(
    "--ledger",
    default="zfan.db",
    show_default=True,
    envvar="ZFAN_LEDGER",
    help="SQLite ledger file (':memory:' keeps nothing across restarts)",
)
@click.option(
    "--fsync",
    type=click.Choice(["normal", "full"]),
    default="normal",
    show_default=True,
    help="full: survive power loss, at a cost; normal survives process crashes",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="local worker processes to start beside the sink",
)
@click.option(
    "--app", default="zfan.apps:rollup", show_default=True, metavar="MODULE:FUNCTION", help="what local workers run"
)
@click.option(
    "--credit",
    type=click.IntRange(1, 1000),
    default=64,
    show_default=True,
    help="batches each local worker holds at once",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="failed attempts before a batch is dead-lettered on topic zfan.dead",
)
@click.option(
    "--batch-timeout",
    type=click.FloatRange(min=0.001),
    default=300.0,
    show_default=True,
    help="seconds a worker may hold a batch before it is replayed elsewhere",
)
@click.option(
    "--retain",
    default="100000",
    show_default=True,
    metavar="COUNT|AGE",
    help="published results kept for subscribers to repair gaps and replay: a count (100000) or an age (30m, 12h, 7d)",
)
@timing
@curve(server=True)
def sink(
    intake: str,
    control: str,
    results: str,
    ledger: str,
    fsync: str,
    workers: int,
    app: str,
    credit: int,
    max_attempts: int,
    batch_timeout: float,
    retain: str,
    timing: Timing,
    curve: Curve | None,
) -> int:
    """Receive batches, record them in the ledger, lease them to workers, publish results."""
    retain_count, retain_age = parse_retention(retain)
    settings = SinkSettings(
        intake=intake,
        control=control,
        results=results,
        ledger=ledger,
        fsync=fsync,
        timing=timing,
        max_attempts=max_attempts,
        batch_timeout=batch_timeout,
        retain_count=retain_count,
        retain_age=retain_age,
        curve=curve,
    )
    node = Sink(settings, workers=workers, app=app, worker_credit=credit)
    node.start()
    on_stop(node.stop)
    ready(
        "sink",
        intake=node.intake,
        control=node.control,
        results=node.results,
        ledger=ledger,
        epoch=node.epoch,
        workers=workers,
        curve="on" if curve else "off",
    )
    return _wait(node)


@cli.command()
@role("worker")
@endpoints("control")
@click.option(
    "--app",
    default="zfan.apps:rollup",
    show_default=True,
    metavar="MODULE:FUNCTION",
    help="the function to run on each batch: process(records) -> list | dict[topic, list]",
)
@click.option("--credit", type=click.IntRange(1, 1000), default=64, show_default=True, help="batches to hold at once")
@click.option("--name", default=None, help="how the sink names this worker [default: random]")
@click.option("--parent", type=int, default=None, hidden=True, help="end when this process does")
@timing
@curve(server=False)
def worker(
    control: str, app: str, credit: int, name: str | None, parent: int | None, timing: Timing, curve: Curve | None
) -> int:
    """Run an app on batches leased by a sink."""
    if parent is not None:
        die_with_parent(parent)
    process = load_app(app)
    settings = WorkerSettings(control=control, credit=credit, timing=timing, curve=curve)
    node = Worker(process, settings if name is None else dataclasses.replace(settings, name=name))
    node.start()
    on_stop(node.stop)
    ready("worker", control=control, app=app, name=node.settings.name, credit=credit)
    return _wait(node)


@cli.command()
@role("produce")
@endpoints("intake", "control")
@click.option("--file", "path", type=click.File("r"), default=None, help="JSON lines to send [default: stdin]")
@click.option(
    "--count",
    type=click.IntRange(min=0),
    default=None,
    help="send this many synthetic sensor readings instead of reading input",
)
@click.option(
    "--start", type=click.IntRange(min=0), default=0, show_default=True, help="first id of the synthetic readings"
)
@click.option(
    "--sensors",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="distinct sensors in the synthetic readings",
)
@click.option("--topic", default="readings", show_default=True, help="topic of every batch")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--linger-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="send a partial batch once its first record is this old",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="unacknowledged batches allowed before sending blocks",
)
@click.option("--producer-id", default=None, help="[default: random]")
@click.option("--strict", is_flag=True, help="stop at the first line that is not JSON (default: skip it)")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="seconds to wait at the end for the sink to acknowledge everything",
)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@timing
@curve(server=False)
def produce(
    intake: str,
    control: str,
    path: TextIO | None,
    count: int | None,
    start: int,
    sensors: int,
    topic: str,
    batch_size: int,
    linger_ms: float,
    window: int,
    producer_id: str | None,
    strict: bool,
    timeout: float,
    progress: bool | None,
    timing: Timing,
    curve: Curve | None,
) -> int:
    """Send records to a sink; exit 0 once the sink has acknowledged every one."""
    if count is not None and path is not None:
        raise ConfigError("give --count or --file, not both")
    source: Any
    if count is not None:
        source = readings(count, sensors=sensors, start=start, source=topic)
    else:
        source = JsonLines(path or sys.stdin, strict=strict, name=getattr(path, "name", "stdin"))
    settings = ProducerSettings(
        intake=intake,
        control=control,
        topic=topic,
        batch_size=batch_size,
        linger_ms=linger_ms,
        window=window,
        timing=timing,
        curve=curve,
    )
    node = Producer(settings if not producer_id else dataclasses.replace(settings, producer_id=producer_id))
    node.start()
    stopping = threading.Event()
    on_stop(stopping.set)
    ready("produce", intake=intake, control=control, producer_id=settings.producer_id)
    live = Live(sys.stderr, enabled=progress, total=count)
    try:
        for record in source:
            if stopping.is_set():
                break
            node.send(record)
            live.update(node.sent_records, node.acked_records)
        node.close(timeout)
    finally:
        node.stop()
    live.done(node.sent_records, node.acked_records)
    skipped = getattr(source, "skipped", 0)
    click.echo(
        f"zfan produce: {node.sent_records} record(s) sent and acknowledged"
        + (f", {skipped} line(s) skipped as not JSON" if skipped else ""),
        err=True,
    )
    return RET_OK


@cli.command()
@role("subscribe")
@endpoints("results", "control")
@click.option(
    "--topic",
    "topics",
    multiple=True,
    default=[""],
    metavar="PREFIX",
    help="topic prefix to receive (repeatable) [default: everything]",
)
@click.option(
    "--durable",
    default=None,
    metavar="NAME",
    help="keep this subscriber's position at the sink and resume from it next time "
    "(the first time: from the oldest result the sink retains)",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="exit after this many results")
@click.option(
    "--idle-timeout", type=click.FloatRange(min=0), default=None, help="exit after this many seconds without a result"
)
@curve(server=False)
def subscribe(
    results: str,
    control: str,
    topics: tuple[str, ...],
    durable: str | None,
    count: int | None,
    idle_timeout: float | None,
    curve: Curve | None,
) -> int:
    """Print published results as JSON lines on stdout, each topic in order, gaps repaired."""
    stopping = threading.Event()
    on_stop(stopping.set)
    settings = SubscriberSettings(results=results, control=control, topics=topics, durable=durable, curve=curve)
    with Subscriber(settings) as sub:
        waited = 0
        while not sub.wait_ready(1.0):
            if stopping.is_set():
                return RET_OK
            waited += 1
            if waited == 5:
                logging.getLogger("zfan").warning(
                    "no answer yet from a sink at results=%s control=%s; waiting", results, control
                )
        ready("subscribe", results=results, topics=",".join(topics) or "*", durable=durable or "-")
        n, last = 0, time.monotonic()
        while not stopping.is_set() and (count is None or n < count):
            try:
                msg = sub.recv(timeout=0.25)
            except RetentionGap as gap:
                click.echo(f"zfan subscribe: error: {gap}; skipped", err=True)
                continue
            if msg is None:
                if idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                    break
                continue
            last = time.monotonic()
            sys.stdout.write(json.dumps(msg.to_json(), separators=(",", ":")) + "\n")
            sys.stdout.flush()
            n += 1
    return RET_OK


@cli.command()
@role("status")
@endpoints("control")
@click.option("--json", "as_json", is_flag=True, help="print the status as one JSON object")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True)
@curve(server=False)
def status(control: str, as_json: bool, timeout: float, curve: Curve | None) -> int:
    """Ask a running sink for its workers and batch counts."""
    info = query_status(control, timeout=timeout, curve=curve)
    click.echo(json.dumps(info, indent=2) if as_json else status_table(info))
    return RET_OK


@cli.command()
@role("up")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0.1),
    default=None,
    help="stream for this long [default: 5 unless --records is given]",
)
@click.option("--records", type=click.IntRange(min=1), default=None, help="stream this many records")
@click.option("--producers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--sensors",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="sensors per producer; each is a topic sensor.<id>",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
def up(
    seconds: float | None,
    records: int | None,
    producers: int,
    workers: int,
    sensors: int,
    batch_size: int,
    progress: bool | None,
) -> int:
    """Run a whole local pipeline (sink, workers, producers, subscriber) and count the result."""
    if seconds is None and records is None:
        seconds = 5.0
    live = Live(sys.stderr, enabled=progress, total=records)
    report = pipeline.run(
        seconds=seconds,
        records=records,
        producers=producers,
        workers=workers,
        sensors=sensors,
        batch_size=batch_size,
        progress=lambda p: live.update(p.sent, p.acked, p.delivered, p.elapsed),
    )
    live.done(report.sent, report.acked, report.delivered, report.elapsed)
    click.echo(summary(report))
    return RET_OK if report.ok else RET_ERROR


@cli.group()
def keys() -> None:
    """CURVE keypairs for an encrypted pipeline."""


@keys.command("generate")
@role("keys")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("name")
def keys_generate(folder: str, name: str) -> int:
    """Write FOLDER/NAME.key (public: give it out) and FOLDER/NAME.key_secret (keep it)."""
    public, secret = security.generate(folder, name)
    click.echo(f"public key: {public}\nsecret key: {secret}")
    return RET_OK


def _wait(node: Any) -> int:
    while not node.wait(0.5):
        pass
    node.close()
    if node.error is not None:
        raise node.error
    return RET_OK
