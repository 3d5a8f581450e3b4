"""A sink cut off from the network, between hosts made of network namespaces: nothing is
dead-lettered, intake flows again within seconds of the heal, and every record arrives once.

The hosts are the test's own: a sink host and a client host with a router between them, all
network namespaces joined by veth pairs, with documentation addresses (TEST-NET-1 and -2), so
nothing leaves them. Needs root and iproute2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from tests.checker import check, from_json_lines
from tests.helpers import ROOT, Feed, Role, wait_for

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2 (CI has both)",
    ),
]

SINK_IP, ROUTER_SINK_SIDE = "192.0.2.1", "192.0.2.254"  # TEST-NET-1
CLIENT_IP, ROUTER_CLIENT_SIDE = "198.51.100.2", "198.51.100.254"  # TEST-NET-2
CUT = 15.0  # long enough for TCP's retransmit timer to back off past 5 s
HEAL_TARGET = 5.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Hosts:
    sink: str
    client: str
    router: str

    def cut(self) -> None:
        """The path between the hosts loses every packet, silently, both ways: what a dead link
        or switch does. Neither end gets an error it could act on (which a link taken down
        under its feet would give it)."""
        for addr in (SINK_IP, CLIENT_IP):
            ip("-n", self.router, "route", "add", "blackhole", f"{addr}/32")

    def heal(self) -> None:
        for addr in (SINK_IP, CLIENT_IP):
            ip("-n", self.router, "route", "del", "blackhole", f"{addr}/32")


@pytest.fixture
def hosts():
    """Three namespaces: a sink host and a client host, and a router between them."""
    tag = f"{os.getpid() % 100000}"
    h = Hosts(f"zfan-s{tag}", f"zfan-c{tag}", f"zfan-r{tag}")
    links = (
        (h.sink, f"zs{tag}", SINK_IP, f"zrs{tag}", ROUTER_SINK_SIDE),
        (h.client, f"zc{tag}", CLIENT_IP, f"zrc{tag}", ROUTER_CLIENT_SIDE),
    )
    try:
        for ns in (h.sink, h.client, h.router):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "netns", "exec", h.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        for ns, dev, addr, router_dev, gateway in links:
            ip("link", "add", dev, "type", "veth", "peer", "name", router_dev)
            ip("link", "set", dev, "netns", ns)
            ip("link", "set", router_dev, "netns", h.router)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", h.router, "addr", "add", f"{gateway}/24", "dev", router_dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", h.router, "link", "set", router_dev, "up")
            ip("-n", ns, "route", "add", "default", "via", gateway)
        yield h
    finally:
        for ns in (h.sink, h.client, h.router):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


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
    sink_ns = hosts.sink
    on_sink, on_client = ("ip", "netns", "exec", hosts.sink), ("ip", "netns", "exec", hosts.client)
    ports = {"intake": 5557, "control": 5558, "results": 5559}
    remote = {n: f"--{n}=tcp://{SINK_IP}:{port}" for n, port in ports.items()}
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

        hosts.cut()
        threading.Event().wait(CUT)  # the fault's length, not a wait for anything
        stored = status(sink_ns, ports["control"])["batches_in"]
        hosts.heal()
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
