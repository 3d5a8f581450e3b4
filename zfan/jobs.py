"""The worker's core, with no sockets: its session with the sink, and the jobs it holds (leases).

A lease is run only if it comes from the sink that welcomed us, in its current epoch; its
answer is sent only if the lease is still ours when the answer is ready. What the sink can no
longer accept (it restarted, reset our session, or went silent and has replayed our batches
to others) is dropped here, not sent to be fenced there.
"""

from __future__ import annotations

import logging
import random

from . import protocol as p
from .config import Limits, Timing
from .errors import ProtocolError
from .routing import DEFAULT_ROUTE
from .session import SESSION_TYPES, Event, Joined, Lost, Session

log = logging.getLogger(__name__)

CONTROL_TYPES: frozenset[type[p.Message]] = SESSION_TYPES | {p.Lease, p.Leases, p.Drain, p.Features}


class WorkerCore:
    def __init__(
        self,
        name: str,
        credit: int,
        timing: Timing,
        now: float,
        *,
        groups: Limits | None = None,
        route: str = DEFAULT_ROUTE,
        rng: random.Random | None = None,
    ) -> None:
        self.session = Session("worker", name, timing, now, credit=credit, route=route, rng=rng)
        self.credit = credit
        # With `groups` (what we take in one message), each session asks the sink for leases
        # in groups, and answers in groups once the sink says it takes them: `sink_groups`,
        # the most bytes one frame and one message to it may have.
        self._groups = groups
        self.sink_groups: tuple[int, int] | None = None
        self.held: set[tuple[int, int, int]] = set()  # (epoch, batch_id, attempt) of leases not answered
        self.ignored = 0  # messages from the sink that could not be decoded
        self.fenced = 0  # leases or answers dropped because they belong to an earlier session
        self.answered = 0  # batches whose result or failure went back to the sink
        self.draining = False  # asked the sink for nothing more, to stop once what we hold is done
        self._drain_heard = False  # the sink's echo: no lease it sent is still on the way

    def received(self, frames: list[bytes], now: float) -> tuple[Event | None, list[p.Lease]]:
        """A message from the sink: (what it meant to the session, the leases to run). When the
        event is Joined with a new epoch, or Lost, the leases not yet started are void."""
        try:
            msg = p.decode(frames, allowed=CONTROL_TYPES)
        except ProtocolError as exc:
            self.ignored += 1
            log.warning("ignored a message from the sink: %s", exc)
            return None, []
        event = self.session.received(msg, now)
        if isinstance(event, Lost) or (isinstance(event, Joined) and event.new_epoch):
            self.held.clear()  # the sink forgot us or restarted: what we hold is fenced already
        if isinstance(event, (Joined, Lost)):
            self.sink_groups = None  # a new session, perhaps with another sink: asked again
        if isinstance(event, Joined):
            log.debug("joined the sink (epoch %d)", event.epoch)
            if self._groups is not None:
                self.session.outbox.append(p.Features([p.GROUPS], self._groups.max_frame, self._groups.max_message))
        if isinstance(msg, p.Features):
            if p.GROUPS in msg.names and self.session.joined:
                self.sink_groups = (msg.max_frame, msg.max_message)
            return event, []
        if isinstance(msg, p.Drain):
            self._drain_heard = self.draining
            return event, []
        if isinstance(event, Joined) and self.draining:
            self.session.outbox.append(p.Drain())  # a new session: ask again
            self._drain_heard = False
        if isinstance(msg, (p.Lease, p.Leases)):
            if not self.session.joined or msg.epoch != self.session.epoch:
                self.fenced += 1 if isinstance(msg, p.Lease) else len(msg.batch_ids)
                return event, []
            leases = [msg] if isinstance(msg, p.Lease) else msg.split()
            self.held.update((lease.epoch, lease.batch_id, lease.attempt) for lease in leases)
            return event, leases
        return event, []

    def tick(self, now: float) -> Event | None:
        event = self.session.tick(now)
        if isinstance(event, Lost):
            self.held.clear()  # a silent sink has replayed them, or will, to other workers
        return event

    def holds(self, lease: p.Lease) -> bool:
        """Whether a lease is still ours: its answer counts at the sink."""
        return (lease.epoch, lease.batch_id, lease.attempt) in self.held

    def finished(self, lease: p.Lease) -> bool:
        """A lease's answer is ready: whether to send it (False if the lease is no longer ours)."""
        key = (lease.epoch, lease.batch_id, lease.attempt)
        if key not in self.held:
            self.fenced += 1
            return False
        self.held.discard(key)
        self.answered += 1
        return True

    def drain(self) -> None:
        """Take no new lease: ask the sink for none, and finish the ones we hold."""
        if self.draining:
            return
        self.draining = True
        if self.session.joined:
            self.session.outbox.append(p.Drain())

    @property
    def drained(self) -> bool:
        """Draining, and nothing left to do: every lease the sink sent us is answered (or the
        session is gone, and with it every lease we held)."""
        if not self.draining:
            return False
        if not self.session.joined:
            return not self.held
        return self._drain_heard and not self.held

    def next_deadline(self) -> float:
        return self.session.next_deadline()
