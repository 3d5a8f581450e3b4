"""Key-partitioned sinks through the embedded API: each record goes to the sink that owns its key,
a worker spans every sink, a subscriber takes every sink's results, and a sink that is away holds
back only its own keys. Real sinks with SQLite ledgers on ipc:// endpoints of the test's own."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict

import pytest
import zmq

from tests.apps import echo
from tests.checker import check
from tests.helpers import wait_for
from tests.test_observability import get
from zfan import Producer, Sink, Subscriber, Worker
from zfan.aio import AsyncProducer, AsyncSubscriber
from zfan.errors import ConfigError, DeliveryTimeout, SerializationError
from zfan.nodes.status import query_status
from zfan.partitions import parse_sinks, partition_of

pytestmark = pytest.mark.timeout(60)

KEYS = 30


class Partitions:
    """N sinks, each in a folder of its own (its ledger and ipc endpoints), named as --sinks does."""

    def __init__(self, folder, n: int, ctx: zmq.Context) -> None:
        self.folders = [os.path.join(folder, f"p{i}") for i in range(n)]
        for f in self.folders:
            os.makedirs(f, exist_ok=True)
        self.spec = ",".join(f"ipc://{f}" for f in self.folders)
        self.parts = parse_sinks(self.spec)
        self.ctx = ctx
        self.sinks: list[Sink | None] = [self.start(i) for i in range(n)]

    def start(self, i: int) -> Sink:
        part = self.parts[i]
        ledger = os.path.join(self.folders[i], "zfan.db")
        return Sink(
            intake=part.intake, control=part.control, results=part.results, ledger=ledger, context=self.ctx
        ).start()

    def stop(self, i: int) -> None:
        sink = self.sinks[i]
        assert sink is not None
        sink.close()
        self.sinks[i] = None

    def restart(self, i: int) -> None:
        self.sinks[i] = self.start(i)

    def status(self, i: int) -> dict:
        return query_status(self.parts[i].control, context=self.ctx)

    def close(self) -> None:
        for i, sink in enumerate(self.sinks):
            if sink is not None:
                self.stop(i)


@pytest.fixture
def three(tmp_path, ctx):
    parts = Partitions(str(tmp_path), 3, ctx)
    yield parts
    parts.close()


def records(start: int, n: int) -> list[dict]:
    """Records of KEYS keys; a key's records are in the order of their ids."""
    return [{"id": i, "key": f"k{i % KEYS}"} for i in range(start, start + n)]


class Received:
    """What a subscriber got: every record, the partition each came from, and each (partition,
    topic)'s seqs in the order delivered."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.by_key: dict[str, list[int]] = defaultdict(list)
        self.partition_of: dict[int, int | None] = {}
        self.seqs: dict[str, list[int]] = defaultdict(list)

    def take(self, sub: Subscriber, until: int, timeout: float = 30.0) -> None:
        def more() -> bool:
            while (msg := sub.recv(0.05)) is not None:
                self.seqs[f"{msg.partition}/{msg.topic}"].append(msg.seq)
                for r in msg.records:
                    self.ids.append(r["id"])
                    self.by_key[r["key"]].append(r["id"])
                    self.partition_of[r["id"]] = msg.partition
            return len(self.ids) >= until

        wait_for(more, timeout, interval=0, what=f"{until} records at the subscriber (got {len(self.ids)})")

    def check(self, sent: range) -> None:
        verdict = check(sent, self.ids, self.seqs)
        assert verdict.ok, verdict
        out_of_order = {k: ids for k, ids in self.by_key.items() if ids != sorted(ids)}
        assert not out_of_order, f"keys whose records came out of order: {sorted(out_of_order)}"


def test_each_record_goes_to_the_sink_owning_its_key_and_arrives_once_in_its_keys_order(three, ctx):
    got = Received()
    with Subscriber(sinks=three.spec, context=ctx) as sub:
        assert sub.wait_ready(10) and sub.partitions == 3
        with (
            Worker(echo, sinks=three.spec, context=ctx),
            Producer(sinks=three.spec, key="key", batch_size=50, context=ctx) as prod,
        ):
            for chunk in range(0, 6000, 500):
                prod.send_many(records(chunk, 500))
            outcomes = prod.join(30)
            assert outcomes.done_records == 6000 and outcomes.ok
            got.take(sub, 6000)
    got.check(range(6000))
    wrong = [i for i, part in got.partition_of.items() if part != partition_of(f"k{i % KEYS}", 3)]
    assert wrong == [], f"records published by a sink that does not own their key: {wrong[:10]}"
    stored = [three.status(i)["records_in"] for i in range(3)]
    assert sum(stored) == 6000 and min(stored) > 0, stored


def test_a_sink_that_is_away_holds_back_only_its_own_keys_and_they_follow_once_it_is_back(three, ctx):
    got = Received()
    away = 1
    mine = [i for i in range(3000, 6000) if partition_of(f"k{i % KEYS}", 3) == away]
    with Subscriber(sinks=three.spec, context=ctx) as sub:
        assert sub.wait_ready(10)
        with (
            Worker(echo, sinks=three.spec, context=ctx),
            Producer(sinks=three.spec, key="key", batch_size=50, context=ctx) as prod,
        ):
            prod.send_many(records(0, 3000))
            got.take(sub, 3000)
            three.stop(away)
            wait_for(lambda: prod.stuck == [away], 10, what="the producer to say which partition is stuck")
            prod.send_many(records(3000, 3000))
            # Every other key flows while the sink is away.
            got.take(sub, 6000 - len(mine))
            assert not set(mine) & set(got.ids)
            with pytest.raises(DeliveryTimeout, match=rf"partition {away} \(ipc://.*/p{away}/control\)"):
                prod.flush(0.5)
            three.restart(away)
            got.take(sub, 6000)
            prod.flush(30)
            assert prod.stuck == []
    got.check(range(6000))


def test_a_worker_shares_one_credit_budget_among_the_sinks(three, ctx):
    with Worker(echo, sinks=three.spec, credit=7, name="spanning", context=ctx) as worker:
        wait_for(worker.connected.is_set, 10, what="every sink to welcome the worker")
        credits = [[w["credit"] for w in three.status(i)["workers"]] for i in range(3)]
    assert credits == [[2], [2], [2]], credits


def test_a_durable_subscriber_resumes_at_every_sink_where_the_last_one_stopped(three, ctx):
    got = Received()
    with (
        Worker(echo, sinks=three.spec, context=ctx),
        Producer(sinks=three.spec, key="key", batch_size=20, context=ctx) as prod,
    ):
        prod.send_many(records(0, 3000))
        prod.join(30)
    with Subscriber(sinks=three.spec, durable="audit", context=ctx) as sub:
        got.take(sub, 1000)  # some of every sink's, then it stops
    assert len(set(got.partition_of.values())) == 3
    with Subscriber(sinks=three.spec, durable="audit", context=ctx) as sub:
        got.take(sub, 3000)
        assert sub.recv(0.5) is None
    got.check(range(3000))


def test_a_record_without_the_key_is_refused_by_name_and_the_ones_before_it_go(three, ctx):
    got = Received()
    with Subscriber(sinks=three.spec, context=ctx) as sub:
        assert sub.wait_ready(10)
        with Worker(echo, sinks=three.spec, context=ctx), Producer(sinks=three.spec, key="key", context=ctx) as prod:
            for r in records(0, 10):
                prod.send(r)
            with pytest.raises(SerializationError, match="record of type dict has no field 'key', the key that"):
                prod.send({"id": 10})
            # In send_many, the records before the one at fault go, whatever their sink, and none after it.
            batch = [*records(10, 40), [1, 2], *records(50, 10)]
            with pytest.raises(SerializationError, match="record of type list has no field 'key'"):
                prod.send_many(batch)
            with pytest.raises(
                SerializationError, match="record of type dict cannot be sent: can not serialize 'set' object"
            ):
                prod.send_many([*records(60, 5), {"id": -1, "key": "k1", "tags": {1}}, *records(65, 5)])
            prod.join(10)
            got.take(sub, 55)
            assert sub.recv(0.5) is None
    assert sorted(got.ids) == [*range(50), *range(60, 65)]


def test_a_timeout_names_every_partition_that_holds_records_back(three, ctx):
    with Producer(sinks=three.spec, key="key", context=ctx) as prod:
        prod.send_many(records(0, 300))
        prod.flush(10)
        three.stop(0)
        three.stop(2)
        wait_for(lambda: prod.stuck == [0, 2], 10, what="the producer to see both sinks away")
        prod.send_many(records(300, 300))
        with pytest.raises(DeliveryTimeout) as raised:
            prod.flush(1)
        said = str(raised.value)
        # Each away sink's records are sealed and counted, not only the first one's.
        assert re.search(r"partition 0 \(ipc://.*/p0/control\): \d+;", said), said
        assert re.search(r"partition 2 \(ipc://.*/p2/control\): \d+;?", said), said
        assert "partition 1" not in said
        assert raised.value.unacked == prod.unacked > 0
        three.restart(0)
        three.restart(2)
        prod.flush(30)


def test_each_outcome_says_which_sink_took_its_batch(three, ctx):
    seen: list = []
    with (
        Worker(echo, sinks=three.spec, context=ctx),
        Producer(sinks=three.spec, key="key", batch_size=10, context=ctx, on_outcome=seen.append) as prod,
    ):
        prod.send_many(records(0, 600))
        assert prod.join(20).done_records == 600
    assert {o.partition for o in seen} == {0, 1, 2}
    assert len({(o.partition, o.seq) for o in seen}) == len(seen)


def test_partitioning_by_topic_keeps_each_topic_on_one_sink(three, ctx):
    topics = [f"t{i}" for i in range(12)]
    seen: dict[str, set[int | None]] = defaultdict(set)
    with Subscriber(sinks=three.spec, context=ctx) as sub:
        assert sub.wait_ready(10)
        with Worker(echo, sinks=three.spec, context=ctx), Producer(sinks=three.spec, context=ctx) as prod:
            for i in range(1200):
                prod.send({"id": i, "key": "-"}, topic=topics[i % 12])
            prod.join(20)
        n = 0
        while n < 1200:
            msg = sub.recv(10)
            assert msg is not None
            seen[msg.topic].add(msg.partition)
            n += len(msg.records)
    assert {t: list(parts) for t, parts in seen.items()} == {t: [partition_of(t, 3)] for t in topics}
    assert Counter(partition_of(t, 3) for t in topics).keys() == {0, 1, 2}


def test_sinks_and_an_endpoint_together_are_refused(three):
    with pytest.raises(ConfigError, match="give sinks or intake, not both"):
        Producer(sinks=three.spec, intake="tcp://127.0.0.1:7000")
    with pytest.raises(ConfigError, match="give sinks or control, not both"):
        Worker(echo, sinks=three.spec, control="tcp://127.0.0.1:7001")
    with pytest.raises(ConfigError, match="key chooses one of several sinks: give them with sinks"):
        Producer(key="device")
    with pytest.raises(ConfigError, match="AsyncProducer takes one sink"):
        AsyncProducer(sinks=three.spec)
    with pytest.raises(ConfigError, match="AsyncSubscriber takes one sink"):
        AsyncSubscriber(sinks=three.spec)
    with pytest.raises(ConfigError, match="is not HOST, HOST:PORT"):
        Subscriber(sinks="a,b:99999")


def test_a_spanning_worker_is_ready_only_while_every_sink_has_welcomed_it(three, ctx):
    with Worker(echo, sinks=three.spec, http="127.0.0.1:0", context=ctx) as worker:
        wait_for(lambda: get(worker.http + "readyz")[0] == 200, 10, what="ready once every sink welcomed it")
        three.stop(2)
        wait_for(lambda: get(worker.http + "readyz")[0] == 503, 10, what="not ready once a sink is silent")
        reasons = json.loads(get(worker.http + "readyz")[1])["reasons"]
        assert reasons == [f"no welcome from the sink at {three.parts[2].control}"]
        three.restart(2)
        wait_for(lambda: get(worker.http + "readyz")[0] == 200, 10, what="ready again once it is back")
