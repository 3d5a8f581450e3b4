"""The subscriber's core with no sockets (zfan.subscription): where each topic starts, what it
asks the sink for and when, and what it hands over (each result once, in seq order, a lost
range in its place), on a fake clock."""

from __future__ import annotations

import random

import msgpack
import pytest

from zfan import protocol as p
from zfan.config import Timing
from zfan.session import Dial, Lost
from zfan.subscription import ASK_AGAIN, COMMIT_EVERY, POLL_HEADS, Message, RetentionGap, SubscriberCore

pytestmark = pytest.mark.timeout(30)

TIMING = Timing(heartbeat=0.25, liveness=3)
SLOW = p.Welcome(1, 1000, 10)  # beat 1 s, expiry 10 s: the session stays up without sink heartbeats
T0 = 100.0


def pub(topic: str, seq: int, payload: bytes | None = None) -> p.Publish:
    return p.Publish(topic, seq, 1000 + seq, 1, msgpack.packb([f"{topic}{seq}"]) if payload is None else payload)


def live(core: SubscriberCore, *msgs: p.Publish, now: float = T0) -> None:
    """Results from the results stream."""
    for msg in msgs:
        core.stream(msg.topic.encode(), p.encode(msg), now)


def ctl(core: SubscriberCore, *msgs: p.Message, now: float = T0) -> None:
    """Messages from the sink on control."""
    for msg in msgs:
        core.control(p.encode(msg), now)


def sent(core: SubscriberCore) -> list[p.Message]:
    """What went to the sink on control, less heartbeats."""
    return [m for m in core.session.take() if not isinstance(m, p.Heartbeat)]


def taken(core: SubscriberCore) -> list[tuple]:
    """Everything handed over: (topic, seq) for a result, ("lost", topic, first, last) for a gap."""
    out: list[tuple] = []
    while (item := core.take()) is not None:
        if isinstance(item, RetentionGap):
            out.append(("lost", item.topic, item.first, item.last))
        else:
            assert isinstance(item, Message) and item.records == [f"{item.topic}{item.seq}"]
            out.append((item.topic, item.seq))
    return out


def subscriber(
    *, durable: str | None = None, prefixes: tuple[str, ...] = ("",), welcome: p.Welcome = SLOW
) -> SubscriberCore:
    """Dialled, welcomed and synced at T0; nothing asked yet."""
    core = SubscriberCore(prefixes, T0, control=True, durable=durable, timing=TIMING, name="s1", rng=random.Random(1))
    assert core.tick(T0) == Dial()
    assert core.session.take() == [p.Hello("subscriber", "s1", 0)]
    ctl(core, welcome)
    core.synced_now()
    return core


def started(heads: dict[str, int]) -> SubscriberCore:
    """A plain subscriber started at T0 after the given heads, in one page."""
    core = subscriber()
    core.tick(T0)
    assert sent(core) == [p.Heads([""], 0)]
    ctl(core, p.Topics(0, list(heads), list(heads.values()), 1, False))
    assert core.ready
    return core


def replays(core: SubscriberCore) -> list[p.Replay]:
    return [m for m in sent(core) if isinstance(m, p.Replay)]


# --- without a control channel ------------------------------------------------------------


def test_without_control_it_starts_at_once_and_orders_the_stream_skipping_gaps():
    core = SubscriberCore(("",), T0, control=False)
    assert core.session is None and core.tick(T0) is None and core.next_deadline() == float("inf")
    live(core, pub("t", 5))
    assert core.take() is None  # the stream is complete only once our sync topic came through
    core.synced_now()
    live(core, pub("t", 6), pub("t", 8), pub("u", 3), pub("t", 7), pub("t", 6), pub("t", 9))
    assert taken(core) == [("t", 5), ("t", 6), ("t", 8), ("u", 3), ("t", 9)]  # 7 came too late
    assert core.gaps == 1 and core.seq.duplicates == 2


def test_without_control_an_undecodable_result_is_lost_in_its_place():
    core = SubscriberCore(("",), T0, control=False)
    core.synced_now()
    live(core, pub("t", 5), pub("t", 7, payload=b"\xc1"), pub("t", 8), pub("u", 2, payload=b"\xc1"), pub("u", 3))
    assert taken(core) == [("t", 5), ("lost", "t", 7, 7), ("t", 8), ("lost", "u", 2, 2), ("u", 3)]
    assert core.gaps == 1  # 6, skipped


# --- start-up: session, sync, heads -------------------------------------------------------


@pytest.mark.parametrize("order", ["welcome, then sync", "sync, then welcome"])
def test_nothing_is_asked_before_the_session_is_joined_and_synced(order):
    core = SubscriberCore(("t.",), T0, control=True, timing=TIMING, rng=random.Random(1))
    first, second = ("welcome", "sync") if order == "welcome, then sync" else ("sync", "welcome")
    assert core.tick(T0) == Dial()
    assert sent(core) == [p.Hello("subscriber", "subscriber", 0)]
    live(core, pub("t.a", 1))
    for step, now in ((first, T0 + 0.25), (second, T0 + 0.5)):
        assert core.tick(now) is None and sent(core) == []  # not both yet: nothing asked
        assert core.next_deadline() > now  # and no busy loop waiting for it
        if step == "welcome":
            ctl(core, SLOW, now=now)
        else:
            core.synced_now()
    assert core.tick(T0 + 0.5) is None
    assert sent(core) == [p.Heads(["t."], 0)]
    assert core.take() is None  # results wait for the heads


def test_head_pages_are_followed_and_earlier_results_wait_then_come_in_order():
    core = subscriber()
    core.tick(T0)
    assert sent(core) == [p.Heads([""], 0)]
    live(core, pub("a", 4), pub("b", 7), pub("b", 6), pub("c", 3))  # before the start: they wait
    ctl(core, p.Topics(0, ["a", "b"], [3, 5], 10, True))
    assert sent(core) == [p.Heads([""], 10)]  # the next page, at once
    assert core.take() is None and not core.ready
    ctl(core, p.Topics(10, ["c"], [2], 12, False))
    assert core.ready and sent(core) == []
    assert taken(core) == [("a", 4), ("b", 6), ("b", 7), ("c", 3)]
    core.tick(T0)
    assert sent(core) == []  # a plain subscriber starts after the heads: nothing older is owed
    core.tick(T0 + POLL_HEADS - 1e-6)
    assert sent(core) == []
    core.tick(T0 + POLL_HEADS)
    assert sent(core) == [p.Heads([""], 12)]  # then heads are polled from where the last page ended


def test_a_plain_subscriber_starts_at_the_earlier_of_its_heads_and_its_first_streamed_result():
    core = subscriber()
    core.tick(T0)
    sent(core)
    live(core, pub("a", 3), pub("b", 9))  # a: the heads were read after 3 was streamed
    ctl(core, p.Topics(0, ["a", "b"], [4, 6], 1, False))
    core.tick(T0)
    # Owed: a from 3 on (4 was not streamed yet), b after its head 6 (7 and 8 were dropped).
    assert sorted(replays(core), key=lambda r: r.topic) == [p.Replay("a", 4, 4), p.Replay("b", 7, 8)]
    assert taken(core) == [("a", 3)]


def test_heads_after_the_start_ask_for_results_dropped_at_the_end_of_the_stream():
    core = started({"t": 2})
    live(core, pub("t", 3))
    core.tick(T0 + POLL_HEADS)
    assert sent(core) == [p.Heads([""], 1)]
    ctl(core, p.Topics(1, ["t"], [5], 2, False), now=T0 + POLL_HEADS)
    core.tick(T0 + POLL_HEADS)
    assert replays(core) == [p.Replay("t", 4, 5)]


# --- repair -------------------------------------------------------------------------------


def test_a_gap_asks_for_a_replay_and_the_replay_fills_it_in_order_once():
    core = started({"t": 2})
    live(core, pub("t", 3), pub("t", 6), pub("t", 7))
    core.tick(T0)
    assert replays(core) == [p.Replay("t", 4, 5)]
    assert taken(core) == [("t", 3)]  # 6 and 7 wait behind the gap
    ctl(core, pub("t", 5), pub("t", 4))
    live(core, pub("t", 5))  # a live copy, late
    assert taken(core) == [("t", 4), ("t", 5), ("t", 6), ("t", 7)]
    assert core.replayed == 2 and core.received == 5
    core.tick(T0 + 0.5)
    assert replays(core) == []


def test_missing_results_are_a_retention_gap_in_their_place():
    core = started({"t": 2})
    live(core, pub("t", 3), pub("t", 7))
    core.tick(T0)
    assert replays(core) == [p.Replay("t", 4, 6)]
    ctl(core, p.Missing("t", 4, 5, "no longer retained"), pub("t", 6))
    assert taken(core) == [("t", 3), ("lost", "t", 4, 5), ("t", 6), ("t", 7)]
    assert core.seq.lost == 2 and core.gaps == 0


def test_a_gap_reported_after_results_already_taken_comes_next():
    core = started({"t": 2})
    live(core, pub("t", 3), pub("t", 5))
    core.tick(T0)
    assert taken(core) == [("t", 3)]
    ctl(core, p.Missing("t", 4, 4, "no longer retained"))
    assert taken(core) == [("lost", "t", 4, 4), ("t", 5)]


def test_a_result_whose_records_cannot_be_decoded_is_lost_in_its_place():
    core = started({"t": 2})
    live(core, pub("t", 3), pub("t", 5, payload=b"\xc1"), pub("t", 6))
    core.tick(T0)
    assert replays(core) == [p.Replay("t", 4, 5)]  # 4 is still owed, and 5 is asked for again
    ctl(core, pub("t", 4), pub("t", 5, payload=b"\xc1"))
    assert taken(core) == [("t", 3), ("t", 4), ("lost", "t", 5, 5), ("t", 6)]
    assert core.rejected["bad payload"] == 2
    live(core, pub("u", 3, payload=b"\xc1"))  # a topic new since the start: owed from 1
    core.tick(T0 + 0.5)
    assert replays(core) == [p.Replay("u", 1, 3)]


# --- asking again -------------------------------------------------------------------------


def test_an_unanswered_heads_request_is_sent_again_and_the_late_answer_is_not_followed_twice():
    core = subscriber()
    core.tick(T0)
    assert sent(core) == [p.Heads([""], 0)]
    core.tick(T0 + ASK_AGAIN - 1e-6)
    assert sent(core) == []
    assert core.next_deadline() == T0 + ASK_AGAIN
    core.tick(T0 + ASK_AGAIN)
    assert sent(core) == [p.Heads([""], 0)]
    page = p.Topics(0, ["t"], [3], 5, True)
    ctl(core, page, now=T0 + ASK_AGAIN)
    assert sent(core) == [p.Heads([""], 5)]
    ctl(core, page, now=T0 + ASK_AGAIN)  # the answer to the first request, late
    assert sent(core) == []
    ctl(core, p.Topics(5, [], [], 6, False), now=T0 + ASK_AGAIN)
    assert core.ready


def test_an_unanswered_replay_is_asked_again():
    core = started({"t": 2})
    live(core, pub("t", 5))
    core.tick(T0)
    assert replays(core) == [p.Replay("t", 3, 4)]
    core.tick(T0 + ASK_AGAIN / 2)
    assert replays(core) == []
    core.tick(T0 + ASK_AGAIN)
    assert replays(core) == [p.Replay("t", 3, 4)]


def test_after_a_dial_outstanding_page_requests_are_asked_again_at_once():
    core = subscriber(durable="d1", welcome=p.Welcome(1, 125, 2))  # the sink's expiry: 0.25 s
    core.tick(T0)
    assert sent(core) == [p.GetCursor("d1", ""), p.Heads([""], 0)]
    now = T0
    while not isinstance(event := core.tick(now := core.next_deadline()), Lost):  # no answer, no beat
        assert event is None
    assert sent(core) == []
    now = core.next_deadline()
    assert core.tick(now) == Dial()
    assert sent(core) == [p.Hello("subscriber", "s1", 0)]  # requests wait for the welcome
    ctl(core, p.Welcome(1, 125, 2), now=now)
    assert core.next_deadline() <= now
    core.tick(now)
    assert now < T0 + ASK_AGAIN  # sooner than they would be asked again anyway
    assert sent(core) == [p.GetCursor("d1", ""), p.Heads([""], 0)]


# --- durable subscribers ------------------------------------------------------------------


def durable_started(cursor: dict[str, int], heads: dict[str, int]) -> SubscriberCore:
    core = subscriber(durable="d1")
    core.tick(T0)
    assert sent(core) == [p.GetCursor("d1", ""), p.Heads([""], 0)]
    ctl(core, p.Cursor("d1", "", list(cursor), list(cursor.values()), False))
    ctl(core, p.Topics(0, list(heads), list(heads.values()), 1, False))
    assert core.ready
    return core


def test_a_durable_subscriber_reads_its_cursor_pages_and_starts_after_the_saved_positions():
    core = subscriber(durable="d1")
    core.tick(T0)
    assert sent(core) == [p.GetCursor("d1", ""), p.Heads([""], 0)]  # the cursor first
    ctl(core, p.Cursor("d1", "", ["a"], [4], True))
    assert sent(core) == [p.GetCursor("d1", "a")]  # the next page, at once
    ctl(core, p.Cursor("d2", "a", ["b"], [9], False))  # another subscriber's: not ours
    ctl(core, p.Topics(0, ["a", "b"], [6, 1], 3, False))
    live(core, pub("a", 7), pub("b", 2))
    assert not core.ready and core.take() is None  # the cursor's last page is not in yet
    ctl(core, p.Cursor("d1", "a", ["b"], [1], False))
    assert core.ready
    core.tick(T0)
    assert replays(core) == [p.Replay("a", 5, 6)]  # after the saved 4, not from 1
    ctl(core, pub("a", 5), pub("a", 6))
    assert taken(core) == [("b", 2), ("a", 5), ("a", 6), ("a", 7)]


def test_a_durable_subscriber_commits_what_was_taken_every_commit_every_and_on_close():
    core = durable_started({"a": 4, "b": 1}, {"a": 4, "b": 1})
    live(core, pub("a", 5), pub("a", 6))
    assert taken(core) == [("a", 5), ("a", 6)]
    live(core, pub("a", 7))  # ready, not taken: not to be committed
    commits = [m for t in (T0 + 0.5, T0 + COMMIT_EVERY - 1e-6) for m in (core.tick(t), sent(core))[1]]
    assert not any(isinstance(m, p.Commit) for m in commits)
    core.tick(T0 + COMMIT_EVERY)
    assert [m for m in sent(core) if isinstance(m, p.Commit)] == [p.Commit("d1", ["a"], [6])]
    core.tick(T0 + 2 * COMMIT_EVERY)
    assert [m for m in sent(core) if isinstance(m, p.Commit)] == []  # nothing new taken
    live(core, pub("b", 2), now=T0 + 2 * COMMIT_EVERY)
    assert taken(core) == [("a", 7), ("b", 2)]
    core.close()
    assert sent(core) == [p.Commit("d1", ["a", "b"], [7, 2]), p.Bye()]


def test_a_durable_first_run_starts_at_the_oldest_result_retained():
    core = durable_started({}, {"t": 5})
    core.tick(T0)
    assert replays(core) == [p.Replay("t", 1, 5)]
    ctl(core, p.Missing("t", 1, 2, "no longer retained"), pub("t", 3), pub("t", 4), pub("t", 5))
    assert taken(core) == [("t", 3), ("t", 4), ("t", 5)]  # nothing older was ever owed to it
    live(core, pub("t", 8))
    core.tick(T0 + 0.5)
    assert replays(core) == [p.Replay("t", 6, 7)]
    ctl(core, p.Missing("t", 6, 7, "no longer retained"), now=T0 + 0.5)
    assert taken(core) == [("lost", "t", 6, 7), ("t", 8)]  # but these were


def test_a_durable_subscriber_keeps_its_place_when_an_undecodable_result_comes_before_the_start():
    core = subscriber(durable="d1")
    core.tick(T0)
    sent(core)
    live(core, pub("t", 5, payload=b"\xc1"), pub("t", 6))
    ctl(core, p.Cursor("d1", "", ["t"], [1], False), p.Topics(0, ["t"], [4], 1, False))
    core.tick(T0)
    assert replays(core) == [p.Replay("t", 2, 5)]  # from the saved position on, not past the bad one
    ctl(core, pub("t", 2), pub("t", 3), pub("t", 4), pub("t", 5, payload=b"\xc1"))
    assert taken(core) == [("t", 2), ("t", 3), ("t", 4), ("lost", "t", 5, 5), ("t", 6)]
