"""Two apps on one sink, each with its own route and retry policy; a bug, its dead letters, the
fix, and the requeue. Exits 0 once every order and every audit record came out exactly once.

    python examples/routed_apps.py

- Topics `orders.*` go to the orders app, `audit.*` to the audit app: neither sees the other's.
- The orders app's database fails now and then (ConnectionError): its route retries those after a
  short backoff. An order without a price is a bug (KeyError): not worth a retry, dead-lettered
  at once.
- Once the app is fixed, the dead letters are requeued, and go through once.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time

from zfan import (
    Producer,
    RetryPolicy,
    Sink,
    Subscriber,
    Worker,
    dead_letters,
    requeue_dead_letters,
)

ORDERS, AUDIT = 2000, 500
fixed = threading.Event()  # the bug fix, deployed
flaky = random.Random(7)


def orders(records: list[dict]) -> list[dict]:
    if flaky.random() < 0.2:
        raise ConnectionError("database unavailable")  # retried after a backoff
    out = []
    for r in records:
        price = r.get("price", 0.0) if fixed.is_set() else r["price"]  # the bug: no price, KeyError
        out.append({"id": r["id"], "total": price * r["qty"]})
    return out


def audit(records: list[dict]) -> list[dict]:
    return [{"id": r["id"], "seen": True} for r in records]


def main() -> int:
    folder = tempfile.mkdtemp(prefix="zfan-example-")
    ends = {k: f"ipc://{folder}/{k}" for k in ("intake", "control", "results")}
    retries = {"orders": RetryPolicy(max_attempts=5, backoff=(0.05, 0.5), retry_on=("ConnectionError",))}
    try:
        with (
            Sink(
                ledger=f"{folder}/zfan.db", routes={"orders.": "orders", "audit.": "audit"}, retries=retries, **ends
            ) as sink,
            Worker(orders, control=sink.control, route="orders"),
            Worker(audit, control=sink.control, route="audit"),
            Subscriber(results=sink.results, control=sink.control, topics=["orders.", "audit."]) as sub,
        ):
            sub.wait_ready(10)
            with Producer(intake=sink.intake, control=sink.control, batch_size=50) as prod:
                prod.send_many(
                    ({"id": i, "qty": 1 + i % 3, **({"price": 9.5} if i % 400 else {})} for i in range(ORDERS)),
                    topic="orders.eu",
                )
                prod.send_many(({"id": i, "user": f"u{i % 7}"} for i in range(AUDIT)), topic="audit.login")
                outcomes = prod.join(60)
            dead = list(dead_letters(sink.control))
            print(f"{outcomes.done_batches} batch(es) processed, {outcomes.dead_batches} dead-lettered:")
            for d in dead:
                print(f"  batch {d['batch_id']} ({d['topic']}, {d['records']} records): {d['error']}")

            fixed.set()
            requeued = requeue_dead_letters(sink.control, every=True)
            print(f"fixed; {requeued['requeued']} batch(es) requeued")

            seen: dict[str, list[int]] = {"orders.eu": [], "audit.login": []}
            deadline = time.monotonic() + 60
            while len(seen["orders.eu"]) < ORDERS or len(seen["audit.login"]) < AUDIT:
                if time.monotonic() > deadline:
                    break
                msg = sub.recv(0.5)
                if msg is not None:
                    seen[msg.topic] += [r["id"] for r in msg.records]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ok = sorted(seen["orders.eu"]) == list(range(ORDERS)) and sorted(seen["audit.login"]) == list(range(AUDIT))
    verdict = "exactly once" if ok else "FAILED"
    print(f"orders {len(seen['orders.eu']):,}, audit {len(seen['audit.login']):,}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
