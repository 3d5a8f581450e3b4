"""A subscriber's bookkeeping with no sockets (zfan.sequencing): what it hands over, in which
order, and which ranges it asks the sink to replay, driven with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from zfan import RetentionGap, ZfanError
from zfan.sequencing import Sequencer

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class M:
    topic: str
    seq: int
    via: str = "stream"  # where the result came from, to tell a replayed copy from a live one


def make(clock, **kw) -> Sequencer[M]:
    return Sequencer(clock=clock, **kw)


def offer(s: Sequencer[M], topic: str, *seqs: int, via: str = "stream") -> list[bool]:
    return [s.offer(M(topic, q, via)) for q in seqs]


def take(s: Sequencer[M]) -> list[tuple[str, int]]:
    """Everything ready for the caller, in the order it would be handed over."""
    out = [(m.topic, m.seq) for m in s.ready]
    s.ready.clear()
    return out


def held(s: Sequencer[M]) -> int:
    return sum(len(h) for h in s.held.values())


# --- delivery ---------------------------------------------------------------------------------


def test_results_in_order_are_delivered_at_once(clock):
    s = make(clock)
    assert offer(s, "t", 1, 2, 3) == [True, True, True]
    assert take(s) == [("t", 1), ("t", 2), ("t", 3)]
    assert s.positions() == {"t": 3}
    assert s.requests() == []
    assert (s.duplicates, s.skipped, s.lost) == (0, 0, 0)


def test_topics_are_sequenced_independently(clock):
    s = make(clock)
    offer(s, "a", 1, 2)
    offer(s, "b", 1)
    offer(s, "a", 3)
    offer(s, "b", 2)
    assert take(s) == [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2)]
    assert s.positions() == {"a": 3, "b": 2}


def test_results_past_a_gap_are_held_until_the_replay_fills_it(clock):
    s = make(clock)
    offer(s, "t", 1, 4, 5)
    assert take(s) == [("t", 1)], "4 and 5 must wait for 2 and 3"
    assert held(s) == 2
    assert s.requests() == [("t", 2, 3)]
    offer(s, "t", 2, via="replay")
    assert take(s) == [("t", 2)]
    offer(s, "t", 3, via="replay")
    assert take(s) == [("t", 3), ("t", 4), ("t", 5)]
    assert held(s) == 0 and s.positions() == {"t": 5}
    assert s.requests() == []


def test_a_replayed_result_that_arrives_first_is_delivered_once(clock):
    s = make(clock)
    offer(s, "t", 1, 3)
    assert offer(s, "t", 2, 3, via="replay") == [True, False]
    assert offer(s, "t", 2) == [False], "the live copy after the replayed one is a duplicate"
    delivered = list(s.ready)
    assert [(m.seq, m.via) for m in delivered] == [(1, "stream"), (2, "replay"), (3, "stream")]
    assert s.duplicates == 2


def test_duplicates_are_dropped_from_the_stream_and_from_replays(clock):
    s = make(clock)
    offer(s, "t", 1, 2)
    assert offer(s, "t", 2) == [False]  # already delivered, from the stream
    assert offer(s, "t", 1, via="replay") == [False]  # already delivered, from a replay
    offer(s, "t", 5)
    assert offer(s, "t", 5) == [False]  # already held, from the stream
    assert offer(s, "t", 5, via="replay") == [False]  # already held, from a replay
    assert s.duplicates == 4
    assert held(s) == 1
    offer(s, "t", 3, 4, via="replay")
    assert take(s) == [("t", q) for q in (1, 2, 3, 4, 5)]


# --- what to ask the sink for ----------------------------------------------------------------


def test_requests_ask_for_the_gap_before_the_first_held_result(clock):
    s = make(clock)
    offer(s, "t", 1, 5, 6, 9)
    assert s.requests() == [("t", 2, 4)], "up to the first held result, not beyond"


def test_requests_ask_up_to_the_head_when_nothing_is_held(clock):
    s = make(clock)
    offer(s, "t", 1, 2)
    s.head("t", 7)
    assert s.requests() == [("t", 3, 7)]


def test_no_second_request_while_an_answer_is_due_and_another_after_ask_every(clock):
    s = make(clock, ask_every=1.0)
    offer(s, "t", 1, 5)
    assert s.requests() == [("t", 2, 4)]
    clock.advance(0.5)
    assert s.requests() == [], "the answer to the first request is still on its way"
    offer(s, "t", 2, via="replay")  # part of the answer
    clock.advance(0.4)
    assert s.requests() == [], "the rest of the answer is still on its way"
    clock.advance(0.2)  # 1.1 s since the request: the rest of the answer was lost
    assert s.requests() == [("t", 3, 4)]
    assert s.requests() == []


def test_a_filled_gap_lets_the_next_gap_be_asked_for_at_once(clock):
    s = make(clock, ask_every=1.0)
    offer(s, "t", 1, 3, 6)
    assert s.requests() == [("t", 2, 2)]
    offer(s, "t", 2, via="replay")
    assert take(s) == [("t", 1), ("t", 2), ("t", 3)]
    assert s.requests() == [("t", 4, 5)], "a new gap needs no wait for ask_every"


def test_requests_per_topic(clock):
    s = make(clock)
    offer(s, "a", 1, 3)
    offer(s, "b", 2)
    s.head("c", 2)
    assert sorted(s.requests()) == [("a", 2, 2), ("b", 1, 1), ("c", 1, 2)]


# --- where a subscriber starts ----------------------------------------------------------------


def test_a_long_gap_is_asked_for_one_sink_answer_at_a_time(clock):
    from zfan.protocol import MAX_REPLAY

    seq = Sequencer(clock=clock)
    seq.head("t", 2500)
    assert seq.requests() == [("t", 1, MAX_REPLAY)]
    for i in range(1, MAX_REPLAY + 1):
        seq.offer(M("t", i))
    assert seq.requests() == [("t", MAX_REPLAY + 1, 2 * MAX_REPLAY)], "the next chunk at once, not after ask_every"


def test_without_repair_a_topic_starts_where_it_was_joined(clock):
    seq = Sequencer(clock=clock, repair=False)
    seq.offer(M("t", 50))
    seq.offer(M("t", 51))
    seq.offer(M("t", 54))
    assert [m.seq for m in seq.ready] == [50, 51, 54]
    assert seq.skipped == 2, "only what went missing after joining counts"


def test_start_at_sets_the_baseline(clock):
    s = make(clock)
    s.start_at({"t": 10, "u": 0})
    assert offer(s, "t", 9, 10) == [False, False], "taken before: duplicates"
    assert offer(s, "t", 11) == [True]
    assert offer(s, "u", 1) == [True]
    assert take(s) == [("t", 11), ("u", 1)]
    assert s.requests() == []


def test_start_at_then_the_head_asks_for_what_came_after(clock):
    s = make(clock)
    s.start_at({"t": 10})
    s.head("t", 14)
    assert s.requests() == [("t", 11, 14)]


def test_start_at_does_not_move_a_topic_already_started(clock):
    s = make(clock)
    s.start_at({"t": 5})
    s.start_at({"t": 2, "u": 3})
    assert offer(s, "t", 6) == [True]
    assert offer(s, "u", 3, 4) == [False, True]
    assert take(s) == [("t", 6), ("u", 4)]


def test_head_reveals_a_gap_at_the_tail(clock):
    s = make(clock)
    offer(s, "t", 1, 2, 3)
    s.head("t", 3)
    assert s.requests() == [], "nothing is missing"
    s.head("t", 5)  # 4 and 5 were published and dropped: nothing after them reveals them
    assert s.requests() == [("t", 4, 5)]
    s.head("t", 4)  # an older answer does not shrink what is known
    clock.advance(2.0)
    assert s.requests() == [("t", 4, 5)]


def test_head_of_an_unseen_topic_asks_from_its_start(clock):
    s = make(clock)
    s.head("new", 3)
    assert s.requests() == [("new", 1, 3)]


# --- results the sink no longer has ------------------------------------------------------------


def test_missing_reports_a_retention_gap_and_releases_what_was_held(clock):
    s = make(clock)
    offer(s, "t", 1, 6, 7)
    s.missing("t", 2, 5, "no longer retained by the sink")
    assert take(s) == [("t", 1), ("t", 6), ("t", 7)]
    assert len(s.errors) == 1
    gap = s.errors.popleft()
    assert isinstance(gap, RetentionGap) and isinstance(gap, ZfanError)
    assert str(gap) == "results t seq 2 to 5 are lost to this subscriber: no longer retained by the sink"
    assert (gap.topic, gap.first, gap.last) == ("t", 2, 5)
    assert s.lost == 4 and held(s) == 0
    assert s.requests() == []
    assert offer(s, "t", 8) == [True]
    assert take(s) == [("t", 8)]


def test_missing_counts_only_what_was_not_delivered(clock):
    s = make(clock)
    offer(s, "t", 1, 2, 3)
    s.missing("t", 1, 5, "no longer retained by the sink")
    gap = s.errors.popleft()
    assert (gap.first, gap.last) == (4, 5)
    assert "results t seq 4 to 5 are lost" in str(gap)
    assert s.lost == 2 and s.positions() == {"t": 5}


def test_missing_what_was_delivered_already_is_no_error(clock):
    s = make(clock)
    offer(s, "t", 1, 2, 3)
    s.missing("t", 1, 3, "no longer retained by the sink")
    assert not s.errors and s.lost == 0
    assert s.positions() == {"t": 3}


def test_missing_ends_the_wait_for_an_answer(clock):
    s = make(clock, ask_every=1.0)
    offer(s, "t", 1, 8)
    assert s.requests() == [("t", 2, 7)]
    s.missing("t", 2, 4, "no longer retained by the sink")
    offer(s, "t", 5, 6, 7, via="replay")
    assert take(s) == [("t", q) for q in (1, 5, 6, 7, 8)]
    s.head("t", 10)
    assert s.requests() == [("t", 9, 10)], "asked at once: no answer is due any more"


# --- without a control channel, and with little memory -----------------------------------------


def test_without_repair_a_gap_is_skipped_and_counted(clock):
    s = make(clock, repair=False)
    offer(s, "t", 1, 4)
    assert take(s) == [("t", 1), ("t", 4)]
    assert s.skipped == 2 and held(s) == 0
    assert offer(s, "t", 3) == [False], "too late: the subscriber has moved past it"
    s.head("t", 4)
    assert s.requests() == []
    offer(s, "t", 5, 9)
    assert take(s) == [("t", 5), ("t", 9)]
    assert s.skipped == 5


def test_hold_limit_bounds_memory_and_what_did_not_fit_is_asked_for_again(clock):
    s = make(clock, hold_limit=3)
    offer(s, "t", 1)
    assert offer(s, "t", 3, 4, 5, 6, 7) == [True] * 5
    assert held(s) == 3
    assert s.requests() == [("t", 2, 2)]
    offer(s, "t", 2, via="replay")
    assert take(s) == [("t", q) for q in (1, 2, 3, 4, 5)]
    assert held(s) == 0
    assert s.requests() == [("t", 6, 7)], "6 and 7 did not fit: they are asked for"
    offer(s, "t", 6, 7, via="replay")
    assert take(s) == [("t", 6), ("t", 7)]
    assert s.duplicates == 0


def test_hold_limit_is_shared_by_all_topics(clock):
    s = make(clock, hold_limit=2)
    offer(s, "a", 1, 3)
    offer(s, "b", 1, 3, 4)
    assert held(s) == 2
    offer(s, "a", 2, via="replay")
    offer(s, "b", 2, via="replay")
    assert held(s) == 0
    assert take(s) == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("b", 3)]
    assert s.requests() == [("b", 4, 4)]
