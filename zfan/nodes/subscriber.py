"""The subscriber: a SUB on the sink's results, filtered by topic prefix.

It is used from the caller's thread (an iterator, recv(), or run() with a callback), which
then owns its socket. Every result carries its topic's sequence number; the subscriber drops
repeats and counts gaps.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from .. import protocol as p
from ..config import SubscriberSettings
from ..errors import Closed, ProtocolError
from .transport import connect, socket

log = logging.getLogger(__name__)

RESULT_TYPES = frozenset({p.PUBLISH, p.DEAD})
SYNC_TOPIC = p.SYNC_PREFIX.encode()


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
        d: dict[str, Any] = {"topic": self.topic, "seq": self.seq, "batch": self.batch_id,
                             "records": self.records}
        if self.dead:
            d.update(source_topic=self.source_topic, attempts=self.attempts, error=self.error)
        return d


class Subscriber:
    """``for msg in Subscriber(results=..., topics=["sensor."]): ...``"""

    def __init__(self, settings: SubscriberSettings | None = None, *, context: zmq.Context | None = None,
                 **overrides: Any) -> None:
        if isinstance(overrides.get("topics"), list):
            overrides["topics"] = tuple(overrides["topics"])
        self.settings = s = settings or SubscriberSettings(**overrides)
        self._sock = socket(context or zmq.Context.instance(), zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, s.hwm)
        connect(self._sock, s.results, "results endpoint")
        for prefix in s.topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._token = f"{p.SYNC_PREFIX}{uuid.uuid4().hex}"
        self._sock.setsockopt(zmq.SUBSCRIBE, self._token.encode())
        self.synced = False
        self._early: deque[list[bytes]] = deque()
        self._last: dict[str, int] = {}
        self.received = 0
        self.gaps = 0  # results known to be missing (a seq jumped)
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self._closed = False

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the sink has our subscriptions; True if it has within the timeout."""
        deadline = time.monotonic() + timeout
        while not self.synced:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(left * 1000):
                return False
            frames = self._sock.recv_multipart()
            if not self._is_sync(frames):
                self._early.append(frames)
        return True

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next new result, or None if none arrives within the timeout (seconds)."""
        if self._closed:
            raise Closed("subscriber is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._early:
                frames = self._early.popleft()
            else:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
                if not self._sock.poll(wait):
                    return None
                frames = self._sock.recv_multipart()
            if self._is_sync(frames):
                continue
            msg = self._accept(frames)
            if msg is not None:
                return msg

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def run(self, callback: Callable[[Message], object], *, count: int | None = None,
            timeout: float | None = None) -> int:
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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------
    def _is_sync(self, frames: list[bytes]) -> bool:
        if frames[0] != self._token.encode():
            return False
        if not self.synced:
            self.synced = True
            self._sock.setsockopt(zmq.UNSUBSCRIBE, self._token.encode())
        return True

    def _accept(self, frames: list[bytes]) -> Message | None:
        if frames[0].startswith(SYNC_TOPIC):
            return None  # another subscriber's handshake, seen through a wide prefix
        try:
            if len(frames) != 3:
                raise ProtocolError("bad frame count", f"{len(frames)} frames")
            mtype, fields = p.decode(frames[1], allowed=RESULT_TYPES)
            topic, seq, batch_id = fields[0], fields[1], fields[2]
            if frames[0] != topic.encode():
                raise ProtocolError("bad header", "topic frame and header disagree")
            last = self._last.get(topic)
            if last is not None and seq <= last:
                self.duplicates += 1
                return None
            records = p.decode_records(frames[2])
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            log.debug("rejected a published message: %s", exc)
            return None
        if last is not None and seq > last + 1:
            self.gaps += seq - last - 1
        self._last[topic] = seq
        self.received += 1
        if mtype == p.DEAD:
            attempts, error, source = fields[3], fields[4], fields[5]
            return Message(topic, seq, batch_id, records, True, error, source, attempts)
        return Message(topic, seq, batch_id, records)
