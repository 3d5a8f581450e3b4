"""What became of each batch (Producer.join, on_outcome) and stopping by draining (Worker.drain,
Sink.drain), through the embedded API over real sockets."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import wait_for
from zfan import OutcomeTimeout, Producer, Sink, Timing, Worker, query_status

pytestmark = pytest.mark.timeout(60)

# These tests are about outcomes and drains, not liveness: a beat late on a loaded machine must
# not end a session here (peers take the sink's timing from its welcome).
TIMING = Timing(heartbeat=0.25, liveness=12)


def picky(records):
    """Fails a batch holding a record marked bad, as a user's function with a KeyError would."""
    for r in records:
        if r.get("bad"):
            raise KeyError("value")
    return [r["n"] for r in records]


@pytest.fixture
def sink(tmp_path, ipc, ctx):
    with Sink(**ipc, timing=TIMING, ledger=str(tmp_path / "z.db"), max_attempts=2, context=ctx) as s:
        yield s


def test_join_counts_processed_and_dead_lettered_records_and_says_why(sink, ipc, ctx):
    told = []
    with (
        Worker(picky, control=sink.control, context=ctx),
        Producer(
            intake=ipc["intake"], control=ipc["control"], batch_size=10, on_outcome=told.append, context=ctx
        ) as prod,
    ):
        for n in range(100):
            prod.send({"n": n, "bad": n == 42})
        outcomes = prod.join(20)
    assert (outcomes.done_batches, outcomes.done_records) == (9, 90)
    assert (outcomes.dead_batches, outcomes.dead_records) == (1, 10)
    assert outcomes.first_error == "KeyError: 'value'" and not outcomes.ok
    assert len(told) == 10 and len({o.seq for o in told}) == 10  # each batch told once
    [failure] = outcomes.failures
    assert failure.state == "dead" and failure.records == 10 and failure.topic == "default"


def test_join_without_a_worker_times_out_saying_the_batches_are_stored(sink, ipc, ctx):
    with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=5, context=ctx) as prod:
        for n in range(10):
            prod.send({"n": n})
        with pytest.raises(OutcomeTimeout) as caught:
            prod.join(0.5)
        assert caught.value.unended == 2 and caught.value.outcomes.done_batches == 0
        assert "2 batch(es) not processed after 0.5 s" in str(caught.value)
        assert prod.unacked == 0  # acknowledged all the same
        with Worker(picky, control=ipc["control"], context=ctx):
            assert prod.join(20).done_records == 10  # a worker comes: join completes


def test_outcomes_of_batches_acked_by_a_sink_that_restarted_still_come(tmp_path, ipc, ctx):
    """The first sink acknowledges and stops before any worker came; the producer's next session
    (a new epoch) names what it still waits on, and hears how it ended from the second sink."""
    ledger = str(tmp_path / "z.db")
    prod = Producer(intake=ipc["intake"], control=ipc["control"], batch_size=10, context=ctx)
    try:
        with Sink(**ipc, timing=TIMING, ledger=ledger, context=ctx) as first:
            prod.start()
            for n in range(50):
                prod.send({"n": n})
            prod.flush(10)
            epoch = first.epoch
        with (
            Sink(**ipc, timing=TIMING, ledger=ledger, context=ctx) as second,
            Worker(picky, control=ipc["control"], context=ctx),
        ):
            assert second.epoch == epoch + 1
            outcomes = prod.join(20)
            assert outcomes.done_records == 50 and outcomes.ok
    finally:
        prod.close(0)


def slow_until(release: threading.Event, started: list):
    def process(records):
        started.append(records[0]["n"])
        release.wait(20)
        return [r["n"] for r in records]

    return process


def test_a_draining_worker_finishes_what_it_holds_and_nothing_is_replayed(sink, ipc, ctx):
    release, started = threading.Event(), []
    worker = Worker(slow_until(release, started), control=sink.control, credit=4, context=ctx).start()
    with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=1, context=ctx) as prod:
        for n in range(6):
            prod.send({"n": n})
        prod.flush(10)
        wait_for(lambda: started, what="the worker to start a batch")
        wait_for(lambda: query_status(sink.control, context=ctx)["workers"][0]["in_flight"] == 4, what="4 batches held")
        finished: list[bool] = []
        drainer = threading.Thread(target=lambda: finished.append(worker.drain(20)))
        drainer.start()
        wait_for(lambda: query_status(sink.control, context=ctx)["workers"][0]["draining"], what="the drain")
        release.set()
        drainer.join(30)
        assert finished == [True]
        # Its bye follows its answers on one connection: once it is gone, every answer is in.
        status = wait_for(
            lambda: (s := query_status(sink.control, context=ctx))["workers"] == [] and s, what="the worker's bye"
        )
        assert status["done"] == 4 and status["pending"] == 2 and status.get("replays", 0) == 0
        with Worker(picky, control=sink.control, context=ctx):
            assert prod.join(20).done_records == 6


def test_a_drain_that_times_out_hands_back_at_no_cost_of_an_attempt(tmp_path, ipc, ctx):
    release, started = threading.Event(), []
    with Sink(**ipc, timing=TIMING, ledger=str(tmp_path / "z.db"), max_attempts=1, context=ctx) as sink:
        stuck = Worker(slow_until(release, started), control=sink.control, credit=1, context=ctx).start()
        with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=1, context=ctx) as prod:
            prod.send({"n": 1})
            wait_for(lambda: started, what="the worker to start the batch")
            assert stuck.drain(0.2) is False  # still running it: handed back
            # With max_attempts=1, a charged attempt would have dead-lettered it.
            with Worker(picky, control=sink.control, context=ctx):
                outcomes = prod.join(20)
            assert outcomes.done_records == 1 and outcomes.ok
            assert query_status(sink.control, context=ctx)["replays_not_charged"] == 1
        release.set()


def test_a_draining_sink_waits_for_its_leases_and_keeps_the_rest_pending(tmp_path, ipc, ctx):
    release, started = threading.Event(), []
    ledger = str(tmp_path / "z.db")
    sink = Sink(**ipc, timing=TIMING, ledger=ledger, context=ctx).start()
    worker = Worker(slow_until(release, started), control=sink.control, credit=1, context=ctx).start()
    try:
        with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=1, context=ctx) as prod:
            for n in range(3):
                prod.send({"n": n})
            prod.flush(10)
            wait_for(lambda: started, what="the worker to start a batch")
            done = []
            t = threading.Thread(target=lambda: done.append(sink.drain(20)))
            t.start()
            wait_for(lambda: query_status(sink.control, context=ctx)["draining"], what="the sink to drain")
            release.set()  # only now: the batch's answer frees credit the sink must not use
            t.join(30)
            assert done == [True]
    finally:
        worker.close()
    with Sink(**ipc, timing=TIMING, ledger=ledger, context=ctx) as again:
        status = query_status(again.control, context=ctx)
        assert (status["done"], status["pending"], status["leased"]) == (1, 2, 0)
