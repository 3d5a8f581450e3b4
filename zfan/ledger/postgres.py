"""The ledger in PostgreSQL, shared by an active sink and its standbys.

One sink at a time is active: the one whose claim is in the `leader` row. A claim is an epoch
(a fencing token) and a time the active sink renews every second; a standby takes the row over
once the renewal is older than the claim's term (`TERM`), by the database's clock, so no two
hosts' clocks are compared. Every commit renews the claim *in its own transaction*, and only if
the epoch is still this sink's: a sink paused or cut off while another took over has its next
commit refused by the database, and steps down without a write landing.

A standby is never kept waiting by a dead or frozen sink's locks: before it takes over a claim
that ran out, it ends the sessions of the sink that held it (a sink frozen mid-commit holds the
claim's row locked, and no timeout of the server's ends a session that went idle inside a
pipeline). The fence goes last in each commit's transaction, in the same round trip as its
COMMIT, so the claim's row is locked only for that moment.

Writes wait in a buffer and go in one pipeline with the next read or the commit, as arrays (one
statement for a whole turn's leases, results, marks) rather than a statement per row.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections import Counter
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from ..errors import Fenced, LedgerError, LedgerFull, LedgerLost
from . import redact
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

TERM = 4.0  # seconds a claim lasts unrenewed: a standby takes over this long after the active sink's last word
RENEW_EVERY = 1.0  # seconds between renewals of an idle active sink's claim
SCHEMA_VERSION = 1
# The schema's advisory lock key ("zfan" in ASCII): sinks starting together create it once.
_SCHEMA_LOCK = 0x7A66616E
# Dead peers are found by the connection itself: a cut link errors within a few seconds instead
# of leaving a query waiting on TCP retransmits for minutes.
_CONNECT = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": int(TERM * 1000),
}
# psycopg warns of a lost connection itself, once per pipeline it could not end; the ledger says
# it once, in its own words, as the LedgerLost the sink logs.
logging.getLogger("psycopg").setLevel(logging.ERROR)
log = logging.getLogger(__name__)
_TABLES = ("meta", "batches", "results", "topics", "producer_keys", "cursors", "leader")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id bigint PRIMARY KEY,
    producer text NOT NULL,
    seq bigint NOT NULL,
    topic text NOT NULL,
    count integer NOT NULL,
    payload bytea,             -- dropped once the batch is done
    state smallint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    error text,
    UNIQUE (producer, seq)
);
CREATE INDEX IF NOT EXISTS batches_open ON batches (state) WHERE state < 2;
CREATE TABLE IF NOT EXISTS results (
    id bigint PRIMARY KEY,     -- publish order
    batch_id bigint NOT NULL,
    topic text NOT NULL,
    seq bigint NOT NULL,
    count integer NOT NULL,
    kind smallint NOT NULL,    -- 0 result, 1 dead letter
    payload bytea NOT NULL,
    created double precision NOT NULL,
    UNIQUE (topic, seq)
);
CREATE INDEX IF NOT EXISTS results_dead ON results (batch_id) WHERE kind = 1;
CREATE TABLE IF NOT EXISTS topics (topic text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS producer_keys (producer text PRIMARY KEY, key text NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (
    name text NOT NULL,
    topic text NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (name, topic)
);
CREATE TABLE IF NOT EXISTS leader (
    id smallint PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL,     -- the fencing token: every commit checks it
    holder text NOT NULL,      -- host:pid:token of the sink that holds it
    renewed timestamptz NOT NULL
);
"""

# Renews the claim if the epoch is still the ledger's, else fails the statement (and with it the
# transaction it is in): an error, not a count to look at, so that it can go in one round trip
# with the COMMIT it guards.
_FENCE = (
    "WITH renewed AS (UPDATE leader SET renewed = clock_timestamp() WHERE id = 1 AND epoch = %s RETURNING 1) "
    "SELECT 1 / (SELECT count(*) FROM renewed)::int"
)


class PostgresLedger(Queries):
    """A ledger in PostgreSQL. Opening it claims nothing: `claim()` makes this sink the active one."""

    def __init__(self, dsn: str, *, term: float = TERM, holder: str | None = None) -> None:
        self.dsn = dsn
        self.term = term
        self.holder = holder or holder_name()  # how this sink's claim names it
        self.path = redact(dsn)
        self.pruned: Counter[str] = Counter()
        self.epoch = 0  # this sink's claim, once claim() took it
        self._done: list[tuple[int, int]] = []
        # Writes not yet sent: they go with the next read or the commit, in one pipeline.
        self._buffer: list[tuple[str, Any]] = []
        self._in_tx = False  # a transaction is open, or its BEGIN is in the buffer
        self._renewed = 0.0  # time.monotonic() of the last renewal that landed
        self._next_batch = self._next_result = 1
        try:
            self._db = psycopg.connect(
                dsn,
                autocommit=True,
                application_name=_session_name(self.holder),  # a sink that takes over ends this one's sessions
                **_CONNECT,  # type: ignore[arg-type]
            )
        except psycopg.Error as exc:
            raise LedgerError(f"ledger {self.path}: cannot connect ({_reason(exc)})") from None
        self._cur = self._db.cursor(binary=True)  # payloads come back as bytes, not hex
        try:
            # A frozen sink's open transaction must not hold a standby's takeover for long.
            self._cur.execute(f"SET idle_in_transaction_session_timeout = {int(TERM * 1000)}")
            self._create()
        except LedgerError:
            self._db.close()
            raise
        except psycopg.Error as exc:
            error = self._failed("open", exc)
            self._db.close()
            raise error from None

    def _create(self) -> None:
        with self._db.transaction():
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            if self._cur.execute("SELECT current_schema()").fetchone() == (None,):
                raise LedgerError(
                    f"ledger {self.path}: the search_path names no schema that exists (create it, or drop options=)"
                )
            found = self._cur.execute("SELECT to_regclass('batches') IS NOT NULL, to_regclass('meta') IS NOT NULL")
            batches, meta = found.fetchone() or (False, False)
            version = self._cur.execute("SELECT value FROM meta WHERE key='zfan_ledger'").fetchone() if meta else None
            if batches and version is None:
                raise LedgerError(
                    f"ledger {self.path} holds tables that are no zfan ledger's; it was left untouched: "
                    "give the sink a database or schema of its own"
                )
            if version is not None and version[0] >= SCHEMA_VERSION:
                return  # its DDL would wait for the locks of an active sink's open transaction
            for statement in _SCHEMA.split(";\n"):
                if statement.strip():
                    self._cur.execute(statement)
            self._cur.execute(
                "INSERT INTO meta (key, value) VALUES ('zfan_ledger', %s) ON CONFLICT (key) DO NOTHING",
                (SCHEMA_VERSION,),
            )
            for table in ("batches", "results"):
                # Payloads are msgpack, and compressing them costs the sink more than it saves:
                # stored out of line, as they are (once, at creation: ALTER TABLE locks the table).
                storage = self._cur.execute(
                    "SELECT attstorage FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'payload'",
                    (table,),
                ).fetchone()
                if storage is not None and storage[0] != "e":
                    self._cur.execute(f"ALTER TABLE {table} ALTER COLUMN payload SET STORAGE EXTERNAL")

    # --- the claim -----------------------------------------------------------------------
    def claim(self) -> bool:
        """Become the active sink if no other one renewed its claim within TERM; True if this
        one is active now. The epoch rises with every claim taken."""
        try:
            current = self.claimed_by()
            # A holder on this host whose process is gone is dead for sure (a frozen one is still
            # a process): a sink restarted after a crash takes over at once, as does this sink
            # after it lost its connection. Taking over early is never unsafe, only disruptive:
            # fencing keeps a live holder's writes out.
            dead = current[1] if current is not None and _gone(current[1]) else ""
            if current is not None and (current[2] > self.term or current[1] in (dead, self.holder)):
                # The holder's sessions go first: one frozen mid-commit keeps the claim's row locked.
                self._end_sessions(current[1])
            with self._db.transaction():
                self._cur.execute("SET LOCAL lock_timeout = 1000")  # a frozen holder's lock: try again later
                row = self._cur.execute(
                    "INSERT INTO leader (id, epoch, holder, renewed) VALUES (1, 1, %s, clock_timestamp()) "
                    "ON CONFLICT (id) DO UPDATE SET epoch = leader.epoch + 1, holder = excluded.holder, "
                    "renewed = clock_timestamp() "
                    "WHERE leader.renewed < clock_timestamp() - make_interval(secs => %s) "
                    "OR leader.holder IN (%s, excluded.holder) "
                    "RETURNING epoch",
                    (self.holder, self.term, dead),
                ).fetchone()
        except pg_errors.LockNotAvailable:
            return False
        except psycopg.Error as exc:
            raise self._failed("claim", exc) from None
        if row is None:
            return False
        self.epoch = int(row[0])
        self._renewed = time.monotonic()
        # Ids come from here, not from the database, so that a group of rows goes in one
        # statement and each knows its id; read now, when no other sink can write.
        self._next_batch = int(self._one("SELECT coalesce(max(id), 0) + 1 FROM batches"))
        self._next_result = 1 + max(int(self._one("SELECT coalesce(max(id), 0) FROM results")), self.published_upto())
        return True

    def _end_sessions(self, holder: str) -> None:
        """End the sessions of the sink whose claim this one takes (this sink's own earlier
        ones too, left on the server by a cut). A frozen sink may hold locks in a transaction it
        never ends; its writes would be fenced anyway, so nothing is lost by ending them, and it
        steps down when it wakes."""
        sql = (
            "SELECT count(pg_terminate_backend(pid, %s)) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()"
        )
        try:
            self._cur.execute(sql, (int(TERM * 1000), _session_name(holder)))
        except psycopg.Error as exc:
            # Not allowed to (another role's sessions): they end by the server's own timeouts.
            log.warning("ledger %s: could not end the sessions of sink %s (%s)", self.path, holder, _reason(exc))

    def claimed_by(self) -> tuple[int, str, float] | None:
        """(epoch, holder, seconds since its renewal) of the claim in the ledger, if any."""
        row = self._read("SELECT epoch, holder, extract(epoch FROM clock_timestamp() - renewed) FROM leader")
        return (int(row[0][0]), str(row[0][1]), float(row[0][2])) if row else None

    def renew(self) -> None:
        """Renew the claim when a second went by without a commit doing it; raise Fenced if
        another sink holds it now."""
        if self.epoch and not self.uncommitted and time.monotonic() - self._renewed >= RENEW_EVERY:
            started = time.monotonic()
            self._send("renew", (_FENCE, (self.epoch,)))
            self._renewed = started

    def next_renewal(self) -> float:
        return self._renewed + RENEW_EVERY if self.epoch else math.inf

    def resign(self) -> None:
        """Give the claim up at a clean stop: a standby takes over at its next try, not after TERM."""
        if self.epoch:
            try:
                self._cur.execute(
                    "UPDATE leader SET renewed = to_timestamp(0) WHERE id = 1 AND epoch = %s", (self.epoch,)
                )
            except psycopg.Error:
                pass  # the claim then ends by itself, after TERM
            self.epoch = 0

    # --- transaction -----------------------------------------------------------------------
    # Writes wait in a buffer and go to the server in one pipeline with whatever comes next: a
    # read, which runs after them in the same transaction and so sees them, or the commit. A
    # turn of the sink's loop costs a round trip per read it makes, and one for its commit.
    def _defer(self, sql: str, args: Any = ()) -> None:
        if not self._in_tx:
            self._buffer.append(("BEGIN", ()))
            self._in_tx = True
        self._buffer.append((sql, args))

    def _send(self, doing: str, last: tuple[str, Any] | None = None) -> psycopg.Cursor[Any]:
        """Send the buffered writes, then `last`, in one round trip; the cursor holds last's result."""
        statements = [*self._buffer, last] if last is not None else self._buffer
        self._buffer = []
        try:
            if len(statements) == 1:
                self._cur.execute(*statements[0])
            elif statements:
                with self._db.pipeline():
                    for sql, args in statements:
                        self._cur.execute(sql, args)
        except psycopg.Error as exc:
            error = self._failed(doing, exc)
            if type(error) is LedgerError and self._taken_over():
                # Its sessions could not be ended (another role's): its writes meet the new
                # sink's (a key taken) before the fence does.
                error = Fenced(
                    f"ledger {self.path}: another sink took over (epoch {self.epoch} is not the ledger's now)"
                )
            raise error from None
        return self._cur

    def _fenced(self) -> Fenced:
        return Fenced(f"ledger {self.path}: another sink took over (epoch {self.epoch} is not the ledger's now)")

    def _taken_over(self) -> bool:
        """Whether another sink holds the claim now (asked after an error: rolled back first)."""
        if not self.epoch:
            return False
        self._buffer, self._in_tx = [], False
        try:
            if self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._cur.execute("ROLLBACK")
            row = self._cur.execute("SELECT epoch FROM leader").fetchone()
        except psycopg.Error:
            return False
        return row is not None and int(row[0]) != self.epoch

    def _read(self, sql: str, args: Any = ()) -> list[Any]:
        cur = self._send("read", (sql.replace("?", "%s"), args))  # the shared queries' placeholders
        try:
            return cur.fetchall()
        except psycopg.Error as exc:
            raise self._failed("read", exc) from None

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._read(sql, args)[0][0]

    def _write_now(self, sql: str, args: Any = ()) -> psycopg.Cursor[Any]:
        """A write whose outcome is wanted now (rows changed, ids returned), after the buffered ones."""
        if not self._in_tx:
            self._buffer.append(("BEGIN", ()))
            self._in_tx = True
        return self._send("write", (sql, args))

    def _change(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return self._write_now(sql.replace("?", "%s"), args).rowcount

    @property
    def uncommitted(self) -> bool:
        return self._in_tx or bool(self._done)

    def commit(self) -> None:
        if self._done:
            done, self._done = self._done, []
            self._defer(
                "UPDATE batches SET state=%s, payload=NULL, error=NULL WHERE id = ANY(%s)", (DONE, [b for _, b in done])
            )
        if not self._in_tx:
            return
        started = time.monotonic()
        if self.epoch:
            # In this transaction, last before its COMMIT: it lands only while the claim is this sink's.
            self._buffer.append((_FENCE, (self.epoch,)))
        self._in_tx = False
        self._send("commit", ("COMMIT", ()))
        if self.epoch:
            self._renewed = started

    def close(self) -> None:
        """Roll back what is not committed, give the claim up, and close. Raises nothing."""
        self._done.clear()
        self._buffer.clear()
        self._in_tx = False
        try:
            if self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._cur.execute("ROLLBACK")
            self.resign()
        except psycopg.Error:
            pass  # closing the connection rolls back all the same
        self._db.close()

    def _failed(self, doing: str, exc: psycopg.Error) -> LedgerError:
        """The one line a person reads for a database error met while `doing` something."""
        if isinstance(exc, pg_errors.DiskFull):
            return LedgerFull(self.path)
        if isinstance(exc, pg_errors.DivisionByZero):  # what _FENCE raises for an epoch not the ledger's
            return self._fenced()
        state = exc.sqlstate or ""
        # No SQLSTATE: libpq's own error, the connection is gone; 08: connection failures;
        # 57P: the server ended the session (shut down, or another sink took over).
        # 25006: the server is read-only now (a database failover put a replica in its place).
        if self._db.broken or self._db.closed or not state or state.startswith(("08", "57P")) or state == "25006":
            return LedgerLost(
                f"ledger {self.path}: {doing} failed: the database is out of reach, or ended this sink's "
                f"session ({_reason(exc)})"
            )
        return LedgerError(f"ledger {self.path}: {doing} failed ({_reason(exc)})")

    # --- startup ---------------------------------------------------------------------------
    def next_epoch(self) -> int:
        """The epoch of this sink's claim: larger than any earlier active sink's."""
        if not self.epoch:
            raise LedgerError(f"ledger {self.path}: this sink holds no claim on it")
        return self.epoch

    def recover(self) -> int:
        """Put batches leased by an earlier sink back to pending; return how many. That sink's
        end is no fault of the batch: the lease does not count as an attempt."""
        n = self._write_now(
            "UPDATE batches SET state=%s, attempts=greatest(attempts - 1, 0) WHERE state=%s", (PENDING, LEASED)
        ).rowcount
        self.commit()
        return n

    def save_heads(self, heads: dict[str, int]) -> None:
        if heads:
            self._defer(
                "INSERT INTO topics (topic, seq) SELECT * FROM unnest(%s::text[], %s::bigint[]) "
                "ON CONFLICT (topic) DO UPDATE SET seq = greatest(topics.seq, excluded.seq)",
                (list(heads), list(heads.values())),
            )

    # --- the life of a batch ---------------------------------------------------------------
    def insert_batches(self, producer: str, batches: list[tuple[int, str, int, bytes]]) -> list[int | None]:
        """Store new batches (seq, topic, count, payload) of one producer as pending; return each
        one's id, None for one whose (producer, seq) is stored already."""
        first = self._next_batch
        ids = list(range(first, first + len(batches)))
        self._next_batch += len(batches)
        seqs, topics, counts, payloads = (list(column) for column in zip(*batches, strict=True))
        cur = self._write_now(
            "INSERT INTO batches (id, producer, seq, topic, count, payload, state) "
            "SELECT u.id, %s, u.seq, u.topic, u.count, u.payload, %s "
            "FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::int[], %b::bytea[]) "
            "AS u(id, seq, topic, count, payload) "
            "ON CONFLICT (producer, seq) DO NOTHING RETURNING id",
            (producer, PENDING, ids, seqs, topics, counts, payloads),
        )
        try:
            stored = {r[0] for r in cur.fetchall()}
        except psycopg.Error as exc:
            raise self._failed("write", exc) from None
        return [bid if bid in stored else None for bid in ids]

    def lease(self, leases: list[tuple[int, int]]) -> None:
        if leases:
            self._defer(
                "UPDATE batches b SET state=%s, attempts=u.attempt "
                "FROM unnest(%s::bigint[], %s::int[]) AS u(id, attempt) WHERE b.id = u.id",
                (LEASED, [bid for bid, _ in leases], [attempt for _, attempt in leases]),
            )

    def release(self, batch_id: int, error: str | None = None, *, attempts: int | None = None) -> None:
        self._defer(
            "UPDATE batches SET state=%s, error=coalesce(%s, error), attempts=coalesce(%s, attempts) WHERE id=%s",
            (PENDING, error, attempts, batch_id),
        )

    def _store(self, stored: list[Stored], created: float) -> None:
        self._defer(
            "INSERT INTO results (id, batch_id, topic, seq, count, kind, payload, created) "
            "SELECT u.id, u.batch_id, u.topic, u.seq, u.count, 0, u.payload, %s "
            "FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::bigint[], %s::int[], %b::bytea[]) "
            "AS u(id, batch_id, topic, seq, count, payload)",
            (
                created,
                [r.id for r in stored],
                [r.batch_id for r in stored],
                [r.topic for r in stored],
                [r.seq for r in stored],
                [r.count for r in stored],
                [r.payload for r in stored],
            ),
        )

    def dead_letter(self, batch_id: int, topic: str, seq: int, error: str) -> Stored:
        count, payload = self._read("SELECT count, payload FROM batches WHERE id=%s", (batch_id,))[0]
        self._defer("UPDATE batches SET state=%s, error=%s WHERE id=%s", (DEAD, error, batch_id))
        rid, self._next_result = self._next_result, self._next_result + 1
        self._defer(
            "INSERT INTO results (id, batch_id, topic, seq, count, kind, payload, created) "
            "VALUES (%s,%s,%s,%s,%s,1,%b,%s)",
            (rid, batch_id, topic, seq, count, payload, time.time()),
        )
        return Stored(rid, batch_id, topic, seq, count, 1, bytes(payload))

    def owners(self, batch_ids: list[int]) -> list[tuple[int, str, int]]:
        return [tuple(r) for r in self._read("SELECT id, producer, seq FROM batches WHERE id = ANY(%s)", (batch_ids,))]

    def states(self, producer: str, seqs: list[int]) -> list[tuple[int, int, str | None]]:
        done = {bid for _, bid in self._done}  # marked done at the commit: leased until then
        found = self._read(
            "SELECT seq, id, state, error FROM batches WHERE producer=%s AND seq = ANY(%s)", (producer, seqs)
        )
        return [(seq, DONE if bid in done else state, error) for seq, bid, state, error in found]

    def mark_published(self, result_id: int) -> None:
        self._defer(
            "INSERT INTO meta (key, value) VALUES ('published', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (result_id,),
        )

    # --- dead letters ------------------------------------------------------------------------
    def dead_ids(self, batch_ids: list[int] | None, prefix: str) -> list[int]:
        args: tuple[Any, ...]
        if batch_ids is None:
            sql, args = "SELECT id FROM batches WHERE state=%s AND starts_with(topic, %s) ORDER BY id", (DEAD, prefix)
        else:
            sql = "SELECT id FROM batches WHERE state=%s AND starts_with(topic, %s) AND id = ANY(%s) ORDER BY id"
            args = (DEAD, prefix, batch_ids)
        return [int(r[0]) for r in self._read(sql, args)]

    def requeue(self, batch_ids: list[int]) -> list[Pending]:
        self._defer(
            "UPDATE batches SET state=%s, attempts=0, error=NULL WHERE id = ANY(%s) AND state=%s",
            (PENDING, batch_ids, DEAD),
        )
        rows = self._read(
            "SELECT id, topic, count FROM batches WHERE id = ANY(%s) AND state=%s ORDER BY id", (batch_ids, PENDING)
        )
        return [Pending(bid, topic, count, 0) for bid, topic, count in rows]

    def purge(self, batch_ids: list[int]) -> None:
        self._defer(
            "UPDATE batches SET state=%s, payload=NULL WHERE id = ANY(%s) AND state=%s", (PURGED, batch_ids, DEAD)
        )
        self._defer(
            "UPDATE results SET payload=%b, count=0 WHERE batch_id = ANY(%s) AND kind=1", (EMPTY_RECORDS, batch_ids)
        )

    # --- for subscribers, producers' keys, retention ------------------------------------------
    def save_cursor(self, name: str, positions: dict[str, int]) -> None:
        if positions:
            self._defer(
                "INSERT INTO cursors (name, topic, seq) SELECT %s, * FROM unnest(%s::text[], %s::bigint[]) "
                "ON CONFLICT (name, topic) DO UPDATE SET seq = greatest(cursors.seq, excluded.seq)",
                (name, list(positions), list(positions.values())),
            )

    def bind_key(self, producer: str, key: str) -> None:
        self._defer("INSERT INTO producer_keys (producer, key) VALUES (%s,%s) ON CONFLICT DO NOTHING", (producer, key))

    def size_bytes(self) -> int:
        """The ledger's tables with their indexes and TOAST, as the server stores them."""
        return int(
            self._one(
                "SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0) FROM unnest(%s::text[]) AS t",
                (list(_TABLES),),
            )
        )

    def integrity_check(self) -> str:
        """The server keeps its own pages whole; what is checked here is that every table answers."""
        for table in _TABLES:
            self._read(f"SELECT 1 FROM {table} LIMIT 1")
        return "ok"


def holder_name() -> str:
    """How a sink names itself in the claim: its host (with its PID namespace), pid, and a
    token of this start."""
    return f"{_where()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _where() -> str:
    """This host, as far as pids go: containers that share a host name (or the host's network)
    number their processes apart, each in a PID namespace of its own."""
    try:
        return f"{socket.gethostname()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _session_name(holder: str) -> str:
    """The application_name of a sink's database sessions: from its token, unique and short
    (the server keeps 63 bytes of it)."""
    return f"zfan sink {holder.rsplit(':', 1)[-1]}"


def _gone(holder: str) -> bool:
    """Whether a claim's holder is a process of this host that no longer exists."""
    where, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if where != _where() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, as another user's process
    return False


def _reason(exc: psycopg.Error) -> str:
    """The server's or libpq's own words: their first line (libpq adds guesses on the next)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return " ".join(first.split()) or type(exc).__name__
