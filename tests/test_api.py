"""The embedded API over real sockets on 127.0.0.1 with random ports."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from datetime import datetime

import pytest
import zmq

from tests.helpers import wait_for
from zfan import (
    DeliveryTimeout,
    Producer,
    SerializationError,
    Sink,
    Subscriber,
    Timing,
    Worker,
    config,
    query_status,
)
from zfan import protocol as p
from zfan.apps import echo, readings, rollup

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"


def collect(sub: Subscriber, until, timeout: float = 30.0) -> list:
    got: list = []
    wait_for(
        lambda: (m := sub.recv(0.05)) is not None and got.append(m) or until(got),
        timeout,
        what="results at the subscriber",
    )
    return got


def by_parity(records):
    """A fan-out app: even ids to one topic, odd to another."""
    out: dict[str, list] = {}
    for r in records:
        out.setdefault("even" if r["id"] % 2 == 0 else "odd", []).append(r["id"])
    return out


def test_every_record_fanned_out_exactly_once(sink, ctx):
    n = 20_000
    with (
        Worker(by_parity, control=sink.control, context=ctx),
        Worker(by_parity, control=sink.control, context=ctx),
        Subscriber(results=sink.results, context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, batch_size=500, context=ctx) as prod:
            prod.send_many(readings(n))
            prod.flush()
            assert prod.unacked == 0 and prod.acked_records == n
        msgs = collect(sub, lambda ms: sum(len(m.records) for m in ms) >= n)
    ids = Counter(i for m in msgs for i in m.records)
    assert sorted(ids) == list(range(n)) and max(ids.values()) == 1
    for topic, parity in (("even", 0), ("odd", 1)):
        mine = [m for m in msgs if m.topic == topic]
        assert all(i % 2 == parity for m in mine for i in m.records)
        assert [m.seq for m in mine] == list(range(1, len(mine) + 1)), f"{topic} seqs without gaps"
    info = query_status(sink.control, context=ctx)
    # Batches of 500, unless the linger sealed one early: each done, none left behind.
    assert info["done"] == len({m.batch_id for m in msgs}) >= n // 500
    assert info["pending"] == 0 and info["leased"] == 0


def test_topic_prefix_filter_and_callback_form(sink, ctx):
    with (
        Worker(rollup, control=sink.control, context=ctx),
        Subscriber(results=sink.results, topics=["sensor.p-001"], context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, topic="p", context=ctx) as prod:
            prod.send_many(readings(3000, sensors=4, source="p"))
        got = []
        assert sub.run(got.append, count=3, timeout=10) == 3
    assert {m.topic for m in got} == {"sensor.p-001"}
    assert all(m.records[0]["sensor"] == "p-001" and m.records[0]["count"] > 0 for m in got)


def test_a_failing_function_is_dead_lettered_and_the_rest_flows(sink, ctx):
    def picky(records):
        if any(r["id"] == 1234 for r in records):
            raise ValueError("record 1234 is poison")
        return [r["id"] for r in records]

    n = 5000
    with Worker(picky, control=sink.control, context=ctx), Subscriber(results=sink.results, context=ctx) as sub:
        assert sub.wait_ready(5)
        with Producer(
            intake=sink.intake, control=sink.control, batch_size=100, linger_ms=60_000, context=ctx
        ) as prod:  # batches sealed by count: the poison one is 1200-1299
            prod.send_many(readings(n))
        msgs = collect(sub, lambda ms: sum(len(m.records) for m in ms) >= n)
    dead = [m for m in msgs if m.dead]
    assert len(dead) == 1
    assert dead[0].topic == "zfan.dead" and dead[0].attempts == 3
    assert "ValueError: record 1234 is poison" in dead[0].error
    assert [r["id"] for r in dead[0].records] == list(range(1200, 1300))
    delivered = sorted(i for m in msgs if not m.dead for i in m.records)
    assert delivered == [i for i in range(n) if not 1200 <= i < 1300]
    info = query_status(sink.control, context=ctx)
    assert info["dead"] == 1 and info["done"] == n // 100 - 1


def test_heartbeats_flow_while_a_long_batch_runs(tmp_path, ctx):
    release = threading.Event()
    timing = Timing(heartbeat=0.05, liveness=3)  # a silent worker would be dead after 150 ms

    def slow(records):
        release.wait(10)
        return records

    with (
        Sink(intake=ANY, control=ANY, results=ANY, ledger=str(tmp_path / "z.db"), timing=timing, context=ctx) as sink,
        Worker(slow, control=sink.control, timing=timing, context=ctx),
        Subscriber(results=sink.results, context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, timing=timing, context=ctx) as prod:
            prod.send_many(range(10))
        wait_for(lambda: query_status(sink.control, context=ctx)["leased"] == 1, what="the batch leased")
        # The point of this test is time passing: hold the batch for ten times the expiry.
        threading.Event().wait(1.5)
        info = query_status(sink.control, context=ctx)
        assert len(info["workers"]) == 1 and info["leased"] == 1 and "replays" not in info
        release.set()
        msgs = collect(sub, lambda ms: len(ms) == 1)
        assert msgs[0].records == list(range(10))


def test_producer_blocks_on_a_full_window_and_resends_when_the_sink_comes(tmp_path, ipc, ctx):
    intake, control, results = ipc["intake"], ipc["control"], ipc["results"]
    sent = threading.Event()
    with Producer(intake=intake, control=control, batch_size=10, window=2, context=ctx) as prod:

        def send():
            prod.send_many(range(35))
            sent.set()

        t = threading.Thread(target=send, daemon=True)
        t.start()
        wait_for(lambda: prod.unacked == 2, what="two batches in the window")
        assert not sent.wait(0.3), "the third batch must wait for room in the window"
        with pytest.raises(DeliveryTimeout, match=r"^2 batch\(es\) not acknowledged by the sink after 0.2 s"):
            prod.flush(timeout=0.2)
        with Sink(intake=intake, control=control, results=results, ledger=str(tmp_path / "z.db"), context=ctx) as sink:
            assert sent.wait(10)
            prod.flush(timeout=10)
            assert prod.acked_records == 35
            info = query_status(sink.control, context=ctx)
            assert info["records_in"] == 35 and info["batches_in"] == 4
        t.join(5)


def test_a_record_msgpack_cannot_encode_is_refused_at_send(sink, ctx):
    with Worker(lambda rs: rs, control=sink.control, context=ctx), Subscriber(results=sink.results, context=ctx) as sub:
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, context=ctx) as prod:
            prod.send({"ok": 1})
            with pytest.raises(SerializationError, match="record of type datetime cannot be sent"):
                prod.send(datetime(2026, 1, 1))
            with pytest.raises(SerializationError, match="record of type dict cannot be sent"):
                prod.send({"when": object()})
            prod.send({"ok": 2})
        msgs = collect(sub, lambda ms: len(ms) == 1)
    assert msgs[0].records == [{"ok": 1}, {"ok": 2}]


def test_what_a_worker_function_returns_wrongly_is_reported(sink, ctx):
    with (
        Worker(lambda rs: 42, control=sink.control, context=ctx),
        Subscriber(results=sink.results, topics=["zfan.dead"], context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, context=ctx) as prod:
            prod.send({"x": 1})
        msgs = collect(sub, lambda ms: len(ms) == 1)
    assert "process() returned int; expected a list, a dict of topic -> list, or None" in msgs[0].error


def test_a_wide_subscriber_does_not_count_other_handshakes_as_rejects(sink, ctx):
    with Subscriber(results=sink.results, context=ctx) as wide:
        assert wide.wait_ready(5)
        for _ in range(3):
            with Subscriber(results=sink.results, context=ctx) as other:
                assert other.wait_ready(5)
        with (
            Worker(lambda rs: rs, control=sink.control, context=ctx),
            Producer(intake=sink.intake, control=sink.control, context=ctx) as prod,
        ):
            prod.send({"x": 1})
            prod.flush()
            msg = wide.recv(timeout=10)
    assert msg is not None and msg.records == [{"x": 1}]
    assert not wide.rejected


def test_peers_beat_at_the_pace_the_sink_asks_for(tmp_path, ctx):
    fast = Timing(heartbeat=0.05, liveness=3)  # the sink drops a peer silent for 150 ms
    slow = Timing(heartbeat=2.0, liveness=3)  # what the peers were configured with
    with (
        Sink(intake=ANY, control=ANY, results=ANY, ledger=str(tmp_path / "z.db"), timing=fast, context=ctx) as sink,
        Worker(lambda rs: rs, control=sink.control, timing=slow, context=ctx),
        Producer(intake=sink.intake, control=sink.control, timing=slow, context=ctx) as prod,
    ):
        assert prod.connected.wait(5)
        wait_for(lambda: len(query_status(sink.control, context=ctx)["workers"]) == 1)
        # The point of this test is time passing: ten of the sink's expiries.
        threading.Event().wait(1.5)
        info = query_status(sink.control, context=ctx)
        assert len(info["workers"]) == 1 and info["producers"] == 1
        assert "resets" not in info


def test_sizes_past_a_frame_are_refused_where_a_person_sees_them(tmp_path, ctx):
    from zfan.config import Limits

    limits = Limits(max_frame=2000)
    with (
        Sink(intake=ANY, control=ANY, results=ANY, ledger=str(tmp_path / "z.db"), limits=limits, context=ctx) as sink,
        Worker(lambda rs: ["x" * 3000] if rs[0] == "big" else rs, control=sink.control, limits=limits, context=ctx),
        Subscriber(results=sink.results, control=sink.control, context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, limits=limits, context=ctx) as prod:
            with pytest.raises(SerializationError, match="record of 3,003 bytes packed is larger than a frame"):
                prod.send("y" * 3000)
            prod.send_many(["r" * 100] * 50)  # 5 KB in all: sent as batches that each fit a frame
            prod.flush()
            assert prod.acked_records == 50
            prod.send("big", topic="big")
        msgs = collect(sub, lambda ms: sum(len(m.records) for m in ms if not m.dead) >= 50 and any(m.dead for m in ms))
    dead = [m for m in msgs if m.dead]
    assert len(dead) == 1 and "more than one frame may hold (2,000)" in dead[0].error
    assert sum(len(m.records) for m in msgs if not m.dead) == 50


@pytest.mark.parametrize(
    "out, limits, says",
    [
        ({f"t{i}": [i] for i in range(10_001)}, None, "returned 10,001 topics, more than one result may name"),
        (
            {f"t{i}".ljust(255, "x"): [i] for i in range(5_000)},
            None,
            "returned 5,000 topics, more than one result may name",
        ),
        (
            {f"t{i}": ["x" * 900] for i in range(10)},
            {"max_frame": 1000, "max_message": 5000},
            "bytes in all, more than one message may hold (5,000)",
        ),
    ],
    ids=["topics", "header bytes", "message bytes"],
)
def test_a_result_too_big_for_one_message_is_a_failure_a_person_reads(out, limits, says):
    from zfan import protocol as p
    from zfan.config import Limits
    from zfan.nodes.worker import run_batch

    kw = {"limits": Limits(**limits)} if limits else {}
    failed = run_batch(lambda records: out, p.Lease(1, 7, 1, "in", 1, p.encode_records([1])), **kw)
    assert isinstance(failed, p.Failed)
    assert says in failed.error


def test_a_producer_run_again_under_its_id_is_not_taken_for_a_resend(sink, ctx):
    # The sink deduplicates on (producer id, seq): a second run must not reuse the first's seqs.
    for run in range(2):
        with Producer(intake=sink.intake, control=sink.control, producer_id="plant-7", context=ctx) as prod:
            prod.send_many({"run": run, "i": i} for i in range(10))
    info = query_status(sink.control, context=ctx)
    assert info["records_in"] == 20 and "duplicate_batches" not in info


def test_a_peer_that_takes_another_peers_routing_id_is_not_heard(sink, ctx):
    # ZeroMQ's ROUTER ignores a second connection whose routing id is in use: a node that sets
    # a worker's id can neither speak for it (a bye, a result) nor take its leases.
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.ROUTING_ID, b"victim")
    clash = ctx.socket(zmq.DEALER)
    clash.setsockopt(zmq.ROUTING_ID, b"victim")
    try:
        worker.connect(sink.control)
        worker.send_multipart(p.encode(p.Hello("worker", "honest", 1)))
        assert worker.poll(5000) and isinstance(p.decode(worker.recv_multipart()), p.Welcome)
        clash.connect(sink.control)
        clash.send_multipart(p.encode(p.Bye()))
        with Producer(intake=sink.intake, control=sink.control, context=ctx) as prod:
            prod.send({"id": 1})
        lease = None
        while lease is None and worker.poll(5000):
            frames = worker.recv_multipart()
            if isinstance(p.decode(frames), p.Lease):
                lease = frames
        assert lease is not None, "the honest worker, still known, got the batch"
        assert not clash.poll(200), "nothing went to the clashing connection"
        assert len(query_status(sink.control, context=ctx)["workers"]) == 1
    finally:
        worker.close(linger=0)
        clash.close(linger=0)


def test_send_many_stops_at_a_record_it_cannot_send_and_keeps_those_before(sink, ctx):
    with Producer(intake=sink.intake, control=sink.control, context=ctx) as prod:
        with pytest.raises(
            SerializationError, match="^record of type dict cannot be sent: can not serialize .set. object$"
        ):
            prod.send_many([{"id": 1}, {"id": 2}, {"bad": {3}}, {"id": 4}])
        prod.flush(timeout=5)
        assert prod.acked_records == 2


@pytest.mark.parametrize("role", [Producer, Subscriber, Sink, lambda **kw: Worker(echo, **kw)])
def test_a_mistyped_option_is_a_type_error_that_names_the_option_meant(role):
    with pytest.raises(TypeError) as info:
        role(contrl="tcp://127.0.0.1:5558")
    assert str(info.value).endswith("() got an unexpected keyword argument 'contrl' (did you mean 'control'?)")


@pytest.mark.parametrize(
    "options, settings",
    [
        (config.SinkOptions, config.SinkSettings),
        (config.WorkerOptions, config.WorkerSettings),
        (config.ProducerOptions, config.ProducerSettings),
        (config.SubscriberOptions, config.SubscriberSettings),
    ],
)
def test_every_setting_is_a_typed_keyword_option(options, settings):
    assert set(options.__annotations__) == {f.name for f in dataclasses.fields(settings)}


def test_a_stopped_sink_leaves_no_socket_files_behind(tmp_path, ipc, ctx):
    with Sink(ledger=str(tmp_path / "z.db"), context=ctx, **ipc):
        assert {"intake", "control", "results"} <= set(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.db", "z.db.lock"]
