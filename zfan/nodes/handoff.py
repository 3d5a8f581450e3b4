"""The producer's hand-off between the threads that call send() and its I/O thread.

One lock guards the open batches and one queue of sealed ones; one condition lets a caller
wait for room in the window (or for every batch to be acknowledged, in flush, or to have
ended, in join); one wake-up pipe tells the I/O thread that the queue is no longer empty or
that a new batch started to linger. Nothing polls.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ..batching import Batch, Batcher
from ..delivery import BatchOutcome, Outcomes, Sent
from ..errors import DeliveryTimeout, OutcomeTimeout, ZfanError
from .transport import Wakeup


class Handoff:
    def __init__(self, batcher: Batcher, window: int, wakeup: Wakeup, seal: Callable[[str, Batch], Sent]) -> None:
        self._batcher = batcher
        self._seal = seal  # numbers and encodes a batch (under the lock, so seqs follow the queue)
        self._wakeup = wakeup
        # One lock, taken for every record (a plain Lock is cheapest); the condition waits on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[Sent] = deque()
        self._room = window  # places left in the window: sealed batches count until acked
        self._unacked = 0  # sealed and not yet acknowledged
        self._unended = 0  # sealed and no outcome yet
        self._outcomes = Outcomes()
        self._stopped: ZfanError | None = None  # why the I/O thread will take nothing more
        self.told = False  # a caller has been given `_stopped`

    # --- the callers' side -------------------------------------------------------------------
    def add(self, topic: str, packed: bytes, count: int) -> None:
        """Add packed records to their topic's open batch; blocks while a batch they seal waits
        for room in the window."""
        # The path of every record: kept short.
        with self._lock:
            if self._stopped is not None:
                self.told = True
                raise self._stopped
            opened = self._batcher.empty  # a first open batch: the I/O thread must time its linger
            sealed = self._batcher.add(topic, packed, time.monotonic(), count)
            if sealed:
                for batch in sealed:
                    self._enqueue(topic, batch)
            elif opened and not self._queue:  # (with a queue, a wake-up is on its way already)
                self._wakeup.set()

    def flush(self, timeout: float) -> None:
        """Seal every open batch and wait until all are acknowledged; DeliveryTimeout if not."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._check()  # a producer that stopped says why, even with nothing left to flush
            while (open_ := self._batcher.take_any()) is not None:
                self._enqueue(*open_, deadline=deadline, timeout=timeout)
            while self._unacked:
                self._check()
                if not self._cond.wait(deadline - time.monotonic()):
                    raise DeliveryTimeout(self._unacked, timeout)

    def join(self, timeout: float) -> Outcomes:
        """Flush, then wait until every batch has an outcome; OutcomeTimeout if not in time."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._lock:
            while self._unended:
                self._check()
                if not self._cond.wait(deadline - time.monotonic()):
                    raise OutcomeTimeout(self._unended, timeout, self._outcomes.copy())
            return self._outcomes.copy()

    @property
    def unacked(self) -> int:
        return self._unacked

    @property
    def outcomes(self) -> Outcomes:
        with self._lock:
            return self._outcomes.copy()

    def _enqueue(self, topic: str, batch: Batch, *, deadline: float | None = None, timeout: float = 0.0) -> None:
        """Under the lock: wait for room, then queue the batch for the I/O thread."""
        while self._room <= 0:
            self._check()
            left = None if deadline is None else deadline - time.monotonic()
            if not self._cond.wait(left) and deadline is not None and time.monotonic() >= deadline:
                raise DeliveryTimeout(self._unacked + 1, timeout)  # this one is not acknowledged either
        self._room -= 1
        self._unacked += 1
        self._unended += 1
        self._queue.append(self._seal(topic, batch))
        if len(self._queue) == 1:
            self._wakeup.set()

    def _check(self) -> None:
        if self._stopped is not None:
            self.told = True
            raise self._stopped

    # --- the I/O thread's side ---------------------------------------------------------------
    def take(self, now: float) -> list[Sent]:
        """Sealed batches, and the open ones that have lingered long enough if the window has
        room for them. Clear the wake-up before calling, so that no wake-up is lost."""
        with self._lock:
            while self._room > 0 and (due := self._batcher.take_due(now)) is not None:
                self._room -= 1
                self._unacked += 1
                self._unended += 1
                self._queue.append(self._seal(*due))
            out = list(self._queue)
            self._queue.clear()
            return out

    def linger_deadline(self, now: float) -> float | None:
        """When the oldest open batch is due, if the window has room for it."""
        with self._lock:
            if self._room <= 0:
                return None  # an ack comes first, and that wakes the I/O thread anyway
            due = self._batcher.next_due(now)
            return None if due is None else now + due

    def acked(self, n: int) -> None:
        with self._lock:
            self._room += n
            self._unacked -= n
            self._cond.notify_all()

    def ended(self, outcomes: list[BatchOutcome]) -> None:
        with self._lock:
            for outcome in outcomes:
                self._outcomes.add(outcome)
            self._unended -= len(outcomes)
            self._cond.notify_all()

    def stop(self, why: ZfanError) -> None:
        """The I/O thread has ended: callers waiting, or calling later, get `why`."""
        with self._lock:
            self._stopped = why
            self._cond.notify_all()
