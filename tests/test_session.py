"""A client's control session with no sockets (zfan.session): when it dials, what it sends
(hello, heartbeats, bye), how it reacts to the sink's welcome, reset, restart and silence, and
how long it waits before dialling again, all on a fake clock. Times are sums of binary
fractions, so that "exactly the expiry" is exact."""

from __future__ import annotations

import logging
import random

import pytest

from zfan import protocol as p
from zfan.config import Timing
from zfan.session import BACKOFF_CAP, Dial, GaveUp, Joined, Lost, Session, said

pytestmark = pytest.mark.timeout(30)

OWN = Timing(heartbeat=0.25, liveness=3)  # before a welcome: beat 0.25 s, expiry 0.75 s
FAST = p.Welcome(3, 125, 4)  # the sink's own pace: beat 0.125 s, expiry 0.5 s
HELLO = p.Hello("worker", "w1", 4)


def session(now: float = 100.0, seed: int = 1, connect_timeout: float | None = None) -> Session:
    return Session("worker", "w1", OWN, now, credit=4, rng=random.Random(seed), connect_timeout=connect_timeout)


def joined(now: float = 100.0, welcome: p.Welcome = FAST, seed: int = 1) -> Session:
    """A session dialled and welcomed at `now`, its outbox emptied."""
    s = session(now, seed)
    assert s.tick(now) == Dial()
    assert s.received(welcome, now) == Joined(welcome.epoch, True)
    s.take()
    return s


def act(s: Session, now: float) -> tuple[object, list[p.Message]]:
    """Tick at `now`: the event, and what it put in the outbox."""
    return s.tick(now), s.take()


def lose(s: Session) -> float:
    """Tick at every deadline, the sink silent, until the session gives it up; return when."""
    while True:
        now = s.next_deadline()
        event, _ = act(s, now)
        if event is not None:
            assert isinstance(event, Lost) and event.redial
            return now


def next_event(s: Session) -> tuple[object, float]:
    """Tick at every deadline, the sink silent, until something happens: the event, and when."""
    while True:
        now = s.next_deadline()
        event, _ = act(s, now)
        if event is not None:
            return event, now


def redial(s: Session, lost_at: float) -> float:
    """The wait from a loss to the next Dial, checking that nothing happens before it."""
    dial_at = s.next_deadline()
    assert act(s, dial_at - 1e-6) == (None, [])
    assert act(s, dial_at) == (Dial(), [HELLO])
    return dial_at - lost_at


# --- dialling and hello -------------------------------------------------------------------


def test_the_first_tick_dials_with_a_hello():
    s = session(100.0)
    assert s.outbox == [] and not s.joined
    assert act(s, 99.5) == (None, [])  # not yet its time
    assert act(s, 100.0) == (Dial(), [HELLO])
    assert act(s, 100.0) == (None, [])  # one dial, one hello
    assert s.dials == 1 and not s.joined


# --- heartbeats ---------------------------------------------------------------------------


def beats(s: Session, until: float, sink_epoch: int | None = None) -> list[tuple[float, p.Message]]:
    """Tick at every deadline up to `until`, the sink beating back when given an epoch; return
    each heartbeat sent with when."""
    sent = []
    while (now := s.next_deadline()) <= until:
        event, out = act(s, now)
        assert event is None
        sent += [(now, m) for m in out]
        if sink_epoch is not None:
            s.received(p.Heartbeat(sink_epoch), now)
    return sent


def test_heartbeats_follow_the_pace_the_welcome_sets():
    s = joined(100.0)  # beat 0.125 s
    sent = beats(s, 101.0, sink_epoch=3)
    assert [m for _, m in sent] == [p.Heartbeat(3)] * 8
    assert [t for t, _ in sent] == pytest.approx([100.0 + 0.125 * i for i in range(1, 9)])


def test_before_a_welcome_no_epoch_is_claimed_and_the_welcome_pace_does_not_apply():
    s = session(100.0)
    act(s, 100.0)
    s.received(p.Heartbeat(9), 100.0)  # a sink heartbeat is no welcome: its epoch is not taken up
    sent = [(t, m) for t in (100.0 + i / 16 for i in range(1, 12)) for m in act(s, t)[1]]
    assert all(m == p.Heartbeat(0) for _, m in sent)
    assert all(b - a >= OWN.heartbeat for (a, _), (b, _) in zip(sent, sent[1:], strict=False))
    assert not s.joined and s.epoch == 0


def test_a_welcome_without_timing_keeps_the_own_pace():
    s = joined(100.0, welcome=p.Welcome(3, 0, 0))
    sent = beats(s, 101.0, sink_epoch=3)
    assert [t for t, _ in sent] == [100.25, 100.5, 100.75, 101.0]


def test_a_long_stall_does_not_send_a_burst_of_heartbeats():
    s = joined(100.0)
    s.received(p.Heartbeat(3), 100.4375)
    assert act(s, 100.4375) == (None, [p.Heartbeat(3)])  # three beats were due: one is sent
    assert s.next_deadline() > 100.4375


# --- silence, loss and backoff ------------------------------------------------------------


def test_silence_just_past_heartbeat_times_liveness_loses_the_sink():
    s = joined(100.0)  # expiry 0.125 x 4 = 0.5 s
    s.received(p.Heartbeat(3), 100.0625)  # heard last at 100.0625
    assert all(act(s, t)[0] is None for t in (100.25, 100.5, 100.5625))  # silent exactly 0.5 s: not yet
    event, out = act(s, 100.5625 + 1e-6)
    assert event == Lost("the sink has been silent for 0.5 s; connecting again", redial=True, first=True)
    assert out == [] and not s.joined
    assert s.received(p.Heartbeat(3), 100.6) is None and not s.joined  # too late: the link is given up


def test_any_message_from_the_sink_keeps_the_session():
    s = joined(100.0)
    for t in (100.375, 100.75, 101.125, 101.5):
        s.received(p.Ack([1]), t)  # no heartbeat, but a sign of life
        assert act(s, t + 0.375)[0] is None
    assert s.joined


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_a_welcome():
    s = session(100.0, seed=7)
    act(s, 100.0)
    waits = [redial(s, lose(s)) for _ in range(6)]  # the sink never answers
    steps = [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert BACKOFF_CAP == 2.0
    for wait, step in zip(waits, steps, strict=True):
        assert 0.5 * step <= wait <= step
    assert len(set(waits)) == len(waits)  # jittered: peers of a restarted sink spread out

    now = s.next_deadline()
    assert s.received(p.Welcome(3, 0, 0), now) == Joined(3, True, waited=now - 100.0)
    wait = redial(s, lose(s))
    assert 0.125 <= wait <= 0.25  # the first step again
    wait = redial(s, lose(s))  # never welcomed on that connection: doubled again
    assert 0.25 <= wait <= 0.5


def test_a_tick_that_comes_late_gives_the_sink_a_beat_to_answer_before_it_is_lost():
    """Woken long after it asked (a busy process, a caller elsewhere), a session was not
    listening: it beats at once, and gives up the sink only if that meets silence."""
    s = joined(100.0)  # expiry 0.125 x 4 = 0.5 s
    event, out = act(s, 103.0)
    assert event is None and out == [p.Heartbeat(3)]
    assert s.joined
    assert act(s, 103.125)[0] is None  # just a beat later: the sink may still answer
    assert s.received(p.Reset("unknown peer: send hello"), 103.13) == Lost(
        "the sink reset the session (unknown peer: send hello)", redial=False
    )
    assert s.take() == [HELLO]  # it forgot us while we were away: hello again, same connection


def test_a_late_tick_that_meets_silence_still_loses_the_sink():
    s = joined(100.0)
    act(s, 103.0)
    assert lose(s) == pytest.approx(103.126)  # a beat's grace, then the expiry holds again


def test_the_own_timing_holds_again_after_a_loss():
    s = joined(100.0)  # the sink said 0.5 s
    lost_at = lose(s)
    assert lost_at == pytest.approx(100.501)
    dial_at = lost_at + redial(s, lost_at)
    assert lose(s) == pytest.approx(dial_at + 0.751)  # the own 0.75 s expiry, not 0.5


# --- reset, restart, epochs ---------------------------------------------------------------


def test_a_reset_says_hello_again_on_the_same_connection():
    s = joined(100.0)
    event = s.received(p.Reset("unknown peer: send hello"), 100.25)
    assert event == Lost(event.reason, redial=False)
    assert s.take() == [HELLO] and not s.joined
    assert all(act(s, t)[0] is None for t in (100.375, 100.5))  # no dial: the connection is kept
    assert s.received(p.Welcome(3, 125, 4), 100.5) == Joined(3, False)  # the same sink
    assert s.joined and s.dials == 1


def test_a_burst_of_resets_gets_one_hello():
    """A sink answers each message of a forgotten peer with a reset: a hello for each would
    start the new session over and over (PROTOCOL.md 6.4)."""
    s = joined(100.0)
    assert isinstance(s.received(p.Reset("unknown peer: send hello"), 100.25), Lost)
    assert s.received(p.Reset("unknown peer: send hello"), 100.26) is None
    assert s.received(p.Reset("unknown peer: send hello"), 100.27) is None
    assert s.take() == [HELLO]
    assert s.received(p.Welcome(3, 125, 4), 100.3) == Joined(3, False)
    assert isinstance(s.received(p.Reset("unknown peer: send hello"), 101.0), Lost)  # a new forgetting
    assert s.take() == [HELLO]


def test_a_heartbeat_of_another_epoch_says_hello_again():
    s = joined(100.0)
    assert s.received(p.Heartbeat(3), 100.125) is None  # its own epoch: nothing to do
    assert s.take() == []
    event = s.received(p.Heartbeat(4), 100.25)  # the sink restarted
    assert event == Lost(event.reason, redial=False)
    assert s.take() == [HELLO] and not s.joined
    assert s.received(p.Welcome(4, 125, 4), 100.375) == Joined(4, True)


def test_new_epoch_is_true_for_the_first_welcome_and_a_changed_one_only():
    s = joined(100.0)  # Joined(3, True) checked there
    lost_at = lose(s)
    redial(s, lost_at)
    now = s.next_deadline()
    assert s.received(p.Welcome(3, 125, 4), now) == Joined(3, False, outage=now - 100.0)  # the same sink, dialled again
    assert s.received(p.Welcome(5, 125, 4), now) == Joined(5, True)  # it restarted meanwhile
    assert s.epoch == 5


# --- idle, close --------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [p.Welcome(3, 125, 4), p.Reset("unknown peer: send hello"), p.Heartbeat(4)])
def test_messages_while_idle_are_ignored(msg):
    s = session(100.0)
    assert s.received(msg, 100.0) is None  # before the first dial
    assert not s.joined and s.outbox == []
    s = joined(100.0)
    lose(s)
    assert s.received(msg, 100.6) is None  # left over from the connection given up
    assert not s.joined and s.outbox == [] and s.epoch == 3


def test_close_says_bye_only_when_joined():
    s = joined(100.0)
    s.close()
    assert s.take() == [p.Bye()]
    assert s.next_deadline() == float("inf")
    assert act(s, 200.0) == (None, [])
    assert s.received(p.Welcome(3, 125, 4), 200.0) is None and not s.joined

    s = session(100.0)
    act(s, 100.0)  # hello sent, no welcome
    s.close()
    assert s.take() == []

    s = session(100.0)  # never dialled
    s.close()
    assert s.take() == [] and act(s, 100.0) == (None, [])


# --- next_deadline ------------------------------------------------------------------------


def test_next_deadline_is_when_tick_next_acts():
    s = session(100.0, seed=3)
    assert s.next_deadline() == 100.0
    assert act(s, 100.0 - 1e-6) == (None, [])
    assert act(s, 100.0) == (Dial(), [HELLO])

    s.received(p.Welcome(3, 125, 4), 100.125)
    s.received(p.Heartbeat(3), 100.1875)  # heard last: the sink is lost just after 100.6875
    for beat in (100.25, 100.375, 100.5, 100.625):  # the welcome's pace, from its arrival
        assert s.next_deadline() == beat
        assert act(s, beat - 1e-6) == (None, [])
        assert act(s, beat) == (None, [p.Heartbeat(3)])

    deadline = s.next_deadline()
    assert 100.6875 < deadline <= 100.6885  # just past the expiry, before the next beat at 100.75
    assert act(s, 100.6875) == (None, [])  # silent exactly the expiry: not more
    event, _ = act(s, deadline)
    assert isinstance(event, Lost) and event.redial

    dial_at = s.next_deadline()
    assert deadline + 0.125 <= dial_at <= deadline + 0.25
    assert act(s, dial_at - 1e-6) == (None, [])
    assert act(s, dial_at) == (Dial(), [HELLO])


# --- what a person reads: one warning per silence, one line when the sink is back -----------

SINK = "tcp://127.0.0.1:5558"


def test_a_silence_is_one_warning_however_many_dials_meet_it_and_one_line_with_its_length_at_the_end():
    s = joined(100.0)  # expiry 0.5 s
    s.received(p.Heartbeat(3), 100.25)  # the sink's last sign of life
    losses = []
    for _ in range(5):  # the sink stays away through five dials
        event, lost_at = next_event(s)
        losses.append(event)
        redial(s, lost_at)
    assert [e.first for e in losses] == [True, False, False, False, False]
    assert [said(e, SINK) for e in losses] == [
        (logging.WARNING, f"sink {SINK}: the sink has been silent for 0.5 s; connecting again")
    ] + [(logging.DEBUG, f"sink {SINK}: {e.reason}") for e in losses[1:]]

    back = s.next_deadline()
    event = s.received(p.Welcome(3, 125, 4), back)
    assert event == Joined(3, False, outage=back - 100.25)
    assert said(event, SINK) == (logging.INFO, f"sink {SINK} back after {back - 100.25:.1f} s")

    s.take()
    event, _ = next_event(s)  # a new silence is news again
    assert isinstance(event, Lost) and event.first
    assert said(event, SINK)[0] == logging.WARNING


def test_a_sink_that_never_answered_is_said_once_and_its_first_welcome_with_the_wait():
    s = session(100.0, connect_timeout=10.0)
    act(s, 100.0)
    losses = []
    for _ in range(3):
        event, lost_at = next_event(s)
        losses.append(event)
        redial(s, lost_at)
    assert [said(e, SINK) for e in losses] == [
        (logging.WARNING, f"sink {SINK}: no answer yet; connecting again for up to 10 s")
    ] + [(logging.DEBUG, f"sink {SINK}: no answer yet; connecting again for up to 10 s")] * 2
    now = s.next_deadline() - 0.125
    event = s.received(p.Welcome(3, 125, 4), now)
    assert event == Joined(3, True, waited=now - 100.0)
    assert said(event, SINK) == (logging.INFO, f"sink {SINK} answered after {now - 100.0:.1f} s")

    quick = joined(100.0)  # welcomed at the first hello: nothing to say
    assert said(Joined(3, True), SINK) is None and quick.welcomed

    waiting = session(100.0)  # no connect_timeout: it waits as long as it takes
    act(waiting, 100.0)
    assert act(waiting, waiting.next_deadline())[0] == Lost(
        "no answer yet; connecting again until a sink answers", redial=True, first=True
    )


def test_a_reset_or_a_restart_is_no_silence():
    s = joined(100.0)
    event = s.received(p.Reset("unknown peer: send hello"), 100.25)
    assert said(event, SINK) == (logging.DEBUG, f"sink {SINK}: the sink reset the session (unknown peer: send hello)")
    assert s.received(p.Welcome(3, 125, 4), 100.375) == Joined(3, False)  # no outage to tell of


# --- connect_timeout: giving up on a sink that never welcomed us ----------------------------


def test_no_welcome_within_the_connect_timeout_gives_up_once_and_closes_the_session():
    s = session(100.0, connect_timeout=2.0)
    assert act(s, 100.0) == (Dial(), [HELLO])
    events = []
    while (now := s.next_deadline()) < 102.0:
        event, _ = act(s, now)
        events.append(event)
    assert now == 102.0  # the give-up is a deadline of its own: the loop around wakes for it
    assert not isinstance(act(s, 102.0 - 1e-6)[0], GaveUp)
    assert act(s, 102.0) == (GaveUp(2.0), [])
    assert {type(e) for e in events} <= {Lost, Dial}
    assert s.next_deadline() == float("inf")
    assert act(s, 200.0) == (None, [])  # no dial after giving up
    assert s.received(p.Welcome(3, 125, 4), 200.0) is None and not s.joined


def test_the_connect_timeout_counts_from_the_first_dial():
    s = session(100.0, connect_timeout=2.0)
    assert act(s, 105.0) == (Dial(), [HELLO])  # the first tick came late: that is when it dials
    s.received(p.Welcome(3, 125, 4), 106.5)
    assert s.joined


def test_once_welcomed_a_silence_of_any_length_is_an_outage_not_a_give_up():
    s = session(100.0, connect_timeout=2.0)
    act(s, 100.0)
    s.received(p.Welcome(3, 125, 4), 100.0)
    s.take()
    now = 100.0
    while now < 160.0:  # a minute without the sink
        now = s.next_deadline()
        event, _ = act(s, now)
        assert not isinstance(event, GaveUp)
    assert s.dials > 10
    assert s.received(p.Welcome(3, 125, 4), now) == Joined(3, False, outage=now - 100.0)


def test_time_not_listening_before_the_first_welcome_is_not_held_against_the_sink():
    s = session(100.0, connect_timeout=2.0)
    act(s, 100.0)
    now = 130.0  # the caller was away long past the timeout (its subscriber not polled)
    event, _ = act(s, now)
    assert not isinstance(event, GaveUp)  # one more hello first
    while not isinstance(event, GaveUp):
        assert now < 131.0
        now = s.next_deadline()
        event, _ = act(s, now)
    assert event.waited == pytest.approx(now - 100.0)


# --- several sinks: an active one and its standbys ----------------------------------------


def test_a_silent_sink_sends_the_next_dial_to_the_next_sink_at_once_and_a_round_backs_off():
    s = Session("worker", "w1", OWN, 100.0, credit=4, rng=random.Random(1), sinks=3)
    assert s.tick(100.0) == Dial(0)
    s.received(FAST, 100.0)
    lost = lose(s)
    assert s.next_deadline() == lost, "the next sink is dialled at once"
    dials = []
    for _ in range(4):
        event, now = next_event(s)
        if isinstance(event, Dial):
            dials.append((event.sink, now))
    assert [sink for sink, _ in dials] == [1, 2]
    (_, first), (_, second) = dials
    assert second - first == pytest.approx(OWN.expiry, abs=0.01), "an unanswered dial moves on after the expiry"
    event, back_at_start = next_event(s)
    assert event == Dial(0) and back_at_start - second > OWN.expiry, "a whole round unanswered backs off"


def test_a_welcome_from_another_sink_is_said_as_a_takeover():
    s = Session("worker", "w1", OWN, 100.0, credit=4, rng=random.Random(1), sinks=2)
    s.tick(100.0)
    s.received(FAST, 100.0)
    lost = lose(s)
    assert s.tick(lost) == Dial(1)
    event = s.received(p.Welcome(4, 125, 4), lost + 0.5)
    assert isinstance(event, Joined) and event.moved and event.new_epoch
    line = said(event, "tcp://b:5558")
    assert line is not None and line[1].startswith("sink tcp://b:5558 answered after ")
    assert line[1].endswith("it took over (epoch 4)")


def test_a_silence_with_one_sink_dials_it_again_after_a_backoff():
    s = joined()
    lost = lose(s)
    event, when = next_event(s)
    assert event == Dial(0) and when > lost
