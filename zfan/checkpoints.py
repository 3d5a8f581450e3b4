"""WAL checkpoints off the sink's thread.

SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, on the thread
that commits: with its fsyncs, one commit in a few hundred took 60 ms to over a second, and
the sink acknowledged, leased and published nothing meanwhile. Here a thread of its own, on a
connection of its own, copies the WAL into the database file while the sink goes on writing
(a PASSIVE checkpoint blocks no writer). Durability is unchanged: a commit is as durable once
it is in the WAL as it was before.

A passive checkpoint never catches up with a writer that commits without pause, and a WAL is
only reused from its start once one has: past LIMIT times `every` bytes of WAL the checkpointer
finishes with a RESTART checkpoint, which holds the writer back for the last few frames. Should
the checkpointer fall behind all the same (a writer far faster than the disk), a writer past
twice that waits for the next pass to end: the file stays bounded whatever the load.

The WAL file is reused, never cut back: it keeps the largest size it reached, at most LIMIT
times `every` (128 MB by default; twice that while a writer outruns the checkpointer). Cutting
it back after each checkpoint (journal_size_limit) made the commit that followed wait about
50 ms on the file system, which was most of the sink's p99 latency at half load.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

log = logging.getLogger(__name__)

# Bytes written to the WAL between two checkpoints. Pages rewritten in that time (the batches
# table's, the free pages a finished batch's payload leaves) are copied to the file once.
EVERY = 32 << 20
# A WAL file larger than this many times `every` has not been reused from its start for a
# while: restart it.
LIMIT = 4
BEHIND_WAIT = 30.0  # seconds a writer waits for a pass at most (a checkpoint that fails goes on failing)


class Checkpointer:
    """Checkpoints the ledger at `path` whenever `wrote()` has counted `every` bytes."""

    def __init__(self, path: str, *, every: int = EVERY) -> None:
        self._path = path
        self._every = every
        self._limit = LIMIT * every
        self._written = 0  # the committing thread's count: no lock on that path
        self._due = threading.Event()
        self._passes = threading.Condition()
        self._started = self._finished = 0  # passes (under _passes)
        self._stop = False
        self._failing = False
        # Opened here so that a ledger that cannot be read fails its opening, not this thread.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="zfan-checkpoints", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        """The committing thread wrote about `n` bytes; wakes the checkpointer every `every`.
        Between two transactions, so that a writer that must wait holds no lock."""
        self._written += n
        if self._written < self._every:
            return
        self._written = 0
        behind = _size(self._path + "-wal") > 2 * self._limit
        with self._passes:
            want = self._started + 1  # a pass that starts after this, and so sees the WAL's size
        self._due.set()
        if behind:
            with self._passes:
                self._passes.wait_for(lambda: self._finished >= want or self._stop, timeout=BEHIND_WAIT)

    def close(self) -> None:
        with self._passes:
            self._stop = True
            self._passes.notify_all()
        self._due.set()
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._stop:
                    return
                with self._passes:
                    self._started += 1
                    this = self._started
                self._checkpoint()
                with self._passes:
                    self._finished = this
                    self._passes.notify_all()
        finally:
            with self._passes:  # however it ended, no writer waits for a pass that cannot come
                self._stop = True
                self._passes.notify_all()

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if _size(self._path + "-wal") > self._limit:
                self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            self.checkpoints += 1
            if self._failing:
                log.info("ledger %s: checkpoints work again", self._path)
                self._failing = False
        except sqlite3.Error as exc:
            # The WAL grows meanwhile, which is safe; a disk that is full for good fails the
            # sink's own commits, which stop it with a clear line.
            if not self._failing:
                log.warning("ledger %s: checkpoint failed (%s); the WAL grows until one succeeds", self._path, exc)
                self._failing = True


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
