"""What serving metrics costs: zfan's throughput with the sink's HTTP port on and read every
second (/metrics and /api/status, as Prometheus and an open dashboard would), against the same
pipeline with no HTTP port, in interleaved pairs on the same machine.

    python bench/metrics_cost.py [--pairs 6] [--sizes 10,1000]

The counters and histograms themselves are always kept (they are how `zfan status` knows its
rates); what this adds on top is the HTTP thread, the snapshots it asks the sink's thread for,
and their exposition. The target: at most 3 % off (a ratio of at least 0.97).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.throughput import make_batches, run_zfan  # noqa: E402

RECORDS = {1: 5_000, 10: 50_000, 100: 200_000, 1000: 500_000}


def measure(size: int, pairs: int) -> dict[str, float]:
    batches = make_batches(RECORDS.get(size, 500_000), size)
    off: list[int] = []
    on: list[int] = []
    for i in range(pairs):
        for scraped in (False, True) if i % 2 == 0 else (True, False):
            res = run_zfan(batches, 1, scraped=scraped)
            if not res["records_per_s"]:
                raise SystemExit(f"records lost or duplicated at batches of {size}: {res}")
            (on if scraped else off).append(res["records_per_s"])
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
            f"batches of {size:,}: {r['off']:,.0f} records/s without HTTP, {r['on']:,.0f} with it read every second; "
            f"on / off {r['ratio']:.3f} (median of {r['pairs']} interleaved pairs)",
            flush=True,
        )


if __name__ == "__main__":
    main()
