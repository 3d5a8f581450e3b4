"""The producer's core with no sockets (zfan.delivery): which batches it pushes on intake and
when, what the sink's acks free, and what a reconnect or a restarted sink makes it push again,
on a fake clock."""

from __future__ import annotations

import random

import msgpack
import pytest

from zfan import protocol as p
from zfan.config import Timing
from zfan.delivery import BatchOutcome, Outcomes, ProducerCore, Sent
from zfan.session import Dial, Joined, Lost

pytestmark = pytest.mark.timeout(30)

# A slow session (beat 1 s, expiry 10 s), so that resends, not heartbeats, set the deadlines.
TIMING = Timing(heartbeat=1.0, liveness=10)
WELCOME = p.Welcome(1, 1000, 10)
RESEND = 0.5


def producer(now: float = 100.0, resend: float = RESEND) -> ProducerCore:
    return ProducerCore("prod-1", TIMING, now, resend_after=resend, rng=random.Random(1))


def batch(seq: int, count: int = 2) -> Sent:
    return Sent(seq, count, [f"batch {seq}".encode()])


def welcome(core: ProducerCore, now: float, msg: p.Welcome = WELCOME) -> None:
    event, acked = core.received(p.encode(msg), now)
    assert isinstance(event, Joined) and acked == 0


def joined(now: float = 100.0, seqs: range = range(1, 4), resend: float = RESEND) -> ProducerCore:
    core = producer(now, resend)
    for seq in seqs:
        core.add(batch(seq))
    assert core.tick(now) == Dial()
    welcome(core, now)
    core.session.take()
    return core


def push(core: ProducerCore, now: float) -> list[int]:
    """Push what is due, as the socket loop does: the seqs sent."""
    out = core.due(now)
    for sent in out:
        core.pushed(sent, now)
    return [s.seq for s in out]


def ack(core: ProducerCore, *seqs: int, now: float = 100.0) -> int:
    event, n = core.received(p.encode(p.Ack(list(seqs))), now)
    assert event is None
    return n


def test_nothing_is_pushed_before_a_welcome():
    core = producer(100.0)
    core.add(batch(1))
    assert push(core, 100.0) == []  # not even dialled
    assert core.tick(100.0) == Dial()
    assert core.session.take() == [p.Hello("producer", "prod-1", 0)]
    assert push(core, 100.0) == [] and push(core, 105.0) == []  # a hello is no welcome
    # Nor does the unsent batch make the loop wake at once: only the session has a deadline.
    assert core.next_deadline() == core.session.next_deadline() > 100.0
    welcome(core, 105.0)
    assert push(core, 105.0) == [1]


def test_each_batch_is_pushed_once_then_again_after_resend_after_without_an_ack():
    core = joined(100.0)
    assert push(core, 100.0) == [1, 2, 3]
    core.add(batch(4))
    assert push(core, 100.25) == [4]  # the others are not due yet
    assert push(core, 100.25) == []
    assert push(core, 100.0 + RESEND - 1e-6) == []
    assert push(core, 100.0 + RESEND) == [1, 2, 3]
    assert push(core, 100.25 + RESEND) == [4]
    assert len(core.window) == 4  # nothing is forgotten without an ack


def test_acks_free_the_window_and_repeats_are_ignored():
    core = joined(100.0)
    push(core, 100.0)
    assert ack(core, 1, 3) == 2
    assert ack(core, 1, 3, 99) == 0  # repeated, and one never sent
    assert len(core.window) == 1
    assert (core.window.acked_batches, core.window.acked_records) == (2, 4)
    assert push(core, 100.0 + RESEND) == [2]  # only the unacked one goes again
    assert ack(core, 2) == 1
    assert push(core, 200.0) == [] and len(core.window) == 0


def test_an_ack_counts_as_a_sign_of_life():
    core = joined(100.0)
    push(core, 100.0)
    for t in range(104, 130, 4):
        ack(core, t, now=float(t))  # acks only, no heartbeats from the sink
        assert core.tick(float(t)) is None
    assert core.session.joined


def test_a_reconnect_makes_every_unacked_batch_due_at_once():
    core = joined(100.0, resend=60.0)  # far longer than the reconnect takes
    push(core, 100.0)
    ack(core, 2)
    # The sink goes silent until the session is lost (10 s); nothing is pushed meanwhile.
    now = 100.0
    while not isinstance(event := core.tick(now := core.next_deadline()), Lost):
        assert event is None and push(core, now) == []
    assert event.redial and now < 115.0
    assert push(core, now) == []
    dial_at = core.next_deadline()
    assert core.tick(dial_at) == Dial()
    assert push(core, dial_at) == []  # dialled, not yet welcomed
    welcome(core, dial_at)
    assert push(core, dial_at) == [1, 3]


@pytest.mark.parametrize("restart", ["heartbeat", "reset"])
def test_a_restarted_sink_gets_every_unacked_batch_at_once(restart):
    core = joined(100.0)
    push(core, 100.0)
    ack(core, 1)
    assert push(core, 100.25) == []  # pushed a moment ago
    why = p.Heartbeat(2) if restart == "heartbeat" else p.Reset("unknown peer: send hello")
    event, _ = core.received(p.encode(why), 100.25)
    assert isinstance(event, Lost) and not event.redial
    assert core.session.take() == [p.Hello("producer", "prod-1", 0)]
    assert push(core, 100.25) == []  # until the sink welcomes us again
    welcome(core, 100.3, p.Welcome(2, 1000, 10))
    assert push(core, 100.3) == [2, 3]  # the new sink may never have had them: not a resend later
    assert push(core, 100.3) == []


def test_next_deadline_covers_the_earliest_resend():
    core = joined(100.0, seqs=range(1, 2))
    assert core.next_deadline() <= 100.0  # a batch never pushed is due at once
    push(core, 100.0)
    core.add(batch(2))
    push(core, 100.25)
    assert core.next_deadline() == 100.0 + RESEND  # before the session's next beat at 101
    assert push(core, core.next_deadline()) == [1]
    assert core.next_deadline() == 100.25 + RESEND
    assert push(core, core.next_deadline()) == [2]
    ack(core, 1, 2)
    assert core.next_deadline() == 101.0  # nothing unacked: the session's beat


def test_a_malformed_message_is_counted_not_raised():
    core = joined(100.0)
    push(core, 100.0)
    lease = p.Lease(1, 1, 1, "t", 1, b"\x90")  # a worker's message: not for a producer
    bad_ack = msgpack.packb([p.VERSION, p.ACK, [1, -2]])  # a seq no producer numbered
    for frames in ([b"garbage"], [], p.encode(lease), [bad_ack]):
        assert core.received(frames, 100.25) == (None, 0)
    assert core.ignored == 4
    assert len(core.window) == 3 and core.session.joined
    assert push(core, 100.0 + RESEND) == [1, 2, 3]


# --- outcomes -------------------------------------------------------------------------------


def outcome(core: ProducerCore, now: float = 100.0, *, done=(), dead=(), unknown=()) -> int:
    msg = p.Outcome(list(done), [seq for seq, _ in dead], [error for _, error in dead], list(unknown))
    event, n = core.received(p.encode(msg), now)
    assert event is None
    return n


def test_a_welcome_asks_the_sink_for_outcomes():
    core = producer(100.0)
    core.add(batch(1))
    core.tick(100.0)
    core.session.take()
    welcome(core, 100.0)
    assert core.session.take() == [p.Watch([])]  # nothing acknowledged waits on an outcome yet


def test_each_outcome_is_taken_once_with_its_batch_topic_and_records():
    core = joined(seqs=range(0))
    core.add(Sent(1, 5, [b"b1"], topic="orders"))
    core.add(Sent(2, 3, [b"b2"], topic="orders"))
    push(core, 100.0)
    assert ack(core, 1, 2) == 2 and core.waiting == 2
    assert outcome(core, done=[1], dead=[(2, "KeyError: 'value'")]) == 0  # acked already
    assert core.take_ended() == [
        BatchOutcome(1, "orders", 5, "done"),
        BatchOutcome(2, "orders", 3, "dead", "KeyError: 'value'"),
    ]
    outcome(core, done=[1])  # told again (a resend's ack): not counted twice
    assert core.take_ended() == [] and core.waiting == 0


def test_an_outcome_acknowledges_a_batch_whose_ack_was_lost():
    core = joined(seqs=range(1, 3))
    push(core, 100.0)
    assert outcome(core, done=[1]) == 1  # a batch that ended is stored
    assert push(core, 101.0) == [2]  # 1 is not resent
    assert [o.seq for o in core.take_ended()] == [1]


def test_a_new_session_asks_about_the_acknowledged_batches_still_waiting():
    core = joined(seqs=range(1, 5))
    push(core, 100.0)
    ack(core, 1, 2, 3)
    outcome(core, done=[1])
    assert [o.seq for o in core.take_ended()] == [1]
    event, _ = core.received(p.encode(p.Reset("unknown peer: send hello")), 100.5)
    assert isinstance(event, Lost)
    core.session.take()
    welcome(core, 100.6)
    # 4 is unacknowledged: it goes again, and its ack (or outcome) comes as for any batch.
    assert core.session.take() == [p.Watch([2, 3])]
    outcome(core, 100.7, dead=[(2, "ValueError: x")], unknown=[3])
    assert [(o.seq, o.state, o.ok) for o in core.take_ended()] == [(2, "dead", False), (3, "unknown", False)]


def test_outcomes_counts_batches_and_records_and_keeps_the_first_failures():
    tally = Outcomes()
    tally.add(BatchOutcome(1, "t", 10, "done"))
    tally.add(BatchOutcome(2, "t", 4, "dead", "KeyError: 'value'"))
    tally.add(BatchOutcome(3, "t", 6, "unknown"))
    assert (tally.done_batches, tally.done_records, tally.dead_records, tally.unknown_records) == (1, 10, 4, 6)
    assert not tally.ok and tally.first_error == "KeyError: 'value'"
    assert [o.seq for o in tally.failures] == [2, 3]
