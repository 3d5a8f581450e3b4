"""The subscriber: a SUB on the sink's results, filtered by topic prefix, and (given the
sink's control endpoint) a DEALER to repair gaps from the sink's ledger.

It is used from the caller's thread (an iterator, recv(), or run() with a callback), which
then owns both sockets. Each topic's results are delivered once and in seq order: a result
dropped by ZeroMQ, missed across a reconnect, or published before a late start is asked for
again; see zfan.sequencing. What a turn does around its poll is SubscriberBase's, which the
asyncio subscriber (zfan.aio) shares.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import zmq

from .. import protocol as p
from ..config import SubscriberSettings, check_sinks, endpoints, settings_from, sink_endpoint
from ..errors import Closed, ZfanError
from ..partitions import split
from ..sequencing import RetentionGap
from ..session import Dial, Event, GaveUp, Joined, Lost, said
from ..subscription import Message, SubscriberCore
from .probe import no_answer
from .security import Handshakes, HandshakeWatch, check_handshakes, secure_client
from .transport import Ctx, Poll, Sock, connect, drain, plain, send, socket

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import SubscriberOptions

log = logging.getLogger(__name__)

SYNC_TOPIC = p.SYNC_PREFIX.encode()
TURN = 0.25  # seconds a turn waits at most while the caller waits for a result
Watched = list[tuple[Any, int]]  # (a socket; POLLIN) to poll


class SubscriberBase:
    """What the threaded subscriber and the asyncio one share: the core, the sockets (of the
    class `ctx` makes: a zmq.asyncio context makes ones an event loop waits on, read and
    written here through plain views of them), and a turn cut around its poll: _before() says
    what to poll and for how long, the subclass polls, _after() takes what came. Neither keeps
    a thread or a task: the caller's own calls turn it.
    """

    def __init__(self, settings: SubscriberSettings, ctx: zmq.Context[Any], partition: int | None = None) -> None:
        self.settings = s = settings
        self._ctx = ctx
        self._handshakes = Handshakes()
        self._token = f"{p.SYNC_GROUPS_PREFIX}{uuid.uuid4().hex}"
        self._core = SubscriberCore(
            s.topics,
            time.monotonic(),
            control=s.control is not None,
            durable=s.durable,
            name=self._token,
            connect_timeout=s.connect_timeout,
            partition=partition,
        )
        if self._core.session is not None:
            self._core.session.sinks = check_sinks(results=s.results, control=s.control)
        self._sub_sink = 0  # the sink whose results the SUB takes
        # Without control there is no session to follow a sink with: the SUB takes every sink's
        # results at once (only the active one publishes; a result twice is dropped by its seq).
        self._sub, self._sub_watch = self._open_sub(s.results if s.control is None else sink_endpoint(s.results, 0))
        self._sub_plain = plain(self._sub)
        self._ctl: zmq.Socket[Any] | None = None  # opened when the core dials
        self._dialled = "" if s.control is None else sink_endpoint(s.control, 0)  # the sink dialled last
        self._ctl_plain: Sock | None = None
        self._ctl_watch: HandshakeWatch | None = None
        self._closed = False
        self._error: ZfanError | None = None  # why it cannot go on: raised again at every call

    def _open_sub(self, results: str) -> tuple[zmq.Socket[Any], HandshakeWatch]:
        s = self.settings
        sub = socket(self._ctx, zmq.SUB, max_frame=s.limits.max_frame, stallable=True)
        sub.setsockopt(zmq.RCVHWM, s.hwm)
        watch = secure_client(sub, s.curve, results, self._handshakes)
        try:
            for endpoint in endpoints(results, what="results endpoint"):
                connect(sub, endpoint, "results endpoint")
        except BaseException:
            watch.close()
            sub.close(linger=0)
            raise
        for prefix in s.topics:
            sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        sub.setsockopt(zmq.SUBSCRIBE, self._token.encode())
        return sub, watch

    def _follow(self, sink: int) -> None:
        """Take results from sink number `sink`, the one the session dials now: what the old
        one published meanwhile and the new one's first results are repaired over control."""
        if sink == self._sub_sink:
            return
        self._sub_watch.close()
        self._sub.close(linger=0)
        self._sub_sink = sink
        self._sub, self._sub_watch = self._open_sub(sink_endpoint(self.settings.results, sink))
        self._sub_plain = plain(self._sub)

    # --- counters ------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return self._core.synced

    @property
    def received(self) -> int:
        """Results handed to the caller."""
        return self._core.received

    @property
    def replayed(self) -> int:
        """Results that came from the ledger, not the live stream."""
        return self._core.replayed

    @property
    def rejected(self) -> Counter[str]:
        return self._core.rejected

    @property
    def duplicates(self) -> int:
        return self._core.seq.duplicates

    @property
    def lost(self) -> int:
        """Results skipped because the sink no longer retained them."""
        return self._core.seq.lost

    @property
    def gaps(self) -> int:
        """Results known to exist and not received: skipped (without a control channel) or
        still being repaired."""
        return self._core.gaps

    @property
    def ready(self) -> bool:
        """The sink has our subscriptions (and, with a control channel, we know where each topic
        starts): what wait_ready() waits for."""
        return self._core.ready

    # --- for the subclasses --------------------------------------------------------------------
    def _next(self) -> Message | None:
        """The next result in order if one is ready; raises RetentionGap in place of results the
        sink no longer has, and Closed once closed."""
        if self._closed:
            raise Closed("subscriber is closed")
        out = self._core.take()
        if isinstance(out, RetentionGap):
            raise out
        return out

    def _before(self, wait: float) -> tuple[Watched, float]:
        """The first half of a turn: what the sink sent while the caller was away, and what time
        did; then what to poll, and for how many seconds (at most `wait`, less if the core has
        something due). A ZfanError that ends the subscriber is raised now and at every call after."""
        if self._error is not None:
            raise self._error
        try:
            # What the sink sent while the caller was away, first: a sink heard from is not a sink lost.
            self._from_control(time.monotonic())
            self._tick()
        except ZfanError as exc:
            self._error = exc
            raise
        watched: Watched = [(self._sub, zmq.POLLIN)]
        if self._ctl is not None:
            watched.append((self._ctl, zmq.POLLIN))
        for watch in (self._sub_watch, self._ctl_watch):
            if watch is not None:  # a failed handshake is news at once
                watched.append((watch.monitor, zmq.POLLIN))
        return watched, min(wait, self._core.next_deadline() - time.monotonic())

    def _after(self, ready: Mapping[Any, int]) -> None:
        """The second half of a turn: take what the poll found `ready`."""
        try:
            self._take_ready(ready)
        except ZfanError as exc:
            self._error = exc
            raise

    def _take_ready(self, ready: Mapping[Any, int]) -> None:
        now = time.monotonic()
        if any(watch.monitor in ready for watch in (self._sub_watch, self._ctl_watch) if watch is not None):
            check_handshakes(self._sub_watch, self._ctl_watch)
        if self._sub in ready:
            for frames in drain(self._sub_plain):
                self._from_stream(frames, now)
        if self._ctl is not None and self._ctl in ready:
            self._from_control(now)
        self._tick()
        waited = self._core.sync_overdue(now)
        if waited is not None:
            check_handshakes(self._sub_watch)  # a refused handshake, not silence, may be why
            raise no_answer(self.settings.results, "results", self.settings.connect_timeout or waited)

    def _commit(self) -> None:
        self._core.commit()
        self._send()

    def _close(self) -> None:
        """Commit a durable position, say bye, close the sockets (once)."""
        if self._closed:
            return
        self._closed = True
        self._sub_watch.close()
        self._sub.close(linger=0)
        self._core.close()
        self._send()
        self._close_control(linger=1000)  # a position committed is a position owed

    # --- inside a turn ---------------------------------------------------------------------------
    def _from_control(self, now: float) -> None:
        if self._ctl_plain is None:
            return
        for frames in drain(self._ctl_plain):
            # A reset is said at debug level: expected after the caller was busy for longer
            # than the expiry, and no news for a person.
            self._say(self._core.control(frames, now))

    def _tick(self) -> None:
        event = self._core.tick(time.monotonic())
        if isinstance(event, (Lost, GaveUp)):
            check_handshakes(self._ctl_watch)  # a refused handshake, not silence, may be why
        if isinstance(event, GaveUp):
            assert self.settings.control is not None
            self._close_control()
            raise no_answer(self.settings.control, "control", self.settings.connect_timeout or event.waited)
        if isinstance(event, Lost):
            self._say(event)
            self._close_control()
        elif isinstance(event, Dial):
            self._follow(event.sink)
            self._open_control(event.sink)
        self._send()

    def _say(self, event: Event | None) -> None:
        if isinstance(event, (Joined, Lost)) and (line := said(event, self._dialled)) is not None:
            log.log(*line)

    def _from_stream(self, frames: list[bytes], now: float) -> None:
        topic = frames[0]
        if topic == self._token.encode():
            # The sync topic stays subscribed: the sink counts its subscribers by these, and
            # ZeroMQ tells it of ours going when we disconnect.
            if not self._core.synced:
                self._core.synced_now()
            return
        if topic.startswith(SYNC_TOPIC):
            return  # another subscriber's handshake, seen through a wide prefix
        self._core.stream(topic, frames[1:], now)

    def _send(self) -> None:
        session = self._core.session
        if session is None or self._ctl_plain is None:
            return
        for msg in session.take():
            if not send(self._ctl_plain, p.encode(msg)):
                # No connection to queue on, or the sink reads nothing: the session notices the
                # silence and dials again, and what was asked is asked again.
                log.debug("sink %s takes nothing on control; %s not sent", self._dialled, type(msg).__name__)

    def _open_control(self, sink: int) -> None:
        s = self.settings
        assert s.control is not None
        self._close_control()
        self._dialled = endpoint = sink_endpoint(s.control, sink)
        ctl = socket(self._ctx, zmq.DEALER, max_frame=s.limits.max_frame, stallable=True)
        ctl.setsockopt(zmq.RCVHWM, 10 * s.hwm)
        watch = secure_client(ctl, s.curve, endpoint, self._handshakes)
        try:
            connect(ctl, endpoint, "control endpoint")
        except BaseException:
            watch.close()
            ctl.close(linger=0)
            raise
        self._ctl, self._ctl_plain, self._ctl_watch = ctl, plain(ctl), watch

    def _close_control(self, linger: int = 0) -> None:
        if self._ctl_watch is not None:
            self._ctl_watch.close()
            self._ctl_watch = None
        if self._ctl is not None:
            self._ctl.close(linger=linger)
            self._ctl = self._ctl_plain = None


class Subscriber:
    """``for msg in Subscriber(results=..., control=..., topics=["sensor."]): ...``

    With ``control`` (the sink's control endpoint) gaps are repaired from the sink's ledger;
    with ``durable="name"`` as well, the position is saved at the sink, so that a subscriber
    of that name resumes where the last one stopped (or, the first time, from the oldest
    result the sink retains). With ``sinks`` (key-partitioned sinks) it takes every sink's
    results: each sink's topics in order, gaps repaired and positions saved at each sink.
    """

    def __init__(
        self,
        settings: SubscriberSettings | None = None,
        *,
        context: Ctx | None = None,
        **options: Unpack[SubscriberOptions],
    ) -> None:
        s = self.settings = settings_from("Subscriber", SubscriberSettings, settings, options)
        ctx = context or zmq.Context.instance()
        self._parts: list[SubscriberBase] = []
        try:
            for i, part in enumerate(split(s)):
                self._parts.append(SubscriberBase(part, ctx, None if s.sinks is None else i))
        except BaseException:
            for opened in self._parts:
                opened._close()
            raise
        self._turn_from = 0  # the part whose results are handed out first, in turn: none starves
        self._poll = Poll()

    # --- counters ------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return all(part.synced for part in self._parts)

    @property
    def ready(self) -> bool:
        """Every sink has our subscriptions (and, with a control channel, we know where each
        topic starts): what wait_ready() waits for."""
        return all(part.ready for part in self._parts)

    @property
    def received(self) -> int:
        """Results handed to the caller."""
        return sum(part.received for part in self._parts)

    @property
    def replayed(self) -> int:
        """Results that came from the ledger, not the live stream."""
        return sum(part.replayed for part in self._parts)

    @property
    def rejected(self) -> Counter[str]:
        return sum((part.rejected for part in self._parts), Counter())

    @property
    def duplicates(self) -> int:
        return sum(part.duplicates for part in self._parts)

    @property
    def lost(self) -> int:
        """Results skipped because the sink no longer retained them."""
        return sum(part.lost for part in self._parts)

    @property
    def gaps(self) -> int:
        """Results known to exist and not received: skipped (without a control channel) or
        still being repaired."""
        return sum(part.gaps for part in self._parts)

    @property
    def partitions(self) -> int:
        """How many key-partitioned sinks it takes results from (1 without `sinks`)."""
        return len(self._parts)

    # --- the caller's side -------------------------------------------------------------------
    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the sink has our subscriptions (and, with a control channel, until we know
        where each topic starts); True if that happened within the timeout. Raises NoSink once
        no sink has answered within connect_timeout (counted from the first wait_ready() or
        recv()), or at once if an endpoint is certainly no sink's; AuthError if a handshake
        was refused. This is the subscriber's "connected": it keeps no thread of its own."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._turn(min(left, TURN))
        return True

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next result in order if one is ready, or None if none comes within the timeout
        (seconds). Raises RetentionGap (once per gap) for results the sink no longer has, and
        NoSink or AuthError as wait_ready() does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self._next()
            if out is not None:
                return out
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._turn(TURN if left is None else min(left, TURN))

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def run(
        self, callback: Callable[[Message], object], *, count: int | None = None, timeout: float | None = None
    ) -> int:
        """Call ``callback`` with each result until ``count`` results, or ``timeout`` seconds
        with nothing new. Returns how many were delivered."""
        n = 0
        while count is None or n < count:
            msg = self.recv(timeout)
            if msg is None:
                break
            callback(msg)
            n += 1
        return n

    def commit(self) -> None:
        """Save a durable subscriber's position at the sink now (it is also saved every second
        and on close)."""
        for part in self._parts:
            part._commit()

    def close(self) -> None:
        for part in self._parts:
            part._close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> Message | None:
        """The next result of any sink, taking the sinks in turn."""
        n = len(self._parts)
        for k in range(n):
            i = (self._turn_from + k) % n
            out = self._parts[i]._next()
            if out is not None:
                self._turn_from = (i + 1) % n
                return out
        return None

    def _turn(self, wait: float) -> None:
        """One turn: poll for at most `wait` seconds (less if a core has something due), then
        take what came."""
        watched: Watched = []
        for part in self._parts:
            more, seconds = part._before(wait)
            watched += more
            wait = min(wait, seconds)
        ready = self._poll(watched, wait)
        for part in self._parts:
            part._after(ready)
