"""What both ledgers ask in the same SQL: the reads, the numbering of results, retention.

Written with `?` placeholders, which SQLite takes as they are and PostgresLedger turns into
psycopg's. Each backend supplies how a statement runs (`_read`, `_change`) and how its own
writes are batched (`insert_batches`, `_store`).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ..errors import LedgerError
from .records import DEAD, DONE, KEEP_BATCHES, PENDING, PURGED, STATE_NAMES, DeadLetter, Pending, Stored

_STORED = "SELECT id, batch_id, topic, seq, count, kind, payload FROM results"
_DEAD = (
    "SELECT b.id, b.producer, b.seq, b.topic, b.count, b.attempts, b.error, "
    "(SELECT created FROM results r WHERE r.batch_id = b.id AND r.kind = 1)"
)


class Queries:
    path: str
    pruned: Counter[str]  # finished batches' rows that prune() dropped, by state
    # Batches whose results are stored this transaction: marked done in one statement at the
    # commit, which writes them with the results or not at all.
    _done: list[tuple[int, int]]
    _next_result: int  # results get their ids here, so that a group goes in one statement

    # --- what each backend supplies ------------------------------------------------------------
    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        raise NotImplementedError

    def _change(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        """Run a write now, in the open transaction; how many rows it changed."""
        raise NotImplementedError

    def insert_batches(self, producer: str, batches: list[tuple[int, str, int, bytes]]) -> list[int | None]:
        raise NotImplementedError

    def _store(self, stored: list[Stored], created: float) -> None:
        """Write these results (kind 0) in the open transaction."""
        raise NotImplementedError

    # --- startup ---------------------------------------------------------------------------
    def pending(self) -> list[Pending]:
        rows = self._read("SELECT id, topic, count, attempts FROM batches WHERE state=? ORDER BY id", (PENDING,))
        return [Pending(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATE_NAMES.values(), 0)
        for state, n in self._read("SELECT state, count(*) FROM batches GROUP BY state"):
            counts[STATE_NAMES[state]] = int(n)
        return counts

    def topic_seqs(self) -> dict[str, int]:
        heads: dict[str, int] = dict(self._read("SELECT topic, seq FROM topics"))
        for topic, seq in self._read("SELECT topic, max(seq) FROM results GROUP BY topic"):
            heads[topic] = max(seq, heads.get(topic, 0))
        return heads

    def published_upto(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE key='published'")
        return int(rows[0][0]) if rows else 0

    def results_after(self, result_id: int) -> list[Stored]:
        return [Stored(*r) for r in self._read(f"{_STORED} WHERE id > ? ORDER BY id", (result_id,))]

    # --- the life of a batch ---------------------------------------------------------------
    def insert_batch(self, producer: str, seq: int, topic: str, count: int, payload: bytes) -> int | None:
        """Store a new batch as pending and return its id; None if (producer, seq) is stored already."""
        return self.insert_batches(producer, [(seq, topic, count, payload)])[0]

    def payload(self, batch_id: int) -> bytes:
        rows = self._read("SELECT payload FROM batches WHERE id=?", (batch_id,))
        if not rows or rows[0][0] is None:
            raise LedgerError(f"ledger {self.path}: batch {batch_id} has no payload")
        return bytes(rows[0][0])

    def store_results(self, batch_id: int, rows: list[tuple[str, int, int, bytes]]) -> list[Stored]:
        """Store a batch's results (topic, seq, count, payload) and mark the batch done."""
        return self.store_many([(batch_id, rows)])

    def store_many(self, results: list[tuple[int, list[tuple[str, int, int, bytes]]]]) -> list[Stored]:
        """Store the results of several batches, (batch_id, [(topic, seq, count, payload)]) each,
        in one statement, and mark the batches done at the commit."""
        stored = []
        for batch_id, rows in results:
            for topic, seq, count, payload in rows:
                stored.append(Stored(self._next_result, batch_id, topic, seq, count, 0, payload))
                self._next_result += 1
            self._done.append((DONE, batch_id))
        if stored:
            self._store(stored, time.time())
        return stored

    def batch_info(self, batch_id: int) -> tuple[str, int, int, str | None]:
        """(topic, record count, attempts, last error) of a batch."""
        rows = self._read("SELECT topic, count, attempts, error FROM batches WHERE id=?", (batch_id,))
        if not rows:
            raise LedgerError(f"ledger {self.path}: no batch {batch_id}")
        topic, count, attempts, error = rows[0]
        return topic, count, attempts, error

    # --- dead letters ------------------------------------------------------------------------
    def dead_page(self, prefix: str, after: int, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead-lettered batches with ids above `after` whose topic starts with
        `prefix`, oldest first."""
        rows = self._read(
            f"{_DEAD} FROM batches b WHERE b.state=? AND b.id > ? AND substr(b.topic, 1, ?) = ? ORDER BY b.id LIMIT ?",
            (DEAD, after, len(prefix), prefix, limit),
        )
        return [DeadLetter(*r) for r in rows]

    def dead_letter_of(self, batch_id: int) -> tuple[DeadLetter, bytes] | None:
        """A dead-lettered batch and its records (packed); None if it is not dead-lettered."""
        rows = self._read(f"{_DEAD}, b.payload FROM batches b WHERE b.id=? AND b.state=?", (batch_id, DEAD))
        if not rows:
            return None
        *fields, payload = rows[0]
        return DeadLetter(*fields), bytes(payload or b"")

    # --- for subscribers, producers' keys, retention --------------------------------------------
    def results_range(self, topic: str, first: int, last: int, limit: int) -> list[Stored]:
        rows = self._read(
            f"{_STORED} WHERE topic=? AND seq BETWEEN ? AND ? ORDER BY seq LIMIT ?", (topic, first, last, limit)
        )
        return [Stored(*r) for r in rows]

    def cursor_page(self, name: str, after_topic: str, limit: int) -> list[tuple[str, int]]:
        """Up to `limit` positions of a durable name, of the topics after `after_topic`, in topic order."""
        rows = self._read(
            "SELECT topic, seq FROM cursors WHERE name=? AND topic > ? ORDER BY topic LIMIT ?",
            (name, after_topic, limit),
        )
        return [(topic, seq) for topic, seq in rows]

    def cursors(self, limit: int) -> list[tuple[str, str, int]]:
        """Up to `limit` durable positions, (name, topic, seq) each."""
        return [(n, t, s) for n, t, s in self._read("SELECT name, topic, seq FROM cursors LIMIT ?", (limit,))]

    def producer_keys(self) -> dict[str, str]:
        return dict(self._read("SELECT producer, key FROM producer_keys"))

    def prune(
        self, *, keep: int | None, max_age: float | None, now: float, keep_batches: int = KEEP_BATCHES
    ) -> tuple[int, int]:
        """Drop published results beyond the retention, and finished batches beyond the newest
        `keep_batches`. Returns how many results and batches went."""
        upto = self.published_upto()
        dropped = 0
        if keep is not None:
            newest = self._read("SELECT max(id) FROM results")[0][0]
            if newest is not None:
                dropped += self._change("DELETE FROM results WHERE id <= ?", (min(upto, newest - keep),))
        if max_age is not None:
            dropped += self._change("DELETE FROM results WHERE id <= ? AND created < ?", (upto, now - max_age))
        # A finished batch's row (without its payload) is what makes a late resend of it a
        # duplicate; resends come within seconds or minutes, so the newest ones are what counts.
        batches = 0
        for state in (DONE, PURGED):
            n = self._change(
                "DELETE FROM batches WHERE state=? AND id <= (SELECT max(id) FROM batches) - ?", (state, keep_batches)
            )
            batches += n
            self.pruned[STATE_NAMES[state]] += n
        if batches:
            # A key's claim on a producer id lasts as long as the rows that deduplicate its
            # batches: with those gone, the id starts afresh whoever uses it.
            self._change(
                "DELETE FROM producer_keys WHERE NOT EXISTS "
                "(SELECT 1 FROM batches b WHERE b.producer = producer_keys.producer)"
            )
        return dropped, batches
