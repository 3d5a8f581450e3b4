"""The two ledgers side by side: zfan's whole pipeline with its ledger in SQLite (a file beside
the sink) and in PostgreSQL (a server on this machine, over loopback), in interleaved pairs in
one run.

    python bench/ledgers.py [--pairs 3] [--sizes 10,100,1000] [--postgres DSN] [--out FILE]

Throughput: records/s from a producer process through the sink and one local worker to a
subscriber that checks every record once (bench/throughput.py). Latency: p50 and p99 from send()
to the subscriber at one rate for both, half of what the PostgreSQL ledger carried at batches
of 1000 (bench/latency.py). Each PostgreSQL run has a schema of its own, dropped after it.

Without --postgres (or ZFAN_BENCH_POSTGRES), a private server is started for the run with
.ci/postgres (Debian's postgresql package) in a temporary folder, and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import latency  # noqa: E402
from bench.throughput import make_batches, run_zfan  # noqa: E402

RECORDS = {10: 100_000, 100: 300_000, 1000: 600_000}  # runs of a few seconds each
LATENCY_SECONDS = 5.0


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[str]:
    """The DSN of a PostgreSQL server: the one given, or a private one for the run."""
    if dsn:
        yield dsn
        return
    folder = tempfile.mkdtemp(prefix="zfan-bench-pg-")
    os.chmod(folder, 0o755)  # as root, the server runs as the postgres user
    script = os.path.join(ROOT, ".ci", "postgres")
    try:
        out = subprocess.run([script, "start", f"{folder}/pg"], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"could not start PostgreSQL: {out.stderr.strip()}")
        yield out.stdout.strip()
    finally:
        subprocess.run([script, "stop", f"{folder}/pg"], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def schema(base: str) -> Iterator[str]:
    """A fresh schema on the server, as a DSN whose search_path is it; dropped at the end."""
    import psycopg

    name = f"zfan_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {name}")
    joiner = "&" if "?" in base else "?"
    try:
        yield f"{base}{joiner}options={quote(f'-csearch_path={name}', safe='')}"
    finally:
        with psycopg.connect(base, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {name} CASCADE")


def throughput(base: str, size: int, pairs: int, records: int | None = None) -> dict[str, Any]:
    batches = make_batches(records or RECORDS.get(size, 300_000), size)
    rates: dict[str, list[int]] = {"sqlite": [], "postgres": []}
    for i in range(pairs):
        for kind in ("sqlite", "postgres") if i % 2 == 0 else ("postgres", "sqlite"):
            with contextlib.ExitStack() as stack:
                ledger = stack.enter_context(schema(base)) if kind == "postgres" else None
                res = run_zfan(batches, 1, ledger=ledger)
            if not res["records_per_s"]:
                raise SystemExit(f"records lost or duplicated on {kind} at batches of {size}: {res}")
            rates[kind].append(res["records_per_s"])
    ratios = [pg / lite for lite, pg in zip(rates["sqlite"], rates["postgres"], strict=True)]
    return {
        "batch_size": size,
        "sqlite": statistics.median(rates["sqlite"]),
        "postgres": statistics.median(rates["postgres"]),
        "ratio": round(statistics.median(ratios), 3),
        "pairs": pairs,
    }


def latencies(base: str, rate: float, seconds: float = LATENCY_SECONDS) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in ("sqlite", "postgres"):
        with contextlib.ExitStack() as stack:
            ledger = stack.enter_context(schema(base)) if kind == "postgres" else None
            out[kind] = latency.measure(rate, seconds, 1000, ledger=ledger)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--sizes", default="10,100,1000", help="batch sizes, comma-separated")
    ap.add_argument("--postgres", default=os.environ.get("ZFAN_BENCH_POSTGRES"), help="a server's DSN")
    ap.add_argument("--out", default=None, help="also write the lines to this file")
    args = ap.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with server(args.postgres) as base:
        results = [throughput(base, int(s), args.pairs) for s in args.sizes.split(",")]
        for r in results:
            say(
                f"batches of {r['batch_size']:,}: SQLite {r['sqlite']:,.0f} records/s, PostgreSQL "
                f"{r['postgres']:,.0f}; PostgreSQL / SQLite {r['ratio']:.3f} (median of {r['pairs']} pairs)"
            )
        top = next((r for r in results if r["batch_size"] == 1000), results[-1])
        rate = top["postgres"] / 2
        lat = latencies(base, rate)
        for kind, name in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
            r = lat[kind]
            say(
                f"latency at {rate:,.0f} records/s, batches of 1000: {name} p50 {r.get('p50_ms')} ms, "
                f"p99 {r.get('p99_ms')} ms (lost {r['lost']}, duplicated {r['duplicated']})"
            )
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
