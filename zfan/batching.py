"""The producer's open batches per topic, with no sockets: records collect until a batch is
full or has lingered long enough; and the batches on their way from the producer's callers to
its I/O loop, with the room left in its window."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .delivery import BatchOutcome, Outcomes, Sent
from .errors import ZfanError


@dataclass(slots=True)
class Batch:
    """A sealed batch: how many records, and their packed bytes in pieces of one or more."""

    count: int
    pieces: list[bytes]


@dataclass
class _Open:
    born: float
    pieces: list[bytes] = field(default_factory=list)
    count: int = 0
    size: int = 0


class Batcher:
    """Collects packed records per topic; a batch is sealed at ``batch_size`` records or once
    its first record is ``linger`` seconds old (as Kafka's producer does). A piece may hold
    several records packed back to back (send_many packs a batch's worth in one call)."""

    def __init__(self, batch_size: int, linger: float, max_bytes: int | None = None) -> None:
        self.batch_size = batch_size
        self.linger = linger
        self.max_bytes = max_bytes  # a batch is sealed before its payload would outgrow this
        self._open: dict[str, _Open] = {}
        self.empty = True  # no batch is open (kept as the open batches come and go: read per record)

    def room(self, topic: str) -> int:
        """Records the open batch of `topic` takes before it is sealed."""
        entry = self._open.get(topic)
        return self.batch_size - (entry.count if entry else 0)

    def add(self, topic: str, packed: bytes, now: float, count: int = 1) -> list[Batch]:
        """Add `count` records packed back to back (at most room(topic) of them); return the
        batches this seals: the open one if they fill it, or, if they would have made it too
        large, the open one without them (and they start the next)."""
        sealed = []
        entry = self._open.get(topic)
        if entry is not None and self.max_bytes is not None and entry.size + len(packed) > self.max_bytes:
            sealed.append(Batch(entry.count, entry.pieces))
            entry = None
        if entry is None:
            entry = self._open[topic] = _Open(now)
            self.empty = False
        entry.pieces.append(packed)
        entry.count += count
        entry.size += len(packed)
        if entry.count >= self.batch_size:
            del self._open[topic]
            self.empty = not self._open
            sealed.append(Batch(entry.count, entry.pieces))
        return sealed

    def take_due(self, now: float) -> tuple[str, Batch] | None:
        """The oldest open batch if it has lingered long enough, removed; else None."""
        if not self._open:
            return None
        topic, entry = min(self._open.items(), key=lambda kv: kv[1].born)
        if now - entry.born < self.linger:
            return None
        del self._open[topic]
        self.empty = not self._open
        return topic, Batch(entry.count, entry.pieces)

    def take_any(self) -> tuple[str, Batch] | None:
        """Any open batch, removed (for flush)."""
        if not self._open:
            return None
        topic = next(iter(self._open))
        entry = self._open.pop(topic)
        self.empty = not self._open
        return topic, Batch(entry.count, entry.pieces)

    def next_due(self, now: float) -> float | None:
        """Seconds until the oldest open batch is due, or None when nothing is open."""
        if not self._open:
            return None
        return max(0.0, min(e.born for e in self._open.values()) + self.linger - now)

    def __len__(self) -> int:
        return sum(e.count for e in self._open.values())


class Outgoing:
    """Batches between a producer's callers and its I/O loop, with no locks, sockets or
    waiting: the open ones (a Batcher), the sealed ones queued for the I/O loop, the room left
    in the window (a sealed batch holds its place until acknowledged), and, for flush() and
    join(), how many are unacknowledged or without an outcome, and the outcomes. The threaded
    hand-off holds one lock around every use and waits on a condition; the asyncio one needs
    no lock and waits on a future. `wake` tells the I/O loop that the queue is no longer empty,
    or that a first batch opened (its linger is to be timed)."""

    def __init__(self, batcher: Batcher, window: int, seal: Callable[[str, Batch], Sent], wake: Callable[[], None]):
        self.batcher = batcher
        self._seal = seal  # numbers and encodes a batch (as it is queued, so that seqs follow the queue)
        self._wake = wake
        self.queue: deque[Sent] = deque()
        self.room = window  # places left in the window: sealed batches count until acked
        self.unacked = 0  # sealed and not yet acknowledged
        self.unended = 0  # sealed and no outcome yet
        self.outcomes = Outcomes()
        self.stopped: ZfanError | None = None  # why the I/O loop will take nothing more
        self.told = False  # a caller has been given `stopped`

    # --- the callers' side ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise why the I/O loop stopped, if it has."""
        if self.stopped is not None:
            self.told = True
            raise self.stopped

    def add(self, topic: str, packed: bytes, count: int, now: float) -> list[Batch]:
        """Add packed records to their topic's open batch; return the batches this seals, each
        for enqueue() once the window has room for it."""
        # The path of every record: kept short.
        if self.stopped is not None:
            self.check()
        opened = self.batcher.empty  # a first open batch: the I/O loop must time its linger
        sealed = self.batcher.add(topic, packed, now, count)
        if not sealed and opened and not self.queue:  # (with a queue, a wake-up is on its way already)
            self._wake()
        return sealed

    def enqueue(self, topic: str, batch: Batch) -> None:
        """Queue a sealed batch for the I/O loop, in a place of the window (room must be left)."""
        assert self.room > 0
        self.room -= 1
        self.unacked += 1
        self.unended += 1
        self.queue.append(self._seal(topic, batch))
        if len(self.queue) == 1:
            self._wake()

    # --- the I/O loop's side -------------------------------------------------------------------
    def take(self, now: float, linger: bool = True) -> list[Sent]:
        """Sealed batches, and (with `linger`) the open ones that have lingered long enough if
        the window has room for them. Clear the wake-up before calling, so that no wake-up is
        lost. Without `linger` (no sink has welcomed us) open batches fill up to their size:
        a window of full batches holds many more records while the sink is away."""
        while linger and self.room > 0 and (due := self.batcher.take_due(now)) is not None:
            self.room -= 1
            self.unacked += 1
            self.unended += 1
            self.queue.append(self._seal(*due))
        out = list(self.queue)
        self.queue.clear()
        return out

    def linger_deadline(self, now: float, linger: bool = True) -> float | None:
        """When the oldest open batch is due, if the window has room for it (and `linger`)."""
        if self.room <= 0 or not linger:
            return None  # an ack comes first, and that wakes the I/O loop anyway
        due = self.batcher.next_due(now)
        return None if due is None else now + due

    def acked(self, n: int) -> None:
        self.room += n
        self.unacked -= n

    def ended(self, outcomes: list[BatchOutcome]) -> None:
        for outcome in outcomes:
            self.outcomes.add(outcome)
        self.unended -= len(outcomes)
