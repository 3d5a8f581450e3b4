"""A subscriber's bookkeeping, with no sockets: deliver each topic's results once, in seq
order, and say which ranges to ask the sink to replay.

Results arrive from the PUB socket (where ZeroMQ may drop some) and from replays on the control
channel; both are offered here. A result past a gap is held until the gap is filled, or until
the sink says the gap is no longer retained, which is reported as an error and skipped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .errors import ZfanError
from .protocol import MAX_REPLAY

# Seqs asked for and not yet in, across all topics. Every one may come back as a message on the
# control connection, whose queue at the sink (20 000 messages) drops what does not fit: asking
# for tens of thousands of topics' gaps at once would lose most answers and wait to ask again.
MAX_ASKING = 10 * MAX_REPLAY


class RetentionGap(ZfanError):
    """Results a subscriber missed are no longer kept by the sink (see `zfan sink --retain`)."""

    def __init__(self, topic: str, first: int, last: int, reason: str) -> None:
        super().__init__(f"results {topic} seq {first} to {last} are lost to this subscriber: {reason}")
        self.topic, self.first, self.last = topic, first, last
        self.after = 0  # results made ready before this gap: it is reported after them


class Sequenced(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def seq(self) -> int: ...


M = TypeVar("M", bound=Sequenced)


@dataclass
class _Ask:
    first: int
    last: int
    at: float


class Sequencer(Generic[M]):
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        repair: bool = True,
        ask_every: float = 1.0,
        hold_limit: int = 100_000,
        max_asking: int = MAX_ASKING,
    ) -> None:
        self.clock = clock
        self.repair = repair  # without a way to ask for replays, a gap is counted and skipped
        self.ask_every = ask_every
        self.hold_limit = hold_limit
        self.max_asking = max_asking
        self.next: dict[str, int] = {}  # next seq to deliver, per topic
        self.want: dict[str, int] = {}  # highest seq known to exist, per topic
        self.held: dict[str, dict[int, M]] = {}
        self._held = 0
        self._asked: dict[str, _Ask] = {}
        self._asking = 0  # seqs in the ranges of _asked
        # Topics that may have a gap (next <= want) and no request out for it: requests() looks at
        # these, not at every topic. A topic with a request out comes back when that is answered.
        self._open: set[str] = set()
        self._answered = float("-inf")  # when the last answer to a request came in
        self.ready: deque[M] = deque()
        self.errors: deque[RetentionGap] = deque()
        self.readied = 0  # results ever made ready
        self.duplicates = 0
        self.skipped = 0  # results jumped over, when not repairing
        self.lost = 0  # results skipped because the sink no longer had them

    def start_at(self, positions: dict[str, int]) -> None:
        """Begin each topic after the given seq (what was taken before, or the head now)."""
        for topic, seq in positions.items():
            if topic not in self.next:
                self.next[topic] = seq + 1
                self.want[topic] = max(self.want.get(topic, 0), seq)
                if self.repair and self.want[topic] > seq:
                    self._open.add(topic)

    def offer(self, msg: M) -> bool:
        """Take a result; False if it was seen before."""
        topic, seq = msg.topic, msg.seq
        # A topic starts at 1, unless nothing can be asked for: then where it was joined.
        nxt = self.next.setdefault(topic, 1 if self.repair else seq)
        held = self.held.setdefault(topic, {})
        if seq < nxt or seq in held:
            self.duplicates += 1
            return False
        self._raise_want(topic, seq)
        if seq > nxt and not self.repair:
            self.skipped += seq - nxt
            nxt = seq
        if seq != nxt:
            if self._held < self.hold_limit:  # past the limit it stays in the gap, asked for again
                held[seq] = msg
                self._held += 1
            return True
        self._make_ready(msg)
        self._advance(topic, seq + 1)
        return True

    def head(self, topic: str, seq: int) -> None:
        """The sink says `topic` has results up to `seq`."""
        self.next.setdefault(topic, 1)
        self._raise_want(topic, seq)

    def missing(self, topic: str, first: int, last: int, reason: str, *, report: bool = True) -> None:
        """The sink no longer has `first`..`last` of `topic`: report it (unless told that the
        range was never wanted) and move past it."""
        nxt = self.next.setdefault(topic, 1)
        if last < nxt:
            return
        first = max(first, nxt)
        if report:
            self.lost += last - first + 1
            gap = RetentionGap(topic, first, last, reason)
            gap.after = self.readied
            self.errors.append(gap)
        for seq in [s for s in self.held.get(topic, {}) if s <= last]:
            del self.held[topic][seq]
            self._held -= 1
        self._advance(topic, last + 1)

    def answered(self) -> None:
        """An answer to a request came in (a replayed result, or word that one is missing)."""
        self._answered = self.clock()

    def requests(self) -> list[tuple[str, int, int]]:
        """Ranges to ask the sink for now: (topic, first, last). While `max_asking` seqs are
        asked for and not in, the other gaps wait: each answer that comes in lets another out."""
        now = self.clock()
        if now - self._answered >= self.ask_every:
            # Nothing came in for a while: what is still out was lost (dropped by ZeroMQ at a
            # high-water mark, or the sink restarted). While answers flow, those before it are coming.
            self._open.update(t for t, asked in self._asked.items() if now - asked.at >= self.ask_every)
        out = []
        settled = []  # no gap, or a request is out: out of _open
        for topic in self._open:
            nxt, want = self.next[topic], self.want.get(topic, 0)
            asked = self._asked.get(topic)
            if nxt > want or (asked is not None and nxt <= asked.last and not self._lost(asked, now)):
                settled.append(topic)
                continue
            held = self.held.get(topic)
            last = min(held) - 1 if held else want
            # No more than the sink sends for one request: once it is in, the next is asked at once.
            last = min(last, nxt + MAX_REPLAY - 1)
            if self._asking - self._size(asked) + last - nxt + 1 > self.max_asking and self._asking:
                break
            self._set_ask(topic, _Ask(nxt, last, now))
            out.append((topic, nxt, last))
            settled.append(topic)
        self._open.difference_update(settled)
        return out

    def positions(self) -> dict[str, int]:
        return {t: n - 1 for t, n in self.next.items() if n > 1}

    def _raise_want(self, topic: str, seq: int) -> None:
        if seq > self.want.get(topic, 0):
            self.want[topic] = seq
            if self.repair:
                self._open.add(topic)

    def _lost(self, asked: _Ask, now: float) -> bool:
        return now - max(asked.at, self._answered) >= self.ask_every

    @staticmethod
    def _size(ask: _Ask | None) -> int:
        return 0 if ask is None else ask.last - ask.first + 1

    def _set_ask(self, topic: str, ask: _Ask | None) -> None:
        self._asking += self._size(ask) - self._size(self._asked.pop(topic, None))
        if ask is not None:
            self._asked[topic] = ask

    def _make_ready(self, msg: M) -> None:
        self.ready.append(msg)
        self.readied += 1

    def _advance(self, topic: str, nxt: int) -> None:
        """Deliver what was held behind the gap, in order."""
        held = self.held.get(topic, {})
        while nxt in held:
            self._make_ready(held.pop(nxt))
            self._held -= 1
            nxt += 1
        self.next[topic] = nxt
        asked = self._asked.get(topic)
        if asked is not None and nxt > asked.last:
            self._set_ask(topic, None)
            if nxt <= self.want.get(topic, 0):
                self._open.add(topic)  # the rest of the gap is asked for at once
