"""The producer's open batches per topic, with no sockets: records collect until a batch is
full or has lingered long enough."""

from __future__ import annotations

from dataclasses import dataclass, field


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
