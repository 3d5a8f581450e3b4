"""An app that holds each batch for a while, so that a benchmark can kill a worker mid-batch.

    zfan worker --app bench.slow:hold          # holds each batch ZFAN_BENCH_HOLD seconds (2)

It writes one line on stderr as it starts a batch, stamped with CLOCK_MONOTONIC (which
time.monotonic() reads in every process on Linux), so that bench/recovery.py can tell when a
replayed batch reached a worker without asking the sink.
"""

from __future__ import annotations

import os
import sys
import time


def hold(records: list) -> list[dict]:
    print(f"bench.slow: hold start {time.monotonic():.6f} {len(records)}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("ZFAN_BENCH_HOLD", "2.0")))
    return [{"records": len(records)}]
