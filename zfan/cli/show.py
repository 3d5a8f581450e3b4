"""How the CLI shows things to a person: a live progress line, the status table, the summary."""

from __future__ import annotations

import time
from typing import Any, TextIO

from .pipeline import Report


class Live:
    """One line on a terminal, redrawn at most ten times a second; silent elsewhere."""

    def __init__(self, stream: TextIO, *, enabled: bool | None = None, total: int | None = None) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.total = total
        self._last = 0.0
        self._started = time.monotonic()

    def update(
        self, sent: int, acked: int, delivered: int | None = None, elapsed: float | None = None, *, force: bool = False
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        elapsed = now - self._started if elapsed is None else elapsed
        of = f"/{self.total:,}" if self.total else ""
        line = f"sent {sent:,}{of}  acked {acked:,}"
        if delivered is not None:
            line += f"  delivered {delivered:,}"
        rate = (delivered if delivered is not None else acked) / elapsed if elapsed > 0 else 0.0
        line += f"  {rate:,.0f} records/s  {elapsed:.1f} s"
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()

    def done(self, *args: Any) -> None:
        if self.enabled:
            self.update(*args, force=True)
            self.stream.write("\n")
            self.stream.flush()


def status_table(info: dict[str, Any]) -> str:
    lines = [
        f"sink epoch {info.get('epoch')}: {info.get('producers', 0)} producer(s), "
        f"{len(info.get('workers', []))} worker(s)"
    ]
    lines.append("batches: " + ", ".join(f"{k} {info.get(k, 0):,}" for k in ("pending", "leased", "done", "dead")))
    rejected = info.get("rejected") or {}
    lines.append(
        f"rejected messages: {sum(rejected.values()):,}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) + ")" if rejected else "")
    )
    others = {
        k: v
        for k, v in info.items()
        if k not in {"epoch", "producers", "workers", "pending", "leased", "done", "dead", "rejected"}
    }
    if others:
        lines.append(", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(others.items())))
    workers = info.get("workers", [])
    if workers:
        lines.append("")
        lines.append(f"{'worker':<24} {'credit':>6} {'in flight':>9} {'idle ms':>8}")
        for w in workers:
            idle = "-" if w.get("idle_ms") is None else f"{w['idle_ms']}"
            lines.append(f"{w['name']:<24} {w['credit']:>6} {w['in_flight']:>9} {idle:>8}")
    return "\n".join(lines)


def summary(r: Report) -> str:
    verdict = "ok" if r.ok else "FAILED"
    return "\n".join(
        [
            f"zfan up: {verdict}",
            f"  records in:    {r.sent:,} from {r.producers} producers (acknowledged {r.acked:,})",
            f"  results out:   {r.results:,} roll-ups on {r.topics} topics (sensor.<id>), "
            f"covering {r.delivered:,} records",
            f"  throughput:    {r.rate:,.0f} records/s over {r.elapsed:.2f} s, {r.workers} workers",
            f"  lost {r.lost:,}, duplicated {r.duplicated:,}  (counted per sensor against what was sent)",
        ]
    )
