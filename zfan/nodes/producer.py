"""The producer: batches records, PUSHes them to the sink's intake and keeps each batch until
the sink acknowledges it on the control channel, after its ledger commit; then learns from
the sink what became of it (processed, or dead-lettered).

send() runs on the caller's thread and only packs and batches; one I/O thread owns both
sockets, sends, resends, heartbeats and takes acks and outcomes. What the I/O thread does on
each turn is a ProducerLink's, which the asyncio producer (zfan.aio) turns from a task.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from .. import protocol as p
from ..config import ProducerSettings, check_sinks, settings_from, sink_endpoint
from ..delivery import BatchOutcome, Outcomes, ProducerCore, Sent
from ..errors import Closed, DeliveryTimeout, OutcomeTimeout, SerializationError, ZfanError
from ..packing import Packing
from ..partitions import Router, split
from ..session import AllWelcomed, Dial, GaveUp, Joined, Lost, said
from .handoff import Handoff
from .probe import no_answer
from .security import Handshakes, HandshakeWatch, check_handshakes, secure_client
from .service import Service
from .transport import Ctx, Poll, Sock, connect, drain, plain, send, socket

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import ProducerOptions

log = logging.getLogger(__name__)

Watched = list[tuple[Any, int]]  # (a socket, or a file descriptor; POLLIN / POLLOUT) to poll
ROUTED_CHUNK = 10_000  # records send_many() routes to their partitions at a time


class Feed(Protocol):
    """The I/O loop's side of a producer's hand-off: what callers sealed, and what became of it."""

    def take(self, now: float, linger: bool = True) -> list[Sent]: ...

    def linger_deadline(self, now: float, linger: bool = True) -> float | None: ...

    def acked(self, n: int) -> None: ...

    def ended(self, outcomes: list[BatchOutcome]) -> None: ...


class Flag(Protocol):
    """threading.Event or asyncio.Event: set while a sink has welcomed us."""

    def set(self) -> None: ...

    def clear(self) -> None: ...


def open_sockets(
    ctx: zmq.Context[Any], s: ProducerSettings, handshakes: Handshakes, watches: list[HandshakeWatch], sink: int = 0
) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """The producer's control DEALER and intake PUSH, connected to sink number `sink` of the
    settings' endpoints, of `ctx`'s socket class; their handshake watches (intake's first) are
    appended to `watches`. One sink at a time: a PUSH to several would also feed a frozen one."""
    push = socket(ctx, zmq.PUSH)
    ctl = socket(ctx, zmq.DEALER, max_frame=p.MAX_HEADER_BYTES)  # it receives headers only
    opened: list[HandshakeWatch] = []
    intake, control = sink_endpoint(s.intake, sink), sink_endpoint(s.control, sink)
    try:
        for sock, endpoint, what in ((push, intake, "intake endpoint"), (ctl, control, "control endpoint")):
            opened.append(secure_client(sock, s.curve, endpoint, handshakes))
            connect(sock, endpoint, what)
    except BaseException:
        for watch in opened:
            watch.close()
        ctl.close(linger=0)
        push.close(linger=0)
        raise
    watches += opened
    return ctl, push


class ProducerLink:
    """A producer's sockets and session with its sink, with no waiting of its own: the I/O loop
    of either producer (a thread's, or an asyncio task's) calls turn(), polls what it returns,
    and calls it again with what was ready. `ctx` makes the sockets: a zmq.asyncio context
    makes ones an event loop waits on, read and written here through plain views of them."""

    def __init__(
        self,
        settings: ProducerSettings,
        ctx: zmq.Context[Any],
        feed: Feed,
        connected: Flag,
        on_outcome: Callable[[BatchOutcome], None] | None = None,
        partition: int | None = None,
    ) -> None:
        s = self.settings = settings
        self._ctx = ctx
        self._feed = feed
        self._connected = connected
        self._on_outcome = on_outcome
        self.core = ProducerCore(
            s.producer_id, s.timing, time.monotonic(), resend_after=s.resend_after, groups=True, partition=partition
        )
        self.core.session.connect_timeout = s.connect_timeout
        self.core.session.sinks = check_sinks(intake=s.intake, control=s.control)
        self._handshakes = Handshakes()
        self._watches: list[HandshakeWatch] = []
        self._sockets: tuple[zmq.Socket[Any], zmq.Socket[Any]] | None = None  # (ctl, push): polled, closed
        self._plain: tuple[Sock, Sock] | None = None  # the same, read and written
        # Until the intake connection's first handshake: when to give up on it (connect_timeout).
        self._intake_due: float | None = None
        self._dialled = sink_endpoint(s.control, 0)  # the control endpoint of the sink dialled last

    @property
    def acked_records(self) -> int:
        return self.core.window.acked_records

    @property
    def welcomed(self) -> bool:
        """A sink has welcomed us, and has not gone silent since."""
        return self.core.session.joined

    def turn(self, ready: Mapping[Any, int]) -> tuple[Watched, float]:
        """Take what the last poll found `ready` and what callers sealed, tick, dial or hang up as
        the session says, push what is due; return what to poll next and until when (a
        monotonic time). Raises why the producer cannot go on (NoSink, AuthError)."""
        core = self.core
        if any(watch.monitor in ready for watch in self._watches):
            check_handshakes(*self._watches)  # a failed handshake is news at once
        now = time.monotonic()
        if self._sockets is not None:
            self._take(ready, now)  # first: a sink heard from is not a sink lost
        event = core.tick(now)
        if isinstance(event, (Lost, GaveUp)):
            check_handshakes(*self._watches)  # a refused handshake, not silence, may be why
        if isinstance(event, GaveUp):
            raise no_answer(self.settings.control, "control", self.settings.connect_timeout or event.waited)
        if isinstance(event, Lost):
            self._say(event)
            self._connected.clear()
            # The intake connection may be just as dead, its batches stuck behind TCP's
            # backed-off retransmits long after the network heals: both are replaced.
            self.close()
        elif isinstance(event, Dial):
            self._open(event.sink)
        self._check_intake(now)
        blocked = self._give(now)
        return self._watched(blocked), self._deadline(blocked)

    def bye(self) -> None:
        """Say bye to the sink, if connected (the producer is stopping)."""
        if self._plain is not None:
            self.core.session.close()
            self._send(self.core.session.take())

    def close(self) -> None:
        """Close the sockets and their watches."""
        for watch in self._watches:
            watch.close()
        self._watches.clear()
        if self._sockets is not None:
            for sock in self._sockets:
                sock.close(linger=0)
        self._sockets = self._plain = None

    def _take(self, ready: Mapping[Any, int], now: float) -> None:
        """Take what callers sealed and what the sink sent."""
        assert self._sockets is not None and self._plain is not None
        core = self.core
        # Batches linger only while a sink takes them: for one that is away they fill up.
        for sent in self._feed.take(now, core.session.joined):
            core.add(sent)
        for frames in drain(self._plain[0]) if self._sockets[0] in ready else ():
            event, acked = core.received(frames, now)
            if acked:
                self._feed.acked(acked)
            self._say(event)
            if isinstance(event, Joined):
                self._connected.set()
            elif isinstance(event, Lost):
                self._connected.clear()
        ended = core.take_ended()
        if ended:
            self._feed.ended(ended)
            if self._on_outcome is not None:
                self._tell(ended)

    def _say(self, event: object) -> None:
        if isinstance(event, (Joined, Lost)) and (line := said(event, self._dialled)) is not None:
            log.log(*line)

    def _check_intake(self, now: float) -> None:
        """Give up on an intake endpoint where nothing completed a handshake within
        connect_timeout (its watch is the first): its batches could only wait for acks forever."""
        if self._intake_due is None:
            return
        if self._watches and self._watches[0].succeeded:
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

    def _give(self, now: float) -> bool:
        """Send what the session says, push what is due; True if intake is full."""
        if self._plain is None:
            return False
        core = self.core
        push = self._plain[1]
        self._send(core.session.take())
        for group, frames in core.messages(core.due(now)):
            try:
                push.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                return True  # the sink's pipe is full: wait until it takes more
            for sent in group:
                core.pushed(sent, now)
        return False

    def _watched(self, blocked: bool) -> Watched:
        watched: Watched = []
        if self._sockets is not None:
            ctl, push = self._sockets
            watched.append((ctl, zmq.POLLIN))
            if blocked:
                watched.append((push, zmq.POLLOUT))
        watched += [(watch.monitor, zmq.POLLIN) for watch in self._watches]  # a failed handshake is news at once
        return watched

    def _deadline(self, blocked: bool) -> float:
        """Until something arrives, a caller wakes us, or the core's next deadline."""
        now = time.monotonic()
        core = self.core
        due = core.session.next_deadline() if blocked else core.next_deadline()
        linger = self._feed.linger_deadline(now, core.session.joined)
        if linger is not None:
            due = min(due, linger)
        if self._intake_due is not None:
            due = min(due, self._intake_due)
        return due

    def _send(self, messages: list[p.Message]) -> None:
        assert self._plain is not None
        for msg in messages:
            if not send(self._plain[0], p.encode(msg)):
                # No connection to queue on, or the sink reads nothing: what is unsent is the
                # session's to notice (no welcome, no acks) and the resends' to make good.
                log.debug("sink %s takes nothing on control; %s not sent", self._dialled, type(msg).__name__)

    def _open(self, sink: int) -> None:
        self.close()
        s = self.settings
        self._dialled = sink_endpoint(s.control, sink)
        if self._intake_due is None and s.connect_timeout is not None and not self._handshakes.ever_succeeded:
            self._intake_due = time.monotonic() + s.connect_timeout
        ctl, push = self._sockets = open_sockets(self._ctx, s, self._handshakes, self._watches, sink)
        self._plain = (plain(ctl), plain(push))


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
        # One partition's batches, window and link for each sink that `sinks` names (or the
        # one sink of `intake` and `control`): a sink that is down holds back only its own.
        self._parts = split(s)
        self._packings = [Packing(part) for part in self._parts]
        self._handoffs = [
            Handoff(packing.batcher, part.window, self._wakeup, packing.seal)
            for part, packing in zip(self._parts, self._packings, strict=True)
        ]
        self._router = Router(len(self._parts), s.key) if s.sinks is not None else None
        self._packing = self._packings[0]  # packs and checks topics for every partition
        self._pack, self._add = self._packing.pack, self._handoffs[0].add  # looked up once
        self._closed = False
        self._links: list[ProducerLink] = []  # made by the I/O thread
        self.sent_records = 0
        self.connected = threading.Event()  # set while every partition's sink has welcomed us
        self._poll = Poll()

    # --- the caller's side -----------------------------------------------------------------
    def send(self, record: Any, topic: str | None = None) -> None:
        """Queue one record. Blocks while the window of unacknowledged batches is full (with
        partitions, that of the record's partition)."""
        if self._closed:  # (what _topic() does, inlined: this is the path of every record)
            raise Closed("producer is closed")
        topic = self._packing.topic(topic)
        if self._router is None:
            self._add(topic, self._pack(record), 1)
        else:
            self._handoffs[self._router.of(record, topic)].add(topic, self._pack(record), 1)
        self.sent_records += 1

    def send_many(self, records: Iterable[Any], topic: str | None = None) -> None:
        """Queue records, as send() would one by one, for a fraction of the cost per record:
        what fills the open batch is packed in one call. A record that cannot be sent raises
        SerializationError; those before it are queued, none after it."""
        topic = self._topic(topic)
        if self._router is None:
            handoff = self._handoffs[0]
            for packed, count in self._packing.pieces(records, topic):
                handoff.add(topic, packed, count)
                self.sent_records += count
            return
        it = iter(records)
        while chunk := list(islice(it, ROUTED_CHUNK)):
            try:  # every partition's share packed before any is queued
                parts = self._router.split(chunk, topic)
                planned = [packing.planned(part, topic) for packing, part in zip(self._packings, parts, strict=True)]
            except SerializationError:
                # Nothing of the chunk is queued yet: now one at a time, in order, up to the
                # record at fault, which raises.
                for record in chunk:
                    self.send(record, topic)
                raise
            for handoff, pieces in zip(self._handoffs, planned, strict=True):
                for packed, count in pieces:
                    handoff.add(topic, packed, count)
                    self.sent_records += count

    def _topic(self, topic: str | None) -> str:
        if self._closed:
            raise Closed("producer is closed")
        return self._packing.topic(topic)

    def flush(self, timeout: float = 30.0) -> None:
        """Return once every record sent so far is acknowledged; raise DeliveryTimeout if not
        (naming, with partitions, the sinks that hold them)."""
        if len(self._handoffs) == 1:
            return self._handoffs[0].flush(timeout)
        deadline = time.monotonic() + timeout
        for handoff in self._handoffs:  # every partition's batches on their way first
            handoff.seal_what_fits()
        late = False
        for handoff in self._handoffs:  # then each waited for, a sink that is away not in the way of the rest
            try:
                handoff.flush(max(0.0, deadline - time.monotonic()))
            except DeliveryTimeout:
                late = True
        if late:
            raise DeliveryTimeout(self.unacked, timeout, self._held("unacked"))

    def join(self, timeout: float = 30.0) -> Outcomes:
        """Flush, then wait until every batch sent so far is processed (its results stored) or
        dead-lettered; return what became of them all, counted since the producer started.
        Raises OutcomeTimeout (with the outcomes that did come) if that takes longer."""
        if len(self._handoffs) == 1:
            return self._handoffs[0].join(timeout)
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        late = False
        for handoff in self._handoffs:
            try:
                handoff.join(max(0.0, deadline - time.monotonic()))
            except OutcomeTimeout:
                late = True
        if late:
            unended = sum(handoff.unended for handoff in self._handoffs)
            raise OutcomeTimeout(unended, timeout, self.outcomes, self._held("unended"))
        return self.outcomes

    def _held(self, count: str) -> str:
        """What each partition's sink still holds back, for a timeout's message."""
        held = []
        for i, (part, handoff) in enumerate(zip(self._parts, self._handoffs, strict=True)):
            n, unsent = getattr(handoff, count), handoff.open_records
            if n or unsent:
                also = f", and {unsent} record(s) not yet in a batch" if unsent else ""
                held.append(f"partition {i} ({part.control}): {n}{also}")
        return "; ".join(held)

    @property
    def outcomes(self) -> Outcomes:
        """What became of the batches that have an outcome so far."""
        if len(self._handoffs) == 1:
            return self._handoffs[0].outcomes
        return Outcomes.total(handoff.outcomes for handoff in self._handoffs)

    @property
    def partitions(self) -> int:
        """How many key-partitioned sinks the producer sends to (1 without `sinks`)."""
        return len(self._parts)

    @property
    def stuck(self) -> list[int]:
        """The partitions whose sink has not welcomed us, or whose window is full: records of
        their keys wait (send() of one blocks while its window is full)."""
        links = self._links
        return [
            i
            for i, handoff in enumerate(self._handoffs)
            if handoff.room <= 0 or (i < len(links) and not links[i].welcomed)
        ]

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then stop. Raises DeliveryTimeout (after stopping) if the sink never acked."""
        if self._closed:
            return
        told = any(handoff.told for handoff in self._handoffs)
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
        return sum(handoff.unacked for handoff in self._handoffs)

    @property
    def acked_records(self) -> int:
        return sum(link.acked_records for link in self._links)

    # --- the I/O thread --------------------------------------------------------------------
    def _serve(self) -> None:
        welcomed = AllWelcomed(self.connected, len(self._parts))
        for i, (part, handoff) in enumerate(zip(self._parts, self._handoffs, strict=True)):
            partition = None if self.settings.sinks is None else i
            self._links.append(ProducerLink(part, self._ctx, handoff, welcomed.flag(i), self._on_outcome, partition))
        wakeup = self._wakeup.fileno()
        ready: dict[Any, int] = {}
        try:
            self._ready.set()
            while not self._stopping.is_set():
                if wakeup in ready:
                    self._wakeup.clear()  # before the links take what callers sealed
                watched: Watched = [(wakeup, zmq.POLLIN)]
                due = math.inf
                for link in self._links:
                    more, when = link.turn(ready)
                    watched += more
                    due = min(due, when)
                ready = self._poll(watched, due - time.monotonic())
            for link in self._links:
                link.bye()
        finally:
            for link in self._links:
                link.close()

    def _ended(self) -> None:
        why = stopped_error(self.error, self._stopping.is_set())
        for handoff in self._handoffs:
            handoff.stop(why)


def stopped_error(error: BaseException | None, stopping: bool, loop: str = "I/O thread") -> ZfanError:
    """What a producer's callers are told once its I/O loop has ended: why it ended."""
    if isinstance(error, ZfanError):
        return error
    if stopping:
        return Closed("producer is closed")
    return ZfanError(f"producer's {loop} has stopped")
