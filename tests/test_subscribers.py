"""Subscribers over real sockets: a slow one, late ones, durable ones, retention, and a sink
restart; each ends holding every result it is owed exactly once, in per-topic order."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import pytest

from tests.checker import check, from_json_lines
from tests.helpers import ROOT, run_cli, wait_for
from zfan import Producer, RetentionGap, Sink, Subscriber, Worker, query_status
from zfan.publishing import GROUP_BYTES

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"


def echo(records: list) -> list:
    return records


def numbered(first: int, last: int, pad: int = 0) -> list[dict]:
    """Records first..last-1, each carrying its id (and some padding, to fill socket buffers)."""
    return [{"id": i, "pad": "x" * pad} if pad else {"id": i} for i in range(first, last)]


def ids_of(msgs: Iterable) -> list[int]:
    return [r["id"] for m in msgs for r in m.records]


def seqs_of(msgs: Iterable) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for m in msgs:
        seqs.setdefault(m.topic, []).append(m.seq)
    return seqs


def take(
    sub: Subscriber, records: int, timeout: float = 20.0, handler: Callable[[object], object] | None = None
) -> list:
    """Results from the subscriber until they hold `records` records; fail at the deadline."""
    got: list = []
    n = 0
    deadline = time.monotonic() + timeout
    while n < records:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out after {timeout} s with {n} of {records} records "
                f"(replayed {sub.replayed}, duplicates {sub.duplicates}, gaps {sub.gaps})"
            )
        msg = sub.recv(min(left, 0.25))
        if msg is not None:
            if handler is not None:
                handler(msg)
            got.append(msg)
            n += len(msg.records)
    return got


def all_done(control: str, ctx, batches: int | None = None) -> Callable[[], bool]:
    """True once the sink has every batch it received done (and published)."""

    def done() -> bool:
        info = query_status(control, context=ctx)
        return (
            info["pending"] == 0
            and info["leased"] == 0
            and info["done"] > 0
            and info.get("published", 0) >= info.get("batches_done", 0)
            and (batches is None or info["done"] >= batches)
        )

    return done


class Streamer:
    """A producer sending on a thread of its own, so that the test's thread can be the subscriber."""

    def __init__(self, prod: Producer, records: list, topic: str = "t") -> None:
        self.prod = prod
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(records, topic), daemon=True)
        self._thread.start()

    def _run(self, records: list, topic: str) -> None:
        try:
            self.prod.send_many(records, topic)
            self.prod.flush(timeout=30)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished.set()

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the producer thread did not finish"
        assert self.error is None, f"the producer failed: {self.error!r}"


@pytest.fixture
def sink(tmp_path, ctx):
    with Sink(intake=ANY, control=ANY, results=ANY, ledger=str(tmp_path / "z.db"), context=ctx) as s:
        yield s


# --- 1. a slow subscriber -------------------------------------------------------------------------


def test_a_slow_subscriber_catches_up_with_every_result_once_in_order(tmp_path, ipc, ctx):
    n, size = 3000, 10
    # ipc: small kernel buffers, so that ZeroMQ's queues (10 at the sink, 5 here) fill and drop.
    with (
        Sink(**ipc, ledger=str(tmp_path / "z.db"), publish_hwm=10, context=ctx) as sink,
        Worker(echo, control=sink.control, context=ctx),
        Subscriber(results=sink.results, control=sink.control, hwm=5, context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, batch_size=size, context=ctx) as prod:
            # Results of over half GROUP_BYTES each go one to a message, so that the queues fill.
            streamer = Streamer(prod, numbered(0, n, pad=GROUP_BYTES // 20 + 500))

            def slow(msg) -> None:
                time.sleep(0.003)  # the point of this test: a handler slower than the stream

            msgs = take(sub, n, timeout=40, handler=slow)
            streamer.join()
        assert sub.recv(0.2) is None, "nothing more was published"
    verdict = check(range(n), ids_of(msgs), seqs_of(msgs))
    assert verdict.ok, verdict
    assert seqs_of(msgs)["t"][0] == 1
    assert sub.replayed > 0, "the live path dropped nothing: this test did not exercise repair"
    assert sub.lost == 0 and sub.gaps == 0


def test_a_caller_busy_for_longer_than_the_expiry_keeps_its_session(sink, ctx, caplog):
    """What the sink sent while the caller was away counts before its silence does: coming
    back, the subscriber does not take a sink that kept beating for a lost one."""
    with Subscriber(results=sink.results, control=sink.control, context=ctx) as sub:
        assert sub.wait_ready(5)
        time.sleep(3 * sink.settings.timing.expiry)  # the point of this test: a caller busy elsewhere
        with caplog.at_level("WARNING", logger="zfan"):
            assert sub.recv(0.3) is None
        assert [r.getMessage() for r in caplog.records if "connecting again" in r.getMessage()] == []
        core = sub._parts[0]._core
        assert core.session is not None and core.session.dials == 1


STALLED = """
import json, sys, threading, time
from zfan import Producer, Sink, Subscriber, Worker
from zfan.nodes.transport import HEARTBEAT_TIMEOUT

folder, n = sys.argv[1], int(sys.argv[2])
ipc = {k: f"ipc://{folder}/{k}" for k in ("intake", "control", "results")}
with (
    Sink(**ipc, ledger=f"{folder}/z.db") as sink,
    Worker(lambda records: records, control=sink.control),
    Subscriber(results=sink.results, control=sink.control, hwm=20) as sub,
):
    assert sub.wait_ready(10)
    flowing = threading.Event()

    def feed() -> None:
        with Producer(intake=sink.intake, control=sink.control, batch_size=10) as prod:
            for i in range(0, n, 100):
                prod.send_many([{"id": j} for j in range(i, i + 100)])
                flowing.set()
                time.sleep(0.01)  # a steady stream, so that results arrive while the caller is away
            prod.flush(30)

    producer = threading.Thread(target=feed)
    producer.start()
    flowing.wait(10)
    got = [sub.recv(10)]
    time.sleep(HEARTBEAT_TIMEOUT / 1000 + 2)  # the caller away for longer than the heartbeat timeout
    ids = []
    deadline = time.monotonic() + 40
    while len(ids) < n and time.monotonic() < deadline:
        msg = got.pop() if got else sub.recv(0.5)
        if msg is not None:
            ids += [r["id"] for r in msg.records]
    producer.join(30)
    print(json.dumps(ids))
"""


@pytest.mark.timeout(90)
def test_a_caller_away_while_its_queue_is_full_reads_on_without_a_crash(tmp_path):
    """A full receive queue stops ZeroMQ reading the connection; the subscriber's sockets must
    not then time it out and dial again, which libzmq 4.3.5 answers by aborting the process
    once the caller reads again (Assertion failed: _input_stopped)."""
    n = 20_000
    done = subprocess.run(
        [sys.executable, "-c", STALLED, str(tmp_path), str(n)],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ids = json.loads(done.stdout)
    assert sorted(ids) == list(range(n)), f"{len(ids)} records, {len(set(ids))} distinct, of {n}"


# --- 2. late subscribers -----------------------------------------------------------------------------


def test_a_late_durable_subscriber_gets_everything_retained_and_a_plain_one_only_what_follows(sink, ctx):
    with (
        Worker(echo, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod,
    ):
        prod.send_many(numbered(0, 500), "t")
        prod.flush()
        wait_for(all_done(sink.control, ctx), what="the first 500 records published")

        with (
            Subscriber(results=sink.results, control=sink.control, durable="late", context=ctx) as late,
            Subscriber(results=sink.results, control=sink.control, context=ctx) as plain,
        ):
            assert late.wait_ready(5) and plain.wait_ready(5)
            old = take(late, 500)
            verdict = check(range(500), ids_of(old), seqs_of(old))
            assert verdict.ok, verdict
            assert seqs_of(old)["t"][0] == 1
            head = seqs_of(old)["t"][-1]
            assert late.replayed == len(old), "published before it started: all from the ledger"

            prod.send_many(numbered(500, 800), "t")
            prod.flush()
            new = take(plain, 300)
            assert plain.recv(0.2) is None, "the plain subscriber must not get what came before it"
            verdict = check(range(500, 800), ids_of(new), seqs_of(new))
            assert verdict.ok, verdict
            assert seqs_of(new)["t"][0] == head + 1

            rest = take(late, 300)
            verdict = check(range(800), ids_of(old + rest), seqs_of(old + rest))
            assert verdict.ok, verdict


START_RACE = (
    "zfan/nodes/subscriber.py _from_stream offers live results to the Sequencer before the "
    "subscriber knows where to start, which sets Sequencer.next[topic] = 1; start_at "
    "(zfan/sequencing.py) then skips that topic, so the durable cursor or the heads are ignored "
    "and the subscriber starts at seq 1"
)


def test_a_plain_subscriber_that_starts_while_results_flow_does_not_get_the_history(sink, ctx):
    with (
        Worker(echo, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod,
    ):
        prod.send_many(numbered(0, 500), "t")
        prod.flush()
        wait_for(all_done(sink.control, ctx, 50), what="the first 500 records published")
        # Subscribed, and results flow to it before it is first read from (as they may in the
        # moment between its sync and the sink's answer about where to start).
        with Subscriber(results=sink.results, control=sink.control, context=ctx) as plain:
            prod.send_many(numbered(500, 800), "t")
            prod.flush()
            wait_for(all_done(sink.control, ctx, 80), what="300 more records published")
            assert plain.wait_ready(5)
            new = take(plain, 300)
            assert plain.recv(0.2) is None, "the plain subscriber must not get what came before it"
    verdict = check(range(500, 800), ids_of(new), seqs_of(new))
    assert verdict.ok, verdict


# --- 3. durable subscribers resume where the last one stopped -----------------------------------------


def test_a_durable_subscriber_resumes_exactly_after_the_last_one(sink, ctx):
    n = 3000
    with (
        Worker(echo, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod,
    ):
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as first:
            assert first.wait_ready(5)
            streamer = Streamer(prod, numbered(0, n))
            part1 = take(first, 1000)  # from the live stream; closing commits the position
        streamer.join()
        wait_for(all_done(sink.control, ctx, 300), what="every record published")
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as second:
            assert second.wait_ready(5)
            part2 = take(second, n - len(ids_of(part1)))
            assert second.recv(0.2) is None
    assert seqs_of(part2)["t"][0] == seqs_of(part1)["t"][-1] + 1
    verdict = check(range(n), ids_of(part1 + part2), seqs_of(part1 + part2))
    assert verdict.ok, verdict
    assert seqs_of(part1)["t"][0] == 1


def test_a_durable_subscriber_resumes_exactly_after_the_last_one_while_results_flow(sink, ctx):
    with (
        Worker(echo, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod,
    ):
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as first:
            assert first.wait_ready(5)
            prod.send_many(numbered(0, 1000), "t")
            part1 = take(first, 1000)
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as second:
            # Results flow to it before it is first read from, as they may while it starts.
            prod.send_many(numbered(1000, 2000), "t")
            prod.flush()
            wait_for(all_done(sink.control, ctx, 200), what="every record published")
            assert second.wait_ready(5)
            part2 = take(second, 1000)
            assert second.recv(0.2) is None
    verdict = check(range(2000), ids_of(part1 + part2), seqs_of(part1 + part2))
    assert verdict.ok, verdict


def endpoint_args(ipc: dict[str, str], *names: str) -> list[str]:
    return [f"--{n}={ipc[n]}" for n in names]


def test_cli_durable_subscribe_twice_takes_every_result_once(tmp_path, ipc, roles, ctx):
    n = 2000
    sink = roles(
        "sink",
        "--workers",
        "1",
        "--app",
        "zfan.apps:echo",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    prod = run_cli("produce", "--count", str(n), "--batch-size", "100", *endpoint_args(ipc, "intake", "control"))
    assert prod.returncode == 0, prod.stderr
    info = wait_for(
        lambda: (
            (i := query_status(ipc["control"], context=ctx))["pending"] == 0
            and i["leased"] == 0
            and i["done"] >= 1
            and i.get("published", 0) >= i["done"]
            and i
        ),
        what="every batch published",
    )
    results = info["published"]  # one per batch: echo publishes each batch on its own topic
    sub = ("subscribe", "--durable", "cli", *endpoint_args(ipc, "results", "control"))
    first = run_cli(*sub, "--count", "7")
    assert first.returncode == 0, first.stderr
    second = run_cli(*sub, "--count", str(results - 7))
    assert second.returncode == 0, second.stderr
    ids1, seqs1 = from_json_lines(first.stdout.splitlines())
    ids2, seqs2 = from_json_lines(second.stdout.splitlines())
    assert seqs1 == {"readings": list(range(1, 8))}
    assert seqs2["readings"][0] == 8
    verdict = check(range(n), ids1 + ids2, {"readings": seqs1["readings"] + seqs2["readings"]})
    assert verdict.ok, verdict
    assert sink.stop() == 0, sink.stderr


# --- 4. retention ----------------------------------------------------------------------------------------


def wait_pruned(sink, ctx, n: int) -> None:
    """Pruning runs about once a second: wait until it has dropped `n` results."""
    wait_for(lambda: query_status(sink.control, context=ctx).get("results_pruned", 0) >= n, what=f"{n} results pruned")


@contextmanager
def retaining(results: int, tmp_path, ctx):
    """A sink that keeps only the newest `results` results, an echo worker, and a producer of
    one record per batch."""
    with (
        Sink(
            intake=ANY, control=ANY, results=ANY, ledger=str(tmp_path / "z.db"), retain_count=results, context=ctx
        ) as sink,
        Worker(echo, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=1, context=ctx) as prod,
    ):
        yield sink, prod


def test_a_durable_subscriber_behind_the_retention_is_told_what_it_lost_and_goes_on(tmp_path, ctx):
    with retaining(20, tmp_path, ctx) as (sink, prod):
        # One record per batch, one producer, one worker: result seq k holds record k - 1.
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as sub:
            assert sub.wait_ready(5)
            prod.send_many(numbered(0, 10), "t")
            before = take(sub, 10)
        prod.send_many(numbered(10, 100), "t")
        prod.flush()
        # Pruning runs about once a second: the newest 20 of 100 results are kept.
        wait_pruned(sink, ctx, 80)
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as sub:
            assert sub.wait_ready(5)
            with pytest.raises(RetentionGap) as gap:
                sub.recv(10)
            after = take(sub, 20)
            assert sub.recv(0.2) is None
        assert query_status(sink.control, context=ctx)["results_pruned"] == 80
    assert str(gap.value) == ("results t seq 11 to 80 are lost to this subscriber: no longer retained by the sink")
    assert (gap.value.topic, gap.value.first, gap.value.last) == ("t", 11, 80)
    assert sub.lost == 70
    assert all(m.records == [{"id": m.seq - 1}] for m in before + after)
    assert seqs_of(after) == {"t": list(range(81, 101))}
    verdict = check([*range(10), *range(80, 100)], ids_of(before + after), seqs_of(before))
    assert verdict.ok, verdict


def test_a_new_durable_subscriber_starts_at_the_oldest_retained_result_without_an_error(tmp_path, ctx):
    with retaining(20, tmp_path, ctx) as (sink, prod):
        prod.send_many(numbered(0, 100), "t")
        prod.flush()
        wait_pruned(sink, ctx, 80)
        with Subscriber(results=sink.results, control=sink.control, durable="new", context=ctx) as sub:
            assert sub.wait_ready(5)
            got = take(sub, 20)
    assert seqs_of(got) == {"t": list(range(81, 101))}
    verdict = check(range(80, 100), ids_of(got), seqs_of(got))
    assert verdict.ok, verdict
    assert sub.lost == 0


def test_a_durable_subscriber_skips_quietly_only_on_its_first_run(tmp_path, ctx):
    """A topic whose every result was pruned before the first run is saved as skipped with
    that run's position: the next run neither asks for it again nor reports it lost."""
    with retaining(20, tmp_path, ctx) as (sink, prod):
        prod.send_many(numbered(0, 30), "gone")
        prod.send_many(numbered(30, 60), "kept")
        prod.flush()
        wait_pruned(sink, ctx, 40)
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as first:
            assert first.wait_ready(5)
            got = take(first, 20)
            assert first.recv(0.5) is None and first.lost == 0
        assert seqs_of(got) == {"kept": list(range(11, 31))}
        prod.send_many(numbered(60, 62), "kept")
        prod.flush()
        with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as second:
            assert second.wait_ready(5)
            more = take(second, 2)
            assert second.recv(0.5) is None, "nothing else is owed"
            assert second.lost == 0
    assert seqs_of(more) == {"kept": [31, 32]}


# --- 5. zfan sink --retain ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["garbage", "0", "-3h", "10x"])
def test_sink_refuses_a_retention_it_cannot_read(value, tmp_path, ipc):
    res = run_cli(
        "sink",
        f"--retain={value}",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"zfan sink: error: retention {value.lower()!r}"), lines[0]
    for form in ("100000", "30m", "12h", "7d"):
        assert form in lines[0], lines[0]
    assert not (tmp_path / "z.db").exists(), "nothing is created for a command line that is refused"


@pytest.mark.parametrize("value", ["30m", "5000"])
def test_sink_accepts_a_count_or_an_age_to_retain(value, tmp_path, ipc, roles):
    sink = roles(
        "sink",
        "--retain",
        value,
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    assert "zfan sink: ready" in sink.wait_ready()
    assert sink.stop() == 0, sink.stderr
    assert "error" not in sink.stderr.lower(), sink.stderr


# --- 6. a sink restart ---------------------------------------------------------------------------------------


def test_a_subscriber_ends_with_every_result_once_across_a_sink_restart(tmp_path, ipc, ctx):
    n1, n2 = 1000, 1000
    ledger = str(tmp_path / "z.db")
    sink = Sink(**ipc, ledger=ledger, context=ctx).start()
    try:
        with (
            Worker(echo, control=ipc["control"], context=ctx),
            Producer(intake=ipc["intake"], control=ipc["control"], batch_size=10, context=ctx) as prod,
            Subscriber(results=ipc["results"], control=ipc["control"], context=ctx) as sub,
        ):
            assert sub.wait_ready(5)
            streamer = Streamer(prod, numbered(0, n1))
            got = take(sub, 200)
            streamer.join()
            first_epoch = sink.epoch
            sink.close()
            # The producer keeps sending while no sink runs: its window holds what is not acknowledged.
            streamer = Streamer(prod, numbered(n1, n1 + n2))
            wait_for(lambda: prod.unacked > 0, what="batches waiting for the sink")
            sink = Sink(**ipc, ledger=ledger, context=ctx).start()
            assert sink.epoch > first_epoch
            got += take(sub, n1 + n2 - len(ids_of(got)), timeout=30)
            streamer.join()
            assert sub.recv(0.3) is None
    finally:
        sink.close()
    seqs = seqs_of(got)
    verdict = check(range(n1 + n2), ids_of(got), seqs)
    assert verdict.ok, verdict
    assert seqs["t"][0] == 1


def test_numbering_continues_after_a_restart_when_every_result_was_pruned(tmp_path, ipc, ctx):
    ledger = str(tmp_path / "z.db")
    with (
        Worker(echo, control=ipc["control"], context=ctx),
        Producer(intake=ipc["intake"], control=ipc["control"], batch_size=10, context=ctx) as prod,
    ):
        with Sink(**ipc, ledger=ledger, retain_age=0.2, context=ctx) as sink:
            with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as sub:
                assert sub.wait_ready(5)
                prod.send_many(numbered(0, 500), "t")
                before = take(sub, 500)
            wait_for(
                lambda: query_status(sink.control, context=ctx).get("results_pruned", 0) >= 50,
                what="every result older than 0.2 s pruned",
            )
        with Sink(**ipc, ledger=ledger, retain_age=0.2, context=ctx) as sink:
            with Subscriber(results=sink.results, control=sink.control, durable="d", context=ctx) as sub:
                assert sub.wait_ready(5)
                prod.send_many(numbered(500, 600), "t")
                after = take(sub, 100, timeout=3)
            # The producer's session with the first sink may still be open when these batches
            # go (ZeroMQ reconnects it to the new sink unnoticed): their acks come only once it
            # has said hello to this sink and sent them again, so this sink must outlive that.
            prod.flush(10)
    assert seqs_of(after)["t"][0] == seqs_of(before)["t"][-1] + 1
    verdict = check(range(600), ids_of(before + after), seqs_of(before + after))
    assert verdict.ok, verdict


def test_a_result_whose_records_cannot_be_decoded_is_reported_once_and_skipped(ctx):
    import msgpack
    import zmq

    from zfan import protocol as p

    pub = ctx.socket(zmq.XPUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Subscriber(results=f"tcp://127.0.0.1:{port}", context=ctx) as sub:

            def sync() -> bool:
                """Answer the subscriber's handshake as a sink does."""
                sub.wait_ready(0.01)  # the subscriber is single-threaded: let it read meanwhile
                while pub.poll(0):
                    topic = pub.recv()[1:]
                    if topic.startswith(p.SYNC_PREFIX.encode()):
                        pub.send_multipart([topic, *p.encode(p.Sync(topic.decode()))])
                return sub.synced

            wait_for(sync, what="the subscriber's handshake")
            for seq, payload in ((1, msgpack.packb([1])), (2, b"\xc1 not msgpack"), (3, msgpack.packb([3]))):
                pub.send_multipart([b"t", *p.encode(p.Publish("t", seq, seq, 1, payload))])
            first = sub.recv(5)
            with pytest.raises(
                RetentionGap, match="results t seq 2 to 2 are lost to this subscriber: its records cannot be decoded"
            ):
                sub.recv(5)
            third = sub.recv(5)
            assert sub.rejected["bad payload"] == 1
    finally:
        pub.close(linger=0)
    assert (first.seq, first.records, third.seq, third.records) == (1, [1], 3, [3])
