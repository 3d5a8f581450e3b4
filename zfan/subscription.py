"""The subscriber's core, with no sockets: what it receives from the sink's results stream and
control channel, where each topic starts, what to ask the sink for, and when.

A subscriber with a control channel starts once the sink's topic heads (and, for a durable
subscriber, its saved position) are in, every page of them; results that came before that wait.
Afterwards it polls the heads (which catches results dropped at the end of a stream), asks for
the ranges its Sequencer finds missing, and saves a durable position every COMMIT_EVERY
seconds. Without a control channel it starts at once and only orders what the stream brings.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from .config import Timing
from .errors import ProtocolError
from .sequencing import RetentionGap, Sequencer
from .session import SESSION_TYPES, Dial, Event, Session

log = logging.getLogger(__name__)

RESULT_TYPES: frozenset[type[p.Message]] = frozenset({p.Publish, p.Dead})
STREAM_TYPES = RESULT_TYPES | {p.Publishes}  # results of one topic may come several in one message
CONTROL_TYPES: frozenset[type[p.Message]] = SESSION_TYPES | RESULT_TYPES | {p.Missing, p.Topics, p.Cursor}
POLL_HEADS = 1.0  # seconds between asking the sink for its topics' latest seqs
ASK_AGAIN = 1.0  # seconds after which a request whose answer has not come is sent again
COMMIT_EVERY = 1.0  # seconds between saving a durable subscriber's position
SYNC_GRACE = 1.0  # seconds: a caller away longer than this gives the sink as long again to sync


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
    # Which of the key-partitioned sinks published it (None: the subscriber takes one sink's):
    # seqs, batch ids and durable positions are each sink's own.
    partition: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"topic": self.topic, "seq": self.seq, "batch": self.batch_id, "records": self.records}
        if self.partition is not None:
            d["partition"] = self.partition
        if self.dead:
            d.update(source_topic=self.source_topic, attempts=self.attempts, error=self.error)
        return d


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

    def next_deadline(self) -> float:
        return self.due if self.asked is None else self.asked + ASK_AGAIN


class SubscriberCore:
    def __init__(
        self,
        prefixes: tuple[str, ...],
        now: float,
        *,
        control: bool,
        durable: str | None = None,
        timing: Timing | None = None,
        name: str = "subscriber",
        rng: random.Random | None = None,
        connect_timeout: float | None = None,
        partition: int | None = None,
    ) -> None:
        self.prefixes = prefixes
        self.partition = partition
        self.durable = durable
        self._now = now
        # With a control channel, a session keeps it alive and says when to dial it again.
        self.session = (
            Session("subscriber", name, timing or Timing(), now, rng=rng, connect_timeout=connect_timeout)
            if control
            else None
        )
        # The results stream must answer our sync within connect_timeout of the first look.
        self.connect_timeout = connect_timeout
        self._sync_due: float | None = None
        self._sync_since = self._sync_seen = now
        self.seq: Sequencer[Message] = Sequencer(clock=lambda: self._now, repair=control)
        self.synced = False  # the sink has our subscriptions: the stream is complete from here
        self.started = not control  # where each topic starts is known
        self._heads = _Pages(after=0)  # after: the position the sink's last page gave
        self._cursor = _Pages(after="", done=durable is None)  # after: the last topic read
        self._first_run = False  # a durable name the sink has no position for yet
        self._early: list[Message] = []
        self._early_lost: list[tuple[str, int]] = []  # (topic, seq) of undecodable results before then
        self._next_commit = now + COMMIT_EVERY
        self._taken: dict[str, int] = {}  # last seq handed to the caller, per topic
        self._committed: dict[str, int] = {}
        self.received = 0  # results handed to the caller
        self.replayed = 0  # results that came from the ledger, not the live stream
        self.rejected: Counter[str] = Counter()

    # --- what the caller sees --------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.synced and self.started

    def take(self) -> Message | RetentionGap | None:
        """The next result in order, a gap in its place, or None if nothing is ready yet."""
        seq = self.seq
        if seq.errors and seq.errors[0].after <= seq.readied - len(seq.ready):
            return seq.errors.popleft()  # in its place: after the results that came before it
        if seq.ready and self.ready:
            msg = seq.ready.popleft()
            self._taken[msg.topic] = msg.seq
            self.received += 1
            return msg
        return None

    @property
    def gaps(self) -> int:
        """Results known to exist and not received: skipped (without a control channel) or
        still being repaired."""
        pending = sum(max(0, self.seq.want.get(t, 0) - n + 1) for t, n in self.seq.next.items())
        return self.seq.skipped + pending

    # --- events ----------------------------------------------------------------------------
    def synced_now(self) -> None:
        """The sink answered our private sync topic: every subscription of ours is in place."""
        self.synced = True

    def sync_overdue(self, now: float) -> float | None:
        """Seconds waited for the sync, if it is overdue (connect_timeout); counted from the
        first call, made once the caller first waits for results, and called again after each
        look at the stream. A look long after the last one follows a caller that was not
        listening: that proves nothing against the sink, which gets SYNC_GRACE more."""
        if self.synced or self.connect_timeout is None:
            return None
        if self._sync_due is None:
            self._sync_since = now
            self._sync_due = now + self.connect_timeout
        elif now - self._sync_seen > SYNC_GRACE:
            self._sync_due = max(self._sync_due, now + SYNC_GRACE)
        self._sync_seen = now
        return now - self._sync_since if now >= self._sync_due else None

    def stream(self, topic: bytes, frames: list[bytes], now: float) -> None:
        """Results from the results stream: its topic frame, then a header and a payload (of one
        result, or of several on that topic)."""
        self._now = now
        try:
            if topic != topic[: p.MAX_TOPIC]:
                raise ProtocolError("bad header", "topic frame too long")
            msg = p.decode(frames, allowed=STREAM_TYPES)
            assert isinstance(msg, (p.Publish, p.Dead, p.Publishes))
            if topic != msg.topic.encode():
                raise ProtocolError("bad header", "topic frame and header disagree")
        except ProtocolError as exc:
            self._reject(exc)
            return
        for each in msg.split() if isinstance(msg, p.Publishes) else (msg,):
            result = self._records(each)
            if result is None:
                continue
            if self.started:
                self.seq.offer(result)
            else:
                self._early.append(result)  # offered once we know where each topic starts

    def control(self, frames: list[bytes], now: float) -> Event | None:
        """A message from the sink on control."""
        self._now = now
        assert self.session is not None
        try:
            msg = p.decode(frames, allowed=CONTROL_TYPES)
        except ProtocolError as exc:
            self._reject(exc)
            return None
        event = self.session.received(msg, now)
        try:
            if isinstance(msg, (p.Publish, p.Dead)):
                result = self._records(msg)
                self.seq.answered()
                if result is not None and self.seq.offer(result):
                    self.replayed += 1
            elif isinstance(msg, p.Missing):
                self._missing(msg)
            elif isinstance(msg, p.Topics):
                self._topics_page(msg)
            elif isinstance(msg, p.Cursor) and msg.name == self.durable:
                self._cursor_page(msg)
        except ProtocolError as exc:
            self._reject(exc)
        return event

    def tick(self, now: float) -> Event | None:
        """The passing of time: the session's beats and dials, and the requests now due."""
        self._now = now
        if self.session is None:
            return None
        event = self.session.tick(now)
        if isinstance(event, Dial):
            self._heads.asked = self._cursor.asked = None  # a new connection: what was out is lost
        if not (self.synced and self.session.joined):
            return event
        if not self._cursor.done and self._cursor.ready(now):
            self._ask_cursor(now)
        if self._heads.ready(now):
            self._ask_heads(now)
        if self.started:
            for topic, first, last in self.seq.requests():
                self.session.outbox.append(p.Replay(topic, first, last))
            if now >= self._next_commit:
                self._next_commit = now + COMMIT_EVERY
                self.commit()
        return event

    def next_deadline(self) -> float:
        if self.session is None:
            return float("inf")
        due = self.session.next_deadline()
        if self.synced and self.session.joined:
            due = min(due, self._heads.next_deadline())
            if not self._cursor.done:
                due = min(due, self._cursor.next_deadline())
            if self.started:
                due = min(due, self._next_commit, self._now + self.seq.ask_every)
        return due

    def commit(self) -> None:
        """Save a durable subscriber's position at the sink (its changes since the last time)."""
        if self.durable is None or self.session is None:
            return
        changed = {t: q for t, q in self._taken.items() if self._committed.get(t) != q}
        items = list(changed.items())
        while items:
            n = p.pairs_that_fit(items)
            part, items = items[:n], items[n:]
            self.session.outbox.append(p.Commit(self.durable, [t for t, _ in part], [q for _, q in part]))
        self._committed.update(changed)

    def close(self) -> None:
        """Commit a durable position, and say bye."""
        self.commit()
        if self.session is not None:
            self.session.close()

    # --- pages: heads and cursors ----------------------------------------------------------
    def _ask_heads(self, now: float) -> None:
        assert self.session is not None
        self._heads.asked = now
        self.session.outbox.append(p.Heads(list(self.prefixes), self._heads.after))

    def _ask_cursor(self, now: float) -> None:
        assert self.session is not None and self.durable is not None
        self._cursor.asked = now
        self.session.outbox.append(p.GetCursor(self.durable, self._cursor.after))

    def _topics_page(self, msg: p.Topics) -> None:
        heads = list(zip(msg.topics, msg.seqs, strict=True))
        if self.started:
            for topic, seq in heads:
                self.seq.head(topic, seq)
        else:
            self._heads.early += heads
        pages = self._heads
        if msg.after != pages.after:
            return  # a repeated request's answer: its heads count, its place was taken already
        pages.after, pages.asked = msg.upto, None
        if msg.more:
            self._ask_heads(self._now)
        else:
            pages.due = self._now + POLL_HEADS
            pages.done = True
            self._start()

    def _cursor_page(self, msg: p.Cursor) -> None:
        pages = self._cursor
        if pages.done or msg.after_topic != pages.after:
            return  # a repeated request's answer
        if msg.more and not msg.topics:
            raise ProtocolError("bad field", "a cursor page that says more follows holds no topic")
        if not msg.after_topic:
            self._first_run = not msg.topics
        positions = dict(zip(msg.topics, msg.seqs, strict=True))
        self.seq.start_at(positions)
        self._committed.update(positions)
        pages.asked = None
        if msg.more:
            pages.after = msg.topics[-1]
            self._ask_cursor(self._now)
        else:
            pages.done = True
            self._start()

    def _missing(self, msg: p.Missing) -> None:
        self.seq.answered()
        # A durable subscriber's first run starts at the oldest result retained: what is older
        # was never owed to it.
        owed = not (self._first_run and msg.first == 1 and msg.topic not in self._taken)
        self.seq.missing(msg.topic, msg.first, msg.last, msg.reason, report=owed)
        if not owed:  # saved with the position, so the next run does not ask again
            self._taken[msg.topic] = max(self._taken.get(msg.topic, 0), msg.last)

    def _start(self) -> None:
        """Once every page of the heads (and of the cursor) is in: where each topic starts is known."""
        if self.started or not (self._heads.done and self._cursor.done):
            return
        heads = self._heads.early
        if self.durable is None:
            # A plain subscriber starts after the heads the sink reported first, or before the
            # first result its stream brought since it subscribed, if that is earlier.
            start: dict[str, int] = {}
            for topic, seq in heads:
                start.setdefault(topic, seq)
            for topic, seq in [(m.topic, m.seq) for m in self._early] + self._early_lost:
                start[topic] = min(start.get(topic, seq), seq - 1)
            self.seq.start_at(start)
        self.started = True
        for topic, seq in heads:
            self.seq.head(topic, seq)
        for msg in self._early:
            self.seq.offer(msg)
        for topic, seq in self._early_lost:
            self._undecodable(topic, seq)
        self._early.clear()
        self._early_lost.clear()
        self._heads.early = []

    # --- results ---------------------------------------------------------------------------
    def _records(self, msg: p.Publish | p.Dead) -> Message | None:
        """The result, or None if its records cannot be decoded: then it is reported lost once
        and skipped, since asking again would bring the same bytes."""
        try:
            records = p.decode_records(msg.payload)
        except ProtocolError as exc:
            self._reject(exc)
            self._undecodable(msg.topic, msg.seq)
            return None
        if isinstance(msg, p.Dead):
            return Message(
                msg.topic,
                msg.seq,
                msg.batch_id,
                records,
                True,
                msg.error,
                msg.source_topic,
                msg.attempts,
                self.partition,
            )
        return Message(msg.topic, msg.seq, msg.batch_id, records, partition=self.partition)

    def _undecodable(self, topic: str, seq: int) -> None:
        """A result whose records cannot be decoded is reported lost in its place: once it is the
        next of its topic. Before that, what comes before it is still owed (and asked for, with
        it); before the start, where its topic starts is not known yet."""
        if not self.started:
            self._early_lost.append((topic, seq))
            return
        nxt = self.seq.next.get(topic, 1 if self.seq.repair else seq)  # where offer() would start it
        if seq > nxt:
            if self.seq.repair:
                self.seq.head(topic, seq)  # its copy asked for again comes back here as the next
                return
            self.seq.skipped += seq - nxt  # without repair, the results before it are skipped
        self.seq.missing(topic, seq, seq, "its records cannot be decoded")

    def _reject(self, exc: ProtocolError) -> None:
        self.rejected[exc.reason] += 1
        log.debug("rejected a message: %s", exc)
