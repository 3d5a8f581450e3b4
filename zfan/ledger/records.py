"""What every ledger stores and hands back, whatever holds it: a batch's states and the rows
the sink reads."""

from __future__ import annotations

from dataclasses import dataclass

PENDING, LEASED, DONE, DEAD = 0, 1, 2, 3
PURGED = 4  # a dead letter whose records were dropped on request: kept, like a done one, for dedup
EMPTY_RECORDS = b"\x90"  # a msgpack array of no records
# Finished batches remembered for deduplication, whatever the results' retention.
KEEP_BATCHES = 1_000_000
STATE_NAMES = {PENDING: "pending", LEASED: "leased", DONE: "done", DEAD: "dead", PURGED: "purged"}


@dataclass(slots=True)
class Pending:
    batch_id: int
    topic: str
    count: int
    attempts: int
    # Held by a worker that died holding several: one of them may have killed it, so it is run
    # alone until it answers (see Leasing.drop in leasing.py).
    suspect: bool = False


@dataclass(slots=True)
class DeadLetter:
    batch_id: int
    producer: str
    seq: int  # the producer's
    topic: str
    count: int
    attempts: int
    error: str | None
    at: float | None  # wall-clock seconds it was dead-lettered (None once retention dropped its notice)


@dataclass(slots=True)
class Stored:
    """A result row as the sink publishes it."""

    id: int
    batch_id: int
    topic: str
    seq: int
    count: int
    kind: int
    payload: bytes
