"""The producer's core, with no sockets: its session with the sink, and the window of batches
sent but not yet acknowledged, each pushed again until the sink's ack (after its ledger
commit) says it is safe.

Sealed batches come in with ``add()``; ``received()`` takes what the sink sent on control,
``tick()`` the passing of time; ``due()`` says which batches to push on intake now, and the
session's outbox what to send on control.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from . import protocol as p
from .config import Timing
from .errors import ProtocolError
from .session import SESSION_TYPES, Event, Joined, Session

log = logging.getLogger(__name__)

CONTROL_TYPES: frozenset[type[p.Message]] = SESSION_TYPES | {p.Ack}


@dataclass
class Sent:
    seq: int
    count: int
    frames: list[bytes]
    sent_at: float | None = None  # None until sent (and when it is to be sent again at once)


class Window:
    """Batches handed to the sink and not yet acknowledged, by seq."""

    def __init__(self) -> None:
        self._unacked: dict[int, Sent] = {}
        self.acked_records = 0
        self.acked_batches = 0

    def add(self, sent: Sent) -> None:
        self._unacked[sent.seq] = sent

    def ack(self, seqs: list[int]) -> int:
        """Forget acknowledged batches; return how many were still unacked (repeats are ignored)."""
        n = 0
        for seq in seqs:
            sent = self._unacked.pop(seq, None)
            if sent is not None:
                n += 1
                self.acked_records += sent.count
        self.acked_batches += n
        return n

    def due(self, now: float, resend_after: float) -> list[Sent]:
        """Batches never sent, or sent longer ago than ``resend_after`` without an ack."""
        return [s for s in self._unacked.values() if s.sent_at is None or now - s.sent_at >= resend_after]

    def next_due(self, resend_after: float) -> float | None:
        """When the next batch falls due (-inf if one is due at once), None if none is unacked."""
        if not self._unacked:
            return None
        return min(float("-inf") if s.sent_at is None else s.sent_at + resend_after for s in self._unacked.values())

    def all(self) -> list[Sent]:
        return list(self._unacked.values())

    def __len__(self) -> int:
        return len(self._unacked)


class ProducerCore:
    def __init__(
        self, producer_id: str, timing: Timing, now: float, *, resend_after: float, rng: random.Random | None = None
    ) -> None:
        self.session = Session("producer", producer_id, timing, now, rng=rng)
        self.window = Window()
        self.resend_after = resend_after
        self.ignored = 0  # messages from the sink that could not be decoded

    def add(self, sent: Sent) -> None:
        """A sealed batch, to push once a sink has welcomed us."""
        self.window.add(sent)

    def received(self, frames: list[bytes], now: float) -> tuple[Event | None, int]:
        """A message from the sink on control: (what it meant to the session, batches it acked)."""
        try:
            msg = p.decode(frames, allowed=CONTROL_TYPES)
        except ProtocolError as exc:
            self.ignored += 1
            log.warning("ignored a message from the sink: %s", exc)
            return None, 0
        event = self.session.received(msg, now)
        if isinstance(msg, p.Ack):
            return event, self.window.ack(msg.seqs)
        if isinstance(event, Joined):
            # A sink we just (re)joined may never have had what the last connection pushed:
            # everything unacked goes again.
            for sent in self.window.all():
                sent.sent_at = None
        return event, 0

    def tick(self, now: float) -> Event | None:
        return self.session.tick(now)

    def due(self, now: float) -> list[Sent]:
        """Batches to push on intake now: only while a sink has welcomed us (a push before that
        could queue for a peer that is not a sink at all). Mark each with pushed() once sent."""
        if not self.session.joined:
            return []
        return self.window.due(now, self.resend_after)

    def pushed(self, sent: Sent, now: float) -> None:
        sent.sent_at = now

    def next_deadline(self) -> float:
        due = self.session.next_deadline()
        if self.session.joined:
            resend = self.window.next_due(self.resend_after)
            if resend is not None:
                due = min(due, resend)
        return due
