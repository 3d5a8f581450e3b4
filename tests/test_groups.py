"""Groups (docs/PROTOCOL.md section 5.7): several batches, leases, results or publishes in one
message, negotiated with `features`. Each entry of a group means what the single message
means: the same batches stored once, the same leases fenced, the same results numbered."""

from __future__ import annotations

import msgpack
import pytest

from tests.test_dispatch import Turn, batch, hello_producer, hello_worker, make_core, records
from zfan import protocol as p
from zfan.config import Limits, Timing
from zfan.delivery import ProducerCore, Sent
from zfan.errors import ProtocolError
from zfan.jobs import WorkerCore
from zfan.ledger import DONE
from zfan.nodes.worker import answer_frames
from zfan.publishing import GROUP_BYTES
from zfan.session import Joined, Lost

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ledger(backend):
    """Tried on each ledger backend."""
    return backend.open()


BIG = (16 << 20, 64 << 20)  # max_frame, max_message: room for any group here
TIMING = Timing(heartbeat=0.25, liveness=3)


def batches(producer: str, seqs: list[int], topic: str = "in") -> list[bytes]:
    payloads = [records(f"{producer}-{seq}") for seq in seqs]
    return p.encode(
        p.Batches(producer, seqs, [topic] * len(seqs), [1] * len(seqs), list(map(len, payloads)), b"".join(payloads))
    )


def grouped_worker(core, rid: bytes, credit: int) -> p.Features:
    """A worker that says hello and asks for groups; the sink's answer."""
    hello_worker(core, rid, credit)
    core.control(rid, p.encode(p.Features([p.GROUPS, "colour"], *BIG)))
    turn = Turn(core)
    (answer,) = [m.msg for m in turn.msgs if isinstance(m.msg, p.Features)]
    return answer


def results_of(core, leases: list[p.Lease], epoch: int | None = None) -> list[bytes]:
    outs = [records(f"result-of-{lease.batch_id}") for lease in leases]
    return p.encode(
        p.Results(
            core.epoch if epoch is None else epoch,
            [lease.batch_id for lease in leases],
            [lease.attempt for lease in leases],
            [1] * len(leases),
            ["out"] * len(leases),
            [1] * len(leases),
            list(map(len, outs)),
            b"".join(outs),
        )
    )


# --- the wire ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg, says",
    [
        (p.Batches("p", [1, 2], ["t", "t"], [1, 1], [2, 2], b"\x91\x01\x91"), "sizes do not add up to the payload"),
        (p.Batches("p", [1, 2], ["t"], [1, 1], [2, 2], b"\x91\x01\x91\x02"), "lists of different lengths"),
        (p.Leases(1, [1], [1], ["t"], [1], [3], b"\x91\x01"), "sizes do not add up to the payload"),
        (p.Results(1, [1, 2], [1], [1, 0], ["a"], [1], [2], b"\x91\x01"), "lists of different lengths"),
        (p.Results(1, [1, 2], [1, 1], [2, 1], ["a", "b"], [1, 1], [2, 2], b"\x91\x01\x91\x02"), "spans do not add up"),
        (p.Publishes("t", [1, 2], [5, 6], [1, 1], [2], b"\x91\x01"), "lists of different lengths"),
    ],
    ids=["batches sizes", "batches lists", "leases sizes", "results lists", "results spans", "publishes lists"],
)
def test_a_group_whose_lists_or_sizes_disagree_is_refused(msg, says):
    with pytest.raises(ProtocolError) as info:
        p.decode(p.encode(msg))
    assert info.value.reason == "bad field" and says in str(info.value)


def test_a_group_is_cut_into_the_messages_it_stands_for():
    results = p.Results(3, [7, 8, 9], [1, 2, 1], [2, 0, 1], ["a", "b", "c"], [1, 2, 3], [1, 2, 3], b"xyyzzz")
    assert p.decode(p.encode(results)).split() == [  # type: ignore[attr-defined]
        p.Result(3, 7, 1, ["a", "b"], [1, 2], [b"x", b"yy"]),
        p.Result(3, 8, 2, [], [], []),
        p.Result(3, 9, 1, ["c"], [3], [b"zzz"]),
    ]
    pubs = p.Publishes("t", [4, 5], [1, 2], [1, 1], [1, 2], b"abb")
    assert pubs.split() == [p.Publish("t", 4, 1, 1, b"a"), p.Publish("t", 5, 2, 1, b"bb")]


# --- the sink ------------------------------------------------------------------------------


def test_the_sink_answers_features_with_what_it_shares_and_its_limits(ledger, clock):
    core = make_core(ledger, clock, limits=Limits(max_frame=1 << 20, max_message=4 << 20))
    assert grouped_worker(core, b"w1", 8) == p.Features([p.GROUPS], 1 << 20, 4 << 20)  # "colour" left out


def test_a_group_of_batches_is_stored_once_each_and_acknowledged_whole(ledger, clock, backend):
    core = make_core(ledger, clock)
    hello_producer(core, b"pr", "prod")
    Turn(core)
    core.intake(batch("prod", 2))  # came before, alone
    core.intake(batches("prod", [1, 2, 3, 3]))  # one resent, one twice in the group
    turn = Turn(core)
    assert turn.acks(b"pr") == [[2, 1, 2, 3, 3]]
    assert backend.peek("SELECT seq FROM batches ORDER BY id") == [(2,), (1,), (3,)]
    assert core.stats["duplicate batches"] == 2 and core.counts["pending"] == 3


def test_a_group_of_batches_with_a_reserved_topic_is_refused_whole(ledger, clock, backend):
    core = make_core(ledger, clock)
    payloads = [records("a"), records("b")]
    group = p.Batches("prod", [1, 2], ["in", "zfan.x"], [1, 1], list(map(len, payloads)), b"".join(payloads))
    core.intake(p.encode(group))
    Turn(core)
    assert core.rejected == {"reserved topic": 1}
    assert backend.peek("SELECT count(*) FROM batches") == [(0,)]


def test_a_worker_that_asked_for_groups_gets_a_turns_leases_in_one_message(ledger, clock):
    core = make_core(ledger, clock)
    plain = b"w0"
    hello_worker(core, plain, 3)
    grouped_worker(core, b"w1", 3)
    for seq in range(1, 7):
        core.intake(batch("prod", seq))
    turn = Turn(core)
    assert [type(m.msg) for m in turn.msgs if m.rid == plain] == [p.Lease] * 3
    (group,) = [m.msg for m in turn.msgs if m.rid == b"w1"]
    assert isinstance(group, p.Leases) and len(group.batch_ids) == 3
    leases = group.split()
    assert {msgpack.unpackb(lease.payload)[0] for lease in leases} <= {f"prod-{seq}" for seq in range(1, 7)}
    assert core.workers[b"w1"].free == 0  # each lease of the group took its credit


def test_leases_are_grouped_within_what_the_worker_takes(ledger, clock):
    core = make_core(ledger, clock)
    hello_worker(core, b"w1", 10)
    core.control(b"w1", p.encode(p.Features([p.GROUPS], 2 * len(records("prod-1")), 1 << 20)))
    Turn(core)
    for seq in range(1, 6):
        core.intake(batch("prod", seq))
    sizes = [len(m.msg.batch_ids) if isinstance(m.msg, p.Leases) else 1 for m in Turn(core).msgs if m.rid == b"w1"]
    assert sizes == [2, 2, 1]  # two payloads fill the frame it takes


def test_a_group_of_results_is_stored_and_published_and_a_fenced_one_in_it_is_dropped(ledger, clock, backend):
    core = make_core(ledger, clock)
    grouped_worker(core, b"w1", 4)
    for seq in range(1, 5):
        core.intake(batch("prod", seq))
    (group,) = [m.msg for m in Turn(core).msgs if isinstance(m.msg, p.Leases)]
    leases = group.split()
    stale = p.Lease(core.epoch, leases[1].batch_id, leases[1].attempt + 1, "in", 1, b"")  # never leased
    core.control(b"w1", results_of(core, [leases[0], stale, *leases[2:]]))
    turn = Turn(core)
    assert [(pub.topic, pub.seq) for pub in turn.pubs] == [("out", 1), ("out", 2), ("out", 3)]
    assert turn.messages == 1  # one topic, one turn: one message
    assert core.stats["fenced results"] == 1 and core.counts["done"] == 3
    done = {bid for (bid,) in backend.peek("SELECT id FROM batches WHERE state=?", (DONE,))}
    assert done == {leases[0].batch_id, leases[2].batch_id, leases[3].batch_id}


def test_publishes_group_a_topic_keep_dead_letters_alone_and_stop_for_a_subscriber_without_groups(ledger, clock):
    core = make_core(ledger, clock, max_attempts=1)
    hello_worker(core, b"w1", 10)
    for seq in range(1, 5):
        core.intake(batch("prod", seq))
    a, b, c, d = (m.msg for m in Turn(core).leases)
    for lease, topic in ((a, "x"), (b, "y"), (c, "x")):
        out = records("r")
        core.control(b"w1", p.encode(p.Result(core.epoch, lease.batch_id, lease.attempt, [topic], [1], [out])))
    core.control(b"w1", p.encode(p.Failed(core.epoch, d.batch_id, d.attempt, "boom")))
    turn = Turn(core)
    assert turn.messages == 3  # x (two results), y, the dead letter
    assert [(pub.topic, pub.seq) for pub in turn.pubs] == [("x", 1), ("x", 2), ("y", 1), (p.DEAD_TOPIC, 1)]

    core.subscriber_without_groups()
    for seq in range(5, 7):
        core.intake(batch("prod", seq))
    for lease in Turn(core).leases:
        core.control(b"w1", p.encode(p.Result(core.epoch, lease.batch_id, lease.attempt, ["x"], [1], [records("r")])))
    turn = Turn(core)
    assert turn.messages == 2 and [(pub.topic, pub.seq) for pub in turn.pubs] == [("x", 3), ("x", 4)]


def test_a_publish_group_holds_at_most_group_bytes(ledger, clock):
    core = make_core(ledger, clock)
    hello_worker(core, b"w1", 10)
    for seq in range(1, 6):
        core.intake(batch("prod", seq))
    big = msgpack.packb(["x" * (GROUP_BYTES // 2 - 100)])
    for lease in Turn(core).leases:
        core.control(b"w1", p.encode(p.Result(core.epoch, lease.batch_id, lease.attempt, ["x"], [1], [big])))
    turn = Turn(core)
    assert turn.messages == 3 and [pub.seq for pub in turn.pubs] == [1, 2, 3, 4, 5]


# --- the clients' cores -------------------------------------------------------------------


def welcomed_worker(groups: Limits | None) -> WorkerCore:
    core = WorkerCore("w1", 4, TIMING, 100.0, groups=groups)
    core.tick(100.0)
    core.session.take()
    core.received(p.encode(p.Welcome(7, 250, 3)), 100.0)
    return core


def test_a_worker_asks_for_groups_after_each_welcome_and_forgets_the_answer_with_the_session():
    assert welcomed_worker(None).session.take() == []  # without groups: version 1's messages only
    core = welcomed_worker(Limits(max_frame=1 << 20, max_message=2 << 20))
    assert core.session.take() == [p.Features([p.GROUPS], 1 << 20, 2 << 20)]
    assert core.sink_groups is None
    core.received(p.encode(p.Features([p.GROUPS], 5 << 20, 9 << 20)), 100.1)
    assert core.sink_groups == (5 << 20, 9 << 20)
    event, _ = core.received(p.encode(p.Reset("unknown peer: send hello")), 100.2)
    assert isinstance(event, Lost) and core.sink_groups is None
    event, _ = core.received(p.encode(p.Welcome(7, 250, 3)), 100.3)
    assert isinstance(event, Joined) and core.session.take()[-1] == p.Features([p.GROUPS], 1 << 20, 2 << 20)


def test_a_sink_that_does_not_share_groups_leaves_the_worker_on_single_messages():
    core = welcomed_worker(Limits())
    core.received(p.encode(p.Features([], 1 << 20, 1 << 20)), 100.1)
    assert core.sink_groups is None


def test_a_worker_runs_every_lease_of_a_group_and_answers_them_in_groups_within_the_sinks_limits():
    core = welcomed_worker(Limits())
    core.received(p.encode(p.Features([p.GROUPS], 10, 1 << 20)), 100.1)
    payloads = [msgpack.packb([i]) for i in range(5)]
    group = p.Leases(7, [1, 2, 3, 4, 5], [1] * 5, ["t"] * 5, [1] * 5, list(map(len, payloads)), b"".join(payloads))
    _, jobs = core.received(p.encode(group), 100.2)
    assert [job.batch_id for job in jobs] == [1, 2, 3, 4, 5] and len(core.held) == 5
    answers: list[p.Result | p.Failed] = [p.Result(7, j.batch_id, 1, ["t"], [1], [b"\x91\x01\x02\x03"]) for j in jobs]
    answers[3] = p.Failed(7, 4, 1, "boom")
    sent = []
    while answers:
        n, frames = answer_frames(answers, core.sink_groups)
        sent.append(p.decode(frames))
        answers = answers[n:]
    # 4-byte payloads in frames of at most 10 bytes: two per group; a failure alone.
    assert [type(m).__name__ for m in sent] == ["Results", "Result", "Failed", "Result"]
    assert [r.batch_id for m in sent if isinstance(m, p.Results) for r in m.split()] == [1, 2]


def test_a_producer_groups_due_batches_within_the_sinks_limits_once_it_takes_groups():
    core = ProducerCore("prod", TIMING, 100.0, resend_after=5.0, groups=True)
    core.tick(100.0)
    core.session.take()
    core.received(p.encode(p.Welcome(7, 250, 3)), 100.0)
    assert core.session.take()[0] == p.Features([p.GROUPS], p.MAX_HEADER_BYTES, p.MAX_HEADER_BYTES)
    for seq in range(1, 6):
        payload = msgpack.packb([seq, "x" * 10])
        core.add(Sent(seq, 1, p.encode(p.Batch("prod", seq, "t", 1, payload)), topic="t"))
    singles = list(core.messages(core.due(100.0)))
    assert [len(group) for group, _ in singles] == [1] * 5  # no answer yet: one batch a message
    core.received(p.encode(p.Features([p.GROUPS], 30, 1 << 20)), 100.1)
    sent = list(core.messages(core.due(100.1)))
    assert [[s.seq for s in group] for group, _ in sent] == [[1, 2], [3, 4], [5]]
    first = p.decode(sent[0][1])
    assert isinstance(first, p.Batches) and first.seqs == [1, 2]
    assert [msgpack.unpackb(x) for x in first.payloads()] == [[1, "x" * 10], [2, "x" * 10]]
    assert isinstance(p.decode(sent[2][1]), p.Batch)
