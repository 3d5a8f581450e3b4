"""The producer's core, with no sockets: its session with the sink, the window of batches
sent but not yet acknowledged, each pushed again until the sink's ack (after its ledger
commit) says it is safe, and the batches acknowledged whose outcome (processed, or
dead-lettered) is still to come.

Sealed batches come in with ``add()``; ``received()`` takes what the sink sent on control,
``tick()`` the passing of time; ``due()`` says which batches to push on intake now, the
session's outbox what to send on control, and ``take_ended()`` which batches ended.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from . import protocol as p
from .config import Timing
from .errors import ProtocolError
from .session import SESSION_TYPES, Event, Joined, Lost, Session

log = logging.getLogger(__name__)

CONTROL_TYPES: frozenset[type[p.Message]] = SESSION_TYPES | {p.Ack, p.Outcome, p.Features}
OutcomeState = Literal["done", "dead", "unknown"]
FAILURES_KEPT = 100  # dead-lettered batches an Outcomes keeps in full (all are counted)


@dataclass
class Sent:
    seq: int
    count: int
    frames: list[bytes]
    sent_at: float | None = None  # None until sent (and when it is to be sent again at once)
    topic: str = ""


class BatchOutcome(NamedTuple):  # a tuple: made once per batch, on the producer's I/O thread
    """What became of one batch: `done` (its results are stored and published), `dead`
    (dead-lettered after its attempts; `error` is the last line of the last one), or `unknown`
    (the sink no longer remembers it: asked about long after, past its retention)."""

    seq: int
    topic: str
    records: int
    state: OutcomeState
    error: str | None = None
    partition: int | None = None  # which of the key-partitioned sinks took it (seqs are each one's)

    @property
    def ok(self) -> bool:
        return self.state == "done"


@dataclass
class Outcomes:
    """What became of a producer's batches, counted in batches and records."""

    done_batches: int = 0
    done_records: int = 0
    dead_batches: int = 0
    dead_records: int = 0
    unknown_batches: int = 0
    unknown_records: int = 0
    failures: list[BatchOutcome] = field(default_factory=list)  # the first FAILURES_KEPT dead ones

    @property
    def ok(self) -> bool:
        """Every batch processed: none dead-lettered or unknown."""
        return not (self.dead_batches or self.unknown_batches)

    @property
    def first_error(self) -> str | None:
        return self.failures[0].error if self.failures else None

    def add(self, outcome: BatchOutcome) -> None:
        if outcome.state == "done":
            self.done_batches += 1
            self.done_records += outcome.records
            return
        if outcome.state == "dead":
            self.dead_batches += 1
            self.dead_records += outcome.records
        else:
            self.unknown_batches += 1
            self.unknown_records += outcome.records
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append(outcome)

    def copy(self) -> Outcomes:
        return dataclasses.replace(self, failures=list(self.failures))

    @classmethod
    def total(cls, parts: Iterable[Outcomes]) -> Outcomes:
        """Several partitions' outcomes as one."""
        out = cls()
        for part in parts:
            for f in dataclasses.fields(cls):
                if f.name != "failures":
                    setattr(out, f.name, getattr(out, f.name) + getattr(part, f.name))
            out.failures += part.failures[: FAILURES_KEPT - len(out.failures)]
        return out


class Window:
    """Batches handed to the sink and not yet acknowledged, by seq, indexed by what is due: those
    never sent (or to send again at once) in order, and those sent, oldest send first. The I/O
    thread asks what is due and when next on every turn: neither scans the whole window."""

    def __init__(self) -> None:
        self._unacked: dict[int, Sent] = {}
        self._unsent: dict[int, Sent] = {}
        self._sent: dict[int, Sent] = {}  # insertion order is send order: the oldest first
        self.acked_records = 0
        self.acked_batches = 0

    def add(self, sent: Sent) -> None:
        sent.sent_at = None
        self._unacked[sent.seq] = sent
        self._unsent[sent.seq] = sent

    def ack(self, seqs: list[int]) -> int:
        """Forget acknowledged batches; return how many were still unacked (repeats are ignored)."""
        n = 0
        for seq in seqs:
            sent = self._unacked.pop(seq, None)
            if sent is not None:
                self._unsent.pop(seq, None)
                self._sent.pop(seq, None)
                n += 1
                self.acked_records += sent.count
        self.acked_batches += n
        return n

    def pushed(self, sent: Sent, now: float) -> None:
        """A batch went out: due again `resend_after` from now, unless acknowledged."""
        if sent.seq not in self._unacked:
            return
        sent.sent_at = now
        self._unsent.pop(sent.seq, None)
        self._sent.pop(sent.seq, None)  # to the end: the newest send
        self._sent[sent.seq] = sent

    def resend_all(self) -> None:
        """Every unacknowledged batch is to be sent again at once (oldest first)."""
        for sent in self._sent.values():
            sent.sent_at = None
        self._unsent = {**self._sent, **self._unsent}
        self._sent = {}

    def due(self, now: float, resend_after: float) -> list[Sent]:
        """Batches never sent, or sent longer ago than ``resend_after`` without an ack."""
        out = list(self._unsent.values())
        for sent in self._sent.values():
            assert sent.sent_at is not None
            if now - sent.sent_at < resend_after:
                break  # the rest were sent later still
            out.append(sent)
        return out

    def next_due(self, resend_after: float) -> float | None:
        """When the next batch falls due (-inf if one is due at once), None if none is unacked."""
        if self._unsent:
            return float("-inf")
        for sent in self._sent.values():
            assert sent.sent_at is not None
            return sent.sent_at + resend_after
        return None

    def all(self) -> list[Sent]:
        return list(self._unacked.values())

    def __contains__(self, seq: int) -> bool:
        return seq in self._unacked

    def __len__(self) -> int:
        return len(self._unacked)


class ProducerCore:
    def __init__(
        self,
        producer_id: str,
        timing: Timing,
        now: float,
        *,
        resend_after: float,
        groups: bool = False,
        rng: random.Random | None = None,
        partition: int | None = None,
    ) -> None:
        self.session = Session("producer", producer_id, timing, now, rng=rng)
        self.partition = partition
        # With `groups`, each session asks the sink whether it takes batches in groups; once it
        # says so, `sink_groups` holds the most bytes one frame and one message to it may have.
        self._groups = groups
        self.sink_groups: tuple[int, int] | None = None
        self.window = Window()
        self.resend_after = resend_after
        self.ignored = 0  # messages from the sink that could not be decoded
        self._waiting: dict[int, tuple[str, int]] = {}  # seq -> (topic, records): no outcome yet
        self._ended: list[BatchOutcome] = []

    def add(self, sent: Sent) -> None:
        """A sealed batch, to push once a sink has welcomed us."""
        self.window.add(sent)
        self._waiting[sent.seq] = (sent.topic, sent.count)

    @property
    def waiting(self) -> int:
        """Batches whose outcome is still to come."""
        return len(self._waiting)

    def take_ended(self) -> list[BatchOutcome]:
        """The outcomes that came since the last call."""
        out, self._ended = self._ended, []
        return out

    def received(self, frames: list[bytes], now: float) -> tuple[Event | None, int]:
        """A message from the sink on control: (what it meant to the session, batches it acked)."""
        try:
            msg = p.decode(frames, allowed=CONTROL_TYPES)
        except ProtocolError as exc:
            self.ignored += 1
            log.warning("ignored a message from the sink: %s", exc)
            return None, 0
        event = self.session.received(msg, now)
        if isinstance(event, (Joined, Lost)):
            self.sink_groups = None  # a new session, perhaps with another sink: asked again
        if isinstance(msg, p.Ack):
            return event, self.window.ack(msg.seqs)
        if isinstance(msg, p.Outcome):
            return event, self._outcome(msg)
        if isinstance(msg, p.Features):
            if p.GROUPS in msg.names and self.session.joined:
                self.sink_groups = (msg.max_frame, msg.max_message)
            return event, 0
        if isinstance(event, Joined):
            if self._groups:  # (its control socket takes headers only)
                self.session.outbox.append(p.Features([p.GROUPS], p.MAX_HEADER_BYTES, p.MAX_HEADER_BYTES))
            # A sink we just (re)joined may never have had what the last connection pushed:
            # everything unacked goes again.
            self.window.resend_all()
            self._watch()
        return event, 0

    def _watch(self) -> None:
        """Ask this session for outcomes, naming the acknowledged batches still waiting for
        one: those that ended while we were away are told at once. (Unacknowledged ones go
        again, and the sink tells the outcome of one it has already with its ack.)"""
        acked = [seq for seq in self._waiting if seq not in self.window]
        for i in range(0, max(len(acked), 1), p.MAX_SEQS):
            self.session.outbox.append(p.Watch(acked[i : i + p.MAX_SEQS]))

    def _outcome(self, msg: p.Outcome) -> int:
        """Record how batches ended; return how many that also acknowledges (a batch that
        ended is stored, whether its ack came or not)."""
        told: list[tuple[int, OutcomeState, str | None]] = [(seq, "done", None) for seq in msg.done]
        told += [(seq, "dead", error) for seq, error in zip(msg.dead, msg.errors, strict=True)]
        told += [(seq, "unknown", None) for seq in msg.unknown]
        for seq, state, error in told:
            waiting = self._waiting.pop(seq, None)
            if waiting is not None:  # not told twice (a batch resent may be told again)
                self._ended.append(BatchOutcome(seq, waiting[0], waiting[1], state, error, self.partition))
        return self.window.ack([seq for seq, _, _ in told])

    def tick(self, now: float) -> Event | None:
        return self.session.tick(now)

    def due(self, now: float) -> list[Sent]:
        """Batches to push on intake now: only while a sink has welcomed us (a push before that
        could queue for a peer that is not a sink at all). Mark each with pushed() once sent."""
        if not self.session.joined:
            return []
        return self.window.due(now, self.resend_after)

    def pushed(self, sent: Sent, now: float) -> None:
        self.window.pushed(sent, now)

    def messages(self, due: list[Sent]) -> Iterator[tuple[list[Sent], list[bytes]]]:
        """The intake messages that push `due`, made as they are asked for: each batch alone,
        or, once the sink takes groups, as many in one message as its limits allow (with each
        message, the batches it holds)."""
        if self.sink_groups is None:
            for sent in due:
                yield [sent], sent.frames
            return
        for group in p.grouped(due, _sizes, *self.sink_groups):
            yield self._message(group)

    def _message(self, group: list[Sent]) -> tuple[list[Sent], list[bytes]]:
        if len(group) == 1:
            return group, group[0].frames
        msg = p.Batches(
            self.session.hello.name,
            [s.seq for s in group],
            [s.topic for s in group],
            [s.count for s in group],
            [len(s.frames[1]) for s in group],
            b"".join(s.frames[1] for s in group),
        )
        return group, p.encode(msg)

    def next_deadline(self) -> float:
        due = self.session.next_deadline()
        if self.session.joined:
            resend = self.window.next_due(self.resend_after)
            if resend is not None:
                due = min(due, resend)
        return due


def _sizes(sent: Sent) -> tuple[int, int]:
    """A batch's payload bytes, and at most what it adds to a group's header."""
    return len(sent.frames[1]), len(sent.topic.encode()) + 32
