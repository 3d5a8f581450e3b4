"""Which worker runs which batch: the backlog of batches waiting for a worker, each worker's
credit and the leases it holds, and what becomes of a lease that ends without a result (a
replay, at the cost of an attempt or not, alone if it is suspect, or a dead letter).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from .errors import ProtocolError
from .ledger import Ledger, Pending

log = logging.getLogger(__name__)

RECORDS_IN_FLIGHT = 4000  # records leased to one worker beyond which it gets no third batch


class Backlog:
    """The batches waiting for a worker, oldest first, and the payloads of those that came in
    while `cache_bytes` had room: those are leased without reading them back from the ledger."""

    def __init__(self, ledger: Ledger, pending: Iterable[Pending], cache_bytes: int) -> None:
        self._ledger = ledger
        self.queue: deque[Pending] = deque(pending)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, bytes] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, batch: Pending, payload: bytes) -> None:
        """A batch just stored: to the back."""
        self.queue.append(batch)
        if self._cached + len(payload) <= self.cache_bytes:
            self._cache[batch.batch_id] = payload
            self._cached += len(payload)

    def append(self, batch: Pending) -> None:
        """A batch pending again on request (a requeued dead letter): to the back, read from the
        ledger when leased."""
        self.queue.append(batch)

    def put_back(self, batch: Pending) -> None:
        """A batch whose lease ended: to the front, since a replayed batch is the oldest work there is."""
        self.queue.appendleft(batch)

    def first(self) -> Pending:
        return self.queue[0]

    def take(self) -> tuple[Pending, bytes]:
        batch = self.queue.popleft()
        payload = self._cache.pop(batch.batch_id, None)
        if payload is None:
            payload = self._ledger.payload(batch.batch_id)
        else:
            self._cached -= len(payload)
        return batch, payload


@dataclass
class WorkerState:
    rid: bytes
    name: str
    credit: int
    # (batch_id, attempt) -> records, of every lease this worker holds, including leases the
    # sink has since revoked (timed out): the worker's credit returns only when it answers.
    held: dict[tuple[int, int], int] = field(default_factory=dict)
    records: int = 0  # records in the batches held
    alone: tuple[int, int] | None = None  # a suspect lease it runs with nothing beside it
    draining: bool = False  # it asked for nothing more: it is finishing what it holds, to stop
    # With the groups feature: the most bytes one frame and one message to it may have (a
    # turn's leases to it go in as few messages as these allow); None: one message per lease.
    groups: tuple[int, int] | None = None

    @property
    def free(self) -> int:
        """Leases it may take now: up to its credit, but beyond two only while it holds fewer
        than RECORDS_IN_FLIGHT records. Small batches need many in flight to hide the round
        trip; big ones only fill the worker's memory and delay a replay."""
        if self.draining or self.alone is not None or (len(self.held) >= 2 and self.records >= RECORDS_IN_FLIGHT):
            return 0
        return self.credit - len(self.held)

    def hold(self, key: tuple[int, int], count: int) -> None:
        self.held[key] = count
        self.records += count

    def release(self, key: tuple[int, int]) -> None:
        self.records -= self.held.pop(key, 0)
        if key == self.alone:
            self.alone = None


def _sizes(lease: p.Lease) -> tuple[int, int]:
    """A lease's payload bytes, and at most what it adds to a group's header."""
    return len(lease.payload), len(lease.topic.encode()) + 32


def _leases(epoch: int, group: list[p.Lease]) -> p.Leases:
    return p.Leases(
        epoch,
        [lease.batch_id for lease in group],
        [lease.attempt for lease in group],
        [lease.topic for lease in group],
        [lease.count for lease in group],
        [len(lease.payload) for lease in group],
        b"".join(lease.payload for lease in group),
    )


@dataclass
class Lease:
    rid: bytes
    attempt: int
    deadline: float


class Leasing:
    """Leases batches from the backlog to workers with free credit, and settles the leases.

    It sends through `send`, asks `fresh` whether a worker was heard recently enough to be
    given work, and hands a batch out of attempts to `dead_letter`. `counts` and `stats` are
    the sink's shared counters."""

    def __init__(
        self,
        ledger: Ledger,
        backlog: Backlog,
        *,
        epoch: int,
        max_attempts: int,
        batch_timeout: float,
        counts: dict[str, int],
        stats: Counter[str],
        send: Callable[[bytes, p.Message], None],
        fresh: Callable[[bytes, float], bool],
        dead_letter: Callable[[int, str], None],
    ) -> None:
        self._ledger = ledger
        self._backlog = backlog
        self._epoch = epoch
        self._max_attempts = max_attempts
        self._batch_timeout = batch_timeout
        self._counts = counts
        self._stats = stats
        self._send = send
        self._fresh = fresh
        self._dead_letter = dead_letter
        self.leases: dict[int, Lease] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.closed = False  # the sink is stopping: nothing more is leased

    def join(self, rid: bytes, name: str, credit: int) -> None:
        self.workers[rid] = WorkerState(rid, name, credit)
        log.info("worker %s joined with credit %d", name, credit, extra={"worker": name})

    def drain(self, rid: bytes) -> None:
        """A worker that is stopping: it gets no new lease, and answers for those it holds."""
        worker = self.workers.get(rid)
        if worker is None:
            raise ProtocolError("not a worker", "only a worker drains")
        worker.draining = True
        log.info(
            "worker %s is draining: %d batch(es) to finish",
            worker.name,
            len(worker.held),
            extra={"worker": worker.name},
        )

    def dispatch(self, now: float) -> None:
        """Lease what waits to the fresh workers with free credit, the freest first."""
        if self.closed or not self._backlog or not self.workers:
            return
        workers = [w for w in self.workers.values() if self._fresh(w.rid, now)]
        leased: list[tuple[int, int]] = []
        grouped: dict[bytes, list[p.Lease]] = {}  # leases to workers that take groups, sent last
        while workers and self._backlog:
            first = self._backlog.first()
            if first.suspect:
                # Alone on an idle worker, so that if it kills that worker too, it is the one to pay.
                worker = next((w for w in workers if not w.held), None)
                if worker is None:
                    break  # suspects are the oldest work: the rest waits behind them
                worker.alone = (first.batch_id, first.attempts + 1)
            else:
                worker = max(workers, key=lambda w: w.free)
                if worker.free <= 0:
                    break
            batch, payload = self._backlog.take()
            attempt = batch.attempts + 1
            leased.append((batch.batch_id, attempt))
            worker.hold((batch.batch_id, attempt), batch.count)
            self.leases[batch.batch_id] = Lease(worker.rid, attempt, now + self._batch_timeout)
            self._counts["pending"] -= 1
            self._counts["leased"] += 1
            lease = p.Lease(self._epoch, batch.batch_id, attempt, batch.topic, batch.count, payload)
            if worker.groups is None:
                self._send(worker.rid, lease)
            else:
                grouped.setdefault(worker.rid, []).append(lease)
        if leased:
            self._ledger.lease(leased)
        for rid, leases in grouped.items():
            max_frame, max_message = self.workers[rid].groups or (0, 0)  # set: they were grouped
            for group in p.grouped(leases, _sizes, max_frame, max_message):
                self._send(rid, group[0] if len(group) == 1 else _leases(self._epoch, group))

    def can_lease(self, now: float) -> bool:
        """Whether batches wait that a worker could take now (they went back after the turn's leasing)."""
        return (
            not self.closed
            and bool(self._backlog)
            and any(w.free > 0 and self._fresh(w.rid, now) for w in self.workers.values())
        )

    def next_deadline(self) -> float | None:
        """When the first lease times out (None with no leases)."""
        return min(lease.deadline for lease in self.leases.values()) if self.leases else None

    def settle(self, rid: bytes, epoch: int, batch_id: int, attempt: int) -> bool:
        """Close the lease a worker answered for; False (and counted) if the answer is fenced."""
        worker = self.workers.get(rid)
        if worker is None:
            raise ProtocolError("not a worker", "results come only from workers")
        worker.release((batch_id, attempt))  # its credit is back, whatever the verdict
        lease = self.leases.get(batch_id)
        if epoch != self._epoch or lease is None or lease.rid != rid or lease.attempt != attempt:
            self._stats["fenced results"] += 1
            return False
        del self.leases[batch_id]
        self._counts["leased"] -= 1
        return True

    def failed(self, rid: bytes, msg: p.Failed) -> None:
        if self.settle(rid, msg.epoch, msg.batch_id, msg.attempt):
            self._stats["batches failed"] += 1
            self._ended(msg.batch_id, msg.attempt, msg.error)

    def expire(self, now: float) -> None:
        """End the leases past their deadline. The worker keeps each batch in `held` (its credit
        stays used) until it answers."""
        for batch_id in [b for b, lease in self.leases.items() if lease.deadline <= now]:
            lease = self.leases.pop(batch_id)
            self._counts["leased"] -= 1
            self._ended(batch_id, lease.attempt, f"batch timeout: no result after {self._batch_timeout:g} s")
            self._stats["batch timeouts"] += 1

    def drop(self, rid: bytes, why: str, *, fault: bool = False) -> None:
        """Forget a worker (nothing if `rid` is none); its leases go back to the backlog. With
        `fault` (it died or vanished, perhaps because of a batch it ran), a batch pays an attempt
        only where it is the one that can have done it: the worker held no other. When it held
        several, the one it was running cannot be told (its results may have died unsent with
        it), so none pays yet: each is run again alone, and pays if it kills that worker too."""
        worker = self.workers.pop(rid, None)
        if worker is None:
            return
        live = [
            (b, a)
            for b, a in worker.held
            if (lease := self.leases.get(b)) is not None and lease.rid == rid and lease.attempt == a
        ]
        cut = why == "silent" and not fault
        (log.warning if live else log.info)(
            "worker %s gone (%s); replaying %d batch(es)%s",
            worker.name,
            why,
            len(live),
            " at no cost of an attempt: every peer fell silent at once, the sink's own link failed" if cut else "",
            extra={"worker": worker.name, "count": len(live)},
        )
        # Newest first, since each goes to the front of the queue: they end up oldest first.
        for batch_id, attempt in sorted(live, reverse=True):
            del self.leases[batch_id]
            self._counts["leased"] -= 1
            self._ended(
                batch_id,
                attempt,
                f"worker {worker.name} {why} (attempt {attempt})",
                charge=fault and len(live) == 1,
                suspect=fault and len(live) > 1,
            )

    def status(self, idle_ms: Callable[[bytes], int | None]) -> list[dict[str, Any]]:
        return [
            {
                "name": w.name,
                "credit": w.credit,
                "in_flight": len(w.held),
                "idle_ms": idle_ms(w.rid),
                "draining": w.draining,
            }
            for w in self.workers.values()
        ]

    def _ended(self, batch_id: int, attempt: int, error: str, *, charge: bool = True, suspect: bool = False) -> None:
        """A lease ended without a result: replay the batch, or dead-letter it at max attempts.
        A lease that ended through no fault of the batch (`charge` false) gives its attempt back;
        one that may have been its fault (`suspect`) is replayed alone to find out."""
        topic, count, _, _ = self._ledger.batch_info(batch_id)
        if not charge:
            attempt -= 1
            self._ledger.release(batch_id, error, attempts=attempt)
            self._backlog.put_back(Pending(batch_id, topic, count, attempt, suspect))
            self._counts["pending"] += 1
            self._stats["replays"] += 1
            self._stats["replays not charged"] += 1
        elif attempt >= self._max_attempts:
            self._dead_letter(batch_id, error)
            self._counts["dead"] += 1
            log.warning(
                "batch %d dead-lettered after %d attempts: %s",
                batch_id,
                attempt,
                error.strip().splitlines()[-1] if error.strip() else "",
                extra={"batch": batch_id, "topic": topic, "attempt": attempt},
            )
        else:
            self._ledger.release(batch_id, error)
            self._backlog.put_back(Pending(batch_id, topic, count, attempt))
            self._counts["pending"] += 1
            self._stats["replays"] += 1
