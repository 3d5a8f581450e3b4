"""The producer: batches records, PUSHes them to the sink's intake and keeps each batch until
the sink acknowledges it on the control channel, after its ledger commit.

send() runs on the caller's thread and only packs and batches; one I/O thread owns both
sockets, sends, resends, heartbeats and takes acks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice
from typing import Any

import msgpack
import zmq

from .. import protocol as p
from ..batching import Batch, Batcher, Sent, Window
from ..config import ProducerSettings, check_topic
from ..errors import Closed, DeliveryTimeout, ProtocolError, SerializationError, ZfanError
from .security import Handshakes, HandshakeWatch, check_handshakes, secure_client
from .service import Service
from .transport import Backoff, connect, drain, socket, welcome_timing

log = logging.getLogger(__name__)

CONTROL_TYPES = frozenset({p.WELCOME, p.HEARTBEAT, p.ACK, p.RESET})
PAYLOAD_OVERHEAD = 5  # the array header in front of a batch's packed records


class Producer(Service):
    """``with Producer(intake=..., control=...) as prod: prod.send({"v": 1}, topic="t")``"""

    role = "producer"

    def __init__(
        self, settings: ProducerSettings | None = None, *, context: zmq.Context | None = None, **overrides: Any
    ) -> None:
        super().__init__(context)
        s = self.settings = settings or ProducerSettings(**overrides)
        self._lock = threading.Lock()  # guards the batcher, seq and the hand-off queue
        # A payload must fit one frame (ZeroMQ drops a connection that sends a larger one).
        self._max_record = s.limits.max_frame - PAYLOAD_OVERHEAD
        self._batcher = Batcher(s.batch_size, s.linger_ms / 1000, max_bytes=self._max_record)
        self._packer = msgpack.Packer()
        # (producer id, seq) is what the sink deduplicates on, so a producer that runs again
        # under the same id must not reuse a seq: each run starts at the wall clock in ns,
        # past every seq an earlier run used (it would take a billion batches a second to
        # catch up) and far below the 2^63 limit.
        self._seq = time.time_ns()
        self._handoff: deque[Sent] = deque()
        self._slots = threading.Semaphore(s.window)  # free places in the window
        self._acked = threading.Condition()
        self._window = Window()
        self._outstanding = 0  # handed off and not yet acked (under _acked)
        self._topics: set[str] = set()
        self._push_watch: HandshakeWatch | None = None  # set by the I/O thread: intake's handshakes
        self._handshakes = Handshakes()
        self._beat = self._expiry = 0.0  # the sink's heartbeat timing, from its welcome (I/O thread)
        self._closed = False
        self._window_full = False  # a lingering batch waits for an ack before it can go
        self._parked: tuple[str, Batch] | None = None  # that batch (I/O thread)
        self.sent_records = 0
        self.connected = threading.Event()

    # --- the caller's side -----------------------------------------------------------------
    def send(self, record: Any, topic: str | None = None) -> None:
        """Queue one record. Blocks while the window of unacknowledged batches is full."""
        topic = self._topic(topic)
        self._queue(topic, self._pack(record), 1)

    def send_many(self, records: Iterable[Any], topic: str | None = None) -> None:
        """Queue records, as send() would one by one, for a fraction of the cost per record:
        what fills the open batch is packed in one call. A record that cannot be sent raises
        SerializationError; those before it are queued."""
        topic = self._topic(topic)
        it = iter(records)
        while chunk := list(islice(it, self._batcher.room(topic))):
            body = self._pack_all(chunk)
            if body is not None:
                self._queue(topic, body, len(chunk))
                continue
            for record in chunk:  # one by one, to name the record at fault or split by size
                self._queue(topic, self._pack(record), 1)

    def _topic(self, topic: str | None) -> str:
        if self._closed:
            raise Closed("producer is closed")
        if topic is None:
            return self.settings.topic
        if topic not in self._topics:
            check_topic(topic)  # once per topic: this is the hot path
            self._topics.add(topic)
        return topic

    def _pack(self, record: Any) -> bytes:
        try:
            packed: bytes = self._packer.pack(record)
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise SerializationError(f"record of type {type(record).__name__} cannot be sent: {exc}") from None
        if len(packed) > self._max_record:
            raise SerializationError(
                f"record of {len(packed):,} bytes packed is larger than a frame may be "
                f"({self._max_record:,} bytes: Limits.max_frame)"
            )
        return packed

    def _pack_all(self, records: list[Any]) -> bytes | None:
        """The records packed back to back, or None if one cannot be packed or together they
        would not fit a batch: then they go one by one."""
        try:
            packed: bytes = self._packer.pack(records)
        except (TypeError, ValueError, OverflowError):
            self._packer.reset()
            return None
        body = packed[len(p.array_header(len(records))) :]
        return body if len(body) <= self._max_record else None

    def _queue(self, topic: str, packed: bytes, count: int) -> None:
        with self._lock:
            sealed = self._batcher.add(topic, packed, time.monotonic(), count)
            self.sent_records += count
        for batch in sealed:
            self._hand_off(topic, batch, block=True)

    def flush(self, timeout: float = 30.0) -> None:
        """Return once every record sent so far is acknowledged; raise DeliveryTimeout if not."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                batch = self._batcher.take_any()
            if batch is None:
                break
            self._hand_off(*batch, block=True, deadline=deadline, timeout=timeout)
        with self._acked:
            while self._outstanding or self._parked is not None:
                left = deadline - time.monotonic()
                if not self.running:
                    raise self._stopped_error()
                if left <= 0:
                    raise DeliveryTimeout(self._outstanding + (self._parked is not None), timeout)
                self._acked.wait(min(left, 0.1))

    def close(self, timeout: float = 30.0) -> None:  # type: ignore[override]
        """Flush, then stop. Raises DeliveryTimeout (after stopping) if the sink never acked."""
        if self._closed:
            return
        try:
            if self.running:
                self.flush(timeout)
        finally:
            self._closed = True
            super().close()

    def _stopped_error(self) -> ZfanError:
        if isinstance(self.error, ZfanError):
            return self.error
        return ZfanError(f"producer's I/O thread has stopped; {self._outstanding} batch(es) unacknowledged")

    @property
    def unacked(self) -> int:
        return self._outstanding

    @property
    def acked_records(self) -> int:
        return self._window.acked_records

    def _hand_off(
        self, topic: str, batch: Batch, *, block: bool, deadline: float | None = None, timeout: float = 0.0
    ) -> bool:
        """Give a sealed batch to the I/O thread once the window has room."""
        if not block:
            if not self._slots.acquire(blocking=False):
                self._window_full = True
                return False
        while block and not self._slots.acquire(timeout=0.1):
            if not self.running:
                raise self._stopped_error()
            if deadline is not None and time.monotonic() > deadline:
                raise DeliveryTimeout(self._outstanding + 1, timeout)  # this one is not acknowledged either
        with self._lock:
            self._seq += 1
            header = p.encode(p.BATCH, self.settings.producer_id, self._seq, topic, batch.count)
            self._handoff.append(Sent(self._seq, batch.count, [header, p.join_records(batch.pieces, batch.count)], 0.0))
        with self._acked:
            self._outstanding += 1
        self._wakeup.set()
        return True

    # --- the I/O thread --------------------------------------------------------------------
    def _serve(self) -> None:
        s = self.settings
        push = self._open_push()
        try:
            self._ready.set()
            backoff = Backoff(s.timing.heartbeat)
            while not self._stopping.is_set():
                if self._session(push):
                    backoff.reset()
                if self._stopping.wait(backoff.next()):
                    break
                # A session ends when the sink went silent: the intake connection may be just as
                # dead, its batches stuck behind TCP's backed-off retransmits long after the
                # network heals. A new one costs nothing: the next welcome resends what is unacked.
                self._close_push(push)
                push = self._open_push()
        finally:
            self._close_push(push)

    def _open_push(self) -> zmq.Socket:
        s = self.settings
        push = socket(self._ctx, zmq.PUSH)
        self._push_watch = secure_client(push, s.curve, s.intake, self._handshakes)
        try:
            connect(push, s.intake, "intake endpoint")
        except BaseException:
            self._close_push(push)
            raise
        return push

    def _close_push(self, push: zmq.Socket) -> None:
        if self._push_watch is not None:
            self._push_watch.close()
        push.close(linger=0)

    def _session(self, push: zmq.Socket) -> bool:
        """One control connection, until the sink goes silent or we stop. True if welcomed."""
        s = self.settings
        ctl = socket(self._ctx, zmq.DEALER, max_frame=p.MAX_HEADER_BYTES)  # it receives headers only
        watch = secure_client(ctl, s.curve, s.control, self._handshakes)
        connect(ctl, s.control, "control endpoint")
        poller = zmq.Poller()
        poller.register(ctl, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        epoch = 0
        welcomed = False
        self._beat, self._expiry = s.timing.heartbeat, s.timing.expiry  # until the sink says its own
        heard = time.monotonic()
        next_beat = heard + self._beat
        ctl.send(p.encode(p.HELLO, "producer", s.producer_id, 0))
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(self._wait(next_beat) * 1000))
                now = time.monotonic()
                check_handshakes(watch, self._push_watch)
                if self._wakeup.fileno() in ready:
                    self._wakeup.clear()
                self._seal_lingering(now)
                while self._handoff:
                    self._window.add(self._handoff.popleft())
                if ctl in ready:
                    for frames in drain(ctl):
                        heard = now
                        epoch = self._control(frames, ctl, epoch)
                    next_beat = min(next_beat, now + self._beat)  # a welcome may ask for a faster pace
                if epoch:
                    self._send_due(push, now)
                if now - heard > self._expiry:
                    log.warning("sink %s silent for %.1f s; reconnecting", s.control, now - heard)
                    self.connected.clear()
                    return welcomed
                welcomed = welcomed or bool(epoch)
                if now >= next_beat:
                    ctl.send(p.encode(p.HEARTBEAT, epoch))
                    next_beat = now + self._beat
            return welcomed
        finally:
            watch.close()
            ctl.close(linger=0)

    def _wait(self, next_beat: float) -> float:
        """Seconds to poll: until the next heartbeat, or the oldest open batch's linger."""
        now = time.monotonic()
        with self._lock:
            linger = None if self._window_full else self._batcher.next_due(now)
        wait = next_beat - now if linger is None else min(linger, next_beat - now)
        return max(0.0, wait)

    def _send_due(self, push: zmq.Socket, now: float) -> None:
        """Push batches never sent, and those unacknowledged for `resend_after`."""
        for sent in self._window.due(now, self.settings.resend_after):
            try:
                push.send_multipart(sent.frames, zmq.NOBLOCK)
            except zmq.Again:
                return  # the sink's pipe is full: try again next turn
            sent.sent_at = now

    def _control(self, frames: list[bytes], ctl: zmq.Socket, epoch: int) -> int:
        try:
            mtype, fields = p.decode(frames[0], allowed=CONTROL_TYPES)
        except ProtocolError as exc:
            log.warning("ignored a message from the sink: %s", exc)
            return epoch
        if mtype == p.ACK:
            n = self._window.ack(fields[0])
            if n:
                self._window_full = False
                self._slots.release(n)
                with self._acked:
                    self._outstanding -= n
                    self._acked.notify_all()
        elif mtype == p.WELCOME:
            if fields[0] != epoch:
                # A sink we had not met (or one that restarted): everything unacked goes again.
                for sent in self._window.all():
                    sent.sent_at = 0.0
            self._beat, self._expiry = welcome_timing(fields, self.settings.timing)
            self.connected.set()
            return int(fields[0])
        elif mtype == p.RESET or (mtype == p.HEARTBEAT and epoch and fields[0] != epoch):
            self.connected.clear()
            ctl.send(p.encode(p.HELLO, "producer", self.settings.producer_id, 0))
            return 0
        return epoch

    def _seal_lingering(self, now: float) -> None:
        while True:
            due = self._parked
            if due is None:
                with self._lock:
                    due = self._batcher.take_due(now)
            if due is None:
                return
            if not self._hand_off(*due, block=False):
                self._parked = due  # window full: it goes first once an ack makes room
                return
            self._parked = None
            while self._handoff:
                self._window.add(self._handoff.popleft())
