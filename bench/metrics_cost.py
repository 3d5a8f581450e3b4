"""What metrics cost: zfan's throughput with metrics on, against the same pipeline with them
off, in interleaved pairs on the same machine.

    python bench/metrics_cost.py [--pairs 6] [--sizes 10,1000]

On: the sink keeps its counters and histograms for every batch and result, and serves HTTP,
whose /metrics and /api/status a thread reads every second, as Prometheus and an open dashboard
would. Off: no HTTP port, and the hooks that run for every batch and result do nothing (the
sink always counts, since `zfan status` reads its rates; only the benchmark can turn it off).
The target: at most 3 % off (a ratio of at least 0.97).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.throughput import make_batches, run_zfan  # noqa: E402

RECORDS = {1: 20_000, 10: 200_000, 100: 500_000, 1000: 1_000_000}  # runs of a few seconds each


def measure(size: int, pairs: int) -> dict[str, float]:
    batches = make_batches(RECORDS.get(size, 500_000), size)
    off: list[int] = []
    on: list[int] = []
    for i in range(pairs):
        for metered in (False, True) if i % 2 == 0 else (True, False):
            res = run_zfan(batches, 1, scraped=metered, counted=metered)
            if not res["records_per_s"]:
                raise SystemExit(f"records lost or duplicated at batches of {size}: {res}")
            (on if metered else off).append(res["records_per_s"])
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    return {
        "off": statistics.median(off),
        "on": statistics.median(on),
        "ratio": round(statistics.median(ratios), 3),
        "pairs": pairs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--sizes", default="10,1000", help="batch sizes, comma-separated")
    args = ap.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.pairs)
        print(
            f"batches of {size:,}: {r['off']:,.0f} records/s with metrics off, {r['on']:,.0f} with them on "
            f"and read every second; on / off {r['ratio']:.3f} (median of {r['pairs']} interleaved pairs)",
            flush=True,
        )


if __name__ == "__main__":
    main()
