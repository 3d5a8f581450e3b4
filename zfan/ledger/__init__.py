"""The sink's ledger: every batch, its lease, its result; nothing is acknowledged or published
before the commit that holds it.

Two backends keep the same promises behind one interface (`Ledger`):
- `SqliteLedger`, one file beside the sink (the embedded default);
- `PostgresLedger`, a PostgreSQL database that several sinks share, one of them active at a
  time (failover: see postgres.py).
The sink's core sees only the interface; `open_ledger` picks the backend from the location.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError
from .records import (
    DEAD,
    DONE,
    EMPTY_RECORDS,
    KEEP_BATCHES,
    LEASED,
    PENDING,
    PURGED,
    STATE_NAMES,
    DeadLetter,
    Pending,
    Stored,
)
from .sqlite import SqliteLedger

if TYPE_CHECKING:
    from .postgres import PostgresLedger

__all__ = [
    "DEAD",
    "DONE",
    "EMPTY_RECORDS",
    "KEEP_BATCHES",
    "LEASED",
    "PENDING",
    "PURGED",
    "STATE_NAMES",
    "DeadLetter",
    "Ledger",
    "Pending",
    "SqliteLedger",
    "Stored",
    "is_postgres",
    "open_ledger",
    "postgres",
    "redact",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Ledger(Protocol):
    """What the sink's core asks of a ledger. Writes go into one open transaction that the sink
    commits once per turn of its loop (group commit)."""

    path: str  # where it is, as a person reads it (a DSN without its password)
    pruned: Counter[str]  # finished batches' rows that prune() dropped, by state

    # --- transaction and life ---
    @property
    def uncommitted(self) -> bool: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...
    def renew(self) -> None:
        """Keep this sink's claim on a shared ledger; raises Fenced once another sink holds it."""
        ...

    def next_renewal(self) -> float:
        """When (time.monotonic()) renew() has something to do: infinity where nothing is shared."""
        ...

    # --- startup ---
    def next_epoch(self) -> int: ...
    def recover(self) -> int: ...
    def pending(self) -> list[Pending]: ...
    def counts(self) -> dict[str, int]: ...
    def topic_seqs(self) -> dict[str, int]: ...
    def save_heads(self, heads: dict[str, int]) -> None: ...
    def published_upto(self) -> int: ...
    def results_after(self, result_id: int) -> list[Stored]: ...

    # --- the life of a batch ---
    def insert_batch(self, producer: str, seq: int, topic: str, count: int, payload: bytes) -> int | None: ...
    def insert_batches(self, producer: str, batches: list[tuple[int, str, int, bytes]]) -> list[int | None]: ...
    def payload(self, batch_id: int) -> bytes: ...
    def lease(self, leases: list[tuple[int, int]]) -> None: ...
    def release(self, batch_id: int, error: str | None = None, *, attempts: int | None = None) -> None: ...
    def store_results(self, batch_id: int, rows: list[tuple[str, int, int, bytes]]) -> list[Stored]: ...
    def store_many(self, results: list[tuple[int, list[tuple[str, int, int, bytes]]]]) -> list[Stored]: ...
    def dead_letter(self, batch_id: int, topic: str, seq: int, error: str) -> Stored: ...
    def batch_info(self, batch_id: int) -> tuple[str, int, int, str | None]: ...
    def owners(self, batch_ids: list[int]) -> list[tuple[int, str, int]]: ...
    def states(self, producer: str, seqs: list[int]) -> list[tuple[int, int, str | None]]: ...
    def mark_published(self, result_id: int) -> None: ...

    # --- dead letters ---
    def dead_page(self, prefix: str, after: int, limit: int) -> list[DeadLetter]: ...
    def dead_letter_of(self, batch_id: int) -> tuple[DeadLetter, bytes] | None: ...
    def dead_ids(self, batch_ids: list[int] | None, prefix: str) -> list[int]: ...
    def requeue(self, batch_ids: list[int]) -> list[Pending]: ...
    def purge(self, batch_ids: list[int]) -> None: ...

    # --- for subscribers, producers' keys, retention ---
    def results_range(self, topic: str, first: int, last: int, limit: int) -> list[Stored]: ...
    def cursor_page(self, name: str, after_topic: str, limit: int) -> list[tuple[str, int]]: ...
    def cursors(self, limit: int) -> list[tuple[str, str, int]]: ...
    def save_cursor(self, name: str, positions: dict[str, int]) -> None: ...
    def producer_keys(self) -> dict[str, str]: ...
    def bind_key(self, producer: str, key: str) -> None: ...
    def prune(
        self, *, keep: int | None, max_age: float | None, now: float, keep_batches: int = KEEP_BATCHES
    ) -> tuple[int, int]: ...
    def size_bytes(self) -> int: ...
    def integrity_check(self) -> str: ...


def is_postgres(location: str) -> bool:
    return location.startswith(POSTGRES_SCHEMES)


def redact(dsn: str) -> str:
    """The DSN as a person may read it in a log: without its password."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def postgres() -> type[PostgresLedger]:
    """The PostgreSQL backend; ConfigError if psycopg, an extra, is not installed."""
    try:
        from .postgres import PostgresLedger  # imported only when asked for
    except ImportError:
        raise ConfigError("a postgresql:// ledger needs psycopg: pip install 'zfan[postgres]'") from None
    return PostgresLedger


def open_ledger(location: str, *, fsync: str = "normal") -> Ledger:
    """The ledger at `location`: a PostgreSQL URL (postgresql://...), else an SQLite file's path."""
    if is_postgres(location):
        return postgres()(location)
    return SqliteLedger(location, fsync=fsync)
