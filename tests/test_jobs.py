"""The worker's core with no sockets (zfan.jobs): which leases it runs, and whose answers it
sends back, once the sink welcomed, reset, restarted or went silent, on a fake clock."""

from __future__ import annotations

import random

import msgpack
import pytest

from zfan import protocol as p
from zfan.config import Timing
from zfan.jobs import WorkerCore
from zfan.session import Dial, Joined, Lost

pytestmark = pytest.mark.timeout(30)

TIMING = Timing(heartbeat=0.25, liveness=3)
EPOCH = 5


def worker(now: float = 100.0) -> WorkerCore:
    return WorkerCore("w1", 4, TIMING, now, rng=random.Random(1))


def joined(now: float = 100.0) -> WorkerCore:
    core = worker(now)
    assert core.tick(now) == Dial()
    assert core.session.take() == [p.Hello("worker", "w1", 4)]
    assert core.received(p.encode(p.Welcome(EPOCH, 250, 3)), now) == (Joined(EPOCH, True), [])
    return core


def lease(batch_id: int, epoch: int = EPOCH, attempt: int = 1) -> p.Lease:
    return p.Lease(epoch, batch_id, attempt, "jobs", 2, msgpack.packb([batch_id, "x"]))


def offer(core: WorkerCore, msg: p.Message, now: float = 100.0) -> p.Lease | None:
    """A message from the sink; the lease to run, if any."""
    _, jobs = core.received(p.encode(msg), now)
    assert len(jobs) <= 1
    return jobs[0] if jobs else None


def test_a_lease_of_the_current_epoch_is_run_and_answered_once():
    core = joined()
    job = offer(core, lease(7))
    assert job == lease(7)
    assert p.decode_records(job.payload) == [7, "x"]
    assert core.finished(job) is True
    assert core.finished(job) is False  # answered already: never twice
    assert (core.answered, core.fenced) == (1, 1)


def test_leases_are_answered_in_any_order_and_each_attempt_is_its_own():
    core = joined()
    first, second, retry = lease(7), lease(8), lease(7, attempt=2)
    assert [offer(core, m) for m in (first, second, retry)] == [first, second, retry]
    assert [core.finished(m) for m in (second, retry, first)] == [True, True, True]
    assert core.answered == 3 and core.fenced == 0


@pytest.mark.parametrize("epoch", [EPOCH - 1, EPOCH + 1])
def test_a_lease_of_another_epoch_is_fenced(epoch):
    core = joined()
    assert offer(core, lease(7, epoch=epoch)) is None
    assert core.fenced == 1
    assert core.finished(lease(7, epoch=epoch)) is False  # never held, so never answered
    assert core.answered == 0


def test_a_lease_before_the_welcome_is_fenced():
    core = worker()
    assert offer(core, lease(7)) is None  # not even dialled
    core.tick(100.0)
    assert offer(core, lease(8)) is None  # hello sent, not yet welcomed
    assert core.fenced == 2
    core.received(p.encode(p.Welcome(EPOCH, 250, 3)), 100.0)
    assert offer(core, lease(9)) == lease(9)


def test_an_answer_after_a_reset_is_not_sent():
    core = joined()
    job = offer(core, lease(7))
    event, _ = core.received(p.encode(p.Reset("unknown peer: send hello")), 100.25)
    assert isinstance(event, Lost) and not event.redial
    assert core.session.take() == [p.Hello("worker", "w1", 4)]
    assert offer(core, lease(8), 100.25) is None  # not welcomed again yet
    assert core.received(p.encode(p.Welcome(EPOCH, 250, 3)), 100.3) == (Joined(EPOCH, False), [])
    assert core.finished(job) is False  # the sink ended that lease when it forgot us
    assert offer(core, lease(7, attempt=2), 100.3) == lease(7, attempt=2)  # its replay is run
    assert core.fenced == 2 and core.answered == 0


@pytest.mark.parametrize("how", ["heartbeat", "welcome"])
def test_an_answer_after_a_sink_restart_is_not_sent(how):
    core = joined()
    old, kept = offer(core, lease(7)), offer(core, lease(8))
    assert core.finished(kept) is True  # answered before the restart
    if how == "heartbeat":
        event, _ = core.received(p.encode(p.Heartbeat(EPOCH + 1)), 100.25)
        assert isinstance(event, Lost)
        core.received(p.encode(p.Welcome(EPOCH + 1, 250, 3)), 100.3)
    else:  # a welcome of a new epoch, with no heartbeat seen before it
        assert core.received(p.encode(p.Welcome(EPOCH + 1, 250, 3)), 100.3) == (Joined(EPOCH + 1, True), [])
    assert core.finished(old) is False
    assert offer(core, lease(7), 100.3) is None  # the old epoch's lease, late: fenced
    assert offer(core, lease(7, epoch=EPOCH + 1), 100.3) is not None
    assert (core.answered, core.fenced) == (1, 2)


def test_an_answer_after_the_sink_went_silent_is_not_sent():
    core = joined()
    job = offer(core, lease(7))
    now = 100.0
    while (event := core.tick(now := core.next_deadline())) is None:
        assert now <= 100.751  # heartbeats only, until just past the expiry
    assert event == Lost(event.reason, redial=True)
    assert core.finished(job) is False  # replayed to another worker by now
    assert (core.answered, core.fenced) == (0, 1)


def test_a_lease_still_held_through_heartbeats_is_answered():
    core = joined()
    job = offer(core, lease(7))
    for t in (100.25, 100.5, 100.75, 101.0, 101.25):
        core.received(p.encode(p.Heartbeat(EPOCH)), t)
        assert core.tick(t) is None
    assert core.finished(job) is True


def test_malformed_messages_are_counted_and_change_nothing():
    core = joined()
    job = offer(core, lease(7))
    for frames in ([b"\xc1"], [], p.encode(p.Ack([1])), [p.header(lease(8))]):  # the last has no payload
        assert core.received(frames, 100.1) == (None, [])
    assert core.ignored == 4 and core.fenced == 0
    assert core.session.joined
    assert core.finished(job) is True


# --- draining -------------------------------------------------------------------------------


def test_a_draining_worker_finishes_every_lease_the_sink_sent_before_its_echo():
    core = joined()
    job = offer(core, lease(1))
    core.drain()
    assert core.session.take() == [p.Drain()]
    late = offer(core, lease(2))  # sent before the sink read our drain: ours all the same
    assert late is not None
    assert core.finished(job) and not core.drained
    offer(core, p.Drain())  # the echo: nothing more is on its way
    assert not core.drained  # lease 2 is still running
    assert core.finished(late) and core.drained


def test_a_worker_with_no_session_is_drained_at_once():
    core = worker()
    core.drain()
    assert core.drained and core.session.take() == []


def test_a_worker_draining_across_a_new_session_asks_again():
    core = joined()
    offer(core, lease(1))
    core.drain()
    core.session.take()
    event, _ = core.received(p.encode(p.Reset("unknown peer: send hello")), 100.1)
    assert isinstance(event, Lost) and core.drained  # the sink replays what we held
    core.session.take()
    core.received(p.encode(p.Welcome(EPOCH, 250, 3)), 100.2)
    assert core.session.take() == [p.Drain()] and not core.drained
    offer(core, p.Drain(), 100.3)
    assert core.drained
