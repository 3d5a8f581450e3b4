"""The peer designs of bench/peers/ on their own private servers: every record through once, a
run past its deadline says what it lost, nothing left running or on disk, and a peer that cannot
run here says why in one line. (Their speed is measured by bench/run.py, never asserted here.)"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time

import pytest

from bench import run as bench_run
from bench.peers import nats_jetstream, parties, rabbitmq, redis_streams
from bench.throughput import make_batches

# RabbitMQ's node takes about 10 s to start: bench/run.py --quick runs it, this suite does not.
FAST = [redis_streams, nats_jetstream]


def leftovers() -> list[str]:
    return sorted(glob.glob(os.path.join(tempfile.gettempdir(), "zfanbench-*")))


@pytest.fixture(params=FAST, ids=lambda peer: peer.KEY)
def peer(request):
    reason = request.param.unavailable()
    if reason:
        pytest.skip(f"{request.param.LABEL}: {reason}")
    return request.param


@pytest.mark.timeout(60)
def test_every_record_reaches_the_consumer_once_with_one_and_two_workers(peer):
    before = leftovers()
    batches = make_batches(3000, 10)
    with peer.Server() as server:
        for workers in (1, 2):
            res = peer.run(batches, server.url, workers)
            assert (res["records"], res["lost"], res["duplicated"]) == (3000, 0, 0), workers
            assert res["records_per_s"] > 0
        lat = peer.latency(5000, 1.0, 100, server.url)
        assert (lat["lost"], lat["duplicated"]) == (0, 0)
        assert lat["counted"] > 0 and lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        pid = server._proc.pid
    assert not os.path.exists(f"/proc/{pid}"), "the server was not stopped"
    assert leftovers() == before


@pytest.mark.timeout(60)
def test_a_run_past_its_deadline_stops_and_reports_what_was_lost(peer):
    batches = make_batches(200_000, 10)  # far more than gets through before the deadline
    with peer.Server() as server:
        began = time.monotonic()
        res = peer.run(batches, server.url, 1, deadline=0.5)
        assert time.monotonic() - began < 20
    assert res["records"] == 200_000
    assert 0 < res["lost"] <= 200_000 and res["duplicated"] == 0


def test_a_missing_server_or_client_is_one_line_and_the_run_skips_the_peer(monkeypatch, capsys):
    monkeypatch.setattr(parties, "find", lambda binary: None)
    monkeypatch.setattr(rabbitmq, "DEB_SERVER", "/nonexistent/rabbitmq-server")
    assert redis_streams.unavailable() == "redis-server not installed: apt-get install redis-server"
    assert nats_jetstream.unavailable() == "nats-server not installed: apt-get install nats-server"
    assert rabbitmq.unavailable() == "rabbitmq-server not installed: apt-get install rabbitmq-server"

    bench = bench_run.Bench(quick=True, runs=1)
    with contextlib.ExitStack() as stack:
        bench.start_peers(stack)
    assert bench.peers == []
    assert capsys.readouterr().out.splitlines() == [
        "RabbitMQ design: skipped (rabbitmq-server not installed: apt-get install rabbitmq-server)",
        "Redis Streams design: skipped (redis-server not installed: apt-get install redis-server)",
        "NATS JetStream design: skipped (nats-server not installed: apt-get install nats-server)",
    ]

    monkeypatch.undo()
    monkeypatch.setattr(redis_streams, "redis", None)
    monkeypatch.setattr(nats_jetstream, "nats", None)
    if parties.find("redis-server"):
        assert redis_streams.unavailable() == "redis (the Python client) not installed: pip install redis hiredis"
    if parties.find("nats-server"):
        assert nats_jetstream.unavailable() == "nats-py not installed: pip install nats-py"


def test_the_pacer_hands_out_each_record_once_when_it_catches_up_after_a_stall():
    """A producer stalled for longer than 100 000 records' worth catches up in chunks of
    distinct dicts: a chunk that held one dict twice would stamp it twice, and the latency run
    would count a duplicate that no contender made."""
    from bench.latency import Pacer

    pacer = Pacer(rate=1_000_000, n=250_000)
    pacer.begin()
    late = pacer.start + 0.25  # everything is due at once
    ids: list[int] = []
    while not pacer.done:
        chunk = pacer.due(late)
        assert len({id(r) for r in chunk}) == len(chunk), "a dict handed out twice in one chunk"
        ids += [r["id"] for r in chunk]  # read now: the caller packs a chunk before the next
    assert ids == list(range(250_000))
