"""Attempts count what the batch did, not what the network did: the sink's core, with a fake
clock, as workers go silent one by one or all at once."""

from __future__ import annotations

import pytest

from tests.test_dispatch import (
    HEARTBEAT,
    LIVENESS,
    Turn,
    batch,
    heartbeat,
    hello_producer,
    hello_worker,
    make_core,
    send_result,
    settle,
    status_counts,
)
from zfan import protocol as p

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ledger(backend):
    """Tried on each ledger backend."""
    return backend.open()


EXPIRY = HEARTBEAT * LIVENESS


def silence(core, clock, seconds: float, *, talking: tuple[bytes, ...] = ()) -> None:
    """Let `seconds` pass in heartbeat steps; only the peers in `talking` are heard."""
    steps = round(seconds / HEARTBEAT)
    for _ in range(steps):
        clock.advance(HEARTBEAT)
        for rid in talking:
            heartbeat(core, rid)
        core.tick()
        Turn(core)


def test_a_sink_cut_off_from_every_peer_dead_letters_nothing(ledger, clock, backend):
    core = make_core(ledger, clock, max_attempts=3)
    hello_producer(core, b"p", "prod")
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    for cut in range(5):  # more cuts than max_attempts
        workers = [f"w{cut}-{i}".encode() for i in range(3)]
        for rid in workers:
            hello_worker(core, rid, 1)
        leases = Turn(core).leases
        assert sorted(lease.attempt for lease in leases) == [1, 1, 1], "no cut cost an attempt"
        # The sink's link goes down: every peer falls silent at once, and stays so.
        silence(core, clock, EXPIRY + 2 * HEARTBEAT)
        assert core.status()["workers"] == []
        assert status_counts(core) == {"pending": 3, "leased": 0, "done": 0, "dead": 0, "purged": 0}
        hello_producer(core, b"p", "prod")  # the link is back
    assert core.stats["replays not charged"] == 15
    assert backend.peek("SELECT attempts, state FROM batches") == [(0, 0)] * 3
    hello_worker(core, b"last", 3)
    leases = Turn(core).leases
    assert [lease.attempt for lease in leases] == [1, 1, 1]
    for lease in leases:
        send_result(core, lease.rid, lease)
    assert len(Turn(core).pubs) == 3


def test_a_worker_silent_while_others_are_heard_costs_its_batch_an_attempt(ledger, clock, backend):
    core = make_core(ledger, clock, max_attempts=3)
    for rid in (b"a", b"b"):
        hello_worker(core, rid, 1)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    other = b"b" if lease.rid == b"a" else b"a"
    silence(core, clock, EXPIRY + HEARTBEAT, talking=(other,))
    assert core.stats["replays"] == 1 and core.stats["replays not charged"] == 0
    assert [(w["name"], w["in_flight"]) for w in core.status()["workers"]] == [(other.decode(), 1)]
    settle(core)
    assert backend.peek("SELECT attempts FROM batches") == [(2,)]


def test_a_batch_that_kills_every_worker_it_reaches_is_still_dead_lettered(ledger, clock):
    core = make_core(ledger, clock, max_attempts=3)
    hello_producer(core, b"p", "prod")  # a producer stays connected and heartbeating
    core.intake(batch("prod", 1))
    for attempt in (1, 2, 3):
        rid = f"w{attempt}".encode()
        hello_worker(core, rid, 1)
        heartbeat(core, rid)
        (lease,) = Turn(core).leases
        assert (lease.rid, lease.attempt) == (rid, attempt)
        silence(core, clock, EXPIRY + HEARTBEAT, talking=(b"p",))  # the worker died on it
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 0, "dead": 1, "purged": 0}


def test_a_lone_worker_that_dies_costs_its_batch_an_attempt(ledger, clock):
    """With no other peer, nothing says the sink was cut off: the worker is taken to have died."""
    core = make_core(ledger, clock, max_attempts=2)
    core.intake(batch("prod", 1))  # from a producer that has since gone
    clock.advance(EXPIRY * 3)
    hello_worker(core, b"w1", 1)
    (lease,) = Turn(core).leases
    clock.advance(EXPIRY * 3)  # long after anything else was heard
    core.tick()
    Turn(core)
    hello_worker(core, b"w2", 1)
    (lease,) = Turn(core).leases
    assert lease.attempt == 2


def test_a_worker_that_missed_a_beat_gets_no_lease(ledger, clock):
    core = make_core(ledger, clock)
    hello_worker(core, b"w1", 4)
    clock.advance(HEARTBEAT * 1.5 + 0.01)  # its next beat is late: perhaps it is cut off
    core.intake(batch("prod", 1))
    core.tick()
    assert Turn(core).leases == []
    assert core.next_deadline() > 0, "no busy loop while the only worker is quiet"
    heartbeat(core, b"w1")
    (lease,) = Turn(core).leases
    assert lease.rid == b"w1" and lease.attempt == 1


def test_a_worker_that_beats_on_time_gets_leases_between_its_beats(ledger, clock):
    """Heard a little more than one interval apart, as a worker on schedule is, it stays fresh:
    a batch that comes between two beats goes at once, not at the next beat."""
    core = make_core(ledger, clock)
    hello_worker(core, b"w1", 4)
    clock.advance(HEARTBEAT * 1.2)
    core.intake(batch("prod", 1))
    (lease,) = Turn(core).leases
    assert lease.rid == b"w1"


def test_a_worker_dying_with_several_batches_charges_only_the_one_that_kills_again_alone(ledger, clock):
    """Its results may die unsent with it, so the sink cannot tell which batch it was running:
    each is run again alone, and only the one that kills its worker alone pays."""
    core = make_core(ledger, clock, max_attempts=2)
    hello_producer(core, b"p", "prod")  # heard throughout: the sink's link is fine
    for seq in range(1, 4):
        core.intake(batch("prod", seq))
    hello_worker(core, b"w0", 3)
    killer = 2
    assert [lease.batch_id for lease in Turn(core).leases] == [1, 2, 3]
    silence(core, clock, EXPIRY + HEARTBEAT, talking=(b"p",))  # w0 died holding all three
    done = []
    for n in range(1, 5):  # 2 innocent batches, and the killer twice
        rid = f"w{n}".encode()
        hello_worker(core, rid, 3)
        (lease,) = Turn(core).leases  # one at a time
        if lease.batch_id == killer:
            silence(core, clock, EXPIRY + HEARTBEAT, talking=(b"p",))
        else:
            assert lease.attempt == 1, "an innocent batch never paid"
            send_result(core, rid, lease)
            core.control(rid, p.encode(p.Bye()))  # one batch each, so that each gets a new worker
            done.append(lease.batch_id)
    assert sorted(done) == [1, 3]
    assert status_counts(core) == {"pending": 0, "leased": 0, "done": 2, "dead": 1, "purged": 0}
