"""How the CLI shows things to a person: the progress bar, lines said above it, the status
table, and the lines that end `zfan produce` and `zfan up`."""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..delivery import Outcomes
from . import logs
from .pipeline import Report

REFRESH = 0.1  # seconds between redraws of the bar


def say(line: str) -> None:
    """One line for a person on stderr; above the progress bar, if one is drawn. Written with
    its newline in one call: a sink's local workers share its stderr, and a line written in two
    parts can have another process's line land in between. While stderr carries JSON log lines,
    it is one of them."""
    if logs.json_on_stderr():
        logging.getLogger("zfan.cli").info(line)
        return
    tqdm.write(line + "\n", file=sys.stderr, end="")


@dataclass
class Counts:
    """What a bar shows: records handed to producers, acknowledged by the sink, and done: processed
    (`zfan produce`) or delivered to the subscriber (`zfan up`)."""

    sent: int
    acked: int
    done: int
    dead: int = 0
    elapsed: float | None = None  # since the run started [default: since the bar was]


class Bar:
    """The progress bar of `zfan produce` and `zfan up`, drawn by tqdm on stderr when it is a
    terminal (or when asked), with log lines routed above it; nothing elsewhere."""

    def __init__(self, *, enabled: bool | None = None, total: int | None = None, done: str = "processed") -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total or None
        self.done = done
        self._bar: Any = None
        self._redirect: AbstractContextManager[None] | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last = 0.0
        self._read: Callable[[], Counts] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Bar:
        if self.enabled:
            self._redirect = logging_redirect_tqdm([logging.getLogger()])
            self._redirect.__enter__()
            self._bar = tqdm(
                total=self.total,
                file=sys.stderr,
                bar_format="{percentage:3.0f}%|{bar}| {desc}" if self.total else "{desc}",
                dynamic_ncols=True,
                leave=True,
            )
        return self

    def follow(self, read: Callable[[], Counts]) -> None:
        """Redraw from `read()` ten times a second, on a thread of the bar's own, until the bar
        closes: it moves whatever the caller's thread is blocked on."""
        self._read = read
        if self._bar is not None:
            self.show(read(), force=True)
            self._thread = threading.Thread(target=self._follow, name="zfan-progress", daemon=True)
            self._thread.start()

    def _follow(self) -> None:
        assert self._read is not None
        while not self._stop.wait(REFRESH):
            self.show(self._read())

    def show(self, counts: Counts, *, force: bool = False) -> None:
        if self._bar is None:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < REFRESH:
                return
            self._last = now
            elapsed = now - self._started if counts.elapsed is None else counts.elapsed
            self._bar.n = min(counts.done, self.total) if self.total else counts.done
            self._bar.set_description_str(self._text(counts, elapsed), refresh=False)
            self._bar.refresh()

    def _text(self, c: Counts, elapsed: float) -> str:
        of = f"/{self.total:,}" if self.total else ""
        rate = c.done / elapsed if elapsed > 0 else 0.0
        dead = f"  dead {c.dead:,}" if c.dead else ""
        return (
            f"sent {c.sent:,}{of}  acked {c.acked:,}  {self.done} {c.done:,}{dead}  "
            f"{rate:,.0f} records/s  {elapsed:.1f} s"
        )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            if self._read is not None:
                self.show(self._read(), force=True)
            self._bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)


# --- zfan produce's last line ----------------------------------------------------------------


def processed_line(o: Outcomes, skipped: int = 0, keyless: int = 0) -> str:
    done = f"zfan produce: {o.done_records:,} record(s) processed in {o.done_batches:,} batch(es)"
    return done + _skipped(skipped, keyless)


def acknowledged_line(records: int, skipped: int = 0, keyless: int = 0) -> str:
    return f"zfan produce: {records:,} record(s) sent and acknowledged" + _skipped(skipped, keyless)


def failed_line(o: Outcomes) -> str:
    """The batches that were not processed, and the first error, in one line."""
    parts = []
    if o.dead_batches:
        first = f" (first error: {o.first_error})" if o.first_error else ""
        parts.append(f"{o.dead_records:,} record(s) in {o.dead_batches:,} batch(es) dead-lettered{first}")
    if o.unknown_batches:
        parts.append(
            f"{o.unknown_records:,} record(s) in {o.unknown_batches:,} batch(es) of unknown outcome "
            "(the sink no longer remembers them)"
        )
    return "zfan produce: error: " + "; ".join(parts) + f"; {o.done_records:,} processed"


def timeout_line(*, unacked: int, unended: int, timeout: float, outcomes: Outcomes | None) -> str:
    """What was still out when `--timeout` ran out."""
    if unacked:
        line = f"{unacked:,} batch(es) not acknowledged by the sink after {timeout:g} s"
    else:
        line = (
            f"{unended:,} batch(es) acknowledged but not processed after {timeout:g} s "
            "(they are in the sink's ledger: a worker will take them)"
        )
    if outcomes is not None and not outcomes.ok:
        line += "; " + failed_line(outcomes).removeprefix("zfan produce: error: ")
    return "zfan produce: error: " + line


def interrupted_line(sent: int, acked: int, processed: int) -> str:
    return f"zfan produce: interrupted: {sent:,} sent, {acked:,} acknowledged, {processed:,} processed"


def _skipped(n: int, keyless: int = 0) -> str:
    said = f", {n:,} line(s) skipped as not JSON" if n else ""
    return said + (f", {keyless:,} record(s) skipped without their --key field" if keyless else "")


# --- stdout that a reader closed -------------------------------------------------------------


def reader_gone(stream: TextIO) -> bool:
    """True if nobody reads `stream` any more (`zfan subscribe | head -n 1` after head ended),
    seen without writing to it."""
    if not hasattr(select, "poll"):
        return False
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # errors and hang-ups only: they are always reported
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def release_stdout() -> None:
    """Flush stdout; if its reader has gone, point it at /dev/null, so that neither this flush
    nor the one at interpreter exit prints a BrokenPipeError."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# --- zfan status and zfan up -----------------------------------------------------------------


# What status_table() writes in lines of their own; every other number goes on the counters line.
SHOWN = {
    "version", "epoch", "uptime_s", "draining", "producers", "workers", "subscribers", "pending", "leased", "done",
    "dead", "purged", "ledger_bytes", "records_in", "records_out", "rate_in", "rate_out", "topics", "top_topics",
    "rejected", "cursor_lag", "routes",
}  # fmt: skip


def partitions_table(info: dict[str, Any]) -> str:
    """Every key-partitioned sink's status, each under its partition's number and endpoint."""
    return "\n\n".join(
        f"partition {part['partition']} at {part['control']}:\n"
        + (f"  {part['error']}" if "error" in part else textwrap.indent(status_table(part["status"]), "  "))
        for part in info["partitions"]
    )


def status_table(info: dict[str, Any]) -> str:
    """A sink's status for a person: one line per subject, the workers and the furthest topics."""
    version = f" {info['version']}" if "version" in info else ""  # a sink of an earlier version says less
    uptime = f", up {duration(info['uptime_s'])}" if "uptime_s" in info else ""
    lines = [
        f"sink{version}, epoch {info.get('epoch')}{uptime}{' (draining)' if info.get('draining') else ''}: "
        f"{info.get('producers', 0)} producer(s), {len(info.get('workers', []))} worker(s), "
        f"{info.get('subscribers', 0)} subscriber(s)"
    ]
    size = f" ({megabytes(info['ledger_bytes'])} on disk)" if "ledger_bytes" in info else ""
    lines.append(
        "batches: "
        + ", ".join(f"{k} {info.get(k, 0):,}" for k in ("pending", "leased", "done", "dead", "purged") if k in info)
        + size
    )
    if "rate_in" in info:
        lines.append(
            f"records: in {info.get('records_in', 0):,} ({info['rate_in']:,.0f}/s), "
            f"out {info.get('records_out', 0):,} ({info['rate_out']:,.0f}/s) over the last 10 s"
        )
    lag = info.get("cursor_lag") or {}
    if lag:
        behind = sorted(lag.items(), key=lambda kv: -kv[1])
        lines.append("durable subscribers: " + ", ".join(f"{name} {n:,} behind" for name, n in behind[:10]))
    routes = info.get("routes") or {}
    if set(routes) - {"default"} or any(r["backoff"] for r in routes.values()):
        lines.append("routes: " + "; ".join(_route(name, r) for name, r in routes.items()))
    rejected = info.get("rejected") or {}
    lines.append(
        f"rejected messages: {sum(rejected.values()):,}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) + ")" if rejected else "")
    )
    others = {k: v for k, v in info.items() if k not in SHOWN and isinstance(v, int)}
    if others:
        lines.append(", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(others.items())))
    lines += _workers(info.get("workers", []))
    top = info.get("top_topics") or []
    if top:
        lines += [
            "",
            f"{'topic (the furthest of ' + format(info.get('topics', len(top)), ',') + ')':<40} {'last seq':>10}",
        ]
        lines += [f"{t:<40} {seq:>10,}" for t, seq in top]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {s % 60}s" if m else f"{s}s"


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _route(name: str, r: dict[str, int]) -> str:
    backoff = f", {r['backoff']:,} in backoff" if r["backoff"] else ""
    served = f"{r['workers']} worker(s)" if r["workers"] else "NO WORKER" if r["pending"] or backoff else "no worker"
    return f"{name} {r['pending']:,} pending{backoff}, {served}"


def _workers(workers: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    if workers:
        lines.append("")
        lines.append(f"{'worker':<24} {'credit':>6} {'in flight':>9} {'idle ms':>8}")
        for w in workers:
            idle = "-" if w.get("idle_ms") is None else f"{w['idle_ms']}"
            draining = "  draining" if w.get("draining") else ""
            route = f"  route {w['route']}" if w.get("route", "default") != "default" else ""
            lines.append(f"{w['name']:<24} {w['credit']:>6} {w['in_flight']:>9} {idle:>8}{route}{draining}")
    return lines


def summary(r: Report) -> str:
    verdict = "interrupted" if r.interrupted else "ok" if r.ok else "FAILED"
    return "\n".join(
        [
            f"zfan up: {verdict}",
            f"  records in:    {r.sent:,} from {r.producers} producers (acknowledged {r.acked:,})",
            f"  results out:   {r.results:,} roll-ups on {r.topics} topics (sensor.<id>), "
            f"covering {r.delivered:,} records",
            f"  throughput:    {r.rate:,.0f} records/s over {r.elapsed:.2f} s, {r.workers} workers"
            + (f", {r.sinks} sinks (partitioned by sensor)" if r.sinks > 1 else ""),
            f"  lost {r.lost:,}, duplicated {r.duplicated:,}  (counted per sensor against what was sent)",
        ]
    )


def settings_toml(path: str | None, settings: dict[str, list[Any]]) -> str:
    """`zfan config show`: each command's settings as a TOML table a file could hold, with where
    each value comes from; a value not set is a comment."""
    lines = [f"# settings file: {path or 'none (./zfan.toml or [tool.zfan] in ./pyproject.toml)'}"]
    for command, rows in settings.items():
        lefts = [
            f"# {r.key.replace('_', '-')} (not set)"
            if r.value is None or r.value == ()
            else f"{r.key.replace('_', '-')} = {_toml(r.value)}"
            for r in rows
        ]
        width = max(map(len, lefts), default=0)
        lines += [
            "",
            f"[{command}]",
            *(f"{left.ljust(width)}  # {r.source}" for left, r in zip(lefts, rows, strict=True)),
        ]
    return "\n".join(lines)


def settings_json(path: str | None, settings: dict[str, list[Any]]) -> str:
    return json.dumps(
        {
            "file": path,
            **{
                command: {r.key.replace("_", "-"): {"value": r.value, "from": r.source} for r in rows}
                for command, rows in settings.items()
            },
        },
        indent=2,
        default=str,
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def dead_table(letters: list[dict[str, Any]], topic: str) -> str:
    """`zfan dead list`: one line per dead-lettered batch, then how many."""
    of = f" on topics {topic}*" if topic else ""
    if not letters:
        return f"no dead-lettered batch{of}"
    rows = [("batch", "topic", "records", "attempts", "dead-lettered", "error")]
    rows += [
        (
            str(d["batch_id"]),
            d["topic"],
            f"{d['records']:,}",
            str(d["attempts"]),
            _when(d.get("at")),
            d["error"],
        )
        for d in letters
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    numbers = (0, 2, 3)  # right-aligned

    def line(row: tuple[str, ...]) -> str:
        pairs = enumerate(zip(row[:5], widths, strict=True))
        cells = [c.rjust(w) if i in numbers else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join([*cells, row[5]])

    lines = [line(r) for r in rows]
    return "\n".join(line.rstrip() for line in lines) + f"\n{len(letters):,} dead-lettered batch(es){of}"


def dead_letter(d: dict[str, Any]) -> str:
    """`zfan dead show`: what became of the batch, its traceback, then its records as JSON lines."""
    head = (
        f"batch {d['batch_id']} on topic {d['topic']}: {d['count']:,} record(s), {d['attempts']} attempt(s), "
        f"dead-lettered {_when(d.get('at'))}\nfrom producer {d['producer']} (its batch {d['producer_seq']})"
    )
    error = "\n".join("  " + line for line in (d.get("error") or "").rstrip().splitlines())
    records = "\n".join(json.dumps(r, default=repr) for r in d["records"])
    return f"{head}\nerror:\n{error}\nrecords:\n{records}"


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"
