"""Failover: two sinks on one PostgreSQL ledger, one active and one standing by; clients that
name both follow the active one. Killed (SIGKILL) or frozen (SIGSTOP) mid-stream, the active
sink is replaced by the standby within seconds, every record arrives once, and a frozen sink
that wakes up steps down without a write landing.

Real processes throughout: the sinks, workers, producer and subscriber are `zfan` commands, the
ledger a schema of the test's own on the server ZFAN_TEST_POSTGRES names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psycopg
import pytest

from tests import ledgers
from tests.checker import check, from_json_lines
from tests.helpers import Feed, Role, free_ports, run_cli, wait_for

pytestmark = pytest.mark.timeout(180)

KINDS = ("intake", "control", "results")


def status(port: int) -> dict:
    out = run_cli("status", "--json", f"--control=tcp://127.0.0.1:{port}", timeout=20)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def answers(port: int) -> dict | None:
    """The status of the sink on this control port, or None if none answers."""
    out = run_cli("status", "--json", "--timeout", "1", f"--control=tcp://127.0.0.1:{port}", timeout=20)
    return json.loads(out.stdout) if out.returncode == 0 else None


def leader(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn, autocommit=True) as db:
        row = db.execute("SELECT epoch, holder FROM leader").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


class Pipeline:
    """Two sinks on one ledger (A starts first, so it is active), and the clients of both."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.ports = {"a": free_ports(3), "b": free_ports(3)}
        self.started: list[Role] = []
        self.frozen: list[Role] = []
        # Every client names both sinks, A's endpoints first.
        self.both = {
            kind: f"--{kind}=tcp://127.0.0.1:{a},tcp://127.0.0.1:{b}"
            for kind, a, b in zip(KINDS, self.ports["a"], self.ports["b"], strict=True)
        }

    def role(self, *args: str, **kw) -> Role:
        r = Role(*args, **kw)
        self.started.append(r)
        return r

    def sink(self, name: str) -> Role:
        bound = [f"--{kind}=tcp://127.0.0.1:{port}" for kind, port in zip(KINDS, self.ports[name], strict=True)]
        # --max-attempts 1: a lease charged to a batch for the takeover would dead-letter it.
        return self.role("sink", "--ledger", self.dsn, "--max-attempts", "1", *bound)

    def control(self, name: str) -> int:
        return self.ports[name][1]

    def freeze(self, r: Role) -> None:
        os.killpg(r.proc.pid, signal.SIGSTOP)
        self.frozen.append(r)

    def thaw(self, r: Role) -> None:
        os.killpg(r.proc.pid, signal.SIGCONT)
        self.frozen.remove(r)

    def close(self) -> None:
        for r in self.frozen:
            os.killpg(r.proc.pid, signal.SIGCONT)
        for r in reversed(self.started):
            r.kill()


@pytest.fixture
def pipeline():
    with ledgers.schema() as dsn:
        pipe = Pipeline(dsn)
        try:
            yield pipe
        finally:
            pipe.close()


def start(pipe: Pipeline) -> tuple[Role, Role, Role, Role, Feed]:
    """A active, B standing by, two workers, a subscriber and a producer fed 2000 records/s."""
    a = pipe.sink("a")
    a.wait_ready()
    b = pipe.sink("b")
    wait_for(lambda: "standing by on ledger" in b.stderr, 15, what="sink B standing by")
    assert ": ready " not in b.stderr
    for i in range(2):
        pipe.role("worker", pipe.both["control"], "--app", "tests.apps:ids", "--name", f"w{i}").wait_ready()
    sub = pipe.role("subscribe", pipe.both["results"], pipe.both["control"], "--topic", "readings")
    sub.wait_ready()
    prod = pipe.role(
        "produce",
        pipe.both["intake"],
        pipe.both["control"],
        "--topic",
        "readings",
        "--timeout",
        "90",
        stdin=subprocess.PIPE,
    )
    prod.wait_ready()
    feed = Feed(prod.proc, rate=2000)
    wait_for(lambda: status(pipe.control("a")).get("batches_in", 0) >= 10, 20, what="intake flowing to A")
    return a, b, sub, prod, feed


def finish(pipe: Pipeline, b: Role, sub: Role, prod: Role, feed: Feed) -> None:
    """B took over: the stream goes on through it and ends with every record once."""
    b.wait_ready(timeout=30)
    taken = status(pipe.control("b")).get("batches_in", 0)
    wait_for(lambda: status(pipe.control("b")).get("batches_in", 0) > taken, 30, what="intake flowing to B")
    total = feed.finish()
    assert prod.wait(120) == 0, prod.stderr
    wait_for(lambda: len(from_json_lines(list(sub.out))[0]) >= total, 60, what="every record at the subscriber")
    ids, seqs = from_json_lines(list(sub.out))
    verdict = check(range(total), ids, seqs)
    assert verdict.ok, verdict
    info = status(pipe.control("b"))
    assert info["dead"] == 0 and info["epoch"] == 2, info


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_failover_when_the_active_sink_dies_delivers_every_record_once(pipeline, signum):
    a, b, sub, prod, feed = start(pipeline)
    if signum == signal.SIGKILL:
        a.kill()
    else:
        assert a.stop(40) == 0, a.stderr  # drains, and hands its claim over at once
    finish(pipeline, b, sub, prod, feed)
    assert leader(pipeline.dsn)[0] == 2


def test_failover_when_the_active_sink_is_frozen_and_wakes_it_steps_down_without_a_write(pipeline):
    a, b, sub, prod, feed = start(pipeline)
    pipeline.freeze(a)
    finish(pipeline, b, sub, prod, feed)
    epoch, holder = leader(pipeline.dsn)
    before = status(pipeline.control("b"))
    pipeline.thaw(a)
    wait_for(lambda: "stepped down" in a.stderr, 30, what="the old active sink stepping down")
    assert a.proc.poll() is None, "it stands by again, ready for a next takeover"
    # Nothing it held landed: the claim is B's still, and B's ledger counts what it did.
    assert leader(pipeline.dsn) == (epoch, holder)
    after = status(pipeline.control("b"))
    assert (after["done"], after["dead"], after["pending"]) == (before["done"], before["dead"], before["pending"])
    wait_for(lambda: answers(pipeline.control("a")) is None, 15, what="A's ports closed")
