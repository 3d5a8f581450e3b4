"""The subscriber: a SUB on the sink's results, filtered by topic prefix, and (given the
sink's control endpoint) a DEALER to repair gaps from the sink's ledger.

It is used from the caller's thread (an iterator, recv(), or run() with a callback), which
then owns both sockets. Each topic's results are delivered once and in seq order: a result
dropped by ZeroMQ, missed across a reconnect, or published before a late start is asked for
again; see zfan.sequencing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from .. import protocol as p
from ..config import SubscriberSettings
from ..errors import Closed, ProtocolError
from ..sequencing import Sequencer
from .security import Handshakes, check_handshakes, secure_client
from .transport import connect, drain, socket

log = logging.getLogger(__name__)

RESULT_TYPES = frozenset({p.PUBLISH, p.DEAD})
CONTROL_TYPES = frozenset({p.PUBLISH, p.DEAD, p.MISSING, p.TOPICS, p.CURSOR, p.RESET})
SYNC_TOPIC = p.SYNC_PREFIX.encode()
POLL_HEADS = 1.0  # seconds between asking the sink for its topics' latest seqs
ASK_AGAIN = 1.0  # seconds after which a request whose answer has not come is sent again
COMMIT_EVERY = 1.0  # seconds between saving a durable subscriber's position


@dataclass
class _Pages:
    """A request the sink answers in pages (heads, a cursor): where the next page starts, and
    whether a request is out."""

    after: Any
    asked: float | None = None  # when the request now out was sent
    due: float = 0.0  # when to ask next, with no request out
    done: bool = False  # the last page of the first pass is in
    early: list[tuple[str, int]] = field(default_factory=list)  # what pages said before the start

    def ready(self, now: float) -> bool:
        if self.asked is None:
            return now >= self.due
        return now >= self.asked + ASK_AGAIN  # its answer got lost


@dataclass(frozen=True)
class Message:
    """One published result: the records a worker returned for one topic of one batch."""

    topic: str
    seq: int
    batch_id: int
    records: list[Any]
    # Dead letters (topic zfan.dead) carry the batch's own records and why it failed.
    dead: bool = False
    error: str = ""
    source_topic: str = ""
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"topic": self.topic, "seq": self.seq, "batch": self.batch_id, "records": self.records}
        if self.dead:
            d.update(source_topic=self.source_topic, attempts=self.attempts, error=self.error)
        return d


class Subscriber:
    """``for msg in Subscriber(results=..., control=..., topics=["sensor."]): ...``

    With ``control`` (the sink's control endpoint) gaps are repaired from the sink's ledger;
    with ``durable="name"`` as well, the position is saved at the sink, so that a subscriber
    of that name resumes where the last one stopped (or, the first time, from the oldest
    result the sink retains).
    """

    def __init__(
        self, settings: SubscriberSettings | None = None, *, context: zmq.Context | None = None, **overrides: Any
    ) -> None:
        if isinstance(overrides.get("topics"), list):
            overrides["topics"] = tuple(overrides["topics"])
        self.settings = s = settings or SubscriberSettings(**overrides)
        ctx = context or zmq.Context.instance()
        self._sub = socket(ctx, zmq.SUB, max_frame=s.limits.max_frame)
        self._sub.setsockopt(zmq.RCVHWM, s.hwm)
        history = Handshakes()
        self._watches = [secure_client(self._sub, s.curve, s.results, history)]
        connect(self._sub, s.results, "results endpoint")
        for prefix in s.topics:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._token = f"{p.SYNC_PREFIX}{uuid.uuid4().hex}".encode()
        self._sub.setsockopt(zmq.SUBSCRIBE, self._token)
        self._ctl: zmq.Socket | None = None
        if s.control is not None:
            self._ctl = socket(ctx, zmq.DEALER, max_frame=s.limits.max_frame)
            self._ctl.setsockopt(zmq.RCVHWM, 10 * s.hwm)
            self._watches.append(secure_client(self._ctl, s.curve, s.control, history))
            connect(self._ctl, s.control, "control endpoint")
        self._poller = zmq.Poller()
        for sock in (self._sub, self._ctl):
            if sock is not None:
                self._poller.register(sock, zmq.POLLIN)
        self._seq: Sequencer[Message] = Sequencer(clock=time.monotonic, repair=s.control is not None)
        self.synced = False
        # With a control channel it starts once every page of the heads (and of the cursor) is in.
        self._started = s.control is None
        self._heads = _Pages(after=0)  # after: the position the sink's last page gave
        self._cursor = _Pages(after="", done=s.durable is None)  # after: the last topic read
        self._first_run = False  # a durable name the sink has no position for yet
        self._early: list[Message] = []
        self._next_commit = time.monotonic() + COMMIT_EVERY
        self._taken: dict[str, int] = {}  # last seq handed to the caller, per topic
        self._committed: dict[str, int] = {}
        self.received = 0  # results handed to the caller
        self.replayed = 0  # results that came from the ledger, not the live stream
        self.rejected: Counter[str] = Counter()
        self._closed = False

    # --- counters ------------------------------------------------------------------------------
    @property
    def duplicates(self) -> int:
        return self._seq.duplicates

    @property
    def lost(self) -> int:
        """Results skipped because the sink no longer retained them."""
        return self._seq.lost

    @property
    def gaps(self) -> int:
        """Results known to exist and not received: skipped (without a control channel) or
        still being repaired."""
        pending = sum(max(0, self._seq.want.get(t, 0) - n + 1) for t, n in self._seq.next.items())
        return self._seq.skipped + pending

    # --- the caller's side -------------------------------------------------------------------
    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the sink has our subscriptions (and, with a control channel, until we know
        where each topic starts); True if that happened within the timeout."""
        deadline = time.monotonic() + timeout
        while not (self.synced and self._started):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._turn(min(left, 0.25))
        return True

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next result in order, or None if none comes within the timeout (seconds).
        Raises RetentionGap (once per gap) for results the sink no longer has."""
        if self._closed:
            raise Closed("subscriber is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seq = self._seq
            if seq.errors and seq.errors[0].after <= seq.readied - len(seq.ready):
                raise seq.errors.popleft()  # in its place: after the results that came before it
            if seq.ready and self.synced and self._started:
                msg = seq.ready.popleft()
                self._taken[msg.topic] = msg.seq
                self.received += 1
                return msg
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._turn(0.25 if left is None else min(left, 0.25))

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
        s = self.settings
        if s.durable is None or self._ctl is None:
            return
        changed = {t: q for t, q in self._taken.items() if self._committed.get(t) != q}
        if not changed:
            return
        items = list(changed.items())
        while items:
            n = p.pairs_that_fit(items)
            part, items = items[:n], items[n:]
            self._ctl.send(p.encode(p.COMMIT, s.durable, [t for t, _ in part], [q for _, q in part]))
        self._committed.update(changed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in self._watches:
            watch.close()
        self._sub.close(linger=0)
        if self._ctl is not None:
            self.commit()
            self._ctl.close(linger=1000)  # a position committed is a position owed

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one turn: read what is there, ask for what is missing -------------------------------
    def _turn(self, wait: float) -> None:
        check_handshakes(*self._watches)
        self._ask()
        ready = dict(self._poller.poll(wait * 1000))
        if self._sub in ready:
            for frames in drain(self._sub):
                self._from_stream(frames)
        if self._ctl is not None and self._ctl in ready:
            for frames in drain(self._ctl):
                self._from_control(frames)

    def _ask(self) -> None:
        if self._ctl is None or not self.synced:
            return
        now = time.monotonic()
        if not self._cursor.done and self._cursor.ready(now):
            self._ask_cursor(now)
        if self._heads.ready(now):  # the poll catches what was dropped at the end of a stream
            self._ask_heads(now)
        if not self._started:
            return
        for topic, first, last in self._seq.requests():
            self._ctl.send(p.encode(p.REPLAY, topic, first, last))
        if now >= self._next_commit:
            self._next_commit = now + COMMIT_EVERY
            self.commit()

    def _ask_heads(self, now: float) -> None:
        assert self._ctl is not None
        self._heads.asked = now
        self._ctl.send(p.encode(p.HEADS, list(self.settings.topics), self._heads.after))

    def _ask_cursor(self, now: float) -> None:
        assert self._ctl is not None and self.settings.durable is not None
        self._cursor.asked = now
        self._ctl.send(p.encode(p.GET_CURSOR, self.settings.durable, self._cursor.after))

    def _from_stream(self, frames: list[bytes]) -> None:
        if frames[0] == self._token:
            if not self.synced:
                self.synced = True
                self._sub.setsockopt(zmq.UNSUBSCRIBE, self._token)
            return
        if frames[0].startswith(SYNC_TOPIC):
            return  # another subscriber's handshake, seen through a wide prefix
        try:
            if len(frames) != 3:
                raise ProtocolError("bad frame count", f"{len(frames)} frames")
            if frames[0] != frames[0][: p.MAX_TOPIC] or not frames[1]:
                raise ProtocolError("bad header", "topic frame too long or empty header")
            msg = self._message(frames[1], frames[2])
            if msg is not None and frames[0] != msg.topic.encode():
                raise ProtocolError("bad header", "topic frame and header disagree")
        except ProtocolError as exc:
            self._reject(exc)
            return
        if msg is None:
            return
        if self._started:
            self._seq.offer(msg)
        else:
            self._early.append(msg)  # offered once we know where each topic starts

    def _from_control(self, frames: list[bytes]) -> None:
        try:
            mtype, fields = p.decode(frames[0], allowed=CONTROL_TYPES)
            if mtype in RESULT_TYPES:
                if len(frames) != 2:
                    raise ProtocolError("bad frame count", f"replayed result has {len(frames)} frames")
                msg = self._message(frames[0], frames[1])
                self._seq.answered()
                if msg is not None and self._seq.offer(msg):
                    self.replayed += 1
            elif mtype == p.MISSING:
                self._seq.answered()
                topic, first = fields[0], fields[1]
                # A durable subscriber's first run starts at the oldest result retained:
                # what is older was never owed to it.
                owed = not (self._first_run and first == 1 and topic not in self._taken)
                self._seq.missing(*fields, report=owed)
                if not owed:  # saved with the position, so the next run does not ask again
                    self._taken[topic] = max(self._taken.get(topic, 0), fields[2])
            elif mtype == p.TOPICS:
                self._topics_page(*fields)
            elif mtype == p.CURSOR and fields[0] == self.settings.durable:
                self._cursor_page(*fields[1:])
        except ProtocolError as exc:
            self._reject(exc)

    def _topics_page(self, after: int, topics: list[str], seqs: list[int], upto: int, more: bool) -> None:
        heads = list(zip(topics, seqs, strict=True))
        if self._started:
            for topic, seq in heads:
                self._seq.head(topic, seq)
        else:
            self._heads.early += heads
        pages = self._heads
        if after != pages.after:
            return  # a repeated request's answer: its heads count, its place was taken already
        pages.after, pages.asked = upto, None
        if more:
            self._ask_heads(time.monotonic())
        else:
            pages.due = time.monotonic() + POLL_HEADS
            pages.done = True
            self._start()

    def _cursor_page(self, after: str, topics: list[str], seqs: list[int], more: bool) -> None:
        pages = self._cursor
        if pages.done or after != pages.after:
            return  # a repeated request's answer
        if more and not topics:
            raise ProtocolError("bad field", "a cursor page that says more follows holds no topic")
        if not after:
            self._first_run = not topics
        positions = dict(zip(topics, seqs, strict=True))
        self._seq.start_at(positions)
        self._committed.update(positions)
        pages.asked = None
        if more:
            pages.after = topics[-1]
            self._ask_cursor(time.monotonic())
        else:
            pages.done = True
            self._start()

    def _start(self) -> None:
        """Once every page of the heads (and of the cursor) is in: where each topic starts is known."""
        if self._started or not (self._heads.done and self._cursor.done):
            return
        heads = self._heads.early
        if self.settings.durable is None:
            # A plain subscriber starts after the heads the sink reported first, or before the
            # first result its stream brought since it subscribed, if that is earlier.
            start: dict[str, int] = {}
            for topic, seq in heads:
                start.setdefault(topic, seq)
            for msg in self._early:
                start[msg.topic] = min(start.get(msg.topic, msg.seq), msg.seq - 1)
            self._seq.start_at(start)
        self._started = True
        for topic, seq in heads:
            self._seq.head(topic, seq)
        for msg in self._early:
            self._seq.offer(msg)
        self._early.clear()
        self._heads.early = []

    def _message(self, header: bytes, payload: bytes) -> Message | None:
        """The result, or None if its header is sound but its records cannot be decoded: then
        it is reported lost once and skipped, since asking again would bring the same bytes."""
        mtype, fields = p.decode(header, allowed=RESULT_TYPES)
        topic, seq, batch_id = fields[0], fields[1], fields[2]
        try:
            records = p.decode_records(payload)
        except ProtocolError as exc:
            self._reject(exc)
            self._seq.missing(topic, seq, seq, "its records cannot be decoded")
            return None
        if mtype == p.DEAD:
            attempts, error, source = fields[3], fields[4], fields[5]
            return Message(topic, seq, batch_id, records, True, error, source, attempts)
        return Message(topic, seq, batch_id, records)

    def _reject(self, exc: ProtocolError) -> None:
        self.rejected[exc.reason] += 1
        log.debug("rejected a message: %s", exc)
