"""A client's control session with the sink, with no sockets: the part every producer, worker
and subscriber shares.

hello -> welcome, heartbeats both ways (any message from the sink counts as one), the sink's
silence, a reset or a new epoch, the wait before dialling again, bye, and giving up on a sink
that never answers. It is fed what came from the sink (``received``) and the passing of time
(``tick``), both with the time passed in, and says what to send (``outbox``) and what happened
(the events it returns, which ``said()`` puts in words). The role's own core wraps it; the
socket loop around that only polls until ``next_deadline()``.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
from dataclasses import dataclass

from . import protocol as p
from .config import Timing
from .routing import DEFAULT_ROUTE

SESSION_TYPES: frozenset[type[p.Message]] = frozenset({p.Welcome, p.Heartbeat, p.Reset})
BACKOFF_CAP = 2.0  # seconds: the longest wait between two dials


@dataclass(frozen=True)
class Dial:
    """Open a new control connection now (the first, or one after the sink went silent) and
    send the outbox on it: the hello is in it. `sink`: which of the client's sinks to dial
    (the next one after a silence, where it has several: an active sink and its standbys)."""

    sink: int = 0


@dataclass(frozen=True)
class Joined:
    """The sink welcomed us. `new_epoch`: a sink we had not met, or one that restarted, so
    what the last one leased or numbered is fenced. When this welcome ends a silence that a
    Lost reported: `outage`, the seconds since a sink that had welcomed us was last heard, or
    `waited`, the seconds since the first dial if none had welcomed us yet."""

    epoch: int
    new_epoch: bool
    outage: float | None = None
    waited: float | None = None
    moved: bool = False  # welcomed by another of the client's sinks than the one last joined


@dataclass(frozen=True)
class Lost:
    """The session ended. With `redial` the connection is dropped (its socket must be closed; a
    Dial follows after a backoff); without, the hello is already in the outbox. `first`: the
    first loss since the last welcome; the others are the same silence going on, and dials
    that met it again."""

    reason: str
    redial: bool
    first: bool = True


@dataclass(frozen=True)
class GaveUp:
    """No sink welcomed us within `connect_timeout` of the first dial: the session is closed
    (its socket must be closed too), and the role stops."""

    waited: float


Event = Dial | Joined | Lost | GaveUp


def said(event: Event | None, endpoint: str) -> tuple[int, str] | None:
    """What a person reads about an event (its logging level and line), if anything: one
    warning when a sink goes silent or does not answer, one line when it is back, the rest
    at debug level."""
    if isinstance(event, Lost):
        level = logging.WARNING if event.first and event.redial else logging.DEBUG
        return level, f"sink {endpoint}: {event.reason}"
    if isinstance(event, Joined) and event.outage is not None and event.moved:
        return logging.INFO, f"sink {endpoint} answered after {event.outage:.1f} s: it took over (epoch {event.epoch})"
    if isinstance(event, Joined) and event.outage is not None:
        return logging.INFO, f"sink {endpoint} back after {event.outage:.1f} s"
    if isinstance(event, Joined) and event.waited is not None:
        return logging.INFO, f"sink {endpoint} answered after {event.waited:.1f} s"
    return None


class State(enum.Enum):
    IDLE = "idle"  # waiting to dial
    HELLO = "hello"  # hello sent, no welcome yet
    JOINED = "joined"
    CLOSED = "closed"  # said bye


class Backoff:
    """Waits between dials: from `first`, doubling up to `cap`, with jitter so that many peers
    of a restarted sink do not all come back at once; reset once a session got going."""

    def __init__(self, first: float, cap: float = BACKOFF_CAP, rng: random.Random | None = None) -> None:
        self.first, self.cap = first, cap
        self._next = first
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        wait = self._next * self._rng.uniform(0.5, 1.0)
        self._next = min(self._next * 2, self.cap)
        return wait


class Session:
    def __init__(
        self,
        role: str,
        name: str,
        timing: Timing,
        now: float,
        *,
        credit: int = 0,
        route: str = DEFAULT_ROUTE,
        rng: random.Random | None = None,
        connect_timeout: float | None = None,
        sinks: int = 1,
    ) -> None:
        self.hello = p.Hello(role, name, credit, route)
        # The sinks this client may reach (an active one and its standbys), and the one it dials.
        self.sinks = sinks
        self.sink = 0
        self.dialled = 0  # the sink of the last dial: the one a Lost speaks of
        self._joined_sink = 0  # the sink that welcomed us last
        self._round_from: int | None = None  # the sink a silence began at: a round of dials ends there
        self.timing = timing
        # Seconds from the first dial to the first welcome before giving up (None: never).
        # Once welcomed, a silent sink is an outage: the session dials until closed.
        self.connect_timeout = connect_timeout
        self.state = State.IDLE
        self.epoch = 0  # of the sink that last welcomed us; kept across sessions
        self.outbox: list[p.Message] = []
        self.backoff = Backoff(timing.heartbeat, rng=rng)
        self.dials = 0
        self._beat, self._expiry = timing.heartbeat, timing.expiry  # until a welcome says the sink's own
        self._heard = now
        self._next_beat = now
        self._dial_at = now
        self._wake_at = now  # when tick() asked to run next: silence counts only while we listen
        self.welcomed = False  # by any sink, ever
        self._first_dial: float | None = None
        self._give_up_at = float("inf")  # set at the first dial, from connect_timeout
        self._silent_since: float | None = None  # of a silence a Lost reported, until a welcome

    @property
    def joined(self) -> bool:
        return self.state is State.JOINED

    def take(self) -> list[p.Message]:
        """What to send on the control connection, in order; the outbox is empty afterwards."""
        out, self.outbox = self.outbox, []
        return out

    def received(self, msg: p.Message, now: float) -> Event | None:
        """A message from the sink (any type counts as a sign of life); returns what its session
        part meant, if anything."""
        if self.state in (State.IDLE, State.CLOSED):
            return None  # left over from a connection already given up
        self._heard = now
        if isinstance(msg, p.Welcome):
            return self._welcome(msg, now)
        if isinstance(msg, p.Reset):
            if self.state is State.HELLO:
                # Our hello is on its way, or answered by a welcome still to come: one more
                # would make the sink start the new session over (PROTOCOL.md 6.4).
                return None
            return self._hello_again(now, f"the sink reset the session ({msg.reason})")
        if isinstance(msg, p.Heartbeat) and self.joined and msg.epoch != self.epoch:
            return self._hello_again(now, f"the sink restarted (epoch {self.epoch} -> {msg.epoch})")
        return None

    def tick(self, now: float) -> Event | None:
        """What the passing of time did: a dial due, a heartbeat due, or the sink silent too long."""
        event = self._tick(now)
        self._wake_at = self.next_deadline()
        return event

    def _tick(self, now: float) -> Event | None:
        if self.state is State.CLOSED:
            return None
        if not self.welcomed and now - self._wake_at > self._expiry / 2:
            # Time we were not listening proves nothing against a sink: one more hello first.
            self._give_up_at = max(self._give_up_at, now + self._expiry + self._beat)
        if not self.welcomed and now >= self._give_up_at:
            self.state = State.CLOSED
            return GaveUp(now - (self._first_dial or now))
        if self.state is State.IDLE:
            if now < self._dial_at:
                return None
            self.state = State.HELLO
            self.dials += 1
            if self._first_dial is None:
                self._first_dial = now
                if self.connect_timeout is not None:
                    self._give_up_at = now + self.connect_timeout
            self._heard = now
            self.outbox.append(self.hello)
            self._next_beat = now + self._beat
            self.dialled = self.sink
            return Dial(self.sink)
        if now - self._wake_at > self._expiry / 2:
            # Woken this late, we were not listening (a busy process, a caller elsewhere), and
            # the sink may have forgotten us meanwhile: that proves nothing about it. Beat now
            # and give it a heartbeat's time to answer (with a reset, if it forgot us).
            self._heard = max(self._heard, now - self._expiry + self._beat)
            self._next_beat = now
        silent = now - self._heard
        if silent > self._expiry:
            self.state = State.IDLE
            # A silent sink may have died or been cut off, and a standby taken over: the next
            # dial goes to the next sink, at once; the backoff is for a round of them all.
            if self._round_from is None:
                self._round_from = self.sink
            self.sink = (self.sink + 1) % self.sinks
            self._dial_at = now + self.backoff.next() if self.sink == self._round_from else now
            self._beat, self._expiry = self.timing.heartbeat, self.timing.expiry
            first = self._silent_since is None
            if first:
                self._silent_since = self._heard if self.welcomed else self._first_dial
            return Lost(self._silence(silent), redial=True, first=first)
        if self.joined and now >= self._next_beat:
            self.outbox.append(p.Heartbeat(self.epoch))
            self._next_beat = max(self._next_beat + self._beat, now + self._beat / 2)
        return None

    def close(self) -> None:
        """Say bye if welcomed (so that the sink replays or forgets what is ours at once)."""
        if self.joined:
            self.outbox.append(p.Bye())
        self.state = State.CLOSED

    def next_deadline(self) -> float:
        """When tick() next has something to do."""
        if self.state is State.CLOSED:
            return float("inf")
        give_up = float("inf") if self.welcomed else self._give_up_at
        if self.state is State.IDLE:
            return min(self._dial_at, give_up)
        # Just past the expiry: the sink is lost only once silent for *more* than that.
        expiry = self._heard + self._expiry + 1e-3
        return min(self._next_beat, expiry) if self.joined else min(expiry, give_up)

    def _silence(self, silent: float) -> str:
        if self.welcomed and self.sinks > 1:
            return f"the sink has been silent for {silent:.1f} s; trying the next sink"
        if self.welcomed:
            return f"the sink has been silent for {silent:.1f} s; connecting again"
        if self.connect_timeout is None:
            return "no answer yet; connecting again until a sink answers"
        return f"no answer yet; connecting again for up to {self.connect_timeout:g} s"

    def _welcome(self, msg: p.Welcome, now: float) -> Joined:
        new = msg.epoch != self.epoch
        self.epoch = msg.epoch
        self.state = State.JOINED
        self.backoff.reset()
        away = None if self._silent_since is None else now - self._silent_since
        back = self.welcomed
        self.welcomed = True
        self._silent_since = None
        moved, self._joined_sink, self._round_from = self.dialled != self._joined_sink, self.dialled, None
        if msg.heartbeat_ms and msg.liveness:
            # Beat as often as the sink expects, and give it the silence it allows itself.
            self._beat = msg.heartbeat_ms / 1000
            self._expiry = self._beat * msg.liveness
            self._next_beat = min(self._next_beat, self._heard + self._beat)
        if away is None:
            return Joined(msg.epoch, new, moved=moved and back)
        if back:
            return Joined(msg.epoch, new, outage=away, moved=moved)
        return Joined(msg.epoch, new, waited=away)

    def _hello_again(self, now: float, reason: str) -> Lost:
        self.state = State.HELLO
        self.outbox.append(self.hello)
        self._next_beat = now + self._beat
        return Lost(reason, redial=False)


class AllWelcomed:
    """A client's `connected`, set while every partition's sink has welcomed it; each
    partition's session sets and clears its own flag()."""

    def __init__(self, connected: threading.Event, partitions: int) -> None:
        self._connected = connected
        self._welcomed = [False] * partitions

    def flag(self, i: int) -> Welcomed:
        return Welcomed(self, i)

    def mark(self, i: int, welcomed: bool) -> None:
        self._welcomed[i] = welcomed
        if all(self._welcomed):
            self._connected.set()
        else:
            self._connected.clear()


class Welcomed:
    """Partition `i`'s flag, as a threading.Event's set() and clear()."""

    def __init__(self, welcomed: AllWelcomed, i: int) -> None:
        self._all, self._i = welcomed, i

    def set(self) -> None:
        self._all.mark(self._i, True)

    def clear(self) -> None:
        self._all.mark(self._i, False)
