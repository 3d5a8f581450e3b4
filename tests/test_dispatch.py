"""The sink's decisions (SinkCore), driven with real protocol frames and a fake clock.

Every test reads only what a peer would see: the frames end_turn() hands back, decoded with
zfan.protocol, and what another process would read from the committed ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from tests.ledgers import Backend
from zfan import protocol as p
from zfan.config import Timing
from zfan.dispatch import COMMIT_WITHIN, SinkCore
from zfan.ledger import LEASED, PENDING, Ledger

pytestmark = pytest.mark.timeout(30)

HEARTBEAT = 1.0
LIVENESS = 3  # a peer silent for more than 3 s is dead


# --- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A message the sink sent to a peer: the peer's routing id and the decoded message, whose
    fields read through (a lease's `sent.batch_id` is `sent.msg.batch_id`)."""

    rid: bytes
    msg: p.Message

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.msg, name)


class Turn:
    """One end_turn(), decoded: what each peer was sent, and what was published."""

    def __init__(self, core: SinkCore) -> None:
        out = core.end_turn()
        self.msgs = [Sent(rid, p.decode(frames)) for rid, frames in out.to_peers]
        self.pubs: list[p.Publish | p.Dead] = []
        self.messages = len(out.publish)  # results of one topic may share a message
        for frames in out.publish:
            assert len(frames) == 3, frames
            pub = p.decode(frames[1:], allowed=frozenset({p.Publish, p.Dead, p.Publishes}))
            assert isinstance(pub, (p.Publish, p.Dead, p.Publishes))
            assert frames[0] == pub.topic.encode()  # the SUB prefix is the topic
            self.pubs += pub.split() if isinstance(pub, p.Publishes) else [pub]

    def of(self, cls: type[p.Message], rid: bytes | None = None) -> list[Sent]:
        return [m for m in self.msgs if type(m.msg) is cls and (rid is None or m.rid == rid)]

    @property
    def leases(self) -> list[Sent]:
        return self.of(p.Lease)

    def acks(self, rid: bytes) -> list[list[int]]:
        return [m.seqs for m in self.of(p.Ack, rid)]


def records(*values) -> bytes:
    return msgpack.packb(list(values))


def batch(
    producer: str, seq: int, topic: str = "in", payload: bytes | None = None, count: int | None = None
) -> list[bytes]:
    payload = records(f"{producer}-{seq}") if payload is None else payload
    if count is None:
        count = len(msgpack.unpackb(payload))
    return p.encode(p.Batch(producer, seq, topic, count, payload))


def make_core(ledger: Ledger, clock, **kw) -> SinkCore:
    kw.setdefault("timing", Timing(heartbeat=HEARTBEAT, liveness=LIVENESS))
    return SinkCore(ledger, clock=clock, **kw)


def hello_worker(core: SinkCore, rid: bytes, credit: int) -> None:
    core.control(rid, p.encode(p.Hello("worker", rid.decode(), credit)))


def hello_producer(core: SinkCore, rid: bytes, name: str) -> None:
    core.control(rid, p.encode(p.Hello("producer", name, 0)))


def send_result(
    core: SinkCore,
    rid: bytes,
    lease: Sent | tuple,
    outputs: dict[str, bytes] | None = None,
    epoch: int | None = None,
) -> None:
    """A RESULT for a lease (or a (batch_id, attempt) pair), with one payload per topic."""
    batch_id, attempt = (lease.batch_id, lease.attempt) if isinstance(lease, Sent) else lease
    if outputs is None:
        outputs = {"out": records(f"result-of-{batch_id}")}
    topics = list(outputs)
    counts = [len(msgpack.unpackb(v)) for v in outputs.values()]
    result = p.Result(core.epoch if epoch is None else epoch, batch_id, attempt, topics, counts, list(outputs.values()))
    core.control(rid, p.encode(result))


def send_failed(core: SinkCore, rid: bytes, lease: Sent | tuple, error: str = "boom", epoch: int | None = None) -> None:
    batch_id, attempt = (lease.batch_id, lease.attempt) if isinstance(lease, Sent) else lease
    core.control(rid, p.encode(p.Failed(core.epoch if epoch is None else epoch, batch_id, attempt, error)))


def heartbeat(core: SinkCore, rid: bytes) -> None:
    core.control(rid, p.encode(p.Heartbeat(core.epoch)))


def count_of(pub: p.Publish | p.Dead) -> int:
    assert isinstance(pub, p.Publish), pub
    return pub.count


def settle(core: SinkCore) -> None:
    """Turns until what the sink left uncommitted is committed: within COMMIT_WITHIN."""
    Turn(core)
    core.clock.advance(COMMIT_WITHIN)
    Turn(core)


def status_counts(core: SinkCore) -> dict[str, int]:
    s = core.status()
    return {k: s[k] for k in ("pending", "leased", "done", "dead", "purged")}


@pytest.fixture
def ledger(backend) -> Ledger:
    """Every decision here is tried on each ledger backend."""
    return backend.open()


@pytest.fixture
def core(ledger, clock) -> SinkCore:
    return make_core(ledger, clock)


@pytest.fixture
def reopen(backend):
    """Open the fixture's ledger again (as a restarted sink would); closed at teardown."""
    return backend.open


# --- dispatch by credit -----------------------------------------------------------------


def test_worker_gets_at_most_its_credit_until_it_answers(core):
    hello_worker(core, b"w1", 2)
    for seq in range(1, 6):
        core.intake(batch("prod", seq))
    turn = Turn(core)
    assert [m.rid for m in turn.of(p.Welcome)] == [b"w1"]
    first = turn.leases
    assert [(le.rid, le.attempt) for le in first] == [(b"w1", 1), (b"w1", 1)]
    for _ in range(3):
        assert Turn(core).leases == []  # no answer, no more leases
    send_result(core, b"w1", first[0])
    (nxt,) = Turn(core).leases
    assert nxt.rid == b"w1"
    assert Turn(core).leases == []


def test_leases_follow_arrival_order(core):
    hello_worker(core, b"w1", 1)
    for seq in range(1, 5):
        core.intake(batch("prod", seq))
    seen = []
    for _ in range(4):
        (lease,) = Turn(core).leases
        seen.append(msgpack.unpackb(lease.payload))
        send_result(core, b"w1", lease)
    assert seen == [["prod-1"], ["prod-2"], ["prod-3"], ["prod-4"]]
    assert Turn(core).leases == []


def test_two_workers_share_pending_batches(core):
    hello_worker(core, b"w1", 2)
    hello_worker(core, b"w2", 2)
    for seq in range(1, 7):
        core.intake(batch("prod", seq))
    leases = Turn(core).leases
    per_worker = {rid: [le for le in leases if le.rid == rid] for rid in (b"w1", b"w2")}
    assert len(per_worker[b"w1"]) == 2
    assert len(per_worker[b"w2"]) == 2
    assert len({le.batch_id for le in leases}) == 4
    assert status_counts(core) == {"pending": 2, "leased": 4, "done": 0, "dead": 0, "purged": 0}
    # w2 answers one: the oldest pending batch goes to w2, the only one with free credit.
    send_result(core, b"w2", per_worker[b"w2"][0])
    (nxt,) = Turn(core).leases
    assert nxt.rid == b"w2"
    assert msgpack.unpackb(nxt.payload) == ["prod-5"]


def test_a_worker_that_joins_later_gets_the_backlog(core):
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    assert Turn(core).leases == []  # no worker yet
    hello_worker(core, b"w1", 10)
    leases = Turn(core).leases
    assert [msgpack.unpackb(le.payload) for le in leases] == [["prod-1"], ["prod-2"], ["prod-3"]]


def test_lease_carries_epoch_topic_count_and_the_producers_payload(core):
    payload = records({"id": 1}, {"id": 2}, {"id": 3})
    core.intake(batch("prod", 1, topic="orders", payload=payload))
    hello_worker(core, b"w1", 1)
    (lease,) = Turn(core).leases
    assert (lease.epoch, lease.attempt, lease.topic, lease.count) == (core.epoch, 1, "orders", 3)
    assert lease.payload == payload


def test_payload_is_read_back_from_the_ledger_when_not_cached(ledger, clock):
    core = make_core(ledger, clock, cache_bytes=0)
    payload = records("a", "b")
    core.intake(batch("prod", 1, payload=payload))
    Turn(core)
    hello_worker(core, b"w1", 1)
    (lease,) = Turn(core).leases
    assert lease.payload == payload


def test_every_batch_is_leased_once_per_attempt(core):
    hello_worker(core, b"w1", 3)
    hello_worker(core, b"w2", 2)
    for seq in range(1, 21):
        core.intake(batch("prod", seq))
    leased: list[tuple[int, int]] = []
    for _ in range(30):
        turn = Turn(core)
        leased += [(le.batch_id, le.attempt) for le in turn.leases]
        for le in turn.leases:
            if le.batch_id % 3 == 0 and le.attempt == 1:
                send_failed(core, le.rid, le)
            else:
                send_result(core, le.rid, le)
    assert len(leased) == len(set(leased))
    assert sorted({b for b, _ in leased}) == list(range(1, 21))
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 20, "dead": 0, "purged": 0}


# --- acks -----------------------------------------------------------------------------------


def test_leases_alone_are_committed_later_and_acks_at_once(core, ledger, clock, backend):
    hello_producer(core, b"p", "prod")
    Turn(core)
    core.intake(batch("prod", 1))
    assert Turn(core).acks(b"p") == [[1]]
    states = "SELECT state FROM batches ORDER BY id"
    assert backend.peek(states) == [(PENDING,)], "committed before its ack"
    hello_worker(core, b"w", 1)
    assert len(Turn(core).leases) == 1
    assert backend.peek(states) == [(PENDING,)], "a lease alone waits for a later commit"
    assert core.next_deadline() <= COMMIT_WITHIN
    clock.advance(COMMIT_WITHIN)
    Turn(core)
    assert backend.peek(states) == [(LEASED,)]


def test_batch_is_acked_in_the_turn_that_commits_it(core, ledger, backend):
    hello_producer(core, b"p1", "prod-1")
    Turn(core)
    core.intake(batch("prod-1", 1))
    core.intake(batch("prod-1", 2))
    assert backend.peek("SELECT count(*) FROM batches") == [(0,)]  # nothing committed yet
    turn = Turn(core)
    assert turn.acks(b"p1") == [[1, 2]]
    assert backend.peek("SELECT producer, seq FROM batches ORDER BY id") == [("prod-1", 1), ("prod-1", 2)]
    assert Turn(core).acks(b"p1") == []  # acked once


def test_producer_gets_welcome_with_epoch_and_timing(core):
    hello_producer(core, b"p1", "prod-1")
    (welcome,) = Turn(core).of(p.Welcome, b"p1")
    assert welcome.msg == p.Welcome(core.epoch, round(HEARTBEAT * 1000), LIVENESS)


def test_duplicate_batch_is_stored_once_and_acked_again(core, ledger, backend):
    hello_producer(core, b"p1", "prod-1")
    core.intake(batch("prod-1", 1))
    assert Turn(core).acks(b"p1") == [[1]]
    core.intake(batch("prod-1", 1))  # a resend: the ack was lost
    core.intake(batch("prod-1", 1, payload=records("changed")))
    assert Turn(core).acks(b"p1") == [[1, 1]]
    assert core.stats["duplicate batches"] == 2
    assert core.stats["batches in"] == 1
    assert backend.peek("SELECT count(*) FROM batches") == [(1,)]
    assert status_counts(core)["pending"] == 1
    hello_worker(core, b"w1", 5)
    (lease,) = Turn(core).leases
    assert msgpack.unpackb(lease.payload) == ["prod-1-1"]


def test_duplicate_within_one_turn_is_stored_once(core, ledger, backend):
    hello_producer(core, b"p1", "prod-1")
    core.intake(batch("prod-1", 7))
    core.intake(batch("prod-1", 7))
    assert Turn(core).acks(b"p1") == [[7, 7]]
    assert backend.peek("SELECT count(*) FROM batches") == [(1,)]
    assert core.stats["duplicate batches"] == 1


def test_resent_batch_that_is_already_done_is_not_processed_again(core, ledger):
    hello_producer(core, b"p1", "prod")
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"w1", lease)
    assert len(Turn(core).pubs) == 1
    core.intake(batch("prod", 1))
    turn = Turn(core)
    assert turn.acks(b"p1") == [[1]]
    assert turn.leases == [] and turn.pubs == []
    assert core.stats["duplicate batches"] == 1
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 1, "dead": 0, "purged": 0}


def test_same_seq_from_two_producers_is_two_batches(core):
    hello_producer(core, b"p1", "prod-1")
    hello_producer(core, b"p2", "prod-2")
    core.intake(batch("prod-1", 1))
    core.intake(batch("prod-2", 1))
    turn = Turn(core)
    assert turn.acks(b"p1") == [[1]]
    assert turn.acks(b"p2") == [[1]]
    assert status_counts(core)["pending"] == 2


def test_no_ack_to_a_producer_without_hello(core, ledger, backend):
    core.intake(batch("stranger", 1))
    turn = Turn(core)
    assert turn.msgs == []
    # The batch is still stored and will be processed.
    assert backend.peek("SELECT producer, seq FROM batches") == [("stranger", 1)]
    hello_worker(core, b"w1", 1)
    assert len(Turn(core).leases) == 1


def test_ack_goes_to_the_producers_latest_connection(core, clock):
    hello_producer(core, b"p1", "prod-1")
    Turn(core)
    clock.advance(core.timing.expiry + 0.01)  # the old connection went quiet and was dropped
    core.tick()
    hello_producer(core, b"p1-again", "prod-1")  # reconnected with a new routing id
    core.intake(batch("prod-1", 1))
    turn = Turn(core)
    assert turn.acks(b"p1-again") == [[1]]
    assert turn.acks(b"p1") == []


def test_a_producer_id_in_use_by_a_live_connection_is_refused_until_it_goes_quiet(core, clock):
    hello_producer(core, b"p1", "prod-1")
    Turn(core)
    hello_producer(core, b"intruder", "prod-1")
    assert Turn(core).of(p.Heartbeat, b"p1"), "the connection holding the id is probed"
    assert not Turn(core).of(p.Welcome, b"intruder"), "and answered: it is alive"
    assert core.rejected["producer id in use"] == 1
    core.intake(batch("prod-1", 1))
    assert Turn(core).acks(b"p1") == [[1]], "acks still go to the first connection"
    clock.advance(core.timing.expiry + 0.01)
    core.tick()
    hello_producer(core, b"intruder", "prod-1")
    assert Turn(core).of(p.Welcome, b"intruder")


# --- results --------------------------------------------------------------------------------


def test_results_are_published_once_with_per_topic_seq(core, ledger):
    hello_worker(core, b"w1", 3)
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    leases = Turn(core).leases
    for le in leases:
        send_result(core, b"w1", le, {"out": records(f"r{le.batch_id}")})
    turn = Turn(core)
    assert [(type(pub), pub.topic, pub.seq) for pub in turn.pubs] == [
        (p.Publish, "out", 1),
        (p.Publish, "out", 2),
        (p.Publish, "out", 3),
    ]
    assert [pub.batch_id for pub in turn.pubs] == [le.batch_id for le in leases]
    assert [msgpack.unpackb(pub.payload) for pub in turn.pubs] == [[f"r{le.batch_id}"] for le in leases]
    assert isinstance(turn.pubs[0], p.Publish) and turn.pubs[0].count == 1  # record count
    for _ in range(3):
        assert Turn(core).pubs == []  # never twice
    assert core.stats["published"] == 3


def test_result_fans_out_to_several_topics(core, ledger, backend):
    hello_worker(core, b"w1", 2)
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    first, second = Turn(core).leases
    send_result(core, b"w1", first, {"a": records(1, 2), "b": records(3)})
    turn = Turn(core)
    assert [(pub.topic, pub.seq, count_of(pub), msgpack.unpackb(pub.payload)) for pub in turn.pubs] == [
        ("a", 1, 2, [1, 2]),
        ("b", 1, 1, [3]),
    ]
    send_result(core, b"w1", second, {"b": records(4), "c": records()})
    turn = Turn(core)
    assert [(pub.topic, pub.seq, count_of(pub)) for pub in turn.pubs] == [("b", 2, 1), ("c", 1, 0)]
    assert backend.peek("SELECT batch_id, topic, seq, count, kind FROM results ORDER BY id") == [
        (first.batch_id, "a", 1, 2, 0),
        (first.batch_id, "b", 1, 1, 0),
        (second.batch_id, "b", 2, 1, 0),
        (second.batch_id, "c", 1, 0, 0),
    ]


def test_result_with_no_topics_completes_the_batch_silently(core):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"w1", lease, {})
    turn = Turn(core)
    assert turn.pubs == []
    assert status_counts(core)["done"] == 1


def test_results_are_committed_before_they_are_published(core, ledger, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"w1", lease, {"out": records("x")})
    assert backend.peek("SELECT count(*) FROM results") == [(0,)]
    turn = Turn(core)
    assert len(turn.pubs) == 1
    assert backend.peek("SELECT topic, seq, payload FROM results") == [("out", 1, records("x"))]
    assert backend.peek("SELECT state, payload FROM batches") == [(2, None)]  # done, payload dropped


def test_status_counts_pending_leased_done(core, ledger):
    hello_worker(core, b"w1", 1)
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    assert status_counts(core) == {"pending": 3, "leased": 0, "done": 0, "dead": 0, "purged": 0}
    (lease,) = Turn(core).leases
    assert status_counts(core) == {"pending": 2, "leased": 1, "done": 0, "dead": 0, "purged": 0}
    send_result(core, b"w1", lease)
    Turn(core)
    assert status_counts(core) == {"pending": 1, "leased": 1, "done": 1, "dead": 0, "purged": 0}
    assert ledger.counts() == status_counts(core)
    status = core.status()
    assert status["epoch"] == core.epoch
    assert status["workers"] == [
        {"name": "w1", "credit": 1, "in_flight": 1, "idle_ms": 0, "draining": False, "route": "default"}
    ]


def test_status_request_from_a_client_gets_a_reply(core, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    Turn(core)
    core.control(b"cli", p.encode(p.Status()))
    (reply,) = Turn(core).of(p.StatusReply, b"cli")
    info = reply.info
    assert (info["pending"], info["leased"], info["done"]) == (1, 1, 0)
    assert info["epoch"] == core.epoch
    assert [w["name"] for w in info["workers"]] == ["w1"]


# --- fencing ------------------------------------------------------------------------------


def assert_fenced(core: SinkCore, backend: Backend, n: int = 1) -> None:
    turn = Turn(core)
    assert turn.pubs == []
    assert core.stats["fenced results"] == n
    assert backend.peek("SELECT count(*) FROM results") == [(0,)]


def test_result_for_a_stale_attempt_is_fenced(core, ledger, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (first,) = Turn(core).leases
    send_failed(core, b"w1", first)
    (second,) = Turn(core).leases
    assert (second.batch_id, second.attempt) == (first.batch_id, 2)
    send_result(core, b"w1", first)  # attempt 1 again
    assert_fenced(core, backend)
    send_result(core, b"w1", second)
    assert [(pub.topic, pub.seq) for pub in Turn(core).pubs] == [("out", 1)]


def test_result_from_the_wrong_worker_is_fenced(core, ledger, backend):
    hello_worker(core, b"w1", 1)
    hello_worker(core, b"w2", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    other = b"w2" if lease.rid == b"w1" else b"w1"
    send_result(core, other, lease)
    assert_fenced(core, backend)
    assert status_counts(core)["leased"] == 1
    send_result(core, lease.rid, lease)
    assert len(Turn(core).pubs) == 1


def test_result_for_an_unknown_batch_is_fenced(core, ledger, backend):
    hello_worker(core, b"w1", 1)
    Turn(core)
    send_result(core, b"w1", (999, 1))
    assert_fenced(core, backend)
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 0, "dead": 0, "purged": 0}


def test_result_for_a_batch_already_done_is_fenced(core, ledger, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"w1", lease, {"out": records("first")})
    assert len(Turn(core).pubs) == 1
    send_result(core, b"w1", lease, {"out": records("second")})
    turn = Turn(core)
    assert turn.pubs == []
    assert core.stats["fenced results"] == 1
    assert backend.peek("SELECT payload FROM results") == [(records("first"),)]
    assert status_counts(core)["done"] == 1


@pytest.mark.parametrize("delta", [-1, 1])
def test_result_with_a_wrong_epoch_is_fenced(core, ledger, delta, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"w1", lease, epoch=core.epoch + delta)
    assert_fenced(core, backend)


def test_failed_with_a_wrong_epoch_is_fenced_and_does_not_replay(core, ledger):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_failed(core, b"w1", lease, epoch=core.epoch + 1)
    turn = Turn(core)
    assert turn.leases == []  # no second lease of the same batch
    assert core.stats["fenced results"] == 1
    assert core.stats["replays"] == 0
    assert status_counts(core)["leased"] == 1


def test_result_from_a_non_worker_is_rejected(core, ledger):
    hello_worker(core, b"w1", 1)
    hello_producer(core, b"p1", "prod")
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"p1", lease)
    turn = Turn(core)
    assert turn.pubs == []
    assert core.rejected == {"not a worker": 1}
    assert status_counts(core)["leased"] == 1


# --- liveness ------------------------------------------------------------------------------


def test_silent_worker_is_dropped_and_its_batches_replayed(core, clock):
    hello_worker(core, b"w1", 2)
    hello_worker(core, b"w2", 2)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    assert lease.rid == b"w1"
    other = b"w2"
    clock.advance(1.9)
    heartbeat(core, other)
    clock.advance(1.6)  # w1 silent 3.5 s > 3 s; w2 1.6 s, a beat missed
    core.tick()
    assert b"w1" not in {w["name"].encode() for w in core.status()["workers"]}
    assert Turn(core).leases == [], "w2 missed a beat: it gets nothing yet"
    heartbeat(core, other)
    (replay,) = Turn(core).leases
    assert (replay.rid, replay.batch_id, replay.attempt) == (other, lease.batch_id, 2)
    assert core.stats["replays"] == 1
    # The dropped worker's late result is refused: it is told to say hello again.
    send_result(core, b"w1", lease)
    turn = Turn(core)
    assert turn.pubs == []
    assert [m.msg for m in turn.of(p.Reset, b"w1")] == [p.Reset("unknown peer: send hello")]
    send_result(core, other, replay)
    assert len(Turn(core).pubs) == 1


def test_worker_silent_exactly_the_expiry_is_kept(core, clock):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    Turn(core)
    clock.advance(HEARTBEAT * LIVENESS)
    core.tick()
    assert [w["name"] for w in core.status()["workers"]] == ["w1"]
    clock.advance(0.01)
    core.tick()
    assert core.status()["workers"] == []
    assert status_counts(core) == {"pending": 1, "leased": 0, "done": 0, "dead": 0, "purged": 0}


def test_worker_that_keeps_heartbeating_is_kept(core, clock):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    for _ in range(20):
        clock.advance(HEARTBEAT)
        heartbeat(core, b"w1")
        core.tick()
        assert Turn(core).leases == []
    assert [w["name"] for w in core.status()["workers"]] == ["w1"]
    assert core.stats["replays"] == 0
    send_result(core, b"w1", lease)
    assert len(Turn(core).pubs) == 1


def test_any_message_counts_as_a_heartbeat(core, clock):
    hello_worker(core, b"w1", 1)
    for seq in range(1, 6):
        core.intake(batch("prod", seq))
    (lease,) = Turn(core).leases
    for _ in range(4):
        clock.advance(2.0)
        send_result(core, b"w1", lease)
        core.tick()
        (lease,) = Turn(core).leases
    assert core.stats["replays"] == 0


def test_heartbeats_are_sent_to_peers_every_interval(core, clock):
    hello_worker(core, b"w1", 1)
    hello_producer(core, b"p1", "prod")
    Turn(core)

    def beats() -> list[Sent]:
        core.tick()
        return Turn(core).of(p.Heartbeat)

    clock.advance(HEARTBEAT / 2)
    assert beats() == []
    clock.advance(HEARTBEAT / 2)
    sent = beats()
    assert sorted(m.rid for m in sent) == [b"p1", b"w1"]
    assert all(m.msg == p.Heartbeat(core.epoch) for m in sent)
    assert beats() == []  # once per interval, however often tick() runs
    clock.advance(HEARTBEAT * 0.9)
    assert beats() == []
    clock.advance(HEARTBEAT * 0.1)
    assert len(beats()) == 2


def test_next_deadline_is_never_later_than_the_next_heartbeat(core, clock):
    assert core.next_deadline() == pytest.approx(HEARTBEAT)
    clock.advance(HEARTBEAT * 0.75)
    assert core.next_deadline() == pytest.approx(HEARTBEAT * 0.25)
    clock.advance(HEARTBEAT)
    assert core.next_deadline() == 0.0
    core.tick()
    assert 0 < core.next_deadline() <= HEARTBEAT


def test_heartbeats_stop_for_a_dropped_peer(core, clock):
    hello_worker(core, b"w1", 1)
    hello_worker(core, b"w2", 1)
    Turn(core)
    for _ in range(4):
        clock.advance(HEARTBEAT)
        heartbeat(core, b"w2")
        core.tick()
        Turn(core)
    clock.advance(HEARTBEAT)
    core.tick()
    assert [m.rid for m in Turn(core).of(p.Heartbeat)] == [b"w2"]


def test_heartbeat_from_an_unknown_peer_gets_reset(core):
    heartbeat(core, b"ghost")
    turn = Turn(core)
    assert [(m.rid, type(m.msg)) for m in turn.msgs] == [(b"ghost", p.Reset)]
    assert core.stats["resets"] == 1
    assert core.status()["workers"] == []


def test_bye_replays_the_workers_batches_at_once(core):
    hello_worker(core, b"w1", 1)
    hello_worker(core, b"w2", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    core.control(lease.rid, p.encode(p.Bye()))
    (replay,) = Turn(core).leases
    assert replay.rid != lease.rid
    # A worker that stops cleanly was not killed by its batch: the batch owes no attempt.
    assert (replay.batch_id, replay.attempt) == (lease.batch_id, 1)


def test_hello_again_replays_what_the_worker_held(core):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    hello_worker(core, b"w1", 1)  # the worker started its session again
    turn = Turn(core)
    (replay,) = turn.leases
    assert (replay.rid, replay.batch_id, replay.attempt) == (b"w1", lease.batch_id, 1)
    send_result(core, b"w1", replay)
    assert len(Turn(core).pubs) == 1
    send_result(core, b"w1", lease)  # a second answer for the batch is fenced
    assert Turn(core).pubs == []


# --- failure and dead letters -------------------------------------------------------------


def test_failed_batch_is_requeued_ahead_of_newer_work(core, ledger, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    (first,) = Turn(core).leases
    send_failed(core, b"w1", first, "ValueError: bad input")
    (again,) = Turn(core).leases
    assert (again.batch_id, again.attempt) == (first.batch_id, 2)
    assert again.payload == first.payload
    assert core.stats["batches failed"] == 1
    settle(core)
    assert backend.peek("SELECT error FROM batches WHERE id=?", (first.batch_id,)) == [("ValueError: bad input",)]


def test_batch_is_dead_lettered_once_after_max_attempts(ledger, clock, backend):
    core = make_core(ledger, clock, max_attempts=3)
    hello_worker(core, b"w1", 1)
    payload = records("poison")
    core.intake(batch("prod", 1, topic="jobs", payload=payload))
    core.intake(batch("prod", 2))
    core.intake(batch("prod", 3))
    (lease,) = Turn(core).leases
    poison = lease.batch_id
    error = "Traceback (most recent call last):\n  ...\nValueError: poison"
    for attempt in (1, 2):
        assert (lease.batch_id, lease.attempt) == (poison, attempt)
        send_failed(core, b"w1", lease, f"attempt {attempt} failed")
        turn = Turn(core)
        assert turn.pubs == []
        (lease,) = turn.leases
    assert (lease.batch_id, lease.attempt) == (poison, 3)
    send_failed(core, b"w1", lease, error)
    turn = Turn(core)
    (dead,) = turn.pubs
    assert dead.topic == p.DEAD_TOPIC
    assert dead == p.Dead(p.DEAD_TOPIC, 1, poison, 3, error, "jobs", payload)
    # The rest keep flowing, in the same turn.
    (nxt,) = turn.leases
    assert msgpack.unpackb(nxt.payload) == ["prod-2"]
    assert status_counts(core) == {"pending": 1, "leased": 1, "done": 0, "dead": 1, "purged": 0}
    send_result(core, b"w1", nxt)
    turn = Turn(core)
    assert [(type(pub), pub.topic, pub.seq) for pub in turn.pubs] == [(p.Publish, "out", 1)]
    (last,) = turn.leases
    send_result(core, b"w1", last)
    Turn(core)
    for _ in range(3):
        assert all(not isinstance(pub, p.Dead) for pub in Turn(core).pubs)
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 2, "dead": 1, "purged": 0}
    assert backend.peek("SELECT topic, seq, kind FROM results WHERE batch_id=?", (poison,)) == [(p.DEAD_TOPIC, 1, 1)]
    # A late result for the dead batch changes nothing.
    send_result(core, b"w1", lease)
    assert Turn(core).pubs == []
    assert core.stats["fenced results"] == 1


def test_dead_letters_have_their_own_sequence(ledger, clock):
    core = make_core(ledger, clock, max_attempts=1)
    hello_worker(core, b"w1", 3)
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    a, b, c = Turn(core).leases
    send_failed(core, b"w1", a, "e1")
    send_result(core, b"w1", b)
    send_failed(core, b"w1", c, "e3")
    turn = Turn(core)
    assert [(pub.topic, pub.seq) for pub in turn.pubs] == [(p.DEAD_TOPIC, 1), ("out", 1), (p.DEAD_TOPIC, 2)]
    assert [pub.error for pub in turn.pubs if isinstance(pub, p.Dead)] == ["e1", "e3"]


# --- batch timeout -------------------------------------------------------------------------


@pytest.fixture
def slow_core(ledger, clock):
    """Liveness long enough never to interfere: only the batch timeout acts."""
    return make_core(ledger, clock, timing=Timing(heartbeat=HEARTBEAT, liveness=10_000), batch_timeout=10.0)


def test_lease_past_its_deadline_is_replayed(slow_core, clock):
    core = slow_core
    hello_worker(core, b"w1", 1)
    hello_worker(core, b"w2", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    other = b"w2" if lease.rid == b"w1" else b"w1"
    clock.advance(9.0)
    core.tick()
    assert Turn(core).leases == []
    clock.advance(1.0)
    for rid in (b"w1", b"w2"):
        heartbeat(core, rid)  # both alive: only the batch timeout acts
    core.tick()
    (replay,) = Turn(core).leases
    assert (replay.rid, replay.batch_id, replay.attempt) == (other, lease.batch_id, 2)
    assert core.stats["batch timeouts"] == 1
    # The slow worker's credit stays used: new work does not go to it ...
    core.intake(batch("prod", 2))
    assert Turn(core).leases == []
    # ... until it answers (too late: fenced), and then it gets the next batch.
    send_result(core, lease.rid, lease)
    turn = Turn(core)
    assert turn.pubs == []
    assert core.stats["fenced results"] == 1
    (nxt,) = turn.leases
    assert nxt.rid == lease.rid
    assert msgpack.unpackb(nxt.payload) == ["prod-2"]
    send_result(core, other, replay)
    assert [(pub.topic, pub.seq, pub.batch_id) for pub in Turn(core).pubs] == [("out", 1, lease.batch_id)]


def test_timeout_error_is_recorded_and_leads_to_dead_letter(ledger, clock):
    core = make_core(
        ledger, clock, timing=Timing(heartbeat=HEARTBEAT, liveness=10_000), batch_timeout=10.0, max_attempts=1
    )
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    Turn(core)
    clock.advance(10.0)
    core.tick()
    (dead,) = Turn(core).pubs
    assert isinstance(dead, p.Dead)
    assert "batch timeout" in dead.error


def test_timed_out_worker_is_never_given_more_than_its_credit(slow_core, clock):
    core = slow_core
    hello_worker(core, b"w1", 2)
    core.intake(batch("prod", 1))
    (first,) = Turn(core).leases
    clock.advance(10.0)
    core.tick()  # first lease revoked; w1 still works on it
    core.intake(batch("prod", 2))
    core.intake(batch("prod", 3))
    leased_since = Turn(core).leases
    # w1 holds attempt 1 of the first batch and has answered nothing: one more lease at most.
    assert len(leased_since) <= 1
    assert core.status()["workers"][0]["in_flight"] <= 2


# --- unreachable ---------------------------------------------------------------------------


def test_unreachable_worker_is_dropped_and_its_batches_replayed(core):
    hello_worker(core, b"w1", 2)
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    lost = Turn(core).leases
    assert [le.rid for le in lost] == [b"w1", b"w1"]
    hello_worker(core, b"w2", 4)
    core.intake(batch("prod", 3))
    (fresh,) = Turn(core).leases
    core.unreachable(b"w1")
    # Either batch may have killed it: neither pays yet, and each runs again alone, on a worker
    # that holds nothing else (w2 first finishes what it holds).
    assert Turn(core).leases == []
    send_result(core, b"w2", fresh)
    replays = []
    for _ in lost:
        (le,) = Turn(core).leases
        replays.append(le)
        assert Turn(core).leases == [], "nothing beside a suspect"
        send_result(core, b"w2", le)
    assert [(le.rid, le.batch_id, le.attempt) for le in replays] == [(b"w2", le.batch_id, 1) for le in lost]
    assert core.stats["replays"] == 2
    assert [w["name"] for w in core.status()["workers"]] == ["w2"]
    heartbeat(core, b"w1")
    assert Turn(core).of(p.Reset, b"w1")


def test_replayed_batches_keep_their_order(core):
    hello_worker(core, b"w1", 3)
    for seq in range(1, 5):
        core.intake(batch("prod", seq))
    first_leases = Turn(core).leases
    assert [msgpack.unpackb(le.payload) for le in first_leases] == [["prod-1"], ["prod-2"], ["prod-3"]]
    core.unreachable(b"w1")
    hello_worker(core, b"w2", 1)
    order = []
    for _ in range(4):
        (le,) = Turn(core).leases
        order.append(msgpack.unpackb(le.payload)[0])
        send_result(core, b"w2", le)
    assert order == ["prod-1", "prod-2", "prod-3", "prod-4"]


def test_unreachable_producer_gets_no_more_acks(core):
    hello_producer(core, b"p1", "prod")
    Turn(core)
    core.unreachable(b"p1")
    core.intake(batch("prod", 1))
    assert Turn(core).acks(b"p1") == []


# --- restart recovery ----------------------------------------------------------------------


def run_first_sink(ledger, clock):
    """A sink that published the result of its first batch, leased the other two, then
    crashed before recording that it had published the result."""
    core = make_core(ledger, clock)
    hello_worker(core, b"w1", 2)
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    first, second = Turn(core).leases
    send_result(core, b"w1", first, {"out": records("r1"), "audit": records("a1")})
    turn = Turn(core)
    assert [(pub.topic, pub.seq) for pub in turn.pubs] == [("out", 1), ("audit", 1)]
    (third,) = turn.leases
    return core, first, (second, third), turn.pubs


def test_restart_has_a_larger_epoch_and_puts_leases_back(ledger, clock, reopen, backend):
    old, first, (second, third), _ = run_first_sink(ledger, clock)
    ledger.close()  # crash
    core = make_core(reopen(), clock)
    assert core.epoch > old.epoch
    assert core.recovered == 2
    assert status_counts(core) == {"pending": 2, "leased": 0, "done": 1, "dead": 0, "purged": 0}
    assert backend.peek("SELECT id, state FROM batches ORDER BY id") == [
        (first.batch_id, 2),
        (second.batch_id, 0),
        (third.batch_id, 0),
    ]
    # The old worker's result is refused (and counted as fenced) until it says hello, and then
    # fenced by the epoch.
    send_result(core, b"w1", second, epoch=old.epoch)
    assert Turn(core).of(p.Reset, b"w1")
    assert core.stats["fenced results"] == 1
    hello_worker(core, b"w1", 2)
    turn = Turn(core)
    # The sink's crash cost the batches no attempt: they go out again as attempt 1, and the
    # new epoch tells these leases from the old ones.
    assert [(le.batch_id, le.attempt, le.epoch) for le in turn.leases] == [
        (second.batch_id, 1, core.epoch),
        (third.batch_id, 1, core.epoch),
    ]
    assert [le.payload for le in turn.leases] == [second.payload, third.payload]
    send_result(core, b"w1", second, epoch=old.epoch)
    assert Turn(core).pubs == []
    assert core.stats["fenced results"] == 2


def test_restart_republishes_unmarked_results_with_the_same_seq(ledger, clock, reopen):
    _, _, _, published = run_first_sink(ledger, clock)
    ledger.close()  # crash before the publish mark was committed
    core = make_core(reopen(), clock)
    turn = Turn(core)
    assert turn.pubs == published  # every header field and payload the same
    assert Turn(core).pubs == []
    # New results continue each topic's sequence.
    hello_worker(core, b"w1", 1)
    (lease,) = Turn(core).leases
    send_result(core, b"w1", lease, {"out": records("r2")})
    assert [(pub.topic, pub.seq) for pub in Turn(core).pubs] == [("out", 2)]


def test_restart_does_not_republish_what_was_marked(ledger, clock, reopen):
    old, *_ = run_first_sink(ledger, clock)
    settle(old)  # the publish mark is committed within COMMIT_WITHIN
    ledger.close()
    core = make_core(reopen(), clock)
    assert Turn(core).pubs == []


def test_restart_republishes_dead_letters_too(ledger, clock, reopen):
    old = make_core(ledger, clock, max_attempts=1)
    hello_worker(old, b"w1", 1)
    old.intake(batch("prod", 1, topic="jobs"))
    (lease,) = Turn(old).leases
    send_failed(old, b"w1", lease, "fatal")
    (dead,) = Turn(old).pubs
    ledger.close()
    core = make_core(reopen(), clock, max_attempts=1)
    (again,) = Turn(core).pubs
    assert isinstance(again, p.Dead) and again == dead


def test_restart_dedups_batches_stored_before_the_crash(ledger, clock, reopen):
    run_first_sink(ledger, clock)
    ledger.close()
    core = make_core(reopen(), clock)
    hello_producer(core, b"p1", "prod")
    core.intake(batch("prod", 1))  # resent: its ack may have been lost in the crash
    core.intake(batch("prod", 4))
    turn = Turn(core)
    assert turn.acks(b"p1") == [[1, 4]]
    assert core.stats["duplicate batches"] == 1
    assert status_counts(core) == {"pending": 3, "leased": 0, "done": 1, "dead": 0, "purged": 0}


# --- rejects -------------------------------------------------------------------------------

GOOD_PAYLOAD = records("x")

BAD_INTAKE = [
    ("not msgpack", [b"\xc1\xc1", GOOD_PAYLOAD], "bad header"),
    ("wrong version", [msgpack.packb([2, p.BATCH, "prod", 1, "in", 1]), GOOD_PAYLOAD], "bad version"),
    ("unknown type", [msgpack.packb([1, "bulk", "prod", 1, "in", 1]), GOOD_PAYLOAD], "unknown type"),
    ("control type on intake", [p.header(p.Hello("producer", "prod", 0)), GOOD_PAYLOAD], "unexpected type"),
    ("seq is a string", [msgpack.packb([1, p.BATCH, "prod", "1", "in", 1]), GOOD_PAYLOAD], "bad field"),
    ("negative count", [msgpack.packb([1, p.BATCH, "prod", 1, "in", -1]), GOOD_PAYLOAD], "bad field"),
    ("missing field", [msgpack.packb([1, p.BATCH, "prod", 1, "in"]), GOOD_PAYLOAD], "bad header"),
    ("no payload", [p.header(p.Batch("prod", 1, "in", 1, GOOD_PAYLOAD))], "bad frame count"),
    ("two payloads", [*p.encode(p.Batch("prod", 1, "in", 1, GOOD_PAYLOAD)), GOOD_PAYLOAD], "bad frame count"),
    ("no frames", [], "bad frame count"),
    ("reserved topic", p.encode(p.Batch("prod", 1, "zfan.x", 1, GOOD_PAYLOAD)), "reserved topic"),
    ("dead topic", p.encode(p.Batch("prod", 1, p.DEAD_TOPIC, 1, GOOD_PAYLOAD)), "reserved topic"),
]


@pytest.mark.parametrize("frames,reason", [c[1:] for c in BAD_INTAKE], ids=[c[0] for c in BAD_INTAKE])
def test_malformed_batch_is_rejected_and_changes_nothing(core, ledger, frames, reason, backend):
    hello_producer(core, b"p1", "prod")
    hello_worker(core, b"w1", 5)
    Turn(core)
    core.intake(frames)
    assert core.rejected == {reason: 1}
    turn = Turn(core)
    assert turn.msgs == [] and turn.pubs == []
    assert core.stats == {}
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 0, "dead": 0, "purged": 0}
    assert backend.peek("SELECT count(*) FROM batches") == [(0,)]
    # The sink goes on: a good batch afterwards is stored, acked and leased.
    core.intake(batch("prod", 1))
    turn = Turn(core)
    assert turn.acks(b"p1") == [[1]]
    assert len(turn.leases) == 1


def _result_header(epoch, batch_id, attempt, topics, counts):
    """A result's header alone: the test adds its payload frames."""
    return p.header(p.Result(epoch, batch_id, attempt, topics, counts, []))


BAD_CONTROL = [
    ("not msgpack", lambda e, b: [b"\xc1"], "bad header"),
    ("no frames", lambda e, b: [], "bad frame count"),
    ("wrong version", lambda e, b: [msgpack.packb([9, p.HEARTBEAT, e])], "bad version"),
    ("unknown type", lambda e, b: [msgpack.packb([1, "shout", e])], "unknown type"),
    ("sink-only type", lambda e, b: p.encode(p.Lease(e, b, 1, "in", 1, GOOD_PAYLOAD)), "unexpected type"),
    ("batch on control", lambda e, b: p.encode(p.Batch("prod", 9, "in", 1, GOOD_PAYLOAD)), "unexpected type"),
    (
        "batch_id is a string",
        lambda e, b: [msgpack.packb([1, p.RESULT, e, str(b), 1, ["out"], [1]]), GOOD_PAYLOAD],
        "bad field",
    ),
    ("result without payload", lambda e, b: [_result_header(e, b, 1, ["out"], [1])], "bad frame count"),
    (
        "result with extra payload",
        lambda e, b: [_result_header(e, b, 1, ["out"], [1]), GOOD_PAYLOAD, GOOD_PAYLOAD],
        "bad frame count",
    ),
    (
        "topics and counts differ",
        lambda e, b: [_result_header(e, b, 1, ["out", "x"], [1]), GOOD_PAYLOAD, GOOD_PAYLOAD],
        "bad frame count",
    ),
    ("reserved result topic", lambda e, b: [_result_header(e, b, 1, ["zfan.x"], [1]), GOOD_PAYLOAD], "reserved topic"),
    (
        "result to the dead topic",
        lambda e, b: [_result_header(e, b, 1, [p.DEAD_TOPIC], [1]), GOOD_PAYLOAD],
        "reserved topic",
    ),
]


@pytest.mark.parametrize("make,reason", [c[1:] for c in BAD_CONTROL], ids=[c[0] for c in BAD_CONTROL])
def test_malformed_control_message_is_rejected_and_changes_nothing(core, ledger, make, reason, backend):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    (lease,) = Turn(core).leases
    stats = dict(core.stats)
    core.control(b"w1", make(core.epoch, lease.batch_id))
    assert core.rejected == {reason: 1}
    turn = Turn(core)
    assert turn.msgs == [] and turn.pubs == []
    assert dict(core.stats) == stats
    assert status_counts(core) == {"pending": 1, "leased": 1, "done": 0, "dead": 0, "purged": 0}
    assert backend.peek("SELECT count(*) FROM results") == [(0,)]
    # The lease stands and the worker's credit is still used by it.
    send_result(core, b"w1", lease)
    turn = Turn(core)
    assert [(pub.topic, pub.seq) for pub in turn.pubs] == [("out", 1)]
    assert len(turn.leases) == 1


@pytest.mark.parametrize(
    "role,credit,reason",
    [
        ("boss", 1, "bad role"),
        ("worker", 0, "bad credit"),
        ("worker", p.MAX_CREDIT + 1, "bad credit"),
    ],
)
def test_bad_hello_is_rejected(core, role, credit, reason):
    core.intake(batch("prod", 1))
    core.control(b"x1", p.encode(p.Hello(role, "x1", credit)))
    assert core.rejected == {reason: 1}
    turn = Turn(core)
    assert turn.msgs == []
    assert core.status()["workers"] == []
    heartbeat(core, b"x1")
    assert Turn(core).of(p.Reset, b"x1")  # it did not join


def test_worker_with_max_credit_is_accepted(core):
    hello_worker(core, b"w1", p.MAX_CREDIT)
    assert Turn(core).of(p.Welcome, b"w1")
    assert core.rejected == {}


def test_rejects_are_counted_by_reason(core):
    core.intake([b"\xc1", GOOD_PAYLOAD])
    core.intake([b"\xc1", GOOD_PAYLOAD])
    core.intake(p.encode(p.Batch("prod", 1, "zfan.x", 1, GOOD_PAYLOAD)))
    core.control(b"c", [b"\xc1"])
    assert core.rejected == {"bad header": 3, "reserved topic": 1}
    assert core.status()["rejected"] == {"bad header": 3, "reserved topic": 1}


def test_messages_from_unknown_peers_get_reset_and_change_nothing(core, ledger):
    hello_worker(core, b"w1", 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    send_result(core, b"ghost", lease)
    send_failed(core, b"ghost", lease)
    core.control(b"ghost", p.encode(p.Bye()))
    turn = Turn(core)
    assert [(m.rid, type(m.msg)) for m in turn.msgs] == [(b"ghost", p.Reset)]  # one per burst
    assert turn.pubs == []
    assert core.stats["resets"] == 3
    assert status_counts(core)["leased"] == 1


# --- invariants under churn ----------------------------------------------------------------


def test_nothing_is_lost_or_published_twice_under_churn(ledger, clock):
    """Failures, a poison batch, a worker gone silent, a worker too slow for the batch timeout,
    an unreachable worker: every (batch, attempt) is leased once, every batch ends done or dead
    exactly once, and each topic's seqs run 1, 2, 3 ... without gaps or repeats."""
    core = make_core(ledger, clock, timing=Timing(heartbeat=1.0, liveness=3), batch_timeout=5.0, max_attempts=4)
    workers = [b"w1", b"w2", b"w3"]
    for w in workers:
        hello_worker(core, w, 2)
    total = 120
    poison = 13
    leased: list[tuple[bytes, int, int]] = []
    published: list[p.Publish | p.Dead] = []
    held: dict[bytes, list[Sent]] = {w: [] for w in workers}
    for step in range(300):
        if step < total:
            core.intake(batch("prod", step + 1))  # one batch per half second
        turn = Turn(core)
        published += turn.pubs
        for le in turn.leases:
            leased.append((le.rid, le.batch_id, le.attempt))
            held[le.rid].append(le)
        for rid in workers:
            silent = rid == b"w1" and 20 <= step < 40  # dropped after 3 s of silence
            slow = rid == b"w2" and 60 <= step < 80  # heartbeats, but answers after 10 s
            if rid == b"w1" and step == 40:
                held[rid] = []  # restarted: forgot its leases
                hello_worker(core, rid, 2)
            if rid == b"w3" and step == 100:
                core.unreachable(rid)
                held[rid] = []
                hello_worker(core, rid, 2)
            if silent:
                continue
            heartbeat(core, rid)
            if slow or step % 2:
                continue
            if held[rid]:  # one answer a second per worker, oldest lease first
                le = held[rid].pop(0)
                if le.batch_id == poison or (le.batch_id % 7 == 0 and le.attempt < 3):
                    send_failed(core, rid, le, f"failed batch {le.batch_id} attempt {le.attempt}")
                else:
                    send_result(core, rid, le, {"out": records(le.batch_id)})
        clock.advance(0.5)
        core.tick()
    published += Turn(core).pubs
    # The scenario did what it says.
    assert core.stats["batch timeouts"] > 0
    assert core.stats["fenced results"] > 0
    assert core.stats["replays"] > core.stats["batches failed"]
    # A batch's attempt never goes backwards (a lease that cost nothing goes out again with its number).
    last_attempt: dict[int, int] = {}
    for _, batch_id, attempt in leased:
        assert attempt >= last_attempt.get(batch_id, 0)
        last_attempt[batch_id] = attempt
    # Nothing published twice, seqs without gaps.
    keys = [(pub.topic, pub.seq) for pub in published]
    assert len(keys) == len(set(keys))
    outs = [pub for pub in published if pub.topic == "out"]
    assert [pub.seq for pub in outs] == list(range(1, len(outs) + 1))
    # Every batch exactly once: a result, or for the poison batch a dead letter.
    assert sorted(pub.batch_id for pub in outs) == [b for b in range(1, total + 1) if b != poison]
    dead = [pub for pub in published if isinstance(pub, p.Dead)]
    assert len(outs) + len(dead) == len(published)
    assert [(d.topic, d.seq, d.batch_id, d.attempts) for d in dead] == [(p.DEAD_TOPIC, 1, poison, 4)]
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": total - 1, "dead": 1, "purged": 0}
    assert ledger.counts() == status_counts(core)


def test_messages_over_the_limits_are_refused_before_decoding(ledger, clock):
    from zfan.config import Limits

    core = make_core(ledger, clock, limits=Limits(max_frames=4, max_message=1000))
    hello_producer(core, b"p1", "prod-1")
    core.intake(p.encode(p.Batch("prod-1", 1, "t", 1, b"\x91" + b"\xc4\xff" + b"x" * 1100)))
    core.control(b"w1", [p.header(p.Heartbeat(0))] * 5)
    core.intake(batch("prod-1", 2))
    assert core.rejected == {"message too large": 1, "too many frames": 1}
    assert Turn(core).acks(b"p1") == [[2]], "what fits the limits goes on"


def test_answers_about_many_long_topics_stay_within_a_header(core):
    # 6 000 topics of 250 bytes: 10 000 pairs of them would be 2.6 MB, over the 1 MiB header
    # limit, and a peer drops such an answer unread.
    topics = [f"{i:05d}".ljust(250, "t") for i in range(6000)]
    hello_worker(core, b"w", 2)
    for seq in (1, 2):
        core.intake([*batch("p", seq)], None)
    leases = Turn(core).leases
    for lease, part in zip(leases, (topics[:3000], topics[3000:]), strict=True):
        send_result(core, b"w", lease, {t: records(1) for t in part})
    Turn(core)
    core.control(b"s", p.encode(p.Heads([""], 0)))
    (answer,) = Turn(core).of(p.Topics, b"s")
    named, seqs, more = answer.topics, answer.seqs, answer.more
    assert 3900 < len(named) < 6000 and set(seqs) == {1} and set(named) <= set(topics) and more
    # A durable position over all of them, committed in parts that each fit, reads back in
    # pages that each fit (tests/test_heads.py reads every page).
    pairs = [(t, 1) for t in topics]
    while pairs:
        n = p.pairs_that_fit(pairs, reserve=200)
        part, pairs = pairs[:n], pairs[n:]
        core.control(b"s", p.encode(p.Commit("n" * p.MAX_NAME, [t for t, _ in part], [s for _, s in part])))
    Turn(core)
    core.control(b"s", p.encode(p.GetCursor("n" * p.MAX_NAME, "")))
    (cursor,) = Turn(core).of(p.Cursor, b"s")
    assert 3900 < len(cursor.topics) < 6000 and set(cursor.seqs) == {1} and cursor.more
    assert core.status()["rejected"] == {}


@pytest.mark.parametrize("records, leased", [(10, 64), (1000, 4), (10_000, 2)])
def test_a_worker_holds_up_to_its_credit_but_few_big_batches(core, records, leased):
    hello_worker(core, b"w", 64)
    payload = msgpack.packb(list(range(records)))
    for seq in range(1, 101):
        core.intake(batch("p", seq, payload=payload, count=records), None)
    first = Turn(core).leases
    assert len(first) == leased
    send_result(core, b"w", first[0])
    assert len(Turn(core).leases) == 1, "one answer frees room for one more"


def test_a_producer_that_dialled_again_is_welcomed_once_its_old_connection_proves_gone(core, clock):
    """A sink that stalled past the expiry still tracks the producer's old connection when the
    producer, having given up on it, says hello on a new one. A heartbeat probes the old one:
    unreachable, it is forgotten and the new one welcomed in that turn, not an expiry later."""
    hello_producer(core, b"p1", "prod-1")
    Turn(core)
    hello_producer(core, b"p1-again", "prod-1")
    turn = Turn(core)
    assert not turn.of(p.Welcome, b"p1-again")
    assert turn.of(p.Heartbeat, b"p1"), "the old connection is probed"
    core.unreachable(b"p1")  # what the sink's socket loop does when that send fails
    assert core.next_deadline() == 0.0, "the welcome goes out at once"
    turn = Turn(core)
    assert turn.of(p.Welcome, b"p1-again")
    core.intake(batch("prod-1", 1))
    assert Turn(core).acks(b"p1-again") == [[1]]


def test_a_probed_connection_that_answers_keeps_its_producer_id(core, clock):
    hello_producer(core, b"p1", "prod-1")
    Turn(core)
    hello_producer(core, b"intruder", "prod-1")
    Turn(core)  # the probe's heartbeat went out: p1 is alive
    assert core.rejected["producer id in use"] == 0, "not refused before the probe tells"
    core.control(b"p1", p.encode(p.Heartbeat(core.epoch)))
    core.intake(batch("prod-1", 1))
    turn = Turn(core)
    assert turn.acks(b"p1") == [[1]]
    assert not turn.of(p.Welcome, b"intruder")
    assert core.rejected["producer id in use"] == 1
    core.unreachable(b"p1")  # gone later: the refused hello is not welcomed by that
    assert not Turn(core).of(p.Welcome, b"intruder")
