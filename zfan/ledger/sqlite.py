"""The embedded ledger: every batch, its lease, its result, in one SQLite file (WAL mode).

Writes go into one open transaction that the sink commits once per turn of its loop (group
commit); nothing is acknowledged or published before that commit.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections import Counter
from typing import Any

from .. import checkpoints
from ..errors import LedgerError, LedgerFull
from .queries import Queries
from .records import (
    DEAD,
    DONE,
    EMPTY_RECORDS,
    LEASED,
    PENDING,
    PURGED,
    Pending,
    Stored,
)

# Stamped in the SQLite header of every ledger ("zfan"), so that no other database is taken over.
APPLICATION_ID = 0x7A66616E

_IN_CHUNK = 500  # values in one `IN (...)`: well under SQLite's limit on bound parameters
SQLITE_FULL = 13  # the primary result code; sqlite3.SQLITE_FULL exists only from Python 3.11
# A new ledger's page size. A batch's payload is one blob of tens of KB: with bigger pages it
# takes fewer overflow pages, WAL frames and write calls (16 KB beat 4 KB at batches of 1000 and
# was even with 8 KB at every size: bench/README.md).
PAGE_SIZE = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    producer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    count INTEGER NOT NULL,
    payload BLOB,             -- dropped once the batch is done
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    UNIQUE (producer, seq)
);
CREATE INDEX IF NOT EXISTS batches_open ON batches (state) WHERE state < 2;
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,   -- publish order
    batch_id INTEGER NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,     -- per-topic sequence, 1, 2, 3 ...
    count INTEGER NOT NULL,
    kind INTEGER NOT NULL,    -- 0 result, 1 dead letter
    payload BLOB NOT NULL,
    created REAL NOT NULL,    -- wall-clock seconds, for retention by age
    UNIQUE (topic, seq)
);
-- A dead letter's notice, found by its batch (zfan dead list, show, purge): dead letters are few,
-- and so is what this index costs.
CREATE INDEX IF NOT EXISTS results_dead ON results (batch_id) WHERE kind = 1;
CREATE TABLE IF NOT EXISTS topics (
    topic TEXT PRIMARY KEY,
    seq INTEGER NOT NULL      -- the last seq given on this topic, whatever retention dropped
);
CREATE TABLE IF NOT EXISTS producer_keys (
    producer TEXT PRIMARY KEY, -- with CURVE, a producer id belongs to the first key that used it
    key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT NOT NULL,       -- a durable subscriber
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,     -- the last seq it has taken on this topic
    PRIMARY KEY (name, topic)
);
"""


class SqliteLedger(Queries):
    def __init__(
        self, path: str = "zfan.db", *, fsync: str = "normal", checkpoint_every: int = checkpoints.EVERY
    ) -> None:
        self.path = path
        self._db = _open(path)
        # Batches whose results are stored this transaction: marked done in one statement at
        # the commit, which writes them with the results or not at all.
        self._done: list[tuple[int, int]] = []
        self._written = 0  # payload bytes written since the last commit, for the checkpointer
        self._checkpoints: checkpoints.Checkpointer | None = None
        self.pruned: Counter[str] = Counter()  # finished batches' rows that prune() dropped, by state
        try:
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID:
                if self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise _refuse(path, "it holds other tables")
                self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before the first write creates the file
                self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync == 'full' else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            # Rows get their ids from here, not from SQLite, so that a group of them goes in one
            # executemany and each knows its id. A result's id never goes back below the last
            # published one, even when retention dropped every result.
            self._next_batch = self._db.execute("SELECT coalesce(max(id), 0) + 1 FROM batches").fetchone()[0]
            self._next_result = 1 + max(
                self._db.execute("SELECT coalesce(max(id), 0) FROM results").fetchone()[0],
                self._db.execute("SELECT coalesce(max(value), 0) FROM meta WHERE key='published'").fetchone()[0],
            )
            # What an earlier run left in the WAL goes into the file now: after a full disk, the
            # next write may fit in the WAL's slack, so only this shows that the disk is still full.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if path != ":memory:":
                # Checkpoints run on a thread of their own (see checkpoints.py), not in our commits.
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpoints = checkpoints.Checkpointer(path, every=checkpoint_every)
        except sqlite3.Error as exc:
            self._db.close()
            raise _failed(path, "open", exc) from None
        except LedgerError:
            self._db.close()
            raise

    # --- transaction -----------------------------------------------------------------------
    # Every statement goes through _read, _write, commit or close, and every SQLite error
    # becomes a LedgerError there, through _failed.
    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _failed(self.path, "read", exc) from None

    def _change(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return self._write(sql, args).rowcount

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._write_many(sql, [args], one=True)

    def _write_many(self, sql: str, rows: list[tuple[Any, ...]], *, one: bool = False) -> sqlite3.Cursor:
        try:
            # The connection's own state, not a flag of ours: SQLite rolls the whole transaction
            # back by itself on some errors (a full disk), and a flag would go on believing it open.
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
            return self._db.execute(sql, rows[0]) if one else self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _failed(self.path, "write", exc) from None

    @property
    def uncommitted(self) -> bool:
        return self._db.in_transaction or bool(self._done)

    def commit(self) -> None:
        if self._done:
            done, self._done = self._done, []
            self._write_many("UPDATE batches SET state=?, payload=NULL, error=NULL WHERE id=?", done)
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _failed(self.path, "commit", exc) from None
            if self._checkpoints is not None:
                # The payloads, and a few pages of rows and indexes each commit rewrites.
                self._checkpoints.wrote(self._written + 4 * PAGE_SIZE)
            self._written = 0

    def close(self) -> None:
        """Roll back what is not committed, and close. Raises nothing: it also runs on the way
        out of a failure (a commit that found the disk full), and must not hide it."""
        self._done.clear()
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # closing the connection rolls back all the same
        if self._checkpoints is not None:
            self._checkpoints.close()  # after the rollback: a checkpoint may be waiting for our write lock
        self._db.close()

    def renew(self) -> None:
        """One sink holds an SQLite ledger, by its lock file (lock.py): there is no claim to renew."""

    def next_renewal(self) -> float:
        return math.inf

    # --- startup ---------------------------------------------------------------------------
    def next_epoch(self) -> int:
        """A number larger than any earlier start of a sink on this ledger."""
        rows = self._read("SELECT value FROM meta WHERE key='epoch'")
        epoch = (rows[0][0] if rows else 0) + 1
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        self.commit()
        return epoch

    def recover(self) -> int:
        """Put batches leased by an earlier sink back to pending; return how many. The sink's
        own death is no fault of the batch: that lease does not count as an attempt."""
        n = self._write(
            "UPDATE batches SET state=?, attempts=max(attempts - 1, 0) WHERE state=?", (PENDING, LEASED)
        ).rowcount
        self.commit()
        return n

    def save_heads(self, heads: dict[str, int]) -> None:
        for topic, seq in heads.items():
            self._write(
                "INSERT INTO topics (topic, seq) VALUES (?,?) "
                "ON CONFLICT (topic) DO UPDATE SET seq=max(seq, excluded.seq)",
                (topic, seq),
            )

    # --- the life of a batch ---------------------------------------------------------------
    def insert_batches(self, producer: str, batches: list[tuple[int, str, int, bytes]]) -> list[int | None]:
        """Store new batches (seq, topic, count, payload) of one producer as pending, in one
        statement; return each one's id, None for one whose (producer, seq) is stored already."""
        first = self._next_batch
        ids = list(range(first, first + len(batches)))
        self._next_batch += len(batches)
        rows = [(bid, producer, *batch, PENDING) for bid, batch in zip(ids, batches, strict=True)]
        cur = self._write_many(
            "INSERT OR IGNORE INTO batches (id, producer, seq, topic, count, payload, state) VALUES (?,?,?,?,?,?,?)",
            rows,
        )
        self._written += sum(len(b[3]) for b in batches)
        if cur.rowcount == len(batches):
            return list(ids)
        # Some came before (a resend): the ids that made it in are the new ones.
        stored = {r[0] for r in self._read("SELECT id FROM batches WHERE id BETWEEN ? AND ?", (first, ids[-1]))}
        return [bid if bid in stored else None for bid in ids]

    def lease(self, leases: list[tuple[int, int]]) -> None:
        """Mark batches leased: (batch_id, attempt) each, in one statement for a whole turn."""
        # Only fixed-size fields change, so SQLite rewrites the row in place and leaves the
        # payload's overflow pages alone (a worker's name here cost a copy of every payload).
        self._write_many(
            "UPDATE batches SET state=?, attempts=? WHERE id=?", [(LEASED, attempt, bid) for bid, attempt in leases]
        )

    def release(self, batch_id: int, error: str | None = None, *, attempts: int | None = None) -> None:
        """Back to pending, keeping the attempt count unless given (and the last error, if any)."""
        self._write(
            "UPDATE batches SET state=?, error=coalesce(?, error), attempts=coalesce(?, attempts) WHERE id=?",
            (PENDING, error, attempts, batch_id),
        )

    def _store(self, stored: list[Stored], created: float) -> None:
        self._write_many(
            "INSERT INTO results (id, batch_id, topic, seq, count, kind, payload, created) VALUES (?,?,?,?,?,0,?,?)",
            [(r.id, r.batch_id, r.topic, r.seq, r.count, r.payload, created) for r in stored],
        )
        self._written += sum(len(r.payload) for r in stored)

    def dead_letter(self, batch_id: int, topic: str, seq: int, error: str) -> Stored:
        """Move a batch to the dead-letter state and store the message that announces it."""
        _, count, payload = self._read("SELECT topic, count, payload FROM batches WHERE id=?", (batch_id,))[0]
        self._write("UPDATE batches SET state=?, error=? WHERE id=?", (DEAD, error, batch_id))
        rid, self._next_result = self._next_result, self._next_result + 1
        self._write(
            "INSERT INTO results (id, batch_id, topic, seq, count, kind, payload, created) VALUES (?,?,?,?,?,1,?,?)",
            (rid, batch_id, topic, seq, count, payload, time.time()),
        )
        return Stored(rid, batch_id, topic, seq, count, 1, bytes(payload))

    # --- dead letters ------------------------------------------------------------------------
    def dead_ids(self, batch_ids: list[int] | None, prefix: str) -> list[int]:
        """Of `batch_ids` (every one if None), those dead-lettered with a topic that starts with `prefix`."""
        if batch_ids is None:
            sql = "SELECT id FROM batches WHERE state=? AND substr(topic, 1, ?) = ? ORDER BY id"
            return [r[0] for r in self._read(sql, (DEAD, len(prefix), prefix))]
        found: list[int] = []
        for i in range(0, len(batch_ids), _IN_CHUNK):
            chunk = batch_ids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            found += [
                r[0]
                for r in self._read(
                    f"SELECT id FROM batches WHERE state=? AND substr(topic, 1, ?) = ? AND id IN ({marks})",
                    (DEAD, len(prefix), prefix, *chunk),
                )
            ]
        return sorted(found)

    def requeue(self, batch_ids: list[int]) -> list[Pending]:
        """Dead-lettered batches back to pending, their attempts from zero."""
        self._write_many(
            "UPDATE batches SET state=?, attempts=0, error=NULL WHERE id=? AND state=?",
            [(PENDING, bid, DEAD) for bid in batch_ids],
        )
        pending: list[Pending] = []
        for i in range(0, len(batch_ids), _IN_CHUNK):
            chunk = batch_ids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT id, topic, count FROM batches WHERE id IN ({marks}) AND state=?", (*chunk, PENDING)
            )
            pending += [Pending(bid, topic, count, 0) for bid, topic, count in rows]
        return sorted(pending, key=lambda b: b.batch_id)

    def purge(self, batch_ids: list[int]) -> None:
        """Drop dead-lettered batches' records; their rows stay, to recognise a late resend."""
        self._write_many(
            "UPDATE batches SET state=?, payload=NULL WHERE id=? AND state=?",
            [(PURGED, bid, DEAD) for bid in batch_ids],
        )
        # Its notice on zfan.dead carried a copy of the records: it keeps its place in that
        # topic's numbering, with none.
        self._write_many(
            "UPDATE results SET payload=?, count=0 WHERE batch_id=? AND kind=1",
            [(EMPTY_RECORDS, bid) for bid in batch_ids],
        )

    def owners(self, batch_ids: list[int]) -> list[tuple[int, str, int]]:
        """(batch id, producer id, producer's seq) of each of these batches still stored."""
        rows: list[tuple[int, str, int]] = []
        for i in range(0, len(batch_ids), _IN_CHUNK):
            chunk = batch_ids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows += self._read(f"SELECT id, producer, seq FROM batches WHERE id IN ({marks})", tuple(chunk))
        return rows

    def states(self, producer: str, seqs: list[int]) -> list[tuple[int, int, str | None]]:
        """(seq, state, error) of each of this producer's batches by seq, where still stored."""
        done = {bid for _, bid in self._done}  # marked done at the commit: leased until then
        rows: list[tuple[int, int, str | None]] = []
        for i in range(0, len(seqs), _IN_CHUNK):
            chunk = seqs[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            found = self._read(
                f"SELECT seq, id, state, error FROM batches WHERE producer=? AND seq IN ({marks})", (producer, *chunk)
            )
            rows += [(seq, DONE if bid in done else state, error) for seq, bid, state, error in found]
        return rows

    def mark_published(self, result_id: int) -> None:
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('published', ?)", (result_id,))

    # --- for subscribers --------------------------------------------------------------------
    def size_bytes(self) -> int:
        """The ledger's files on disk: the database, its WAL and the WAL's index."""
        if self.path == ":memory:":
            return 0
        return sum(os.path.getsize(f) for f in (self.path, self.path + "-wal", self.path + "-shm") if os.path.exists(f))

    def save_cursor(self, name: str, positions: dict[str, int]) -> None:
        for topic, seq in positions.items():
            self._write(
                "INSERT INTO cursors (name, topic, seq) VALUES (?,?,?) "
                "ON CONFLICT (name, topic) DO UPDATE SET seq=max(seq, excluded.seq)",
                (name, topic, seq),
            )

    def bind_key(self, producer: str, key: str) -> None:
        self._write("INSERT OR IGNORE INTO producer_keys (producer, key) VALUES (?,?)", (producer, key))

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])


def _failed(path: str, doing: str, exc: sqlite3.Error) -> LedgerError:
    """The one line a person reads for an SQLite error met while `doing` something."""
    if _disk_full(exc):
        return LedgerFull(path)
    if doing == "open" and not isinstance(exc, sqlite3.OperationalError):
        return _refuse(path, str(exc))  # not a database, or a corrupt one
    return LedgerError(f"ledger {path}: {doing} failed ({exc})")


def _disk_full(exc: sqlite3.Error) -> bool:
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # from Python 3.11
    if code is not None:
        return code & 0xFF == SQLITE_FULL  # extended codes keep the primary one in the low byte
    return "database or disk is full" in str(exc)


def _refuse(path: str, why: str) -> LedgerError:
    return LedgerError(
        f"ledger {path} is not a zfan ledger or is corrupt ({why}); "
        "it was left untouched: move it away or point ledger= elsewhere"
    )


def _open(path: str) -> sqlite3.Connection:
    if os.path.isdir(path):
        raise LedgerError(f"ledger {path} is a directory: give a file path as ledger=")
    if path != ":memory:":
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LedgerError(f"ledger {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise LedgerError(f"ledger {path} is not writable: choose a path you can write for ledger=")
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.OperationalError as exc:
        raise LedgerError(f"ledger {path} is not writable ({exc}): choose a path you can write for ledger=") from None
    try:
        db.execute("PRAGMA user_version").fetchone()  # reads the header: fails here if not a database
    except sqlite3.OperationalError as exc:
        db.close()
        raise LedgerError(f"ledger {path} is not writable ({exc}): choose a path you can write for ledger=") from None
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _refuse(path, str(exc)) from None
    return db
