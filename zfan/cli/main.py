"""Subcommands: each parses its options, builds a role from the library, and runs it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

import click

from .. import __version__
from ..apps import readings
from ..config import (
    DEFAULT_CONTROL,
    DEFAULT_CREDIT,
    DEFAULT_WINDOW,
    Curve,
    ProducerSettings,
    SinkSettings,
    SubscriberSettings,
    Timing,
    WorkerSettings,
    parse_retention,
    split_http,
)
from ..delivery import Outcomes
from ..errors import BindError, ConfigError, DeliveryTimeout, OutcomeTimeout, SerializationError, ZfanError
from ..feeds import JsonLines
from ..loading import load_app
from ..nodes import security
from ..nodes.dead import dead_letters, purge_dead_letters, requeue_dead_letters, show_dead_letter
from ..nodes.local import die_with_parent
from ..nodes.producer import Producer
from ..nodes.sink import ACTIVE, Sink
from ..nodes.status import query_partitions, query_status
from ..nodes.subscriber import Subscriber
from ..nodes.worker import Worker
from ..partitions import parse_sinks
from ..routing import parse_app, parse_retry, parse_route
from ..sequencing import RetentionGap
from . import pipeline, show
from .options import (
    RET_DEAD,
    RET_ERROR,
    RET_OK,
    RET_TIMEOUT,
    Interrupted,
    Signals,
    await_welcome,
    connect_timeout,
    curve,
    endpoints,
    environment,
    ready,
    resolved,
    role,
    signals,
    sinks_option,
    timing,
)
from .show import Bar, Counts, partitions_table, say, status_table, summary

DRAIN = "seconds to finish the batches held before handing them back"
CHECK_TIMEOUT = 5.0  # seconds `zfan worker --check` waits for the sink's answer, unless told
UP_HTTP = "127.0.0.1:5560"  # zfan up's dashboard


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
    metavar="PATH|postgresql://...",
    help="the ledger: an SQLite file (':memory:' keeps nothing across restarts), or a PostgreSQL "
    "database that an active sink and its standbys share (see Failover in the README)",
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
    "--app",
    default="zfan.apps:rollup",
    show_default=True,
    metavar="[ROUTE=]MODULE:FUNCTION",
    help="what local workers run",
)
@click.option(
    "--route",
    "routes",
    multiple=True,
    metavar="PREFIX=ROUTE",
    help="batches of topics starting with PREFIX go only to workers of ROUTE (--app ROUTE=M:F); "
    "repeatable; others go to the default route",
)
@click.option(
    "--retry",
    "retries",
    multiple=True,
    metavar="ROUTE:attempts=N,backoff=S..S,on=E|E,not=E|E",
    help="a route's retry policy: attempts, backoff seconds (doubling, jittered), which exceptions are retried "
    "(on) or never (not); repeatable; e.g. orders:attempts=5,backoff=1..60,on=ConnectionError|TimeoutError",
)
@click.option(
    "--credit",
    type=click.IntRange(1, 1000),
    default=DEFAULT_CREDIT,
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
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=SinkSettings.drain_timeout,
    show_default=True,
    help="seconds a stopping sink waits for the batches leased to come back",
)
@click.option(
    "--http",
    default=None,
    metavar="HOST:PORT",
    envvar="ZFAN_HTTP",
    help="serve the dashboard, /metrics, /healthz and /readyz there (e.g. 127.0.0.1:5560) [default: off]",
)
@click.option(
    "--min-workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="workers connected for /readyz to say ready (at least 1 with --workers)",
)
@click.option("--parent", type=int, default=None, hidden=True, help="end when this process does")
@click.option("--remove-folder", default=None, hidden=True, help="remove this folder as the sink ends (zfan up's own)")
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
    routes: tuple[str, ...],
    retries: tuple[str, ...],
    credit: int,
    max_attempts: int,
    batch_timeout: float,
    retain: str,
    drain_timeout: float,
    http: str | None,
    min_workers: int,
    parent: int | None,
    remove_folder: str | None,
    timing: Timing,
    curve: Curve | None,
) -> int:
    """Receive batches, record them in the ledger, lease them to workers, publish results.

    Ctrl-C or SIGTERM drains it: no new batch is taken, the batches leased come back, the
    ledger is closed cleanly (exit 0); a second signal stops it at once."""
    stop = signals().cooperate()
    if parent is not None:
        stop.follow_parent(parent)
        die_with_parent(parent)
    try:
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
            drain_timeout=drain_timeout,
            http=http,
            min_workers=min_workers,
            routes=dict(parse_route(r) for r in routes),
            retries=dict(parse_retry(r) for r in retries),
        )

        def announce(state: str) -> None:
            # On a shared ledger a standby says so in its log, and is ready once it takes over.
            if state == ACTIVE:
                ready(
                    "sink",
                    intake=node.intake,
                    control=node.control,
                    results=node.results,
                    ledger=node.ledger,
                    epoch=node.epoch,
                    workers=workers,
                    curve="on" if curve else "off",
                    http=node.http or "off",
                )

        node = Sink(settings, workers=workers, app=app, worker_credit=credit, on_state=announce)
        node.start()
        if not _serve(node, stop):
            return _ended(node)
        if stop.signum == signal.SIGHUP and remove_folder is not None:
            # The `zfan up` that started it is gone, and the folder with this run's ledger goes
            # too: nothing a drain would finish is wanted any more.
            _ended(node)
            return stop.code
        if node.standby:
            say(stop.after_ctrl_c("zfan sink: stopping: it was standing by, and holds nothing"))
        else:
            say(
                stop.after_ctrl_c(
                    "zfan sink: stopping: waiting for the batches leased to come back (Ctrl-C again to stop at once)"
                )
            )
        drained = node.drain(drain_timeout)
        _ended(node)
        return RET_OK if drained else stop.code
    finally:
        if remove_folder is not None:
            shutil.rmtree(remove_folder, ignore_errors=True)


def _check_worker(controls: list[str], name: str | None, timeout: float, curve: Curve | None) -> int:
    """`zfan worker --check`: the app loaded (or we would not be here); does the sink (each of
    `--sinks`) answer, and is the named worker among those connected? One line each, and an exit
    code a probe reads."""
    for control in controls:
        info = query_status(control, timeout=timeout, curve=curve)  # ZfanError: one line, RET_TIMEOUT
        names = [w["name"] for w in info.get("workers", [])]
        if name is not None and name not in names:
            say(f"zfan worker: check failed: no worker named {name!r} is connected to the sink at {control}")
            return RET_ERROR
        who = f"worker {name!r} is connected" if name is not None else f"{len(names)} worker(s) connected"
        say(f"zfan worker: check passed: the sink at {control} answers, {who}")
    return RET_OK


@cli.command()
@role("worker")
@endpoints("control")
@click.option(
    "--app",
    default="zfan.apps:rollup",
    show_default=True,
    metavar="[ROUTE=]MODULE:FUNCTION",
    help="the function to run on each batch: process(records) -> list | dict[topic, list]; "
    "with ROUTE=, only batches of that route (see the sink's --route)",
)
@click.option(
    "--credit", type=click.IntRange(1, 1000), default=DEFAULT_CREDIT, show_default=True, help="batches to hold at once"
)
@click.option("--name", default=None, help="how the sink names this worker [default: random]")
@click.option(
    "--drain-timeout", type=click.FloatRange(min=0), default=WorkerSettings.drain_timeout, show_default=True, help=DRAIN
)
@click.option(
    "--http",
    default=None,
    metavar="HOST:PORT",
    help="serve this worker's /metrics, /healthz and /readyz there [default: off]",
)
@click.option(
    "--check",
    is_flag=True,
    help="only check, for a probe: the app loads and the sink answers (with --name: that worker is connected); "
    "exit 0 if so",
)
@click.option("--parent", type=int, default=None, hidden=True, help="end when this process does")
@sinks_option
@connect_timeout(None)
@timing
@curve(server=False)
def worker(
    control: str,
    sinks: str | None,
    app: str,
    credit: int,
    name: str | None,
    drain_timeout: float,
    http: str | None,
    check: bool,
    parent: int | None,
    connect_timeout: float | None,
    timing: Timing,
    curve: Curve | None,
) -> int:
    """Run an app on batches leased by a sink.

    Ctrl-C or SIGTERM drains it: no new batch is taken, the batches held are finished and
    answered (exit 0); a second signal stops it at once."""
    stop = signals().cooperate()
    if parent is not None:
        stop.follow_parent(parent)
        die_with_parent(parent)
    route, spec = parse_app(app)
    process = load_app(spec)
    if check:
        controls = [part.control for part in parse_sinks(sinks)] if sinks else [control]
        return _check_worker(controls, name, connect_timeout or CHECK_TIMEOUT, curve)
    settings = WorkerSettings(
        control=control,
        sinks=sinks,
        credit=credit,
        timing=timing,
        curve=curve,
        connect_timeout=connect_timeout,
        http=http,
        route=route,
    )
    node = Worker(process, settings if name is None else dataclasses.replace(settings, name=name))
    node.start()
    if await_welcome(node, stop):
        ready(
            "worker",
            **({"sinks": sinks} if sinks else {"control": control}),
            app=spec,
            route=route,
            name=node.settings.name,
            credit=credit,
            http=node.http or "off",
        )
    if not _serve(node, stop):
        return _ended(node)
    if parent is not None:
        # A sink's own worker is stopped by its sink once the sink has taken every lease back
        # and closed (or by the sink's death): nothing it held could be answered any more.
        return _ended(node)
    if node.connected.is_set():  # (without a sink it holds nothing, and simply stops)
        say(stop.after_ctrl_c("zfan worker: stopping: finishing the batches held (Ctrl-C again to stop at once)"))
    drained = node.drain(drain_timeout)
    _ended(node)
    return RET_OK if drained else stop.code


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
    default=DEFAULT_WINDOW,
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
    help="seconds to wait, once the input is sent, for every batch to be acknowledged and processed",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="wait until every batch is processed (exit 8 if one is dead-lettered); "
    "--no-wait: only until the sink has stored it",
)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@sinks_option
@click.option(
    "--key",
    default=None,
    metavar="FIELD",
    help="with --sinks: the record field whose value chooses the sink [default: the topic]",
)
@connect_timeout(10.0)
@timing
@curve(server=False)
def produce(
    intake: str,
    control: str,
    sinks: str | None,
    key: str | None,
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
    wait: bool,
    progress: bool | None,
    connect_timeout: float | None,
    timing: Timing,
    curve: Curve | None,
) -> int:
    """Send records to a sink; exit 0 once every one is processed (with --no-wait: stored).

    Exit 8 if a batch was dead-lettered, 6 if --timeout passed first. Ctrl-C stops reading
    the input and says how far it got."""
    stop = signals().cooperate()
    if count is not None and path is not None:
        raise ConfigError("give --count or --file, not both")
    source: Any
    if count is not None:
        source = readings(count, sensors=sensors, start=start, source=topic)
    else:
        source = JsonLines(path or sys.stdin, strict=strict, name=getattr(path, "name", "stdin"))
        if path is None and progress is None and sys.stdin.isatty():
            progress = False  # a person typing records: a bar redrawn on their line is in the way
    if key is not None and sinks is None:
        raise ConfigError("--key chooses one of several sinks: give them with --sinks")
    settings = ProducerSettings(
        intake=intake,
        control=control,
        sinks=sinks,
        key=key,
        topic=topic,
        batch_size=batch_size,
        linger_ms=linger_ms,
        window=window,
        timing=timing,
        curve=curve,
        connect_timeout=connect_timeout,
    )
    node = Producer(settings if not producer_id else dataclasses.replace(settings, producer_id=producer_id))
    node.start()
    where = {"sinks": sinks, "key": key or "topic"} if sinks else {"intake": intake, "control": control}
    fields = {**where, "producer_id": node.settings.producer_id}
    # Sending does not wait for the welcome (the window holds what goes before it), so the
    # ready line is said when it comes, from a thread.
    announcer = threading.Thread(target=_say_ready, args=(node, stop, fields), name="zfan-ready", daemon=True)
    announcer.start()

    def counts() -> Counts:
        o = node.outcomes
        return Counts(node.sent_records, node.acked_records, o.done_records, o.dead_records + o.unknown_records)

    unsent = Counter[str]()  # records the producer refused (one without its --key), skipped

    def skipped() -> tuple[int, int]:
        """Lines skipped as not JSON, and records skipped without their key."""
        return int(getattr(source, "skipped", 0)), unsent["refused"]

    outcomes: Outcomes | None = None
    timed_out: DeliveryTimeout | OutcomeTimeout | None = None
    try:
        with Bar(enabled=progress, total=count) as bar:
            bar.follow(counts)
            try:
                with stop.interruptible():  # a signal ends a read of stdin, or a wait for room
                    for record in source:
                        _send(node, record, strict, unsent)
                outcomes = _finish(node, stop, timeout, wait)
                if node.connected.is_set():
                    announcer.join(1.0)  # the ready line before the last one
            except Interrupted:
                pass
            except (DeliveryTimeout, OutcomeTimeout) as exc:
                timed_out = exc
        # The last line goes below the bar's last state (and, without a bar, below a ^C).
        line, code = _last_line(stop, outcomes, timed_out, timeout, counts(), skipped())
        say(line if bar.enabled else stop.after_ctrl_c(line))
        return code
    finally:
        node.stop()  # whatever was to be waited for has been, or given up on: no flush again
        node.wait(5.0)


def _send(node: Producer, record: Any, strict: bool, unsent: Counter[str]) -> None:
    """Send one record of the input; one the producer refuses (a record without the --key
    field) is skipped and said, as a line that is not JSON is, or with --strict stops the run."""
    try:
        node.send(record)
    except SerializationError as exc:
        if strict:
            raise ConfigError(f"{exc}; stopped (--strict)") from None
        unsent["refused"] += 1
        logging.getLogger("zfan").warning("%s; skipped", exc)


STEP = 0.2  # seconds of each wait at the end: the signal and the deadline are looked at between


def _finish(node: Producer, stop: Signals, timeout: float, wait: bool) -> Outcomes | None:
    """Wait, at most `timeout` seconds in all, until every batch is acknowledged (and with
    `wait`, processed); the outcomes then, or None without `wait`. Raises the last timeout's
    error once the time is up, Interrupted once a signal came."""
    deadline = time.monotonic() + timeout
    while True:
        step = min(STEP, max(0.0, deadline - time.monotonic()))
        try:
            if not wait:
                node.flush(step)
                return None
            return node.join(step)
        except (DeliveryTimeout, OutcomeTimeout):
            if stop.signum is not None:
                raise Interrupted(stop.signum) from None
            if time.monotonic() >= deadline:
                raise


def _last_line(
    stop: Signals,
    outcomes: Outcomes | None,
    timed_out: DeliveryTimeout | OutcomeTimeout | None,
    timeout: float,
    counts: Counts,
    skipped: tuple[int, int],
) -> tuple[str, int]:
    """What `zfan produce` says last, and its exit code."""
    if isinstance(timed_out, DeliveryTimeout):
        return show.timeout_line(unacked=timed_out.unacked, unended=0, timeout=timeout, outcomes=None), RET_TIMEOUT
    if isinstance(timed_out, OutcomeTimeout):
        line = show.timeout_line(unacked=0, unended=timed_out.unended, timeout=timeout, outcomes=timed_out.outcomes)
        return line, RET_TIMEOUT
    if stop.signum is not None:
        return show.interrupted_line(counts.sent, counts.acked, counts.done), stop.code
    if outcomes is None:  # --no-wait
        return show.acknowledged_line(counts.acked, *skipped), RET_OK
    if not outcomes.ok:
        return show.failed_line(outcomes), RET_DEAD
    return show.processed_line(outcomes, *skipped), RET_OK


def _say_ready(node: Producer, stop: Signals, fields: dict[str, str]) -> None:
    try:
        if await_welcome(node, stop):
            ready("produce", **fields)
    except BaseException:  # the producer's error reaches the command through send() and join()
        return


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
@click.option(
    "--messages",
    type=click.IntRange(min=1),
    default=None,
    help="exit after this many published results (each the results of one batch on one topic)",
)
@click.option("--count", type=click.IntRange(min=1), default=None, hidden=True, help="the old name of --messages")
@connect_timeout(10.0)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="exit after this many seconds without a result (exit 6 if --messages were not all there)",
)
@sinks_option
@curve(server=False)
def subscribe(
    results: str,
    control: str,
    sinks: str | None,
    topics: tuple[str, ...],
    durable: str | None,
    messages: int | None,
    count: int | None,
    idle_timeout: float | None,
    connect_timeout: float | None,
    curve: Curve | None,
) -> int:
    """Print published results as JSON lines on stdout, each topic in order, gaps repaired."""
    stop = signals().cooperate()
    if count is not None:
        logging.getLogger("zfan").warning("--count is now --messages: it counts published results, not records")
        messages = messages if messages is not None else count
    settings = SubscriberSettings(
        results=results,
        control=control,
        sinks=sinks,
        topics=topics,
        durable=durable,
        curve=curve,
        connect_timeout=connect_timeout,
    )
    with Subscriber(settings) as sub:
        while not sub.wait_ready(0.25):  # (it warns once itself when no sink answers)
            if stop.stopping.is_set():
                return stop.code
        where = {"sinks": sinks} if sinks else {"results": results}
        ready("subscribe", **where, topics=",".join(topics) or "*", durable=durable or "-")
        n, last = 0, time.monotonic()
        while not stop.stopping.is_set() and (messages is None or n < messages):
            try:
                msg = sub.recv(timeout=0.25)
            except RetentionGap as gap:
                say(f"zfan subscribe: error: {gap}; skipped")
                continue
            if msg is None:
                if show.reader_gone(sys.stdout):
                    return RET_OK  # `| head -n 1` has what it wanted
                if idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                    break
                continue
            last = time.monotonic()
            try:
                sys.stdout.write(json.dumps(msg.to_json(), separators=(",", ":")) + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                return RET_OK  # the role lets go of stdout quietly
            n += 1
    if stop.signum is not None:
        sys.stderr.write(stop.after_ctrl_c(""))  # quietly, but the prompt not after the ^C
        return stop.code
    if messages is not None and n < messages:
        say(
            f"zfan subscribe: error: {n:,} of {messages:,} message(s) came before {idle_timeout:g} s "
            "passed without one (--idle-timeout)"
        )
        return RET_TIMEOUT
    return RET_OK


@cli.command()
@role("status")
@endpoints("control")
@click.option(
    "--json", "as_json", is_flag=True, help="print the status as one JSON object (with --watch: one per line)"
)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="ask again every SECONDS (2 if not given), redrawing in place, until Ctrl-C",
)
@sinks_option
@curve(server=False)
def status(
    control: str, as_json: bool, timeout: float, watch: float | None, sinks: str | None, curve: Curve | None
) -> int:
    """Ask a running sink (with --sinks: every sink) for its workers, batch counts, rates and topics.

    With --sinks, exit 6 if a sink did not answer (the others are shown)."""
    if sinks is not None and control != DEFAULT_CONTROL:
        raise ConfigError("give --sinks or --control, not both: --sinks names each sink's control endpoint")
    controls = None if sinks is None else [part.control for part in parse_sinks(sinks)]

    def ask() -> dict[str, Any]:
        if controls is None:
            return query_status(control, timeout=timeout, curve=curve)
        return query_partitions(controls, timeout=timeout, curve=curve)

    table = status_table if controls is None else partitions_table
    first = ask()  # none there: one line, exit 6
    if watch is None:
        click.echo(json.dumps(first, indent=2) if as_json else table(first))
        # Some sink did not answer (the others are shown): that is no success.
        return RET_TIMEOUT if any("error" in part for part in first.get("partitions", [])) else RET_OK
    info: dict[str, Any] | None = first
    stop = signals().cooperate()
    redraw = sys.stdout.isatty() and not as_json
    error = ""
    while True:
        if as_json:
            text = json.dumps(info if info is not None else {"error": error}, separators=(",", ":")) + "\n"
        else:
            head = (
                f"zfan status of {sinks or control}, every {watch:g} s, at {time.strftime('%H:%M:%S')} (Ctrl-C to stop)"
            )
            body = table(info) if info is not None else f"{error}; asking again"
            # Home and clear to the end before the new text: redrawn in place, as `watch` does.
            text = ("\x1b[H\x1b[J" if redraw else "") + f"{head}\n\n{body}\n" + ("" if redraw else "\n")
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            return RET_OK  # the role lets go of stdout quietly
        if stop.stopping.wait(watch):
            return stop.code
        try:
            info = ask()
        except ZfanError as exc:  # gone for now (restarting?): said in place of the table
            info, error = None, str(exc)


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
    "--sinks",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    envvar="ZFAN_UP_SINKS",
    help="key-partitioned sinks: each sensor's readings go to one, and the workers span them all",
)
@click.option(
    "--sensors",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="sensors per producer; each is a topic sensor.<id>",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--progress/--no-progress", default=None, help="[default: on a terminal]")
@click.option(
    "--http",
    default=UP_HTTP,
    show_default=True,
    metavar="HOST:PORT|off",
    help="the sink's dashboard and /metrics while it runs (the default port, if taken: any free one)",
)
def up(
    seconds: float | None,
    records: int | None,
    producers: int,
    workers: int,
    sinks: int,
    sensors: int,
    batch_size: int,
    progress: bool | None,
    http: str,
) -> int:
    """Run a whole local pipeline (sink, workers, producers, subscriber) and count the result.

    Ctrl-C stops the producers, lets what they sent drain through, and prints the count."""
    stop = signals().cooperate()
    if seconds is None and records is None:
        seconds = 5.0
    address = None if http == "off" else _free_http(http, any_port=http == UP_HTTP)
    if address is not None:
        say(f"zfan up: dashboard at http://{address}/ and metrics at http://{address}/metrics while it runs")
    with Bar(enabled=progress, total=records, done="delivered") as bar:

        def progress_of(p: pipeline.Progress) -> None:
            bar.show(Counts(p.sent, p.acked, p.delivered, elapsed=p.elapsed))

        report = pipeline.run(
            seconds=seconds,
            records=records,
            producers=producers,
            workers=workers,
            sinks=sinks,
            sensors=sensors,
            batch_size=batch_size,
            progress=progress_of,
            stopping=stop.stopping,
            http=address,
        )
        bar.show(Counts(report.sent, report.acked, report.delivered, elapsed=report.elapsed), force=True)
    click.echo(summary(report))
    if report.interrupted:
        return stop.code
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


@cli.group()
def dead() -> None:
    """Dead-lettered batches: list, show, requeue once the app is fixed, or purge."""


def _dead_command(name: str) -> Callable[[Callable[..., int]], click.Command]:
    """A `zfan dead` subcommand: the sink's control endpoint, a timeout, and CURVE as a client's."""

    def decorate(f: Callable[..., int]) -> click.Command:
        f = curve(server=False)(f)
        f = click.option(
            "--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="seconds to wait"
        )(f)
        f = endpoints("control")(f)
        return dead.command(name)(role("dead")(f))

    return decorate


def _chosen(batch_ids: tuple[int, ...], every: bool) -> list[int]:
    if every == bool(batch_ids):
        raise ConfigError("name the batches (their ids, as `zfan dead list` shows them), or give --all")
    return list(batch_ids)


@_dead_command("list")
@click.option("--topic", default="", metavar="PREFIX", help="only batches whose topic starts with this")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def dead_list(control: str, topic: str, as_json: bool, timeout: float, curve: Curve | None) -> int:
    """The dead-lettered batches, oldest first, with the last line of each one's error."""
    letters = dead_letters(control, topic=topic, timeout=timeout, curve=curve)
    if as_json:
        for letter in letters:
            click.echo(json.dumps(letter, separators=(",", ":")))
        return RET_OK
    click.echo(show.dead_table(list(letters), topic))
    return RET_OK


@_dead_command("show")
@click.argument("batch_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="one JSON object, its records included")
def dead_show(control: str, batch_id: int, as_json: bool, timeout: float, curve: Curve | None) -> int:
    """One dead-lettered batch: its error's traceback, attempts, and records (JSON lines)."""
    letter = show_dead_letter(control, batch_id, timeout=timeout, curve=curve)
    if letter is None:
        raise ZfanError(f"the sink at {control} holds no dead-lettered batch {batch_id}")
    click.echo(json.dumps(letter, default=repr) if as_json else show.dead_letter(letter))
    return RET_OK


@_dead_command("requeue")
@click.argument("batch_ids", nargs=-1, type=click.IntRange(min=1), metavar="[BATCH]...")
@click.option("--all", "every", is_flag=True, help="every dead-lettered batch (with --topic: of those topics)")
@click.option("--topic", default="", metavar="PREFIX", help="only batches whose topic starts with this")
def dead_requeue(
    control: str, batch_ids: tuple[int, ...], every: bool, topic: str, timeout: float, curve: Curve | None
) -> int:
    """Put dead-lettered batches back to pending, their attempts from zero: they are processed
    once more, and their results published as any batch's are. Exit 1 if a batch named was not
    dead-lettered."""
    done = requeue_dead_letters(
        control, _chosen(batch_ids, every), every=every, topic=topic, timeout=timeout, curve=curve
    )
    return _dead_done("requeued", done)


@_dead_command("purge")
@click.argument("batch_ids", nargs=-1, type=click.IntRange(min=1), metavar="[BATCH]...")
@click.option("--all", "every", is_flag=True, help="every dead-lettered batch (with --topic: of those topics)")
@click.option("--topic", default="", metavar="PREFIX", help="only batches whose topic starts with this")
@click.option("--yes", is_flag=True, help="do not ask first")
def dead_purge(
    control: str,
    batch_ids: tuple[int, ...],
    every: bool,
    topic: str,
    yes: bool,
    timeout: float,
    curve: Curve | None,
) -> int:
    """Drop dead-lettered batches and their records for good. Asks first on a terminal; elsewhere
    it needs --yes. Exit 1 if a batch named was not dead-lettered."""
    ids = _chosen(batch_ids, every)
    if not yes:
        what = (
            f"every dead-lettered batch{f' of topics {topic}*' if topic else ''}" if every else f"{len(ids)} batch(es)"
        )
        if not sys.stdin.isatty():
            raise ConfigError(f"purging {what} cannot be undone: add --yes")
        with signals().interruptible():
            if not click.confirm(f"Purge {what}? This cannot be undone", default=False, err=True):
                say("zfan dead: nothing purged")
                return RET_ERROR
    done = purge_dead_letters(control, ids, every=every, topic=topic, timeout=timeout, curve=curve)
    return _dead_done("purged", done)


def _dead_done(verb: str, done: dict[str, Any]) -> int:
    say(f"zfan dead: {done.get(verb, 0):,} batch(es) {verb}")
    missing = done.get("not_dead") or []
    if missing:
        say("zfan dead: not dead-lettered (unknown, or requeued or purged already): " + " ".join(map(str, missing)))
        return RET_ERROR
    return RET_OK


@cli.group("config")
def config_group() -> None:
    """Settings files (zfan.toml, or [tool.zfan] in pyproject.toml)."""


@config_group.command("show")
@role("config", logged=False)  # logging set up would set ZFAN_LOG_FORMAT, which it reports
@click.argument("commands", nargs=-1, metavar="[COMMAND]...")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of TOML")
def config_show(commands: tuple[str, ...], as_json: bool) -> int:
    """What each command would run with here, and where each value comes from: flag, env
    (ZFAN_<OPTION>), file or default. Precedence: flag > env > file > default."""
    path = click.get_current_context().meta.get("zfan.config")
    settings = resolved(cli, list(commands), path)
    click.echo(show.settings_json(path, settings) if as_json else show.settings_toml(path, settings))
    return RET_OK


def _free_http(address: str, *, any_port: bool) -> str:
    """`address` if its port is free; if not, with `any_port`, the same host on a free port."""
    host, port = split_http(address)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if not any_port:
                raise BindError(f"http endpoint {address}: {exc.strerror or exc}") from None
            probe.bind((host, 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _serve(node: Any, stop: Signals) -> bool:
    """Wait while the node runs; True if a signal asked it to stop, False if it ended itself."""
    while not stop.stopping.wait(0.2):
        if not node.running:
            return False
        stop.check_parent()
    return True


def _ended(node: Any) -> int:
    """Close a node that ended; raise why, if it ended on an error."""
    node.close()
    if node.error is not None:
        raise node.error
    return RET_OK


environment(cli)  # every option also as ZFAN_<OPTION>, once every command is defined
