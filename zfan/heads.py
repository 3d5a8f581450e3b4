"""Where each topic's head stands, in pages: the sink's side of `heads` and `topics`.

Each change of a topic's head takes the next position of a counter, and (position, topic) is
appended to a log. A subscriber asks for the topics changed after the position its last answer
gave it, so a poll reads only what changed since the one before, however many topics there
are. A topic that changed again has a stale entry further back: skipped when read, and dropped
when the log is compacted, once it holds about twice as many entries as there are topics.

Positions go on the wire with the sink's epoch in their high bits: a position from an earlier
run of the sink means nothing to this one, which then answers from the start.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from . import protocol as p

# Low bits of a position on the wire; the epoch takes the rest of a 63-bit uint. 2**47 changes
# last four years at a million results a second; an epoch repeats after 65 536 sink starts.
POSITION_BITS = 47
_MASK = (1 << POSITION_BITS) - 1
SCAN_LIMIT = 100_000  # log entries one request reads at most, so that a turn of the sink stays short
_SLACK = 1024  # stale entries tolerated besides the 2x, so that few topics do not compact constantly


class HeadLog:
    def __init__(self, epoch: int, topics: Iterable[str] = ()) -> None:
        self._epoch = (epoch % (1 << (63 - POSITION_BITS))) << POSITION_BITS
        self._last = 0  # the position of the latest change
        self._at: dict[str, int] = {}  # topic -> position of its latest change
        self._positions: list[int] = []  # the log, in change order (ascending)
        self._topics: list[str] = []
        for topic in topics:
            self.changed(topic)

    def __len__(self) -> int:
        return len(self._positions)

    def changed(self, topic: str) -> None:
        self._last += 1
        self._at[topic] = self._last
        self._positions.append(self._last)
        self._topics.append(topic)
        if len(self._positions) > 2 * len(self._at) + _SLACK:
            self._compact()

    def page(
        self, after: int, prefixes: tuple[str, ...], heads: dict[str, int], scan_limit: int = SCAN_LIMIT
    ) -> tuple[list[tuple[str, int]], int, bool]:
        """The (topic, head) pairs of topics matching `prefixes` whose head changed after
        position `after`, in change order, as many as one header holds; the position to ask
        from next; and whether more may follow."""
        i = bisect_right(self._positions, self._position(after))
        end = min(len(self._positions), i + scan_limit)
        found: list[tuple[int, str]] = []
        while i < end and len(found) < p.MAX_TOPICS:
            position, topic = self._positions[i], self._topics[i]
            if self._at[topic] == position and topic.startswith(prefixes):
                found.append((position, topic))
            i += 1
        pairs = [(topic, heads[topic]) for _, topic in found]
        fit = p.pairs_that_fit(pairs)
        if fit < len(pairs):  # the header is full: the next page starts after its last topic
            return pairs[:fit], self._epoch | found[fit - 1][0], True
        if i < len(self._positions):
            return pairs, self._epoch | self._positions[i - 1], True
        return pairs, self._epoch | self._last, False

    def _position(self, after: int) -> int:
        """The position `after` stands for: 0, the start, unless this run gave it out."""
        if after & ~_MASK != self._epoch or after & _MASK > self._last:
            return 0
        return after & _MASK

    def _compact(self) -> None:
        live = [(pos, t) for pos, t in zip(self._positions, self._topics, strict=True) if self._at[t] == pos]
        self._positions = [pos for pos, _ in live]
        self._topics = [t for _, t in live]
