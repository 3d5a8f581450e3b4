"""Batches from producers: checked, stored once each (a resent batch is known by its producer id
and seq), queued for leasing, and acknowledged once the turn's commit has made them durable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from . import protocol as p
from .errors import ProtocolError
from .leasing import Backlog
from .ledger import Ledger, Pending
from .outcomes import Outcomes

INTAKE_TYPES: frozenset[type[p.Message]] = frozenset({p.Batch, p.Batches})


class Intake:
    def __init__(
        self,
        ledger: Ledger,
        backlog: Backlog,
        counts: dict[str, int],
        stats: Counter[str],
        owns: Callable[[str, str], bool],
        outcomes: Outcomes,
        arrived: Callable[[list[tuple[int, str, int]]], None] = lambda _: None,
    ) -> None:
        self._ledger = ledger
        self._backlog = backlog
        self._counts = counts
        self._stats = stats
        self._owns = owns  # whether a CURVE key is the one a producer id is bound to
        self._outcomes = outcomes  # told whose each batch is, and of each that came again
        self._arrived = arrived  # told (batch id, topic, records) of the batches stored
        self._acks: dict[str, list[int]] = {}  # producer id -> seqs to acknowledge

    def decode(self, frames: list[bytes], key: str | None) -> p.Batch | p.Batches:
        """The batch, or group of batches, in `frames`; with CURVE, `key` is the sender's, which
        must be the one its producer id is bound to. Raises ProtocolError."""
        msg = p.decode(frames, allowed=INTAKE_TYPES)
        assert isinstance(msg, (p.Batch, p.Batches))
        for topic in (msg.topic,) if isinstance(msg, p.Batch) else msg.topics:
            if topic.startswith("zfan."):
                raise ProtocolError("reserved topic", topic)
        if key is not None and not self._owns(msg.producer_id, key):
            raise ProtocolError("producer id of another key", msg.producer_id)
        return msg

    def store(self, msg: p.Batch | p.Batches) -> None:
        """Store the batches that did not come before, and acknowledge them all."""
        producer_id = msg.producer_id
        if isinstance(msg, p.Batch):
            batches = [(msg.seq, msg.topic, msg.count, msg.payload)]
        else:
            batches = list(zip(msg.seqs, msg.topics, msg.counts, msg.payloads(), strict=False))  # of one length
        ids = self._ledger.insert_batches(producer_id, batches)
        acks = self._acks.setdefault(producer_id, [])
        stored = []
        for batch_id, (seq, topic, count, payload) in zip(ids, batches, strict=True):
            if batch_id is None:
                self._stats["duplicate batches"] += 1
                self._outcomes.duplicate(producer_id, seq)
            else:
                self._backlog.add(Pending(batch_id, topic, count, 0), payload)
                self._outcomes.stored(batch_id, producer_id, seq)
                self._counts["pending"] += 1
                self._stats["batches in"] += 1
                self._stats["records in"] += count
                stored.append((batch_id, topic, count))
            acks.append(seq)
        self._arrived(stored)

    @property
    def acks_waiting(self) -> bool:
        """Whether acks wait: the turn must commit what they acknowledge."""
        return bool(self._acks)

    def take_acks(self) -> list[tuple[str, list[int]]]:
        """(producer id, seqs) of the batches taken in since the last call."""
        acks = list(self._acks.items())
        self._acks.clear()
        return acks
