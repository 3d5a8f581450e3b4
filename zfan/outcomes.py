"""What became of each batch, told to the producer that sent it: done (its results are stored)
or dead-lettered (with the last line of its error), once the commit has made that true.

Only producers that asked (`watch`) are told, so that a producer of an earlier version never
gets a message it does not know. A watch also names the seqs the producer still waits on:
those that ended while it was away are answered from the ledger at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import protocol as p
from .ledger import DEAD, DONE, PURGED, Ledger

# One outcome message stays far below MAX_HEADER_BYTES: seqs cost at most 9 bytes each, and
# an error line at most MAX_SUMMARY.
SEQS_PER_MESSAGE = 10_000
ERRORS_PER_MESSAGE = 200


def summary(error: str) -> str:
    """The line of an error a person reads first: a traceback's last (`KeyError: 'value'`)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "failed"
    return line.encode()[: p.MAX_SUMMARY].decode(errors="ignore")


@dataclass
class _Told:
    """Outcomes for one producer, gathered over a turn."""

    done: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)

    def messages(self) -> Iterator[p.Outcome]:
        done, dead, unknown = self.done, self.dead, self.unknown
        while done or dead or unknown:
            d, done = done[:SEQS_PER_MESSAGE], done[SEQS_PER_MESSAGE:]
            x, dead = dead[:ERRORS_PER_MESSAGE], dead[ERRORS_PER_MESSAGE:]
            u, unknown = unknown[:SEQS_PER_MESSAGE], unknown[SEQS_PER_MESSAGE:]
            yield p.Outcome(d, [seq for seq, _ in x], [e for _, e in x], u)


class Outcomes:
    def __init__(self, ledger: Ledger, producer: Callable[[str], bytes | None], stats: Counter[str]) -> None:
        self._ledger = ledger
        self._producer = producer  # the connection of a producer id, if connected
        self._stats = stats
        self._watchers: dict[bytes, str] = {}  # connection -> producer id, of sessions that watch
        # Whose each batch is, kept from its arrival (while its producer watches) to its end, so
        # that telling the end costs no read of the ledger.
        self._owners: dict[int, tuple[str, int]] = {}
        self._ended: dict[int, tuple[str | None, tuple[str, int] | None]] = {}  # batch id -> (error, owner)
        self._told: dict[str, _Told] = {}  # producer id -> outcomes read from the ledger this turn

    def watch(self, rid: bytes, producer_id: str, seqs: list[int]) -> None:
        """A producer's session watches from now on; of `seqs`, those ended are told at once."""
        self._watchers[rid] = producer_id
        if not seqs:
            return
        told = self._told.setdefault(producer_id, _Told())
        found = set()
        for seq, state, error in self._ledger.states(producer_id, seqs):
            found.add(seq)
            if state == DONE:
                told.done.append(seq)
            elif state in (DEAD, PURGED):  # purged: dead-lettered, its records since dropped
                told.dead.append((seq, summary(error or "")))
        told.unknown += [seq for seq in seqs if seq not in found]

    def duplicate(self, producer_id: str, seq: int) -> None:
        """A batch came again: one that ended already is told again, since its producer may
        have missed the first telling with the ack it resent for."""
        rid = self._producer(producer_id)
        if rid is not None and rid in self._watchers:
            self.watch(rid, producer_id, [seq])

    def stored(self, batch_id: int, producer_id: str, seq: int) -> None:
        """A new batch is in the ledger."""
        if self._watchers and producer_id in self._watchers.values():
            self._owners[batch_id] = (producer_id, seq)

    def ended(self, batch_id: int, error: str | None = None) -> None:
        """A batch is done (`error` None) or dead-lettered, in this turn's transaction."""
        owner = self._owners.pop(batch_id, None)
        if self._watchers:
            self._ended[batch_id] = (error, owner)

    def leave(self, rid: bytes) -> None:
        self._watchers.pop(rid, None)

    @property
    def waiting(self) -> bool:
        """Whether outcomes wait: the turn must commit what they tell."""
        return bool(self._ended or self._told)

    def take(self) -> list[tuple[bytes, list[bytes]]]:
        """The outcome messages of this turn, once it has committed."""
        if self._ended:
            watching = set(self._watchers.values())
            ended, self._ended = self._ended, {}
            owners = [(bid, *owner) for bid, (_, owner) in ended.items() if owner is not None]
            unknown = [bid for bid, (_, owner) in ended.items() if owner is None]
            if unknown:  # stored before its producer watched, or by an earlier sink
                owners += self._ledger.owners(unknown)
            for batch_id, producer_id, seq in owners:
                if producer_id not in watching:
                    continue
                told = self._told.setdefault(producer_id, _Told())
                error = ended[batch_id][0]
                if error is None:
                    told.done.append(seq)
                else:
                    told.dead.append((seq, summary(error)))
        out = []
        for producer_id, told in self._told.items():
            rid = self._producer(producer_id)
            if rid is None or rid not in self._watchers:
                continue  # it watches again when it is back, naming what it still waits on
            for msg in told.messages():
                out.append((rid, p.encode(msg)))
                self._stats["outcomes sent"] += len(msg.done) + len(msg.dead) + len(msg.unknown)
        self._told.clear()
        return out
