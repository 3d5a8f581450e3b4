"""Failover: two sinks on one PostgreSQL ledger, one active and one standing by; clients that
name both follow the active one. Killed (SIGKILL) or frozen (SIGSTOP) mid-stream, the active
sink is replaced by the standby within seconds, every record arrives once, and a frozen sink
that wakes up steps down without a write landing.

Real processes throughout: the sinks, workers, producer and subscriber are `zfan` commands, the
ledger a schema of the test's own on the server ZFAN_TEST_POSTGRES names.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

import psycopg
import pytest

from tests import ledgers, netns
from tests.checker import check, from_json_lines
from tests.helpers import ROOT, Feed, Role, free_ports, run_cli, wait_for
from tests.netns import Network

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


def clients(role: Callable[..., Role], both: dict[str, str], flowing: Callable[[], bool]) -> tuple[Role, Role, Feed]:
    """Two workers, a subscriber and a producer fed 2000 records/s, each naming both sinks, all
    started with `role`; returns once `flowing` says intake flows."""
    for i in range(2):
        role("worker", both["control"], "--app", "tests.apps:ids", "--name", f"w{i}").wait_ready()
    sub = role("subscribe", both["results"], both["control"], "--topic", "readings")
    sub.wait_ready()
    prod = role(
        "produce", both["intake"], both["control"], "--topic", "readings", "--timeout", "90", stdin=subprocess.PIPE
    )
    prod.wait_ready()
    feed = Feed(prod.proc, rate=2000)
    wait_for(flowing, 30, what="intake flowing to A")
    return sub, prod, feed


def delivered_once(sub: Role, prod: Role, feed: Feed) -> None:
    """The feed ends; the producer exits 0 and the subscriber has every record once, in order."""
    total = feed.finish()
    assert prod.wait(120) == 0, prod.stderr
    wait_for(lambda: len(from_json_lines(list(sub.out))[0]) >= total, 60, what="every record at the subscriber")
    ids, seqs = from_json_lines(list(sub.out))
    verdict = check(range(total), ids, seqs)
    assert verdict.ok, verdict


def start(pipe: Pipeline) -> tuple[Role, Role, Role, Role, Feed]:
    """A active, B standing by, and the clients."""
    a = pipe.sink("a")
    a.wait_ready()
    b = pipe.sink("b")
    wait_for(lambda: "standing by on ledger" in b.stderr, 15, what="sink B standing by")
    assert ": ready " not in b.stderr
    sub, prod, feed = clients(pipe.role, pipe.both, lambda: status(pipe.control("a")).get("batches_in", 0) >= 10)
    return a, b, sub, prod, feed


def finish(pipe: Pipeline, b: Role, sub: Role, prod: Role, feed: Feed) -> None:
    """B took over: the stream goes on through it and ends with every record once."""
    b.wait_ready(timeout=30)
    taken = status(pipe.control("b")).get("batches_in", 0)
    wait_for(lambda: status(pipe.control("b")).get("batches_in", 0) > taken, 30, what="intake flowing to B")
    delivered_once(sub, prod, feed)
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
    # `zfan status` given both sinks answers from the active one.
    out = run_cli("status", "--json", pipeline.both["control"], timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["epoch"] == 2


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


# --- across hosts: the active sink's link goes down ---------------------------------------------

HOSTS = ["db", "sa", "sb", "wk", "pr", "su"]  # the ledger's, sink A's and B's, workers', producer's, subscriber's
POSTGRES_SCRIPT = os.path.join(ROOT, ".ci", "postgres")


def netns_ready() -> str | None:
    """Why the cross-host test cannot run here, if it cannot."""
    if netns.unavailable() is not None:
        return netns.unavailable()
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        return "no PostgreSQL server binaries (Debian's postgresql package)"
    return None


@pytest.fixture
def hosts():
    why = netns_ready()
    if why is not None:
        if os.environ.get("ZFAN_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    h = Network(HOSTS)
    folder = tempfile.mkdtemp(prefix="zfan-failover-")
    os.chmod(folder, 0o755)  # the server runs as the postgres user
    try:
        h.make()
        # The ledger's server, on the db host alone: the sinks reach it over the router.
        out = subprocess.run(
            [*h.on("db"), POSTGRES_SCRIPT, "start", os.path.join(folder, "pg")],
            env={**os.environ, "LISTEN": h.addr["db"], "PORT": "5432"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        # The ledger as the sinks reach it, and over its Unix socket, for the test on no host.
        yield h, out.stdout.strip(), f"postgresql://zfan@/postgres?host={folder}/pg&port=5432"
    finally:
        subprocess.run([POSTGRES_SCRIPT, "stop", os.path.join(folder, "pg")], capture_output=True, timeout=60)
        h.remove()
        shutil.rmtree(folder, ignore_errors=True)


def status_on(hosts: Network, host: str, timeout: float = 2.0) -> dict | None:
    """The status of the sink on `host` (asked on its own loopback), or None if none answers."""
    out = subprocess.run(
        [*hosts.on(host), sys.executable, "-m", "zfan", "status", "--json", "--timeout", str(timeout)]
        + ["--control=tcp://127.0.0.1:5558"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_failover_when_the_active_sinks_host_is_cut_off_the_standby_takes_over_and_the_old_one_steps_down(hosts):
    hosts, dsn, socket_dsn = hosts
    ports = {"intake": 5557, "control": 5558, "results": 5559}
    both = {
        kind: f"--{kind}=tcp://{hosts.addr['sa']}:{port},tcp://{hosts.addr['sb']}:{port}"
        for kind, port in ports.items()
    }
    started: list[Role] = []

    def role(host: str, *args: str, **kw) -> Role:
        r = Role(*args, prefix=hosts.on(host), **kw)
        started.append(r)
        return r

    def sink(host: str) -> Role:
        bound = [f"--{kind}=tcp://*:{port}" for kind, port in ports.items()]
        return role(host, "sink", "--ledger", dsn, "--max-attempts", "1", *bound)

    try:
        a = sink("sa")
        a.wait_ready()
        b = sink("sb")
        wait_for(lambda: "standing by on ledger" in b.stderr, 20, what="sink B standing by")
        on = {"worker": "wk", "subscribe": "su", "produce": "pr"}
        sub, prod, feed = clients(
            lambda *args, **kw: role(on[args[0]], *args, **kw),
            both,
            lambda: (status_on(hosts, "sa") or {}).get("batches_in", 0) >= 10,
        )

        hosts.link_down("sa")
        b.wait_ready(timeout=30)
        wait_for(lambda: (status_on(hosts, "sb") or {}).get("batches_in", 0) >= 10, 30, what="intake flowing to B")
        # A, cut off from its ledger too, finds out by itself and stops serving.
        wait_for(lambda: "stepped down" in a.stderr, 30, what="A stepping down while cut off")
        hosts.link_up("sa")
        delivered_once(sub, prod, feed)
        # Healed, A stands by: B holds the claim it took, and nothing A held landed.
        wait_for(lambda: a.stderr.count("standing by on ledger") >= 1, 30, what="A standing by after the heal")
        assert a.proc.poll() is None
        assert leader(socket_dsn)[0] == 2
        info = status_on(hosts, "sb")
        assert info is not None and info["epoch"] == 2 and info["dead"] == 0, info
        assert status_on(hosts, "sa", timeout=1.0) is None, "A serves nothing while B is active"
    finally:
        for r in reversed(started):
            r.kill()


# --- the database itself goes away ----------------------------------------------------------------


@pytest.fixture
def private_postgres():
    """A PostgreSQL server of the test's own, which it may stop and start: (start, stop, dsn)."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        why = "no PostgreSQL server binaries (Debian's postgresql package)"
        if os.environ.get("ZFAN_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    folder = tempfile.mkdtemp(prefix="zfan-pg-")
    os.chmod(folder, 0o755)  # as root, the server runs as the postgres user
    (port,) = free_ports(1)
    cluster = os.path.join(folder, "pg")

    def start() -> str:
        out = subprocess.run(
            [POSTGRES_SCRIPT, "start", cluster],
            env={**os.environ, "PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def stop() -> None:
        subprocess.run([POSTGRES_SCRIPT, "stop", cluster], capture_output=True, timeout=60, check=True)

    try:
        yield start, stop
    finally:
        subprocess.run([POSTGRES_SCRIPT, "stop", cluster], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_failover_when_the_database_restarts_the_sink_stands_by_and_serves_again(private_postgres):
    start_db, stop_db = private_postgres
    dsn = start_db()
    intake, control, results = (f"--{k}=tcp://127.0.0.1:{p}" for k, p in zip(KINDS, free_ports(3), strict=True))
    started: list[Role] = []

    def role(*args: str, **kw) -> Role:
        r = Role(*args, **kw)
        started.append(r)
        return r

    try:
        sink = role("sink", "--ledger", dsn, "--max-attempts", "1", intake, control, results)
        sink.wait_ready()
        role("worker", control, "--app", "tests.apps:ids").wait_ready()
        sub = role("subscribe", results, control, "--topic", "readings")
        sub.wait_ready()
        prod = role("produce", intake, control, "--topic", "readings", "--timeout", "90", stdin=subprocess.PIPE)
        prod.wait_ready()
        feed = Feed(prod.proc, rate=2000)
        port = int(control.rsplit(":", 1)[1])
        wait_for(lambda: status(port).get("batches_in", 0) >= 10, 20, what="intake flowing")

        stop_db()  # at once (immediate mode): the sink's connection breaks mid-stream
        wait_for(lambda: "stepped down" in sink.stderr, 20, what="the sink stepping down")
        assert answers(port) is None, "a sink without its ledger serves nothing"
        assert start_db() == dsn
        wait_for(lambda: sink.stderr.count(": ready ") == 2, 30, what="the sink serving again")

        delivered_once(sub, prod, feed)
        assert status(port)["epoch"] == 2
    finally:
        for r in reversed(started):
            r.kill()


# --- clients given several sinks: what a person reads ---------------------------------------------


def test_failover_clients_with_no_sink_at_any_endpoint_say_so_in_one_line_and_exit_6():
    a, b, c, d = free_ports(4)
    out = run_cli(
        "produce",
        f"--intake=tcp://127.0.0.1:{a},tcp://127.0.0.1:{b}",
        f"--control=tcp://127.0.0.1:{c},tcp://127.0.0.1:{d}",
        "--count",
        "10",
        "--connect-timeout",
        "1",
    )
    assert out.returncode == 6, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"zfan produce: error: no zfan sink answered at any of tcp://127.0.0.1:{c},tcp://127.0.0.1:{d} "
        "within 1 s: is one of them running, and are these their control ports?"
    )


def test_failover_endpoint_lists_of_different_lengths_are_refused_in_one_line():
    out = run_cli("produce", "--intake=tcp://a:5557,tcp://b:5557", "--control=tcp://a:5558", "--count", "1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "zfan produce: error: endpoints name the sinks in one order, as many of each kind: got 2 intake, 1 control"
    )


# --- the embedded API ------------------------------------------------------------------------------


def ipc_ends(folder, name: str) -> dict[str, str]:
    return {kind: f"ipc://{folder}/{name}-{kind}" for kind in KINDS}


def test_failover_in_the_api_a_standby_starts_waits_and_takes_over_when_the_active_sink_drains(tmp_path, ctx):
    from tests.test_observability import get
    from zfan import Sink

    def ends(name: str) -> dict[str, str]:
        return ipc_ends(tmp_path, name)

    with ledgers.schema() as dsn:
        states: list[str] = []
        a = Sink(ledger=dsn, context=ctx, **ends("a")).start()
        b = Sink(ledger=dsn, context=ctx, on_state=states.append, http="127.0.0.1:0", **ends("b"))
        try:
            b.start()
            assert b.standby and not b.wait_active(0.5) and b.control == ""
            code, body = get(b.http + "readyz")
            assert (code, json.loads(body)) == (
                503,
                {"ok": False, "reasons": ["standing by: another sink holds the ledger"]},
            )
            assert "zfan_sink_active 0.0" in get(b.http + "metrics")[1]
            assert a.drain()  # a clean stop hands the claim over at once
            assert b.wait_active(5)
            assert states == ["standby", "active"] and not b.standby and b.epoch == 2
            assert b.control == ends("b")["control"]
            assert "zfan_sink_active 1.0" in get(b.http + "metrics")[1]
        finally:
            a.close()
            b.drain()


def test_failover_sinks_with_a_heartbeat_longer_than_the_claims_term_keep_one_claim(tmp_path, ctx):
    from zfan import Sink
    from zfan.config import Timing
    from zfan.ledger.postgres import TERM

    slow = Timing(heartbeat=2 * TERM)  # an idle sink's loop would wait that long between turns
    with ledgers.schema() as dsn:
        a = Sink(ledger=dsn, context=ctx, timing=slow, **ipc_ends(tmp_path, "a")).start()
        b = Sink(ledger=dsn, context=ctx, timing=slow, **ipc_ends(tmp_path, "b"))
        try:
            b.start()
            assert a.active.is_set() and b.standby
            threading.Event().wait(2 * TERM)  # the span the claim must hold, not a wait for anything
            assert a.active.is_set() and b.standby and leader(dsn)[0] == 1, "the claim changed hands"
        finally:
            b.close()
            a.close()
