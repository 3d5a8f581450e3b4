"""The producer's hand-off between the threads that call send() and its I/O thread.

One lock guards the batches on their way (zfan.batching.Outgoing); one condition lets a caller
wait for room in the window (or for every batch to be acknowledged, in flush, or to have ended,
in join); one wake-up pipe tells the I/O thread that the queue is no longer empty or that a new
batch started to linger. Nothing polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..batching import Batch, Batcher, Outgoing
from ..delivery import BatchOutcome, Outcomes, Sent
from ..errors import DeliveryTimeout, OutcomeTimeout, ZfanError
from .transport import Wakeup


class Handoff:
    def __init__(self, batcher: Batcher, window: int, wakeup: Wakeup, seal: Callable[[str, Batch], Sent]) -> None:
        # One lock, taken for every record (a plain Lock is cheapest); the condition waits on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._out = Outgoing(batcher, window, seal, wakeup.set)

    # --- the callers' side -------------------------------------------------------------------
    def add(self, topic: str, packed: bytes, count: int) -> None:
        """Add packed records to their topic's open batch; blocks while a batch they seal waits
        for room in the window."""
        with self._lock:
            for batch in self._out.add(topic, packed, count, time.monotonic()):
                self._enqueue(topic, batch)

    def seal_what_fits(self) -> None:
        """Seal the open batches the window has room for, now, without waiting."""
        out = self._out
        with self._lock:
            while out.room > 0 and (open_ := out.batcher.take_any()) is not None:
                out.enqueue(*open_)

    @property
    def open_records(self) -> int:
        """Records in batches not yet sealed."""
        with self._lock:
            return len(self._out.batcher)

    def flush(self, timeout: float) -> None:
        """Seal every open batch and wait until all are acknowledged; DeliveryTimeout if not."""
        deadline = time.monotonic() + timeout
        out = self._out
        with self._lock:
            out.check()  # a producer that stopped says why, even with nothing left to flush
            while (open_ := out.batcher.take_any()) is not None:
                self._enqueue(*open_, deadline=deadline, timeout=timeout)
            while out.unacked:
                out.check()
                if not self._cond.wait(deadline - time.monotonic()):
                    raise DeliveryTimeout(out.unacked, timeout)

    def join(self, timeout: float) -> Outcomes:
        """Flush, then wait until every batch has an outcome; OutcomeTimeout if not in time."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        out = self._out
        with self._lock:
            while out.unended:
                out.check()
                if not self._cond.wait(deadline - time.monotonic()):
                    raise OutcomeTimeout(out.unended, timeout, out.outcomes.copy())
            return out.outcomes.copy()

    @property
    def unacked(self) -> int:
        return self._out.unacked

    @property
    def unended(self) -> int:
        return self._out.unended

    @property
    def room(self) -> int:
        """Places left in the window."""
        return self._out.room

    @property
    def told(self) -> bool:
        """A caller has been given the error that stopped the I/O thread."""
        return self._out.told

    @property
    def outcomes(self) -> Outcomes:
        with self._lock:
            return self._out.outcomes.copy()

    def _enqueue(self, topic: str, batch: Batch, *, deadline: float | None = None, timeout: float = 0.0) -> None:
        """Under the lock: wait for room, then queue the batch for the I/O thread."""
        out = self._out
        while out.room <= 0:
            out.check()
            left = None if deadline is None else deadline - time.monotonic()
            if not self._cond.wait(left) and deadline is not None and time.monotonic() >= deadline:
                raise DeliveryTimeout(out.unacked + 1, timeout)  # this one is not acknowledged either
        out.enqueue(topic, batch)

    # --- the I/O thread's side ---------------------------------------------------------------
    def take(self, now: float, linger: bool = True) -> list[Sent]:
        """Sealed batches, and the open ones that have lingered long enough if the window has
        room for them. Clear the wake-up before calling, so that no wake-up is lost."""
        with self._lock:
            return self._out.take(now, linger)

    def linger_deadline(self, now: float, linger: bool = True) -> float | None:
        """When the oldest open batch is due, if the window has room for it."""
        with self._lock:
            return self._out.linger_deadline(now, linger)

    def acked(self, n: int) -> None:
        with self._lock:
            self._out.acked(n)
            self._cond.notify_all()

    def ended(self, outcomes: list[BatchOutcome]) -> None:
        with self._lock:
            self._out.ended(outcomes)
            self._cond.notify_all()

    def stop(self, why: ZfanError) -> None:
        """The I/O thread has ended: callers waiting, or calling later, get `why`."""
        with self._lock:
            self._out.stopped = why
            self._cond.notify_all()
