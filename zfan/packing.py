"""A producer's records on their way into batches, with no sockets and no waiting: topics
checked, records packed with msgpack (a batch's worth in one call for send_many), and each
sealed batch numbered and encoded. The threaded producer and the asyncio one both use it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import msgpack

from . import protocol as p
from .batching import Batch, Batcher
from .config import ProducerSettings, check_topic
from .delivery import Sent
from .errors import SerializationError

PAYLOAD_OVERHEAD = 5  # the array header in front of a batch's packed records


class Packing:
    def __init__(self, settings: ProducerSettings) -> None:
        self.settings = settings
        # A payload must fit one frame (ZeroMQ drops a connection that sends a larger one).
        self.max_record = settings.limits.max_frame - PAYLOAD_OVERHEAD
        self.batcher = Batcher(settings.batch_size, settings.linger_ms / 1000, max_bytes=self.max_record)
        self._packer = msgpack.Packer()
        # (producer id, seq) is what the sink deduplicates on, so a producer that runs again
        # under the same id must not reuse a seq: each run starts at the wall clock in
        # microseconds, past every seq an earlier run used (it would take a million batches a
        # second to catch up), and below 2^53, so that a double holds it exactly.
        self._seq = time.time_ns() // 1000
        self._topics: set[str] = set()

    def topic(self, topic: str | None) -> str:
        """The topic to send on: the default one, or `topic` once checked."""
        if topic is None:
            return self.settings.topic
        if topic not in self._topics:
            check_topic(topic)  # once per topic: this is the hot path
            self._topics.add(topic)
        return topic

    def pack(self, record: Any) -> bytes:
        try:
            packed: bytes = self._packer.pack(record)
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise SerializationError(f"record of type {type(record).__name__} cannot be sent: {exc}") from None
        if len(packed) > self.max_record:
            raise SerializationError(
                f"record of {len(packed):,} bytes packed is larger than a frame may be "
                f"({self.max_record:,} bytes: Limits.max_frame)"
            )
        return packed

    def pieces(self, records: Iterable[Any], topic: str) -> Iterator[tuple[bytes, int]]:
        """send_many's records as (packed, count): each piece is at most what fills the open
        batch of `topic` when it is asked for, so queue one before asking for the next. A
        record that cannot be sent raises SerializationError; the pieces before it are given."""
        return self._pieces(iter(records), lambda: self.batcher.room(topic))

    def planned(self, records: list[Any], topic: str) -> list[tuple[bytes, int]]:
        """What pieces() would give for `records` if each piece were queued before the next was
        asked for, all packed before any is queued: a record that cannot be sent raises
        SerializationError with nothing of them queued."""
        first = [self.batcher.room(topic)]  # the pieces after the first fill batches of their own
        return list(self._pieces(iter(records), lambda: first.pop() if first else self.batcher.batch_size))

    def _pieces(self, it: Iterator[Any], room: Callable[[], int]) -> Iterator[tuple[bytes, int]]:
        while chunk := list(islice(it, room())):
            body = self._pack_all(chunk)
            if body is not None:
                yield body, len(chunk)
                continue
            for record in chunk:  # one by one, to name the record at fault or split by size
                yield self.pack(record), 1

    def _pack_all(self, records: list[Any]) -> bytes | None:
        """The records packed back to back, or None if one cannot be packed or together they
        would not fit a batch: then they go one by one."""
        try:
            packed: bytes = self._packer.pack(records)
        except (TypeError, ValueError, OverflowError):
            self._packer.reset()
            return None
        body = packed[len(p.array_header(len(records))) :]
        return body if len(body) <= self.max_record else None

    def seal(self, topic: str, batch: Batch) -> Sent:
        """The next seq for a sealed batch, and its message encoded."""
        self._seq += 1
        msg = p.Batch(
            self.settings.producer_id, self._seq, topic, batch.count, p.join_records(batch.pieces, batch.count)
        )
        return Sent(self._seq, batch.count, p.encode(msg), topic=topic)
