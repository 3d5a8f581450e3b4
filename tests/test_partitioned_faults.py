"""Partitioned sinks under faults, as separate processes: one sink killed and restarted, and one
sink's host cut off from the network and healed. Its keys stall and then resume; every other key
flows throughout; at the end the subscriber has every record once, each (sink, topic) in seq
order, and each key's records in the order they were sent.

The pipeline: three `zfan sink`s, one `zfan worker --sinks` spanning them (one worker, so that a
key's batches run in the order the sink stored them), a `zfan produce --sinks --key key` fed
records at a steady pace, and a `zfan subscribe --sinks`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections import defaultdict

import pytest

from tests import netns
from tests.checker import check, from_json_lines
from tests.helpers import Feed, Role, wait_for
from tests.netns import Network
from zfan.partitions import parse_sinks, partition_of

KEYS = 30
RATE = 2000  # records/s the feed writes
DOWN = 8.0  # seconds a sink is away: long enough for its keys to pile up
# A window of 64 batches: at 20 small batches a second, a sink's keys would fill it in 3 s if
# batches lingered while their sink is away; they fill up to their size instead.
WINDOW = ("--window", "64")


def keyed(i: int) -> dict:
    """Record i: KEYS keys in turn, so that a key's records are in the order of their ids."""
    return {"id": i, "key": f"k{i % KEYS}"}


class Stream:
    """A subscriber's output read as it comes: records of each partition, keys' order, seqs."""

    def __init__(self, sub: Role) -> None:
        self.sub = sub

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in list(self.sub.out)]

    def records_of(self, partition: int | None = None) -> int:
        return sum(len(m["records"]) for m in self.messages() if partition is None or m["partition"] == partition)

    def others(self, away: int) -> int:
        return sum(len(m["records"]) for m in self.messages() if m["partition"] != away)

    def check(self, total: int) -> None:
        ids, seqs = from_json_lines(list(self.sub.out))
        verdict = check(range(total), ids, seqs)
        assert verdict.ok, verdict
        by_key: dict[str, list[int]] = defaultdict(list)
        for m in self.messages():
            for r in m["records"]:
                assert partition_of(r["key"], 3) == m["partition"], r
                by_key[r["key"]].append(r["id"])
        bad = sorted(k for k, ids in by_key.items() if ids != sorted(ids))
        assert not bad, f"keys whose records came out of order: {bad}"


def keep_flowing(stream: Stream, away: int, seconds: float) -> None:
    """While partition `away` is down: the others' records keep arriving, second after second."""
    end = threading.Event()
    for second in range(int(seconds)):
        before = stream.others(away)
        wait_for(
            lambda b=before: stream.others(away) > b,
            5,
            interval=0.05,
            what=f"the other sinks' records to keep arriving ({second} s into the fault)",
        )
        end.wait(max(0.0, 1.0 - 0.05))  # the fault's length, not a wait for anything


@pytest.mark.timeout(180)
def test_a_sink_killed_and_restarted_mid_stream_holds_back_only_its_keys(tmp_path, roles):
    folders = [tmp_path / f"p{i}" for i in range(3)]
    spec = ",".join(f"ipc://{f}" for f in folders)
    parts = parse_sinks(spec)

    def start_sink(i: int) -> Role:
        folders[i].mkdir(exist_ok=True)
        s = roles(
            "sink",
            "--ledger",
            str(folders[i] / "z.db"),
            f"--intake={parts[i].intake}",
            f"--control={parts[i].control}",
            f"--results={parts[i].results}",
        )
        s.wait_ready()
        return s

    sinks = [start_sink(i) for i in range(3)]
    sub = roles("subscribe", "--sinks", spec)
    sub.wait_ready()
    roles("worker", "--sinks", spec, "--app", "tests.apps:echo").wait_ready()
    prod = roles("produce", "--sinks", spec, "--key", "key", *WINDOW, "--timeout", "60", stdin=subprocess.PIPE)
    prod.wait_ready()
    feed = Feed(prod.proc, rate=RATE, record=keyed)
    stream = Stream(sub)
    away = 1
    wait_for(lambda: stream.records_of(away) >= 500, 20, what="records through the sink to be killed")

    sinks[away].proc.send_signal(signal.SIGKILL)
    sinks[away].proc.wait()
    keep_flowing(stream, away, DOWN)
    held = stream.records_of(away)
    sinks[away] = start_sink(away)
    wait_for(lambda: stream.records_of(away) > held, 20, what="the restarted sink's keys to flow again")

    total = feed.finish()
    assert prod.wait(90) == 0, prod.stderr
    wait_for(lambda: stream.records_of() >= total, 60, what=f"{total} records at the subscriber")
    stream.check(total)


@pytest.fixture
def hosts():
    """Three sink hosts and a client host, with a router between them."""
    net = Network(["s0", "s1", "s2", "client"])
    try:
        net.make()
        yield net
    finally:
        net.remove()


@pytest.mark.timeout(180)
@pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))
def test_a_sinks_host_cut_off_stalls_only_its_keys_and_they_resume_once_healed(hosts, tmp_path, roles):
    # Each sink on its own host, on the default ports; the clients name the hosts alone.
    spec = ",".join(hosts.addr[f"s{i}"] for i in range(3))
    on_client = hosts.on("client")
    sinks = [
        roles(
            "sink",
            "--ledger",
            str(tmp_path / f"s{i}.db"),
            "--intake=tcp://*:5557",
            "--control=tcp://*:5558",
            "--results=tcp://*:5559",
            prefix=hosts.on(f"s{i}"),
        )
        for i in range(3)
    ]
    for sink in sinks:
        sink.wait_ready()
    sub = roles("subscribe", "--sinks", spec, prefix=on_client)
    sub.wait_ready()
    worker = roles("worker", "--sinks", spec, "--app", "tests.apps:echo", prefix=on_client)
    worker.wait_ready()
    prod = roles(
        "produce", "--sinks", spec, "--key", "key", *WINDOW, "--timeout", "60", stdin=subprocess.PIPE, prefix=on_client
    )
    prod.wait_ready()
    feed = Feed(prod.proc, rate=RATE, record=keyed)
    stream = Stream(sub)
    away = 1
    wait_for(lambda: stream.records_of(away) >= 500, 20, what="records through the host to be cut")

    hosts.blackhole(f"s{away}")  # nothing in or out, and no error at either end
    keep_flowing(stream, away, DOWN)
    held = stream.records_of(away)
    hosts.unblackhole(f"s{away}")
    wait_for(lambda: stream.records_of(away) > held, 30, what="the healed sink's keys to flow again")

    total = feed.finish()
    assert prod.wait(90) == 0, prod.stderr
    wait_for(lambda: stream.records_of() >= total, 60, what=f"{total} records at the subscriber")
    stream.check(total)
    assert "dead-lettered" not in "".join(r.stderr for r in (*sinks, worker, prod))
