"""Heads and durable cursors in pages, whatever the number of topics.

The sink's answers (SinkCore, real frames, a fake clock), the subscriber's bookkeeping of many
gaps (Sequencer), and an end-to-end run of 50 000 topics with a subscriber that falls behind.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.checker import check
from tests.helpers import wait_for
from tests.test_dispatch import Turn, batch, hello_worker, make_core, records, send_result
from zfan import Producer, Sink, Subscriber, Worker, query_status
from zfan import protocol as p
from zfan.dispatch import SinkCore
from zfan.heads import HeadLog
from zfan.ledger import Ledger, SqliteLedger
from zfan.sequencing import Sequencer

pytestmark = pytest.mark.timeout(60)

BATCH_SEQS = itertools.count(1)  # the producer's seqs, unique across tests


# --- the sink's side --------------------------------------------------------------------------


def publish(core: SinkCore, topics: list[str], per: int = p.MAX_TOPICS) -> None:
    """One result on each topic, by one worker, `per` topics in a result."""
    parts = [topics[i : i + per] for i in range(0, len(topics), per)]
    hello_worker(core, b"w", len(parts))
    for _ in parts:
        core.intake(batch("p", next(BATCH_SEQS)), None)
    for lease, part in zip(Turn(core).leases, parts, strict=True):
        send_result(core, b"w", lease, {t: records(1) for t in part})
    Turn(core)


def heads_page(core: SinkCore, after: int, prefixes: tuple[str, ...] = ("",)) -> tuple[dict[str, int], int, bool]:
    core.control(b"s", p.encode(p.Heads(list(prefixes), after)))
    out = core.end_turn()
    ((rid, frames),) = out.to_peers
    assert len(frames[0]) <= p.MAX_HEADER_BYTES
    answer = p.decode(frames)
    assert isinstance(answer, p.Topics) and (rid, answer.after) == (b"s", after)
    assert len(set(answer.topics)) == len(answer.topics), "a topic at most once in a page"
    return dict(zip(answer.topics, answer.seqs, strict=True)), answer.upto, answer.more


def sweep(core: SinkCore, after: int = 0, prefixes: tuple[str, ...] = ("",)) -> tuple[dict[str, int], int, int]:
    """Every page from `after` on: (the heads, the position to poll from next, pages read)."""
    heads: dict[str, int] = {}
    pages = 0
    more = True
    while more:
        page, after, more = heads_page(core, after, prefixes)
        heads.update(page)
        pages += 1
    return heads, after, pages


TOPICS = [f"t.{i}" for i in range(25_000)]


@pytest.fixture
def core(ledger, clock) -> SinkCore:
    return make_core(ledger, clock)


@pytest.fixture
def big(ledger, clock) -> SinkCore:
    core = make_core(ledger, clock)
    publish(core, TOPICS)
    return core


def test_heads_of_25000_topics_come_in_pages_and_none_is_missed(big):
    heads, _, pages = sweep(big)
    assert pages == 3
    assert heads == dict.fromkeys(TOPICS, 1)


def test_pages_of_long_topics_stay_within_a_header(ledger, clock):
    core = make_core(ledger, clock)
    topics = [f"{i:05d}".ljust(250, "t") for i in range(12_000)]
    publish(core, topics, per=3000)
    page, _, more = heads_page(core, 0)
    assert more and 3900 < len(page) < 4100
    heads, _, pages = sweep(core)
    assert pages == 3 and heads == dict.fromkeys(topics, 1)


def test_a_poll_returns_only_the_topics_that_changed_since_the_last(big):
    _, after, _ = sweep(big)
    assert heads_page(big, after) == ({}, after, False), "nothing changed: an empty page, the same position"
    publish(big, ["t.7", "t.24999", "new"])
    page, upto, more = heads_page(big, after)
    assert page == {"t.7": 2, "t.24999": 2, "new": 1} and not more
    assert heads_page(big, upto) == ({}, upto, False)


def test_a_topic_that_changes_during_a_sweep_is_reported_again(big):
    first, after, more = heads_page(big, 0)
    assert more and "t.0" in first
    publish(big, ["t.0", "t.24999"])
    heads = dict(first)
    while more:
        page, after, more = heads_page(big, after)
        heads.update(page)
    assert heads == {**dict.fromkeys(TOPICS, 1), "t.0": 2, "t.24999": 2}


def test_prefixes_select_the_topics_of_every_page(big):
    heads, _, _ = sweep(big, prefixes=("t.1", "t.22"))
    assert heads == {t: 1 for t in TOPICS if t.startswith(("t.1", "t.22"))}
    assert sweep(big, prefixes=())[0] == {}


def test_a_position_of_an_earlier_sink_run_starts_the_sweep_over(big, ledger, clock, reopen_ledger):
    _, after, _ = sweep(big)
    big.ledger.commit()  # what the sink left to commit with its next turn
    again = make_core(reopen_ledger(), clock)  # the same ledger: a restarted sink
    assert again.epoch == big.epoch + 1
    heads, upto, pages = sweep(again, after)
    assert pages == 3 and heads == dict.fromkeys(TOPICS, 1)
    assert heads_page(again, upto) == ({}, upto, False)


@pytest.mark.parametrize("after", [1 << 62, p.MAX_INT, 12345])
def test_a_position_this_run_never_gave_starts_the_sweep_over(big, after):
    heads, _, _ = sweep(big, after)
    assert heads == dict.fromkeys(TOPICS, 1)


def test_the_change_log_stays_near_the_number_of_topics_and_reads_right():
    log = HeadLog(epoch=3, topics=["a", "b"])
    heads = {"a": 1, "b": 1}
    for seq in range(2, 20_000):
        topic = "ab"[seq % 2]
        heads[topic] = seq
        log.changed(topic)
    assert len(log) <= 2 * 2 + 1024 + 1
    pairs, after, more = log.page(0, ("",), heads)
    assert sorted(pairs) == [("a", 19_998), ("b", 19_999)] and not more
    log.changed("a")
    assert log.page(after, ("",), heads) == ([("a", 19_998)], after + 1, False)


def test_a_request_reads_at_most_its_scan_limit_of_the_log():
    log = HeadLog(epoch=1, topics=[f"x{i}" for i in range(100)])
    heads = {f"x{i}": 1 for i in range(100)}
    pairs, _, more = log.page(0, ("y",), heads, scan_limit=30)
    assert (pairs, more) == ([], True), "nothing matched in the part read, but the rest is to read"
    got, pages, after, more = [], 0, 0, True
    while more:
        pairs, after, more = log.page(after, ("x5",), heads, scan_limit=30)
        got += pairs
        pages += 1
    assert pages == 4 and got == [("x5", 1), *((f"x5{i}", 1) for i in range(10))]


# --- cursors ---------------------------------------------------------------------------------


def cursor_pages(core: SinkCore, name: str) -> list[list[tuple[str, int]]]:
    pages = []
    after, more = "", True
    while more:
        core.control(b"s", p.encode(p.GetCursor(name, after)))
        ((rid, frames),) = core.end_turn().to_peers
        assert len(frames[0]) <= p.MAX_HEADER_BYTES
        cursor = p.decode(frames)
        assert isinstance(cursor, p.Cursor) and (cursor.name, cursor.after_topic) == (name, after)
        pages.append(list(zip(cursor.topics, cursor.seqs, strict=True)))
        more = cursor.more
        if more:
            after = cursor.topics[-1]
    return pages


def test_a_cursor_of_25000_topics_comes_in_pages_in_topic_order(core):
    positions = [(f"t.{i:05d}", i + 1) for i in range(25_000)]
    for part in (positions[i : i + p.MAX_TOPICS] for i in range(0, len(positions), p.MAX_TOPICS)):
        core.control(b"s", p.encode(p.Commit("d", [t for t, _ in part], [s for _, s in part])))
    core.control(b"s", p.encode(p.Commit("other", ["t.00001"], [9])))
    Turn(core)
    pages = cursor_pages(core, "d")
    assert [len(page) for page in pages] == [10_000, 10_000, 5_000]
    assert [pair for page in pages for pair in page] == positions
    assert cursor_pages(core, "nobody") == [[]]


# --- the subscriber's side: many gaps at once ------------------------------------------------------


def test_requests_keep_at_most_max_asking_seqs_out_and_ask_for_more_as_answers_come(clock):
    seq: Sequencer = Sequencer(clock=clock, max_asking=100)
    seq.start_at({f"t{i}": 0 for i in range(1000)})
    for i in range(1000):
        seq.head(f"t{i}", 2)
    first = seq.requests()
    assert sum(last - f + 1 for _, f, last in first) == 100 and seq.requests() == []

    class Msg:
        def __init__(self, topic: str, n: int) -> None:
            self.topic, self.seq = topic, n

    for topic, f, last in first[:10]:
        for n in range(f, last + 1):
            seq.offer(Msg(topic, n))
    more = seq.requests()
    assert sum(last - f + 1 for _, f, last in more) == 20, "room for as many seqs as came in"
    assert not {t for t, _, _ in more} & {t for t, _, _ in first}


def test_a_result_past_the_hold_limit_is_asked_for_again(clock):
    class Msg:
        def __init__(self, topic: str, n: int) -> None:
            self.topic, self.seq = topic, n

    seq: Sequencer = Sequencer(clock=clock, hold_limit=1)
    seq.start_at({"t": 0})
    seq.offer(Msg("t", 3))  # held
    seq.offer(Msg("t", 4))  # past the limit: not held
    assert seq.requests() == [("t", 1, 2)]
    seq.offer(Msg("t", 1))
    seq.offer(Msg("t", 2))
    assert [m.seq for m in seq.ready] == [1, 2, 3]
    assert seq.requests() == [("t", 4, 4)], "the result that did not fit is asked for, not lost"


# --- end to end ----------------------------------------------------------------------------

N_TOPICS = 50_000


def own_topic(records: list) -> dict:
    """Each record on a topic of its own."""
    return {f"t.{r['id'] % N_TOPICS}": [r] for r in records}


@pytest.fixture
def reopen_ledger(ledger):
    opened: list[Ledger] = []

    def again() -> Ledger:
        opened.append(SqliteLedger(ledger.path))
        return opened[-1]

    yield again
    for led in opened:
        led.close()


@pytest.mark.timeout(120)
def test_50000_topics_reach_a_subscriber_that_fell_behind_exactly_once_in_order(tmp_path, ipc, ctx):
    n = 2 * N_TOPICS  # two results per topic
    started = time.monotonic()
    with (
        Sink(**ipc, ledger=str(tmp_path / "z.db"), publish_hwm=100, retain_count=10 * n, context=ctx) as sink,
        Worker(own_topic, control=sink.control, context=ctx),
        Subscriber(results=sink.results, control=sink.control, topics=["t."], hwm=100, context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, batch_size=1000, context=ctx) as prod:
            prod.send_many([{"id": i} for i in range(n)], "in")
            prod.flush(timeout=60)
        # The subscriber reads nothing while everything is published: ZeroMQ drops most of it.
        wait_for(
            lambda: query_status(sink.control, context=ctx).get("published", 0) >= n,
            timeout=60,
            what="every result published",
        )
        published = time.monotonic()
        got: dict[str, list[int]] = {}
        ids: list[int] = []
        deadline = time.monotonic() + 60
        while len(ids) < n:
            assert time.monotonic() < deadline, f"{len(ids)} of {n} results after 60 s"
            msg = sub.recv(1.0)
            if msg is not None:
                got.setdefault(msg.topic, []).append(msg.seq)
                ids += [r["id"] for r in msg.records]
        assert sub.recv(0.5) is None, "nothing more"
        assert sub.replayed > n // 2, "most came from the ledger: the subscriber did fall behind"
        assert sub.lost == 0 and sub.gaps == 0
    print(f"\npublished in {published - started:.1f} s, caught up in {time.monotonic() - published:.1f} s")
    verdict = check(range(n), ids, got)
    assert verdict.ok, verdict
    assert got == {f"t.{i}": [1, 2] for i in range(N_TOPICS)}
