"""The asyncio producer: zfan.Producer's twin for code that runs on an event loop.

send() packs and batches on the caller's task, and waits, without blocking the event loop,
while the window of unacknowledged batches is full. One task owns both sockets (zmq.asyncio
ones) and turns the same ProducerLink as the threaded producer's I/O thread does: the same
session, resends, acks and outcomes, and the same errors.

One thing blocks the event loop: on the way to an error (no sink answered in time, a handshake
broken off) the I/O task asks the endpoint what it is, as the threaded one does
(zfan.nodes.probe), which takes up to a second when something listens there and says nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import zmq

from ..batching import Batch, Batcher, Outgoing
from ..calling import is_async
from ..config import ProducerSettings, settings_from
from ..delivery import BatchOutcome, Outcomes, Sent
from ..errors import Closed, DeliveryTimeout, OutcomeTimeout, ZfanError
from ..nodes.producer import ProducerLink, stopped_error
from ..packing import Packing
from ..partitions import unpartitioned
from .polling import Poll, aio_context

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import ProducerOptions

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds close() waits for the I/O task to say bye and end before cancelling it
# Seconds a caller sealing batches goes on before it lets the event loop run (the I/O task
# pushes, takes acks and beats; other tasks run): a send() that finds room in the window
# otherwise returns without waiting. Once per batch would cost the I/O task a turn per batch.
YIELD_EVERY = 0.005


class AsyncHandoff:
    """The batches on their way (zfan.batching.Outgoing) between the callers' tasks and the I/O
    task: all on one thread, so with no lock. Callers wait for room, acks or outcomes on a future
    the I/O task resolves when acks or outcomes come, or when it stops."""

    def __init__(self, batcher: Batcher, window: int, seal: Callable[[str, Batch], Sent], wake: Callable[[], None]):
        self._out = Outgoing(batcher, window, seal, wake)
        self._changed: asyncio.Future[None] | None = None
        self._yield_at = 0.0  # when a caller that seals a batch next lets the event loop run

    # --- the callers' side -------------------------------------------------------------------
    async def add(self, topic: str, packed: bytes, count: int) -> None:
        """Add packed records to their topic's open batch; waits while a batch they seal waits
        for room in the window."""
        now = time.monotonic()
        sealed = self._out.add(topic, packed, count, now)
        if not sealed:
            return
        for batch in sealed:
            await self._enqueue(topic, batch)
        if now >= self._yield_at:
            self._yield_at = now + YIELD_EVERY
            await asyncio.sleep(0)

    async def flush(self, timeout: float) -> None:
        """Seal every open batch and wait until all are acknowledged; DeliveryTimeout if not."""
        deadline = time.monotonic() + timeout
        out = self._out
        out.check()  # a producer that stopped says why, even with nothing left to flush
        while (open_ := out.batcher.take_any()) is not None:
            await self._enqueue(*open_, deadline=deadline, timeout=timeout)
        while out.unacked:
            out.check()
            if not await self._changes(deadline):
                raise DeliveryTimeout(out.unacked, timeout)

    async def join(self, timeout: float) -> Outcomes:
        """Flush, then wait until every batch has an outcome; OutcomeTimeout if not in time."""
        deadline = time.monotonic() + timeout
        await self.flush(timeout)
        out = self._out
        while out.unended:
            out.check()
            if not await self._changes(deadline):
                raise OutcomeTimeout(out.unended, timeout, out.outcomes.copy())
        return out.outcomes.copy()

    @property
    def unacked(self) -> int:
        return self._out.unacked

    @property
    def told(self) -> bool:
        """A caller has been given the error that stopped the I/O task."""
        return self._out.told

    @property
    def outcomes(self) -> Outcomes:
        return self._out.outcomes.copy()

    async def _enqueue(self, topic: str, batch: Batch, *, deadline: float | None = None, timeout: float = 0.0) -> None:
        """Wait for room, then queue the batch for the I/O task."""
        out = self._out
        while out.room <= 0:
            out.check()
            if not await self._changes(deadline) and deadline is not None and time.monotonic() >= deadline:
                raise DeliveryTimeout(out.unacked + 1, timeout)  # this one is not acknowledged either
        out.enqueue(topic, batch)

    async def _changes(self, deadline: float | None) -> bool:
        """Wait until acks or outcomes come or the I/O task stops (True), or the deadline passes."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        # Neither this wait's timeout nor its cancellation cancels the future the others wait on.
        done, _ = await asyncio.wait([self._changed], timeout=left)
        return bool(done)

    def _notify(self) -> None:
        if self._changed is not None:
            if not self._changed.done():
                self._changed.set_result(None)
            self._changed = None

    # --- the I/O task's side -----------------------------------------------------------------
    def take(self, now: float, linger: bool = True) -> list[Sent]:
        return self._out.take(now, linger)

    def linger_deadline(self, now: float, linger: bool = True) -> float | None:
        return self._out.linger_deadline(now, linger)

    def acked(self, n: int) -> None:
        self._out.acked(n)
        self._notify()

    def ended(self, outcomes: list[BatchOutcome]) -> None:
        self._out.ended(outcomes)
        self._notify()

    def stop(self, why: ZfanError) -> None:
        """The I/O task has ended: callers waiting, or calling later, get `why`."""
        self._out.stopped = why
        self._notify()


class AsyncProducer:
    """``async with AsyncProducer(intake=..., control=...) as prod: await prod.send({"v": 1}, topic="t")``

    Takes what zfan.Producer takes (ProducerSettings, or their fields as keyword options), and
    `context`, a zmq context, plain or zmq.asyncio (zmq's global one if None). `on_outcome(outcome)`
    is called for each batch as it ends, on the producer's I/O task: a plain function, kept short
    (an exception it raises is logged, not raised)."""

    def __init__(
        self,
        settings: ProducerSettings | None = None,
        *,
        context: zmq.Context[Any] | None = None,
        on_outcome: Callable[[BatchOutcome], None] | None = None,
        **options: Unpack[ProducerOptions],
    ) -> None:
        s = self.settings = settings_from("AsyncProducer", ProducerSettings, settings, options)
        unpartitioned("AsyncProducer", s)
        if on_outcome is not None and not callable(on_outcome):
            raise TypeError(f"on_outcome must be callable, not {type(on_outcome).__name__}")
        if is_async(on_outcome):
            raise TypeError(
                "on_outcome is called on the producer's I/O task and must return at once: give a plain "
                "function (it may start a task of its own)"
            )
        self._ctx = aio_context(context)
        self._on_outcome = on_outcome
        self._packing = Packing(s)
        self._wake: asyncio.Future[None] | None = None  # the I/O task's, while it waits
        self._handoff = AsyncHandoff(self._packing.batcher, s.window, self._packing.seal, self._wake_up)
        self._poll = Poll()
        self._task: asyncio.Task[None] | None = None
        self._link: ProducerLink | None = None
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        self.sent_records = 0
        self.connected = asyncio.Event()  # set while a sink has welcomed us

    # --- the caller's side -----------------------------------------------------------------
    async def start(self) -> AsyncProducer:
        """Start the I/O task (entering ``async with`` does); it dials the sink at once."""
        if self._closed:
            raise Closed("producer is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._main(), name="zfan-producer")
            await asyncio.sleep(0)  # its first turn: the sockets open
        return self

    async def send(self, record: Any, topic: str | None = None) -> None:
        """Queue one record. Waits while the window of unacknowledged batches is full."""
        topic = self._topic(topic)
        await self._handoff.add(topic, self._packing.pack(record), 1)
        self.sent_records += 1

    async def send_many(self, records: Iterable[Any], topic: str | None = None) -> None:
        """Queue records, as send() would one by one, for a fraction of the cost per record:
        what fills the open batch is packed in one call. A record that cannot be sent raises
        SerializationError; those before it are queued."""
        topic = self._topic(topic)
        for packed, count in self._packing.pieces(records, topic):
            await self._handoff.add(topic, packed, count)
            self.sent_records += count

    def _topic(self, topic: str | None) -> str:
        if self._closed:
            raise Closed("producer is closed")
        return self._packing.topic(topic)

    async def flush(self, timeout: float = 30.0) -> None:
        """Return once every record sent so far is acknowledged; raise DeliveryTimeout if not."""
        await self._handoff.flush(timeout)

    async def join(self, timeout: float = 30.0) -> Outcomes:
        """Flush, then wait until every batch sent so far is processed (its results stored) or
        dead-lettered; return what became of them all, counted since the producer started.
        Raises OutcomeTimeout (with the outcomes that did come) if that takes longer."""
        return await self._handoff.join(timeout)

    @property
    def outcomes(self) -> Outcomes:
        """What became of the batches that have an outcome so far."""
        return self._handoff.outcomes

    async def close(self, timeout: float = 30.0) -> None:
        """Flush, then stop. Raises DeliveryTimeout (after stopping) if the sink never acked.
        Closing again does nothing."""
        if self._closed:
            return
        told = self._handoff.told
        try:
            if self.running:
                await self.flush(timeout)
        except ZfanError:
            # Why the producer stopped, which send() or flush() has already raised: said once is enough.
            if not told:
                raise
        finally:
            self._closed = True
            await self._stop()

    async def __aenter__(self) -> AsyncProducer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def error(self) -> BaseException | None:
        """Why the I/O task ended early, if it did."""
        return self._error

    @property
    def unacked(self) -> int:
        return self._handoff.unacked

    @property
    def acked_records(self) -> int:
        return 0 if self._link is None else self._link.acked_records

    # --- the I/O task ----------------------------------------------------------------------
    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _stop(self) -> None:
        """Ask the I/O task to say bye and end, and wait for it: cancelled if it takes longer
        than STOP_TIMEOUT, or if the caller is (it closes its sockets as it ends, either way)."""
        self._stopping = True
        self._wake_up()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait([task], timeout=STOP_TIMEOUT)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

    async def _main(self) -> None:
        try:
            await self._serve()
        except Exception as exc:  # the task's end must reach whoever waits on the producer
            if not isinstance(exc, ZfanError):
                log.exception("producer stopped by an unexpected error")
            self._error = exc
        finally:
            self.connected.clear()
            self._handoff.stop(stopped_error(self._error, self._stopping, "I/O task"))

    async def _serve(self) -> None:
        link = self._link = ProducerLink(self.settings, self._ctx, self._handoff, self.connected, self._on_outcome)
        loop = asyncio.get_running_loop()
        ready: dict[Any, int] = {}
        try:
            while not self._stopping:
                if self._wake is None or self._wake.done():
                    self._wake = loop.create_future()  # before the link takes what callers sealed
                watched, due = link.turn(ready)
                ready = await self._poll(watched, due - time.monotonic(), self._wake)
            link.bye()
        finally:
            link.close()
