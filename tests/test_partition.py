"""A sink cut off from the network, between hosts made of network namespaces: nothing is
dead-lettered, intake flows again within seconds of the heal, and every record arrives once.

The hosts are the test's own: a sink host and a client host with a router between them, all
network namespaces joined by veth pairs (tests/netns.py), with documentation addresses, so
nothing leaves them. Needs root and iproute2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from tests import netns
from tests.checker import check, from_json_lines
from tests.helpers import ROOT, Feed, Role, wait_for
from tests.netns import Network

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable())),
]

CUT = 15.0  # long enough for TCP's retransmit timer to back off past 5 s
HEAL_TARGET = 5.0


@pytest.fixture
def hosts():
    """A sink host and a client host, and a router between them."""
    net = Network(["sink", "client"])
    try:
        net.make()
        yield net
    finally:
        net.remove()


def status(ns: str, port: int) -> dict:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "zfan",
            "status",
            "--json",
            f"--control=tcp://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_sink_cut_off_for_15_s_dead_letters_nothing_and_takes_batches_again_within_5_s(hosts, tmp_path):
    sink_ns = hosts.ns["sink"]
    on_sink, on_client = hosts.on("sink"), hosts.on("client")
    ports = {"intake": 5557, "control": 5558, "results": 5559}
    remote = {n: f"--{n}=tcp://{hosts.addr['sink']}:{port}" for n, port in ports.items()}
    started: list[Role] = []

    def role(*args: str, prefix: tuple[str, ...], **kw) -> Role:
        r = Role(*args, prefix=prefix, **kw)
        started.append(r)
        return r

    try:
        # --max-attempts 1: a single attempt charged for the cut would dead-letter its batch.
        sink = role(
            "sink",
            "--ledger",
            str(tmp_path / "z.db"),
            "--max-attempts",
            "1",
            *[f"--{n}=tcp://*:{port}" for n, port in ports.items()],
            prefix=on_sink,
        )
        sink.wait_ready()
        for i in range(2):
            role(
                "worker", remote["control"], "--app", "tests.apps:ids", "--name", f"remote-{i}", prefix=on_client
            ).wait_ready()
        sub = role("subscribe", remote["results"], remote["control"], "--topic", "readings", prefix=on_client)
        sub.wait_ready()
        prod = role(
            "produce",
            remote["intake"],
            remote["control"],
            "--topic",
            "readings",
            "--timeout",
            "60",
            stdin=subprocess.PIPE,
            prefix=on_client,
        )
        prod.wait_ready()
        feed = Feed(prod.proc, rate=4000)
        wait_for(lambda: status(sink_ns, ports["control"]).get("batches_in", 0) >= 10, 20, what="intake flowing")

        hosts.blackhole("sink", "client")  # both ways
        threading.Event().wait(CUT)  # the fault's length, not a wait for anything
        stored = status(sink_ns, ports["control"])["batches_in"]
        hosts.unblackhole("sink", "client")
        healed = time.monotonic()
        wait_for(
            lambda: status(sink_ns, ports["control"])["batches_in"] > stored,
            30,
            interval=0.1,
            what="a new batch stored after the heal",
        )
        back = time.monotonic() - healed
        assert back < HEAL_TARGET, f"intake flowed again {back:.1f} s after the heal"

        total = feed.finish()
        assert prod.wait(90) == 0, prod.stderr
        wait_for(lambda: len(from_json_lines(list(sub.out))[0]) >= total, 60, what="every record at the subscriber")
        ids, seqs = from_json_lines(list(sub.out))
        verdict = check(range(total), ids, seqs)
        assert verdict.ok, verdict
        info = status(sink_ns, ports["control"])
        assert info["dead"] == 0, info
        assert "dead-lettered" not in sink.stderr
    finally:
        for r in reversed(started):
            r.kill()
