"""The producer's bookkeeping: when a batch is sealed, and which unacknowledged batches are
sent again."""

from __future__ import annotations

import pytest

from zfan.batching import Batch, Batcher
from zfan.delivery import Sent, Window

pytestmark = pytest.mark.timeout(30)

T0 = 1000.0


# --- Batcher --------------------------------------------------------------------------------


def test_batch_is_sealed_exactly_at_batch_size():
    b = Batcher(batch_size=3, linger=10.0)
    assert b.add("t", b"1", T0) == []
    assert b.add("t", b"2", T0) == []
    assert len(b) == 2
    assert b.add("t", b"3", T0) == [Batch(3, [b"1", b"2", b"3"])]
    assert len(b) == 0
    assert b.take_any() is None
    # The next record opens a new batch.
    assert b.add("t", b"4", T0) == []
    assert len(b) == 1


def test_batch_size_one_seals_every_record():
    b = Batcher(batch_size=1, linger=10.0)
    assert b.add("t", b"a", T0) == [Batch(1, [b"a"])]
    assert b.add("t", b"b", T0) == [Batch(1, [b"b"])]
    assert len(b) == 0


def test_topics_are_batched_separately():
    b = Batcher(batch_size=2, linger=10.0)
    assert b.add("a", b"a1", T0) == []
    assert b.add("b", b"b1", T0) == []
    assert b.add("a", b"a2", T0) == [Batch(2, [b"a1", b"a2"])]
    assert len(b) == 1
    assert b.add("b", b"b2", T0) == [Batch(2, [b"b1", b"b2"])]


def test_take_due_only_after_linger():
    b = Batcher(batch_size=100, linger=0.5)
    assert b.take_due(T0) is None  # nothing open
    b.add("t", b"1", T0)
    b.add("t", b"2", T0 + 0.3)
    assert b.take_due(T0) is None
    assert b.take_due(T0 + 0.49) is None
    assert b.take_due(T0 + 0.5) == ("t", Batch(2, [b"1", b"2"]))
    assert b.take_due(T0 + 10) is None  # taken once
    assert len(b) == 0


def test_linger_counts_from_the_first_record_of_the_batch():
    b = Batcher(batch_size=100, linger=1.0)
    b.add("t", b"1", T0)
    b.add("t", b"2", T0 + 0.9)
    assert b.take_due(T0 + 1.0) == ("t", Batch(2, [b"1", b"2"]))


def test_take_due_returns_the_oldest_batch_first():
    b = Batcher(batch_size=100, linger=1.0)
    b.add("young", b"y", T0 + 0.5)
    b.add("old", b"o", T0)
    assert b.take_due(T0 + 1.2) == ("old", Batch(1, [b"o"]))
    assert b.take_due(T0 + 1.2) is None  # "young" is only 0.7 s old
    assert b.take_due(T0 + 1.5) == ("young", Batch(1, [b"y"]))


def test_zero_linger_makes_a_batch_due_at_once():
    b = Batcher(batch_size=100, linger=0.0)
    b.add("t", b"1", T0)
    assert b.take_due(T0) == ("t", Batch(1, [b"1"]))


def test_next_due():
    b = Batcher(batch_size=100, linger=2.0)
    assert b.next_due(T0) is None
    b.add("a", b"1", T0)
    assert b.next_due(T0) == pytest.approx(2.0)
    assert b.next_due(T0 + 0.5) == pytest.approx(1.5)
    b.add("b", b"1", T0 + 1.0)
    assert b.next_due(T0 + 1.0) == pytest.approx(1.0)  # the oldest batch decides
    assert b.next_due(T0 + 5.0) == 0.0  # overdue is never negative
    b.take_due(T0 + 5.0)
    assert b.next_due(T0 + 1.5) == pytest.approx(1.5)  # now "b" is the oldest
    b.take_due(T0 + 5.0)
    assert b.next_due(T0 + 5.0) is None


def test_sealing_at_batch_size_resets_the_linger_clock():
    b = Batcher(batch_size=2, linger=1.0)
    b.add("t", b"1", T0)
    b.add("t", b"2", T0)  # sealed
    b.add("t", b"3", T0 + 0.8)
    assert b.take_due(T0 + 1.0) is None
    assert b.next_due(T0 + 1.0) == pytest.approx(0.8)


def test_take_any_drains_everything_for_flush():
    b = Batcher(batch_size=100, linger=60.0)
    b.add("a", b"a1", T0)
    b.add("b", b"b1", T0)
    b.add("a", b"a2", T0)
    taken = {}
    while (batch := b.take_any()) is not None:
        topic, records = batch
        taken[topic] = records
    assert taken == {"a": Batch(2, [b"a1", b"a2"]), "b": Batch(1, [b"b1"])}
    assert len(b) == 0


# --- Window ---------------------------------------------------------------------------------


def sent(seq: int, count: int = 1) -> Sent:
    return Sent(seq=seq, count=count, frames=[f"h{seq}".encode(), b"payload"])


def window_of(*batches: tuple[int, float | None]) -> Window:
    """A window holding these (seq, when pushed) in order; None: never pushed."""
    w = Window()
    for seq, at in batches:
        s = sent(seq)
        w.add(s)
        if at is not None:
            w.pushed(s, at)
    return w


def test_ack_forgets_batches_and_counts_records():
    w = Window()
    w.add(sent(1, count=10))
    w.add(sent(2, count=5))
    w.add(sent(3, count=1))
    assert len(w) == 3
    assert w.ack([1, 3]) == 2
    assert len(w) == 1
    assert [s.seq for s in w.all()] == [2]
    assert w.acked_records == 11
    assert w.acked_batches == 2


def test_repeated_and_unknown_acks_are_ignored():
    w = Window()
    w.add(sent(1, count=4))
    assert w.ack([1]) == 1
    assert w.ack([1, 1, 99]) == 0
    assert w.ack([]) == 0
    assert w.acked_records == 4
    assert w.acked_batches == 1
    assert len(w) == 0


def test_due_returns_unsent_and_overdue_batches_only():
    w = window_of((3, T0 - 2.0), (2, T0), (1, None))  # sent 2 s ago, just sent, never sent
    assert sorted(s.seq for s in w.due(T0, resend_after=2.0)) == [1, 3]
    assert sorted(s.seq for s in w.due(T0 + 1.99, resend_after=2.0)) == [1, 3]
    assert sorted(s.seq for s in w.due(T0 + 2.0, resend_after=2.0)) == [1, 2, 3]
    assert w.next_due(2.0) == float("-inf")


def test_resend_after_pushing_again_waits_again():
    w = window_of((1, T0))
    (s,) = due = w.due(T0 + 2.0, resend_after=2.0)
    assert due == [s] and w.next_due(2.0) == T0 + 2.0
    w.pushed(s, T0 + 2.0)  # the producer sends it again
    assert w.due(T0 + 3.0, resend_after=2.0) == [] and w.next_due(2.0) == T0 + 4.0
    assert w.due(T0 + 4.0, resend_after=2.0) == [s]
    w.ack([1])
    assert w.due(T0 + 100.0, resend_after=2.0) == [] and w.next_due(2.0) is None


def test_the_oldest_send_is_due_first_whatever_the_seqs():
    w = window_of((1, T0), (2, T0 + 1.0))
    w.pushed(w.all()[0], T0 + 2.0)  # 1 sent again: now 2 is the oldest send
    assert [s.seq for s in w.due(T0 + 3.0, resend_after=2.0)] == [2]
    assert w.next_due(2.0) == T0 + 3.0


def test_resend_all_makes_every_batch_due_at_once_oldest_first():
    w = window_of((1, T0), (2, T0), (3, None))
    w.resend_all()
    assert [s.seq for s in w.due(T0, resend_after=2.0)] == [1, 2, 3]
    assert all(s.sent_at is None for s in w.all())


def test_a_late_push_of_an_acknowledged_batch_changes_nothing():
    w = window_of((1, None))
    (s,) = w.due(T0, resend_after=2.0)
    w.ack([1])
    w.pushed(s, T0)
    assert len(w) == 0 and w.due(T0 + 10, resend_after=2.0) == [] and w.next_due(2.0) is None


def test_due_keeps_the_frames_to_resend():
    w = window_of((7, None))
    (s,) = w.due(T0, resend_after=2.0)
    assert s.frames == [b"h7", b"payload"]


def test_a_batch_is_sealed_before_it_would_outgrow_a_frame():
    b = Batcher(batch_size=100, linger=1.0, max_bytes=10)
    assert b.add("t", b"aaaa", 0.0) == []
    assert b.add("t", b"bbbb", 0.0) == []
    assert b.add("t", b"cccc", 0.0) == [Batch(2, [b"aaaa", b"bbbb"])], "12 bytes would not fit: the first two go"
    assert b.take_any() == ("t", Batch(1, [b"cccc"]))


def test_a_piece_of_several_records_counts_as_them_all():
    b = Batcher(batch_size=5, linger=10.0)
    assert b.room("t") == 5
    assert b.add("t", b"12", T0, count=2) == []
    assert b.room("t") == 3 and len(b) == 2
    assert b.add("t", b"345", T0, count=3) == [Batch(5, [b"12", b"345"])]
    assert b.room("t") == 5


def test_a_piece_too_big_for_the_open_batch_seals_it_and_may_seal_itself():
    b = Batcher(batch_size=1, linger=10.0, max_bytes=4)
    assert b.add("t", b"ab", T0) == [Batch(1, [b"ab"])]
    b = Batcher(batch_size=2, linger=10.0, max_bytes=4)
    assert b.add("t", b"ab", T0) == []
    assert b.add("t", b"cde", T0, count=2) == [Batch(1, [b"ab"]), Batch(2, [b"cde"])]
