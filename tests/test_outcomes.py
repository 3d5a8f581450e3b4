"""What became of each batch, as the sink tells its producer (`watch` / `outcome`), and a worker
that drains: the sink's core with a fake clock, read only through the frames it sends."""

from __future__ import annotations

import pytest

from tests.test_dispatch import (
    Turn,
    batch,
    hello_producer,
    hello_worker,
    make_core,
    send_failed,
    send_result,
)
from zfan import protocol as p

pytestmark = pytest.mark.timeout(30)

P, W = b"p1", b"w1"


def watch(core, seqs=()) -> None:
    core.control(P, p.encode(p.Watch(list(seqs))))


def outcomes(turn: Turn) -> tuple[list[int], list[tuple[int, str]], list[int]]:
    """The outcomes the producer was told in one turn: done, (dead, error), unknown."""
    done, dead, unknown = [], [], []
    for m in turn.of(p.Outcome, P):
        done += m.done
        dead += list(zip(m.dead, m.errors, strict=True))
        unknown += m.unknown
    return done, dead, unknown


@pytest.fixture
def core(ledger, clock):
    core = make_core(ledger, clock, max_attempts=2)
    hello_producer(core, P, "prod")
    hello_worker(core, W, 10)
    Turn(core)
    return core


def test_a_watching_producer_is_told_each_batch_done_after_its_ack(core):
    watch(core)
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    turn = Turn(core)
    assert turn.acks(P) == [[1, 2]]
    assert outcomes(turn) == ([], [], [])  # stored is not processed
    for lease in turn.leases:
        send_result(core, W, lease)
    turn = Turn(core)
    assert outcomes(turn) == ([1, 2], [], [])


def test_a_dead_lettered_batch_is_told_with_the_last_line_of_its_error(core):
    watch(core)
    core.intake(batch("prod", 7))
    lease = Turn(core).leases[0]
    traceback = "Traceback (most recent call last):\n  File \"app.py\", line 3\nKeyError: 'value'\n"
    send_failed(core, W, lease, traceback)
    lease = Turn(core).leases[0]
    assert outcomes(Turn(core)) == ([], [], [])  # one attempt left: not an outcome yet
    send_failed(core, W, lease, traceback)
    assert outcomes(Turn(core)) == ([], [(7, "KeyError: 'value'")], [])


def test_a_producer_that_does_not_watch_is_told_nothing(core):
    """A producer of an earlier version never gets a message type it does not know."""
    core.intake(batch("prod", 1))
    lease = Turn(core).leases[0]
    send_result(core, W, lease)
    turn = Turn(core)
    assert turn.of(p.Outcome) == [] and len(turn.pubs) == 1


def test_outcomes_missed_while_away_are_answered_from_the_ledger(core):
    core.intake(batch("prod", 1))
    core.intake(batch("prod", 2))
    core.intake(batch("prod", 3))
    leases = Turn(core).leases
    send_result(core, W, leases[0])
    send_failed(core, W, leases[1], "ValueError: no")
    send_failed(core, W, Turn(core).leases[0], "ValueError: no")  # its replay: out of attempts
    Turn(core)
    # The producer comes back and asks about what it still waits on, and a seq the sink
    # never had (or has pruned): 3 is still leased, so it is told later.
    watch(core, [1, 2, 3, 99])
    assert outcomes(Turn(core)) == ([1], [(2, "ValueError: no")], [99])
    send_result(core, W, leases[2])
    assert outcomes(Turn(core)) == ([3], [], [])


def test_a_batch_resent_after_it_ended_is_told_again_with_its_ack(core):
    watch(core)
    core.intake(batch("prod", 1))
    send_result(core, W, Turn(core).leases[0])
    assert outcomes(Turn(core)) == ([1], [], [])
    core.intake(batch("prod", 1))  # its ack was lost: the producer sends it again
    turn = Turn(core)
    assert turn.acks(P) == [[1]] and outcomes(turn) == ([1], [], [])
    assert turn.leases == []


def test_a_watch_from_a_worker_is_refused(core):
    core.control(W, p.encode(p.Watch([])))
    Turn(core)
    assert core.rejected["not a producer"] == 1


def test_a_draining_worker_gets_no_new_lease_and_its_answers_still_count(core):
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    Turn(core)  # all three leased to w1 (credit 10)
    core.control(W, p.encode(p.Drain()))
    turn = Turn(core)
    assert [type(m.msg) for m in turn.of(p.Drain, W)] == [p.Drain]  # the echo
    core.intake(batch("prod", 4))
    assert Turn(core).leases == []
    hello_worker(core, b"w2", 10)
    assert [le.rid for le in Turn(core).leases] == [b"w2"]  # another worker takes the new one


def test_a_worker_that_drained_says_bye_and_nothing_is_replayed(core, ledger):
    core.intake(batch("prod", 1))
    lease = Turn(core).leases[0]
    core.control(W, p.encode(p.Drain()))
    Turn(core)
    send_result(core, W, lease)
    core.control(W, p.encode(p.Bye()))
    Turn(core)
    status = core.status()
    assert status.get("replays", 0) == 0 and status["done"] == 1 and status["leased"] == 0


def test_a_sink_that_drains_leases_nothing_more_and_knows_when_all_came_back(core):
    core.intake(batch("prod", 1))
    lease = Turn(core).leases[0]
    core.drain()
    core.intake(batch("prod", 2))
    assert Turn(core).leases == [] and not core.drained
    send_result(core, W, lease)
    Turn(core)
    assert core.drained and core.status()["pending"] == 1


# --- resets -----------------------------------------------------------------------------------


def test_a_burst_from_a_forgotten_peer_gets_one_reset_not_one_each(ledger, clock):
    """A peer that answers each reset with a hello would start its session over again and again,
    ending the leases each new session got: the sink resets a connection once per expiry."""
    core = make_core(ledger, clock)
    for _ in range(3):
        core.control(b"old", p.encode(p.Heartbeat(0)))
    assert len(Turn(core).of(p.Reset, b"old")) == 1
    assert core.status()["resets"] == 3  # every message from an unknown connection is counted
    clock.advance(3.1)  # past the expiry (1 s x 3): its hello may have been lost
    core.control(b"old", p.encode(p.Heartbeat(0)))
    assert len(Turn(core).of(p.Reset, b"old")) == 1


def test_a_peer_forgotten_again_after_its_hello_is_reset_again_at_once(ledger, clock):
    core = make_core(ledger, clock)
    core.control(W, p.encode(p.Heartbeat(0)))
    assert len(Turn(core).of(p.Reset)) == 1
    hello_worker(core, W, 1)
    core.control(W, p.encode(p.Bye()))
    core.control(W, p.encode(p.Heartbeat(0)))
    assert len(Turn(core).of(p.Reset)) == 1
