"""Which worker runs which batch: the backlog of batches waiting for a worker (a queue per
route, and the failed ones waiting out their backoff), each worker's route, credit and the
leases it holds, and what becomes of a lease that ends without a result (a replay, at the cost
of an attempt or not, alone if it is suspect, after a backoff, or a dead letter).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from .errors import ProtocolError
from .ledger import Ledger, Pending
from .routing import DEFAULT_ROUTE, RetryPolicy, Routes

log = logging.getLogger(__name__)

RECORDS_IN_FLIGHT = 4000  # records leased to one worker beyond which it gets no third batch


class Backlog:
    """The batches waiting for a worker, a queue per route, oldest first; the failed batches
    waiting out their backoff before they join their queue again; and the payloads of those
    that came in while `cache_bytes` had room: those are leased without reading them back from
    the ledger."""

    def __init__(
        self, ledger: Ledger, pending: Iterable[Pending], cache_bytes: int, routes: Routes | None = None
    ) -> None:
        self._ledger = ledger
        self.routes = routes or Routes()
        self.queues: dict[str, deque[Pending]] = {}
        self._backoff: list[tuple[float, int, Pending]] = []  # (when it may go again, batch id, batch)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, bytes] = {}
        self._cached = 0
        for batch in pending:
            self.append(batch)

    def __len__(self) -> int:
        """Batches that a worker of their route could take now."""
        return sum(map(len, self.queues.values()))

    @property
    def queue(self) -> deque[Pending]:
        """Every batch ready to lease, route after route."""
        return deque(b for q in self.queues.values() for b in q)

    def route(self, batch: Pending) -> str:
        return self.routes.of(batch.topic)

    def _queue(self, batch: Pending) -> deque[Pending]:
        route = self.routes.of(batch.topic)
        queue = self.queues.get(route)
        if queue is None:
            queue = self.queues[route] = deque()
        return queue

    def add(self, batch: Pending, payload: bytes) -> None:
        """A batch just stored: to the back."""
        self._queue(batch).append(batch)
        if self._cached + len(payload) <= self.cache_bytes:
            self._cache[batch.batch_id] = payload
            self._cached += len(payload)

    def append(self, batch: Pending) -> None:
        """A batch pending again on request (a requeued dead letter), or found pending at start:
        to the back, read from the ledger when leased."""
        self._queue(batch).append(batch)

    def put_back(self, batch: Pending) -> None:
        """A batch whose lease ended: to the front, since a replayed batch is the oldest work there is."""
        self._queue(batch).appendleft(batch)

    def hold(self, batch: Pending, until: float) -> None:
        """A failed batch that may go again only at `until` (its route's backoff)."""
        heapq.heappush(self._backoff, (until, batch.batch_id, batch))

    def release_due(self, now: float) -> None:
        """Failed batches whose backoff is over go to the front of their queues, the longest waiting first."""
        due: list[Pending] = []
        while self._backoff and self._backoff[0][0] <= now:
            due.append(heapq.heappop(self._backoff)[2])
        for batch in reversed(due):
            self.put_back(batch)

    def next_due(self) -> float | None:
        return self._backoff[0][0] if self._backoff else None

    def held_back(self) -> Counter[str]:
        """Batches waiting out a backoff, by route."""
        return Counter(self.routes.of(b.topic) for _, _, b in self._backoff)

    def take(self, route: str) -> tuple[Pending, bytes]:
        batch = self.queues[route].popleft()
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
    route: str = DEFAULT_ROUTE
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
        # The same key held already: a requeued dead letter (its attempts from zero again),
        # leased to a worker still stuck on its old lease of that number. One lease, counted once.
        self.records -= self.held.get(key, 0)
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
        retries: dict[str, RetryPolicy] | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._default = RetryPolicy(max_attempts)
        self._retries = {
            route: policy if policy.max_attempts is not None else dataclasses.replace(policy, max_attempts=max_attempts)
            for route, policy in (retries or {}).items()
        }
        self._clock = clock
        self._unserved: set[str] = set()  # routes said to have batches and no worker
        self.leases: dict[int, Lease] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.closed = False  # the sink is stopping: nothing more is leased

    def join(self, rid: bytes, name: str, credit: int, route: str = DEFAULT_ROUTE) -> None:
        self.workers[rid] = WorkerState(rid, name, credit, route)
        self._unserved.discard(route)
        serves = "" if route == DEFAULT_ROUTE else f" for route {route}"
        log.info("worker %s joined%s with credit %d", name, serves, credit, extra={"worker": name})
        if route not in self._backlog.routes.names:
            log.warning(
                "worker %s serves route %r, which no topic is routed to (--route PREFIX=%s): it gets nothing",
                name,
                route,
                route,
                extra={"worker": name},
            )

    def policy(self, topic: str) -> RetryPolicy:
        """The retry policy of a topic's route: its own (with the sink's max_attempts if it sets
        none), or max_attempts retried at once."""
        return self._retries.get(self._backlog.routes.of(topic)) or self._default

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
        """Lease what waits to the fresh workers of its route with free credit, the freest first."""
        self._backlog.release_due(now)
        if self.closed or not self._backlog or not self.workers:
            return
        fresh = [w for w in self.workers.values() if self._fresh(w.rid, now)]
        leased: list[tuple[int, int]] = []
        grouped: dict[bytes, list[p.Lease]] = {}  # leases to workers that take groups, sent last
        for route, queue in self._backlog.queues.items():
            if not queue:
                continue
            workers = [w for w in fresh if w.route == route]
            if not workers:
                self._no_worker(route, len(queue))
            while workers and queue:
                first = queue[0]
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
                batch, payload = self._backlog.take(route)
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

    def _no_worker(self, route: str, waiting: int) -> None:
        """Batches of a route that no connected worker serves wait for one: said once, until one joins."""
        if route in self._unserved or any(w.route == route for w in self.workers.values()):
            return
        self._unserved.add(route)
        log.warning(
            "%d batch(es) of route %r wait: no worker serves it (start one with --app %s=MODULE:FUNCTION)",
            waiting,
            route,
            route,
            extra={"count": waiting},
        )

    def can_lease(self, now: float) -> bool:
        """Whether batches wait that a worker could take now (they went back after the turn's leasing)."""
        if self.closed or not self._backlog:
            return False
        return any(
            self._backlog.queues.get(w.route) and w.free > 0 and self._fresh(w.rid, now) for w in self.workers.values()
        )

    def routes(self) -> dict[str, dict[str, int]]:
        """Per route: batches ready to lease, batches waiting out a backoff, workers serving it."""
        held = self._backlog.held_back()
        workers = Counter(w.route for w in self.workers.values())
        names = {*self._backlog.routes.names, *held, *workers, *(r for r, q in self._backlog.queues.items() if q)}
        return {
            name: {"pending": len(self._backlog.queues.get(name, ())), "backoff": held[name], "workers": workers[name]}
            for name in sorted(names)
        }

    def next_deadline(self) -> float | None:
        """When the first lease times out or the first backoff ends (None with neither)."""
        due = [lease.deadline for lease in self.leases.values()]
        backoff = self._backlog.next_due()
        if backoff is not None:
            due.append(backoff)
        return min(due) if due else None

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
            self._ended(msg.batch_id, msg.attempt, msg.error, kinds=msg.kinds or kinds_in(msg.error))

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
                "route": w.route,
            }
            for w in self.workers.values()
        ]

    def _ended(
        self,
        batch_id: int,
        attempt: int,
        error: str,
        *,
        charge: bool = True,
        suspect: bool = False,
        kinds: list[str] | None = None,
    ) -> None:
        """A lease ended without a result: replay the batch (after its route's backoff), or
        dead-letter it at its route's max attempts, or at once if its exception (`kinds`, most
        derived class first; None if not known) is one the route does not retry. A lease that
        ended through no fault of the batch (`charge` false) gives its attempt back; one that
        may have been its fault (`suspect`) is replayed alone to find out."""
        topic, count, _, _ = self._ledger.batch_info(batch_id)
        policy = self.policy(topic)
        if not charge:
            attempt -= 1
            self._ledger.release(batch_id, error, attempts=attempt)
            self._backlog.put_back(Pending(batch_id, topic, count, attempt, suspect))
            self._counts["pending"] += 1
            self._stats["replays"] += 1
            self._stats["replays not charged"] += 1
            return
        not_retried = kinds is not None and not policy.retried(kinds)
        if attempt >= (policy.max_attempts or self._max_attempts) or not_retried:
            self._dead_letter(batch_id, error)
            self._counts["dead"] += 1
            why = f"{kinds[0] if kinds else 'its error'} is not retried" if not_retried else f"after {attempt} attempts"
            log.warning(
                "batch %d dead-lettered %s: %s",
                batch_id,
                why,
                error.strip().splitlines()[-1] if error.strip() else "",
                extra={"batch": batch_id, "topic": topic, "attempt": attempt},
            )
            if not_retried:
                self._stats["not retried"] += 1
            return
        self._ledger.release(batch_id, error)
        batch = Pending(batch_id, topic, count, attempt)
        wait = policy.delay(attempt)
        if wait > 0:
            self._backlog.hold(batch, self._clock() + wait)
            self._stats["retries delayed"] += 1
        else:
            self._backlog.put_back(batch)
        self._counts["pending"] += 1
        self._stats["replays"] += 1


def kinds_in(error: str) -> list[str] | None:
    """The exception class named on a traceback's last line ("KeyError: 'x'" gives KeyError,
    "mymodule.Invalid" gives mymodule.Invalid), for a worker that did not send its classes; None
    if the line names none."""
    lines = error.strip().splitlines()
    name = lines[-1].split(":", 1)[0].strip() if lines else ""
    return [name] if name and all(part.isidentifier() for part in name.split(".")) else None
