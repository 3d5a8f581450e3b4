"""The asyncio API over real sockets: AsyncProducer and AsyncSubscriber around a real Sink (whose
ledger is a real SQLite file), with workers that run async def functions, in this process and
as `zfan worker` subprocesses. Each run ends holding every record once, in per-topic order, or
the error the threaded API gives, with the same words."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import zmq.asyncio

from tests.checker import check
from tests.helpers import ROOT
from zfan import AuthError, Closed, DeliveryTimeout, Message, NoSink, Sink, Worker, protocol, query_status
from zfan.aio import AsyncProducer, AsyncSubscriber
from zfan.nodes.worker import run_batch

pytestmark = pytest.mark.timeout(60)
aio = pytest.mark.asyncio  # (sync tests here run without it: marked, pytest-asyncio warns)

ANY = "tcp://127.0.0.1:*"
PROMPT = 5.0  # seconds: "at once", on a busy machine


def numbered(first: int, last: int) -> list[dict[str, int]]:
    return [{"id": i} for i in range(first, last)]


def ids_of(msgs: Iterable[Message]) -> list[int]:
    return [r["id"] if isinstance(r, dict) else r for m in msgs for r in m.records]


def seqs_of(msgs: Iterable[Message]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for m in msgs:
        seqs.setdefault(m.topic, []).append(m.seq)
    return seqs


async def take(sub: AsyncSubscriber, records: int, timeout: float = 20.0) -> list[Message]:
    """Results until they hold `records` records; fail at the deadline."""
    got: list[Message] = []
    n = 0
    deadline = time.monotonic() + timeout
    while n < records:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s with {n} of {records} records (gaps {sub.gaps})")
        msg = await sub.recv(min(left, 0.25))
        if msg is not None:
            got.append(msg)
            n += len(msg.records)
    return got


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Let the event loop run until `condition` holds; fail the test if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def nothing_at(endpoint: str, port: str, timeout: float) -> str:
    return (
        f"no zfan sink answered at {endpoint} within {timeout:g} s: nothing listens there "
        f"(is the sink running, and is this its {port} port?)"
    )


async def by_topic(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """An async fan-out: each record's id to the topic it names."""
    await asyncio.sleep(0)
    out: dict[str, list[int]] = {}
    for r in records:
        out.setdefault(f"out.{r['topic']}", []).append(r["id"])
    return out


async def async_ids(records: list[dict[str, Any]]) -> list[int]:
    await asyncio.sleep(0)
    return [r["id"] for r in records]


# --- the whole pipeline ------------------------------------------------------------------------


@aio
async def test_every_record_goes_through_async_producer_worker_and_subscriber_once_in_order(sink, ctx):
    n, topics = 6000, 5
    records = [{"id": i, "topic": i % topics} for i in range(n)]
    with Worker(by_topic, control=sink.control, context=ctx):
        async with AsyncSubscriber(results=sink.results, control=sink.control, topics=["out."], context=ctx) as sub:
            assert await sub.wait_ready(5)
            async with AsyncProducer(intake=sink.intake, control=sink.control, batch_size=50, context=ctx) as prod:
                for r in records[: n // 2]:  # one at a time, each to a topic of its own...
                    await prod.send(r, topic=f"in.{r['topic']}")
                for t in range(topics):  # ... and in bulk
                    await prod.send_many((r for r in records[n // 2 :] if r["topic"] == t), topic=f"in.{t}")
                outcomes = await prod.join(30)
                assert prod.connected.is_set()
            msgs = await take(sub, n)
            assert await sub.recv(0.2) is None, "nothing more was published"
    assert outcomes.ok and outcomes.done_records == n and outcomes.dead_batches == 0, outcomes
    assert prod.sent_records == prod.acked_records == n and prod.unacked == 0
    verdict = check(range(n), ids_of(msgs), seqs_of(msgs))
    assert verdict.ok, verdict
    assert sorted(seqs_of(msgs)) == [f"out.{t}" for t in range(topics)]
    assert all(seqs[0] == 1 for seqs in seqs_of(msgs).values())
    assert all({i % topics for i in m.records} == {int(m.topic[4:])} for m in msgs), "each record on its topic"


@aio
async def test_leaving_async_with_flushes_what_was_sent(sink, ctx):
    async with AsyncProducer(intake=sink.intake, control=sink.control, linger_ms=60_000, context=ctx) as prod:
        await prod.send_many(numbered(0, 2500), topic="t")  # two full batches, and one still open
    assert not prod.running and prod.unacked == 0 and prod.acked_records == 2500
    assert query_status(sink.control, context=ctx)["records_in"] == 2500


@aio
async def test_on_outcome_is_called_for_each_batch_on_the_event_loops_thread(sink, ctx):
    async def later(outcome: object) -> None:
        pass

    with pytest.raises(TypeError, match="on_outcome is called on the producer's I/O task and must return at once"):
        AsyncProducer(intake=sink.intake, control=sink.control, on_outcome=later, context=ctx)
    told: list[tuple[int, bool, int]] = []
    actx = zmq.asyncio.Context.shadow(ctx)  # a zmq.asyncio context serves as well as a plain one
    with Worker(async_ids, control=sink.control, context=ctx):
        async with AsyncProducer(
            intake=sink.intake,
            control=sink.control,
            batch_size=10,
            on_outcome=lambda o: told.append((o.records, o.ok, threading.get_ident())),
            context=actx,
        ) as prod:
            await prod.send_many(numbered(0, 100))
            outcomes = await prod.join(20)
    assert outcomes.done_batches == 10
    assert told == [(10, True, threading.get_ident())] * 10


# --- backpressure ------------------------------------------------------------------------------


@aio
async def test_send_waits_for_room_in_the_window_and_the_event_loop_goes_on(tmp_path, ipc, ctx):
    """No sink at first: two batches fill the window, and the send that seals a third waits
    for an ack while another task keeps ticking. A sink that comes takes all of it."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    prod = AsyncProducer(
        intake=ipc["intake"], control=ipc["control"], batch_size=10, window=2, connect_timeout=None, context=ctx
    )
    async with prod:
        ticking = asyncio.create_task(ticker())
        sending = asyncio.create_task(prod.send_many(numbered(0, 100), topic="t"))
        try:
            await until(lambda: prod.sent_records == 20, what="two batches in the window")
            seen = ticks
            await until(lambda: ticks >= seen + 20, timeout=5, what="the ticker to tick while send waits")
            assert not sending.done() and prod.sent_records == 20 and prod.unacked == 2
            with (
                Sink(**ipc, ledger=str(tmp_path / "z.db"), context=ctx) as sink,
                Worker(async_ids, control=sink.control, context=ctx),
            ):
                await asyncio.wait_for(sending, 20)
                outcomes = await prod.join(20)
        finally:
            ticking.cancel()
            sending.cancel()
            await asyncio.gather(ticking, sending, return_exceptions=True)
    assert prod.sent_records == prod.acked_records == 100
    assert outcomes.ok and outcomes.done_batches == 10 and outcomes.done_records == 100


# --- a function that raises --------------------------------------------------------------------


@aio
async def test_an_async_function_that_raises_is_retried_then_dead_lettered_and_join_says_so(sink, ctx):
    from tests.apps import async_poison  # an object whose __call__ is async

    n = 3000
    with Worker(async_poison, control=sink.control, context=ctx):
        async with AsyncSubscriber(results=sink.results, control=sink.control, context=ctx) as sub:
            assert await sub.wait_ready(5)
            async with AsyncProducer(
                intake=sink.intake, control=sink.control, batch_size=100, linger_ms=60_000, context=ctx
            ) as prod:  # batches sealed by count: the poison one is 1200-1299
                await prod.send_many(numbered(0, n), topic="t")
                outcomes = await prod.join(30)
            msgs = await take(sub, n)
    assert not outcomes.ok
    assert (outcomes.done_batches, outcomes.dead_batches, outcomes.dead_records) == (29, 1, 100)
    assert outcomes.first_error == "ValueError: record 1234 is poison"
    assert [(f.topic, f.records, f.state) for f in outcomes.failures] == [("t", 100, "dead")]
    dead = [m for m in msgs if m.dead]
    assert len(dead) == 1 and dead[0].topic == "zfan.dead" and dead[0].attempts == 3
    assert "ValueError: record 1234 is poison" in dead[0].error
    assert ids_of(dead) == list(range(1200, 1300))
    verdict = check([i for i in range(n) if not 1200 <= i < 1300], ids_of(m for m in msgs if not m.dead))
    assert verdict.ok, verdict
    assert query_status(sink.control, context=ctx)["dead"] == 1


# --- durable subscribers -----------------------------------------------------------------------


@aio
async def test_a_durable_async_subscriber_resumes_where_the_last_one_stopped(sink, ctx):
    with Worker(async_ids, control=sink.control, context=ctx):
        async with AsyncProducer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod:
            first = AsyncSubscriber(results=sink.results, control=sink.control, durable="d", context=ctx)
            async with first:
                assert await first.wait_ready(5)
                await prod.send_many(numbered(0, 1000), "t")
                part1 = await take(first, 1000)
            async with AsyncSubscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as second:
                # Results flow before it is first read from, as they may while it starts.
                await prod.send_many(numbered(1000, 2000), "t")
                outcomes = await prod.join(20)
                assert await second.wait_ready(5)
                part2 = await take(second, 1000)
                assert await second.recv(0.2) is None
    assert outcomes.ok and outcomes.done_records == 2000
    assert seqs_of(part2)["t"][0] == seqs_of(part1)["t"][-1] + 1
    verdict = check(range(2000), ids_of(part1 + part2), seqs_of(part1 + part2))
    assert verdict.ok, verdict


# --- no sink, a wrong port, keys ---------------------------------------------------------------


@aio
async def test_with_no_sink_both_raise_nosink_within_their_connect_timeout(ctx, free_port):
    started = time.monotonic()
    async with AsyncSubscriber(results=free_port, control=free_port, connect_timeout=0.5, context=ctx) as sub:
        with pytest.raises(NoSink) as raised:
            await sub.wait_ready(10)
        assert str(raised.value) == nothing_at(free_port, "control", 0.5) and raised.value.endpoint == free_port
        with pytest.raises(NoSink):  # and again at every call after
            await sub.recv(1)
    assert time.monotonic() - started < 0.5 + PROMPT

    started = time.monotonic()
    prod = AsyncProducer(intake=free_port, control=free_port, connect_timeout=0.5, context=ctx)
    async with prod:
        await prod.send({"id": 1})
        with pytest.raises(NoSink) as raised:
            await prod.flush(10)
        assert str(raised.value) == nothing_at(free_port, "control", 0.5)
        assert not prod.running and prod.error is raised.value and not prod.connected.is_set()
        for call in (lambda: prod.send({"id": 2}), lambda: prod.join(5)):
            with pytest.raises(NoSink, match="no zfan sink answered"):
                await call()
    assert time.monotonic() - started < 0.5 + PROMPT


@aio
async def test_an_intake_where_nothing_answers_is_nosink_for_intake(sink, ctx, free_port):
    async with AsyncProducer(intake=free_port, control=sink.control, connect_timeout=0.5, context=ctx) as prod:
        with pytest.raises(NoSink) as raised:
            await prod.send_many(numbered(0, 10))
            await prod.flush(10)
    assert str(raised.value) == nothing_at(free_port, "intake", 0.5)


@aio
async def test_a_subscriber_at_a_port_of_the_wrong_kind_says_so_at_once(sink, ctx):
    started = time.monotonic()
    async with AsyncSubscriber(results=sink.control, control=sink.control, context=ctx) as sub:
        with pytest.raises(NoSink) as raised:
            await sub.wait_ready(10)
    assert str(raised.value) == (
        f"{sink.control}: that is not a zfan results port (the peer is a ZeroMQ ROUTER socket, "
        "as a zfan sink's control port is)"
    )
    assert time.monotonic() - started < PROMPT


@aio
async def test_encrypted_async_clients_get_in_with_keys_and_are_told_what_is_wrong_without(keys, ipc, tmp_path, ctx):
    server, client = keys
    with (
        Sink(**ipc, ledger=str(tmp_path / "z.db"), curve=server, context=ctx) as sink,
        Worker(async_ids, control=sink.control, curve=client, context=ctx),
    ):
        async with AsyncSubscriber(results=sink.results, control=sink.control, curve=client, context=ctx) as sub:
            assert await sub.wait_ready(10)
            async with AsyncProducer(intake=sink.intake, control=sink.control, curve=client, context=ctx) as prod:
                await prod.send_many(numbered(0, 500))
                assert (await prod.join(20)).done_records == 500
            msgs = await take(sub, 500)
        assert check(range(500), ids_of(msgs), seqs_of(msgs)).ok
        # Without keys, what is wrong is the keys.
        async with AsyncProducer(intake=sink.intake, control=sink.control, context=ctx) as plain:
            with pytest.raises(AuthError, match="the sink requires encryption: give secret_file= and server_key="):
                await plain.send({"id": 1})
                await plain.flush(10)
        # With keys, at a port of the wrong kind, what is wrong is the port.
        async with AsyncSubscriber(results=sink.control, control=sink.control, curve=client, context=ctx) as sub:
            with pytest.raises(NoSink, match="not a zfan results port .* a ZeroMQ DEALER socket in"):
                await sub.wait_ready(10)


# --- cancelling and closing --------------------------------------------------------------------


@aio
async def test_cancelled_calls_and_closing_twice_leave_nothing_running(ipc, ctx):
    """No sink: a send waits for room in the window, a recv for a result; both are cancelled.
    Closing then ends the producer's task and closes every socket (the ctx fixture's term()
    hangs on one left open), and closing again does nothing."""
    prod = AsyncProducer(
        intake=ipc["intake"], control=ipc["control"], batch_size=1, window=1, connect_timeout=None, context=ctx
    )
    sub = AsyncSubscriber(results=ipc["results"], control=ipc["control"], connect_timeout=None, context=ctx)
    await prod.start()
    sending = asyncio.create_task(prod.send_many(numbered(0, 10)))
    receiving = asyncio.create_task(sub.recv())
    joining = asyncio.create_task(prod.join())
    await until(lambda: prod.unacked == 1 and prod.sent_records == 1, what="the window to fill")
    for task in (sending, receiving, joining):
        assert not task.done()
        task.cancel()
    done = await asyncio.gather(sending, receiving, joining, return_exceptions=True)
    assert all(isinstance(d, asyncio.CancelledError) for d in done)
    assert prod.running  # a cancelled caller stops nothing but itself

    await sub.close()
    await sub.close()
    with pytest.raises(DeliveryTimeout, match="1 batch.es. not acknowledged by the sink after 0.2 s"):
        await prod.close(timeout=0.2)
    await prod.close()
    assert not prod.running
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(Closed, match="producer is closed"):
        await prod.send({"id": 1})
    with pytest.raises(Closed, match="subscriber is closed"):
        await sub.recv(0.1)


@aio
async def test_a_producer_closed_while_its_caller_is_cancelled_still_ends_its_task(sink, ctx):
    prod = await AsyncProducer(intake=sink.intake, control=sink.control, context=ctx).start()
    await prod.send_many(numbered(0, 100))
    closing = asyncio.create_task(prod.close())
    await asyncio.sleep(0)  # it has begun: flushing
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    assert not prod.running
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await prod.close()  # closed already: nothing


# --- workers that run async functions ----------------------------------------------------------


def test_an_async_function_runs_on_one_event_loop_its_thread_keeps(sink, ctx):
    seen: set[tuple[int, int]] = set()  # (thread, loop)

    async def where(records: list[dict[str, Any]]) -> list[int]:
        seen.add((threading.get_ident(), id(asyncio.get_running_loop())))
        await asyncio.sleep(0)
        return [r["id"] for r in records]

    async def produce() -> None:
        async with AsyncProducer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod:
            await prod.send_many(numbered(0, 200))
            assert (await prod.join(20)).done_batches == 20

    with Worker(where, control=sink.control, context=ctx):
        asyncio.run(produce())
    assert len(seen) == 1
    assert next(iter(seen))[0] != threading.get_ident()


def test_a_plain_function_that_returns_a_coroutine_fails_its_batch_and_says_why():
    async def later(records: list[Any]) -> list[Any]:
        return records

    lease = protocol.Lease(1, 7, 1, "in", 1, protocol.encode_records([1]))
    failed = run_batch(lambda records: later(records), lease)
    assert isinstance(failed, protocol.Failed)
    assert failed.error.rstrip().endswith(
        "TypeError: process() returned coroutine, which a worker does not await: make process itself "
        "an async def function (or give its class an async def __call__)"
    )


@aio
async def test_zfan_worker_runs_an_async_app(sink, roles, ctx):
    worker = roles("worker", f"--control={sink.control}", "--app", "tests.apps:async_ids")
    worker.wait_ready()
    async with AsyncSubscriber(results=sink.results, control=sink.control, context=ctx) as sub:
        assert await sub.wait_ready(5)
        async with AsyncProducer(intake=sink.intake, control=sink.control, batch_size=100, context=ctx) as prod:
            await prod.send_many(numbered(0, 3000), topic="t")
            outcomes = await prod.join(30)
        msgs = await take(sub, 3000)
    assert outcomes.ok and outcomes.done_records == 3000
    verdict = check(range(3000), ids_of(msgs), seqs_of(msgs))
    assert verdict.ok, verdict
    assert worker.stop() == 0, worker.stderr


# --- the example -------------------------------------------------------------------------------


def test_the_async_example_runs_and_exits_0():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "async_pipeline.py"), "3000"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "3000 records processed, 0 dead-lettered",
        "3000 results on 4 topics: each record once: True, in order: True",
    ]
