"""The producer: batches records, PUSHes them to the sink's intake and keeps each batch until
the sink acknowledges it on the control channel, after its ledger commit; then learns from
the sink what became of it (processed, or dead-lettered).

send() runs on the caller's thread and only packs and batches; one I/O thread owns both
sockets, sends, resends, heartbeats and takes acks and outcomes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from .. import protocol as p
from ..batching import Batch, Batcher
from ..config import ProducerSettings, check_topic, settings_from
from ..delivery import BatchOutcome, Outcomes, ProducerCore, Sent
from ..errors import Closed, SerializationError, ZfanError
from ..session import Dial, GaveUp, Joined, Lost, said
from .handoff import Handoff
from .probe import no_answer
from .security import Handshakes, HandshakeWatch, check_handshakes, secure_client
from .service import Service
from .transport import Ctx, Poll, Sock, connect, drain, send, socket

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import ProducerOptions

log = logging.getLogger(__name__)

PAYLOAD_OVERHEAD = 5  # the array header in front of a batch's packed records


class Producer(Service):
    """``with Producer(intake=..., control=...) as prod: prod.send({"v": 1}, topic="t")``"""

    role = "producer"

    def __init__(
        self,
        settings: ProducerSettings | None = None,
        *,
        context: Ctx | None = None,
        on_outcome: Callable[[BatchOutcome], None] | None = None,
        **options: Unpack[ProducerOptions],
    ) -> None:
        s = self.settings = settings_from("Producer", ProducerSettings, settings, options)
        super().__init__(context)
        if on_outcome is not None and not callable(on_outcome):
            raise TypeError(f"on_outcome must be callable, not {type(on_outcome).__name__}")
        self._on_outcome = on_outcome
        # A payload must fit one frame (ZeroMQ drops a connection that sends a larger one).
        self._max_record = s.limits.max_frame - PAYLOAD_OVERHEAD
        self._batcher = Batcher(s.batch_size, s.linger_ms / 1000, max_bytes=self._max_record)
        self._handoff = Handoff(self._batcher, s.window, self._wakeup, self._seal)
        self._packer = msgpack.Packer()
        # (producer id, seq) is what the sink deduplicates on, so a producer that runs again
        # under the same id must not reuse a seq: each run starts at the wall clock in
        # microseconds, past every seq an earlier run used (it would take a million batches a
        # second to catch up), and below 2^53, so that a double holds it exactly.
        self._seq = time.time_ns() // 1000
        self._topics: set[str] = set()
        self._handshakes = Handshakes()
        self._closed = False
        self._acked_records = 0
        self.sent_records = 0
        self.connected = threading.Event()  # set while a sink has welcomed us
        self._poll = Poll()
        # Until the intake connection's first handshake: when to give up on it (connect_timeout).
        self._intake_due: float | None = None

    # --- the caller's side -----------------------------------------------------------------
    def send(self, record: Any, topic: str | None = None) -> None:
        """Queue one record. Blocks while the window of unacknowledged batches is full."""
        topic = self._topic(topic)
        self._handoff.add(topic, self._pack(record), 1)
        self.sent_records += 1

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
        self._handoff.add(topic, packed, count)
        self.sent_records += count

    def _seal(self, topic: str, batch: Batch) -> Sent:
        self._seq += 1
        msg = p.Batch(
            self.settings.producer_id, self._seq, topic, batch.count, p.join_records(batch.pieces, batch.count)
        )
        return Sent(self._seq, batch.count, p.encode(msg), topic=topic)

    def flush(self, timeout: float = 30.0) -> None:
        """Return once every record sent so far is acknowledged; raise DeliveryTimeout if not."""
        self._handoff.flush(timeout)

    def join(self, timeout: float = 30.0) -> Outcomes:
        """Flush, then wait until every batch sent so far is processed (its results stored) or
        dead-lettered; return what became of them all, counted since the producer started.
        Raises OutcomeTimeout (with the outcomes that did come) if that takes longer."""
        return self._handoff.join(timeout)

    @property
    def outcomes(self) -> Outcomes:
        """What became of the batches that have an outcome so far."""
        return self._handoff.outcomes

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then stop. Raises DeliveryTimeout (after stopping) if the sink never acked."""
        if self._closed:
            return
        told = self._handoff.told
        try:
            if self.running:
                self.flush(timeout)
        except ZfanError:
            # Why the producer stopped, which send() or flush() has already raised to the caller
            # (its I/O thread may not have ended quite yet): said once is enough.
            if not told:
                raise
        finally:
            self._closed = True
            super().close()

    @property
    def unacked(self) -> int:
        return self._handoff.unacked

    @property
    def acked_records(self) -> int:
        return self._acked_records

    # --- the I/O thread --------------------------------------------------------------------
    def _serve(self) -> None:
        s = self.settings
        core = ProducerCore(s.producer_id, s.timing, time.monotonic(), resend_after=s.resend_after, groups=True)
        core.session.connect_timeout = s.connect_timeout
        ctl: Sock | None = None
        push: Sock | None = None
        watches: list[HandshakeWatch] = []
        ready: dict[Any, int] = {}
        try:
            self._ready.set()
            while not self._stopping.is_set():
                now = time.monotonic()
                if ctl is not None:
                    self._take(core, ctl, ready, now)  # first: a sink heard from is not a sink lost
                event = core.tick(now)
                if isinstance(event, (Lost, GaveUp)):
                    check_handshakes(*watches)  # a refused handshake, not silence, may be why
                if isinstance(event, GaveUp):
                    raise no_answer(s.control, "control", s.connect_timeout or event.waited)
                if isinstance(event, Lost):
                    self._say(event)
                    self.connected.clear()
                    # The intake connection may be just as dead, its batches stuck behind TCP's
                    # backed-off retransmits long after the network heals: both are replaced.
                    ctl, push = self._close(ctl, push, watches)
                elif isinstance(event, Dial):
                    ctl, push = self._open(ctl, push, watches)
                self._check_intake(watches, now)
                assert (ctl is None) == (push is None)
                blocked = ctl is not None and push is not None and self._give(core, ctl, push, now)
                ready = self._wait(core, ctl, push, watches, blocked)
            if ctl is not None:
                core.session.close()
                self._send(ctl, core.session.take())
        finally:
            self._close(ctl, push, watches)

    def _ended(self) -> None:
        self._handoff.stop(self._stopped_error())

    def _take(self, core: ProducerCore, ctl: Sock, ready: dict[Any, int], now: float) -> None:
        """Take what callers sealed and what the sink sent."""
        if self._wakeup.fileno() in ready:
            self._wakeup.clear()
        for sent in self._handoff.take(now):
            core.add(sent)
        for frames in drain(ctl) if ctl in ready else ():
            event, acked = core.received(frames, now)
            if acked:
                self._acked_records = core.window.acked_records
                self._handoff.acked(acked)
            self._say(event)
            if isinstance(event, Joined):
                self.connected.set()
            elif isinstance(event, Lost):
                self.connected.clear()
        ended = core.take_ended()
        if ended:
            self._handoff.ended(ended)
            if self._on_outcome is not None:
                self._tell(ended)

    def _say(self, event: object) -> None:
        if isinstance(event, (Joined, Lost)) and (line := said(event, self.settings.control)) is not None:
            log.log(*line)

    def _check_intake(self, watches: list[HandshakeWatch], now: float) -> None:
        """Give up on an intake endpoint where nothing completed a handshake within
        connect_timeout (its watch is the first): its batches could only wait for acks forever."""
        if self._intake_due is None:
            return
        if watches and watches[0].succeeded:
            self._intake_due = None
        elif now >= self._intake_due:
            raise no_answer(self.settings.intake, "intake", self.settings.connect_timeout or 0.0)

    def _tell(self, ended: list[BatchOutcome]) -> None:
        assert self._on_outcome is not None
        for outcome in ended:
            try:
                self._on_outcome(outcome)
            except Exception:  # the caller's bug must not stop deliveries
                log.exception("on_outcome raised for batch %d; going on", outcome.seq)

    def _give(self, core: ProducerCore, ctl: Sock, push: Sock, now: float) -> bool:
        """Send what the session says, push what is due; True if intake is full."""
        self._send(ctl, core.session.take())
        for group, frames in core.messages(core.due(now)):
            try:
                push.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                return True  # the sink's pipe is full: wait until it takes more
            for sent in group:
                core.pushed(sent, now)
        return False

    def _wait(
        self, core: ProducerCore, ctl: Sock | None, push: Sock | None, watches: list[HandshakeWatch], blocked: bool
    ) -> dict[Any, int]:
        """Poll until something arrives, a caller wakes us, or the cores' next deadline; what is ready."""
        now = time.monotonic()
        due = core.session.next_deadline() if blocked else core.next_deadline()
        linger = self._handoff.linger_deadline(now)
        if linger is not None:
            due = min(due, linger)
        if self._intake_due is not None:
            due = min(due, self._intake_due)
        watched: list[tuple[Sock | int, int]] = [(self._wakeup.fileno(), zmq.POLLIN)]
        if ctl is not None:
            watched.append((ctl, zmq.POLLIN))
        if blocked and push is not None:
            watched.append((push, zmq.POLLOUT))
        watched += [(watch.monitor, zmq.POLLIN) for watch in watches]  # a failed handshake is news at once
        ready = self._poll(watched, due - now)
        if any(watch.monitor in ready for watch in watches):
            check_handshakes(*watches)
        return ready

    def _send(self, ctl: Sock, messages: list[p.Message]) -> None:
        for msg in messages:
            if not send(ctl, p.encode(msg)):
                # No connection to queue on, or the sink reads nothing: what is unsent is the
                # session's to notice (no welcome, no acks) and the resends' to make good.
                log.debug("sink %s takes nothing on control; %s not sent", self.settings.control, type(msg).__name__)

    def _open(self, ctl: Sock | None, push: Sock | None, watches: list[HandshakeWatch]) -> tuple[Sock, Sock]:
        self._close(ctl, push, watches)
        s = self.settings
        if self._intake_due is None and s.connect_timeout is not None and not self._handshakes.ever_succeeded:
            self._intake_due = time.monotonic() + s.connect_timeout
        push = socket(self._ctx, zmq.PUSH)
        ctl = socket(self._ctx, zmq.DEALER, max_frame=p.MAX_HEADER_BYTES)  # it receives headers only
        for sock, endpoint, what in ((push, s.intake, "intake endpoint"), (ctl, s.control, "control endpoint")):
            watches.append(secure_client(sock, s.curve, endpoint, self._handshakes))
            try:
                connect(sock, endpoint, what)
            except BaseException:
                self._close(ctl, push, watches)
                raise
        return ctl, push

    def _close(self, ctl: Sock | None, push: Sock | None, watches: list[HandshakeWatch]) -> tuple[None, None]:
        for watch in watches:
            watch.close()
        watches.clear()
        for sock in (ctl, push):
            if sock is not None:
                sock.close(linger=0)
        return None, None

    def _stopped_error(self) -> ZfanError:
        if isinstance(self.error, ZfanError):
            return self.error
        if self._stopping.is_set():
            return Closed("producer is closed")
        return ZfanError("producer's I/O thread has stopped")
