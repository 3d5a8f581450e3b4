"""The producer's bookkeeping, with no sockets: open batches per topic, and the window of
batches sent but not yet acknowledged."""

from __future__ import annotations

from dataclasses import dataclass


class Batcher:
    """Collects packed records per topic; a batch is sealed at ``batch_size`` records or once
    its first record is ``linger`` seconds old (as Kafka's producer does)."""

    def __init__(self, batch_size: int, linger: float, max_bytes: int | None = None) -> None:
        self.batch_size = batch_size
        self.linger = linger
        self.max_bytes = max_bytes  # a batch is sealed before its payload would outgrow this
        self._open: dict[str, tuple[float, list[bytes]]] = {}
        self._bytes: dict[str, int] = {}

    def add(self, topic: str, packed: bytes, now: float) -> list[bytes] | None:
        """Add a record; return a sealed batch when this record fills it, or when it would have
        made the open one too large (then it starts the next batch)."""
        entry = self._open.get(topic)
        size = self._bytes.get(topic, 0) + len(packed)
        if entry is not None and self.max_bytes is not None and size > self.max_bytes:
            del self._open[topic]
            self._open[topic] = (now, [packed])
            self._bytes[topic] = len(packed)
            return entry[1]
        if entry is None:
            entry = self._open[topic] = (now, [])
        entry[1].append(packed)
        self._bytes[topic] = size
        if len(entry[1]) >= self.batch_size:
            del self._open[topic]
            del self._bytes[topic]
            return entry[1]
        return None

    def take_due(self, now: float) -> tuple[str, list[bytes]] | None:
        """The oldest open batch if it has lingered long enough, removed; else None."""
        if not self._open:
            return None
        topic, (born, records) = min(self._open.items(), key=lambda kv: kv[1][0])
        if now - born < self.linger:
            return None
        del self._open[topic]
        self._bytes.pop(topic, None)
        return topic, records

    def take_any(self) -> tuple[str, list[bytes]] | None:
        """Any open batch, removed (for flush)."""
        if not self._open:
            return None
        topic = next(iter(self._open))
        self._bytes.pop(topic, None)
        return topic, self._open.pop(topic)[1]

    def next_due(self, now: float) -> float | None:
        """Seconds until the oldest open batch is due, or None when nothing is open."""
        if not self._open:
            return None
        return max(0.0, min(born for born, _ in self._open.values()) + self.linger - now)

    def __len__(self) -> int:
        return sum(len(r) for _, r in self._open.values())


@dataclass
class Sent:
    seq: int
    count: int
    frames: list[bytes]
    sent_at: float  # 0 when not yet sent


class Window:
    """Batches handed to the sink and not yet acknowledged, by seq."""

    def __init__(self) -> None:
        self._unacked: dict[int, Sent] = {}
        self.acked_records = 0
        self.acked_batches = 0

    def add(self, sent: Sent) -> None:
        self._unacked[sent.seq] = sent

    def ack(self, seqs: list[int]) -> int:
        """Forget acknowledged batches; return how many were still unacked (repeats are ignored)."""
        n = 0
        for seq in seqs:
            sent = self._unacked.pop(seq, None)
            if sent is not None:
                n += 1
                self.acked_records += sent.count
        self.acked_batches += n
        return n

    def due(self, now: float, resend_after: float) -> list[Sent]:
        """Batches never sent, or sent longer ago than ``resend_after`` without an ack."""
        return [s for s in self._unacked.values() if now - s.sent_at >= resend_after or not s.sent_at]

    def all(self) -> list[Sent]:
        return list(self._unacked.values())

    def __len__(self) -> int:
        return len(self._unacked)
