"""The SQLite ledger: WAL, one row per (producer, seq), group commit, and a clear refusal of
files it must not touch."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest

from tests import ledgers
from tests.helpers import ROOT, free_ports, run_cli, wait_for
from zfan.errors import LedgerError, LedgerFull
from zfan.ledger import DEAD, DONE, LEASED, PENDING, Ledger, Pending, SqliteLedger
from zfan.ledger.sqlite import _failed

pytestmark = pytest.mark.timeout(30)


def peek(path: str, sql: str, args: tuple = ()) -> list[tuple]:
    """What another process would read: committed data only."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, args).fetchall()


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process truly cannot create files in (chmod does not stop root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    candidates = [str(folder), "/proc/sys"]
    try:
        for candidate in candidates:
            try:
                with open(os.path.join(candidate, "probe.zfan"), "wb"):
                    pass
            except OSError:
                yield candidate
                return
            os.unlink(os.path.join(candidate, "probe.zfan"))
        pytest.skip("no folder this process cannot write to")
    finally:
        folder.chmod(0o700)


def test_ledger_is_in_wal_mode(ledger):
    assert peek(ledger.path, "PRAGMA journal_mode") == [("wal",)]


def test_new_ledger_passes_integrity_check(backend):
    ledger = backend.open()
    assert ledger.integrity_check() == "ok"
    ledger.insert_batch("prod", 1, "t", 2, b"\x92\x01\x02")
    ledger.commit()
    assert ledger.integrity_check() == "ok"


def test_a_batch_is_stored_once_per_producer_and_seq(backend):
    ledger = backend.open()
    first = ledger.insert_batch("prod", 1, "t", 2, b"one")
    assert isinstance(first, int)
    assert ledger.insert_batch("prod", 1, "t", 2, b"one again") is None
    assert ledger.insert_batch("prod", 1, "other", 5, b"different") is None
    other_producer = ledger.insert_batch("prod-2", 1, "t", 2, b"two")
    next_seq = ledger.insert_batch("prod", 2, "t", 2, b"three")
    assert len({first, other_producer, next_seq}) == 3
    ledger.commit()
    assert backend.peek("SELECT producer, seq, payload FROM batches ORDER BY id") == [
        ("prod", 1, b"one"),
        ("prod-2", 1, b"two"),
        ("prod", 2, b"three"),
    ]
    assert ledger.payload(first) == b"one"


def test_unique_constraint_is_in_the_file(ledger):
    ledger.insert_batch("prod", 1, "t", 1, b"x")
    ledger.commit()
    with closing(sqlite3.connect(ledger.path)) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute(
            "INSERT INTO batches (producer, seq, topic, count, payload, state) VALUES ('prod', 1, 't', 1, x'00', 0)"
        )


def test_writes_are_invisible_until_commit(backend):
    ledger = backend.open()
    ledger.insert_batch("prod", 1, "t", 1, b"x")
    assert backend.peek("SELECT count(*) FROM batches") == [(0,)]
    ledger.commit()
    assert backend.peek("SELECT count(*) FROM batches") == [(1,)]


def test_close_rolls_back_what_was_not_committed(backend):
    led = backend.open()
    led.insert_batch("prod", 1, "t", 1, b"kept")
    led.commit()
    led.insert_batch("prod", 2, "t", 1, b"lost")
    led.close()
    assert [p.batch_id for p in backend.open().pending()] == [1]


def test_the_life_of_a_batch(backend):
    ledger = backend.open()
    bid = ledger.insert_batch("prod", 1, "in", 3, b"payload")
    assert ledger.pending() == [Pending(bid, "in", 3, 0)]
    ledger.lease([(bid, 1)])
    ledger.commit()
    assert backend.peek("SELECT state, attempts FROM batches") == [(LEASED, 1)]
    ledger.release(bid, "boom")
    assert ledger.batch_info(bid) == ("in", 3, 1, "boom")
    assert ledger.pending() == [Pending(bid, "in", 3, 1)]
    ledger.lease([(bid, 2)])
    stored = ledger.store_results(bid, [("out", 1, 2, b"r1"), ("other", 1, 1, b"r2")])
    ledger.commit()
    assert [(s.topic, s.seq, s.count, s.kind, s.payload) for s in stored] == [
        ("out", 1, 2, 0, b"r1"),
        ("other", 1, 1, 0, b"r2"),
    ]
    assert backend.peek("SELECT state, payload, error FROM batches") == [(DONE, None, None)]
    assert ledger.counts() == {"pending": 0, "leased": 0, "done": 1, "dead": 0, "purged": 0}
    assert ledger.topic_seqs() == {"out": 1, "other": 1}
    with pytest.raises(LedgerError, match=f"batch {bid} has no payload"):
        ledger.payload(bid)


def test_dead_letter_keeps_the_payload_and_the_error(backend):
    ledger = backend.open()
    bid = ledger.insert_batch("prod", 1, "in", 3, b"payload")
    ledger.lease([(bid, 1)])
    stored = ledger.dead_letter(bid, "zfan.dead", 1, "ValueError: bad")
    ledger.commit()
    assert (stored.topic, stored.seq, stored.kind, stored.payload, stored.count) == ("zfan.dead", 1, 1, b"payload", 3)
    assert backend.peek("SELECT state, error FROM batches") == [(DEAD, "ValueError: bad")]
    assert ledger.counts()["dead"] == 1
    assert ledger.pending() == []


def test_recover_puts_leased_batches_back_without_counting_the_interrupted_lease(backend):
    ledger = backend.open()
    a = ledger.insert_batch("prod", 1, "t", 1, b"a")
    b = ledger.insert_batch("prod", 2, "t", 1, b"b")
    ledger.lease([(a, 2)])  # its second attempt, cut short by the sink's own death
    ledger.commit()
    assert ledger.recover() == 1
    assert ledger.pending() == [Pending(a, "t", 1, 1), Pending(b, "t", 1, 0)]
    assert backend.peek("SELECT state, attempts FROM batches WHERE id=?", (a,)) == [(PENDING, 1)]


def test_epochs_grow_across_opens(backend):
    epochs = []
    for _ in range(3):
        led = backend.open()
        epochs.append(led.next_epoch())
        led.close()
    assert epochs == [1, 2, 3]


def test_published_mark_and_results_after(backend):
    ledger = backend.open()
    a = ledger.insert_batch("prod", 1, "t", 1, b"a")
    stored = ledger.store_results(a, [("out", 1, 1, b"r1"), ("out", 2, 1, b"r2"), ("out", 3, 1, b"r3")])
    ledger.commit()
    assert ledger.published_upto() == 0
    assert list(ledger.results_after(0)) == stored
    ledger.mark_published(stored[1].id)
    ledger.commit()
    assert ledger.published_upto() == stored[1].id
    assert list(ledger.results_after(ledger.published_upto())) == [stored[2]]


def test_results_are_unique_per_topic_and_seq(ledger):
    a = ledger.insert_batch("prod", 1, "t", 1, b"a")
    ledger.store_results(a, [("out", 1, 1, b"r1")])
    ledger.commit()
    with closing(sqlite3.connect(ledger.path)) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO results (batch_id, topic, seq, count, kind, payload) VALUES (1, 'out', 1, 1, 0, x'00')")


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database\n" * 200,
        b"hello",
        b"\x00" * 4096,
        b"SQLite format 3\x00" + b"\xff" * 200,
    ],
)
def test_a_non_database_file_is_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(LedgerError) as info:
        SqliteLedger(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "untouched" in message
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no -wal or -shm left behind


@pytest.mark.parametrize(
    "table",
    [
        "customers (id INTEGER PRIMARY KEY, name TEXT)",
        "batches (x)",  # a table of the same name does not make it a ledger
    ],
)
def test_another_database_is_refused_and_left_untouched(tmp_path, table):
    path = tmp_path / "app.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"CREATE TABLE {table}")
        db.commit()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not a zfan ledger") as info:
        SqliteLedger(str(path))
    assert "untouched" in str(info.value)
    assert path.read_bytes() == before
    assert peek(str(path), "SELECT name FROM sqlite_master") == [(table.split()[0],)]


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(LedgerError, match="is a directory"):
        SqliteLedger(str(tmp_path))


def test_a_missing_folder_is_refused(tmp_path):
    path = tmp_path / "nope" / "ledger.db"
    with pytest.raises(LedgerError, match="does not exist"):
        SqliteLedger(str(path))
    assert not (tmp_path / "nope").exists()


def test_an_unwritable_folder_is_refused(unwritable_folder):
    path = os.path.join(unwritable_folder, "ledger.db")
    with pytest.raises(LedgerError) as info:
        SqliteLedger(path)
    assert path in str(info.value)
    assert "writ" in str(info.value)
    assert not os.path.exists(path)


def test_a_read_only_ledger_file_is_refused(tmp_path):
    path = tmp_path / "ledger.db"
    SqliteLedger(str(path)).close()
    path.chmod(0o400)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        with pytest.raises(LedgerError, match="not writable"):
            SqliteLedger(str(path))
    finally:
        path.chmod(0o600)


def test_memory_ledger_works(tmp_path):
    led = SqliteLedger(":memory:")
    try:
        assert led.next_epoch() == 1
        bid = led.insert_batch("prod", 1, "t", 1, b"x")
        led.commit()
        assert led.pending() == [Pending(bid, "t", 1, 0)]
    finally:
        led.close()


def test_deduplication_outlives_the_results_retention(backend):
    ledger = backend.open()
    ids = [ledger.insert_batch("prod", seq, "t", 1, b"x") for seq in range(1, 11)]
    for seq, batch_id in enumerate(ids, 1):
        ledger.lease([(batch_id, 1)])
        ledger.store_results(batch_id, [("t", seq, 1, b"r")])
    ledger.mark_published(10)
    ledger.commit()
    results, batches = ledger.prune(keep=2, max_age=None, now=0.0, keep_batches=5)
    ledger.commit()
    assert (results, batches) == (8, 5)
    assert ledger.insert_batch("prod", 10, "t", 1, b"x") is None, "a late resend is still a duplicate"
    assert ledger.insert_batch("prod", 1, "t", 1, b"x") is not None, "beyond keep_batches it is forgotten"


def test_a_producer_ids_key_is_kept_as_long_as_its_batches(backend):
    ledger = backend.open()
    for producer in ("old", "new"):
        ledger.bind_key(producer, f"key-of-{producer}")
    ledger.bind_key("old", "another key")  # the first key keeps the id
    for seq, producer in enumerate(["old"] * 3 + ["new"] * 3, 1):
        batch_id = ledger.insert_batch(producer, seq, "t", 1, b"x")
        ledger.lease([(batch_id, 1)])
        ledger.store_results(batch_id, [("t", seq, 1, b"r")])
    ledger.commit()
    assert ledger.producer_keys() == {"old": "key-of-old", "new": "key-of-new"}
    ledger.prune(keep=None, max_age=None, now=0.0, keep_batches=3)
    ledger.commit()
    assert ledger.producer_keys() == {"new": "key-of-new"}, "with its batches forgotten, so is its key"


# --- SQLite's errors: one LedgerError each, and a full disk loses nothing committed ----------


def fill_up(ledger: Ledger, per_commit: int = 4) -> tuple[list[int], LedgerError]:
    """Store 3 KB batches, committing every `per_commit`, until the ledger refuses one (it is
    capped a few dozen pages above its size, as a full disk would). Returns the committed seqs."""
    pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]
    ledger._db.execute(f"PRAGMA max_page_count={pages + 40}")
    committed: list[int] = []
    for seq in range(1, 1000):
        try:
            ledger.insert_batch("prod", seq, "t", 1, os.urandom(3000))
            if seq % per_commit == 0:
                ledger.commit()
                committed = list(range(1, seq + 1))
        except LedgerError as exc:
            return committed, exc
    raise AssertionError("the capped ledger never filled up")


def test_a_full_disk_is_one_clear_error_and_loses_nothing_committed(tmp_path):
    path = str(tmp_path / "l.db")
    led = SqliteLedger(path)
    committed, error = fill_up(led)
    assert committed, "some turns were committed before the disk filled"
    assert isinstance(error, LedgerFull)
    assert str(error) == f"ledger {path}: disk full; nothing acknowledged is lost (free space and start the sink again)"
    led.commit()  # SQLite rolled the failed transaction back itself: nothing is left to commit
    led.close()  # and nothing to roll back: no "cannot rollback - no transaction is active"
    led.close()  # twice is harmless
    assert peek(path, "PRAGMA integrity_check") == [("ok",)]
    assert [seq for (seq,) in peek(path, "SELECT seq FROM batches ORDER BY seq")] == committed
    led = SqliteLedger(path)
    try:
        assert len(led.pending()) == len(committed)
    finally:
        led.close()


def test_close_after_a_write_refused_for_space_is_clean_and_the_ledger_works_on(ledger):
    committed, _ = fill_up(ledger, per_commit=1)
    ledger._db.execute("PRAGMA max_page_count=1000000")  # space is back
    bid = ledger.insert_batch("prod", 5000, "t", 1, b"after")
    ledger.commit()
    assert [p.batch_id for p in ledger.pending()][-1] == bid
    assert len(ledger.pending()) == len(committed) + 1
    assert ledger.integrity_check() == "ok"


def test_a_constraint_error_is_a_ledger_error_and_leaves_the_turn_usable(ledger):
    a = ledger.insert_batch("prod", 1, "t", 1, b"a")
    ledger.store_results(a, [("out", 1, 1, b"r1")])
    b = ledger.insert_batch("prod", 2, "t", 1, b"b")
    with pytest.raises(LedgerError) as info:
        ledger.store_results(b, [("out", 1, 1, b"r1 again")])  # (topic, seq) is taken
    assert not isinstance(info.value, LedgerFull)
    assert str(info.value) == (
        f"ledger {ledger.path}: write failed (UNIQUE constraint failed: results.topic, results.seq)"
    )
    ledger.commit()  # only the refused statement was undone
    assert peek(ledger.path, "SELECT topic, seq, payload FROM results") == [("out", 1, b"r1")]


def test_a_read_error_is_a_ledger_error(ledger):
    with closing(sqlite3.connect(ledger.path)) as db:
        db.execute("DROP TABLE topics")
    with pytest.raises(LedgerError) as info:
        ledger.topic_seqs()
    assert str(info.value) == f"ledger {ledger.path}: read failed (no such table: topics)"
    ledger.close()
    ledger.close()


@pytest.mark.parametrize(
    "message, full",
    [
        ("database or disk is full", True),  # Python 3.10: no error code, only the text
        ("disk I/O error", False),
    ],
)
def test_a_full_disk_is_known_by_its_text_where_there_is_no_error_code(message, full):
    exc = sqlite3.OperationalError(message)  # made by hand: it carries no sqlite_errorcode
    assert isinstance(_failed("z.db", "commit", exc), LedgerFull) is full


def test_a_new_ledger_has_16_kb_pages_and_commits_never_checkpoint(ledger):
    """A batch's payload takes few pages, and the WAL is copied to the file by another thread,
    so that no commit stalls on a checkpoint, nor on cutting the WAL file back after one."""
    assert peek(ledger.path, "PRAGMA page_size") == [(16384,)]
    assert ledger._db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    assert ledger._db.execute("PRAGMA journal_size_limit").fetchone() == (-1,)


def test_the_wal_stays_bounded_while_commits_go_on_without_pause(tmp_path):
    every = 256 << 10
    path = str(tmp_path / "z.db")
    led = SqliteLedger(path, checkpoint_every=every)
    payload = os.urandom(20_000)
    biggest = 0
    try:
        for seq in range(2000):  # about 40 MB of payloads and as much of results
            bid = led.insert_batch("p", seq, "t", 1, payload)
            assert bid is not None
            led.lease([(bid, 1)])
            led.store_results(bid, [("t", seq + 1, 1, payload)])
            led.commit()
            biggest = max(biggest, os.path.getsize(path + "-wal"))
        checkpoints = led._checkpoints.checkpoints if led._checkpoints else 0
    finally:
        led.close()
    assert checkpoints >= 1
    # Past 8 x `every` a writer waits for the checkpointer to restart the WAL; it looks every
    # `every` bytes of its own estimate, which counts payloads and a few pages per commit.
    assert biggest < 16 * every, f"the WAL grew to {biggest:,} bytes"
    assert peek(path, "SELECT count(*), sum(length(payload)) FROM results") == [(2000, 2000 * 20_000)]
    assert peek(path, "PRAGMA integrity_check") == [("ok",)]


def test_an_existing_ledger_keeps_its_page_size(tmp_path):
    path = str(tmp_path / "old.db")
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA application_id=2053529966")  # a ledger made before 16 KB pages
        db.commit()
    led = SqliteLedger(path)
    led.insert_batch("p", 1, "t", 1, b"\x01")
    led.commit()
    led.close()
    assert peek(path, "PRAGMA page_size") == [(4096,)]
    assert peek(path, "SELECT count(*) FROM batches") == [(1,)]


# --- PostgreSQL: what a person gets for a wrong DSN, a foreign database, a missing extra ---------


def test_a_postgres_ledger_that_cannot_be_reached_is_one_line_and_exit_5():
    (port,) = free_ports(1)  # nothing listens there
    dsn = f"postgresql://zfan@127.0.0.1:{port}/zfan"
    out = run_cli("sink", "--ledger", dsn, "--intake", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0")
    assert out.returncode == 5, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"zfan sink: error: ledger {dsn}: cannot connect ("), lines
    assert "Traceback" not in out.stderr


def test_a_postgres_password_is_never_printed():
    (port,) = free_ports(1)
    out = run_cli("sink", "--ledger", f"postgresql://zfan:s3cret@127.0.0.1:{port}/zfan")
    assert out.returncode == 5 and "s3cret" not in out.stderr
    assert f"ledger postgresql://zfan:***@127.0.0.1:{port}/zfan: cannot connect" in out.stderr


def test_a_postgres_schema_with_other_tables_is_refused_and_left_untouched():
    import psycopg

    from zfan.ledger.postgres import PostgresLedger

    with ledgers.schema() as dsn:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute("CREATE TABLE batches (id int, what text)")
            db.execute("INSERT INTO batches VALUES (1, 'theirs')")
        with pytest.raises(LedgerError, match="holds tables that are no zfan ledger's; it was left untouched"):
            PostgresLedger(dsn)
        with psycopg.connect(dsn, autocommit=True) as db:
            assert db.execute("SELECT * FROM batches").fetchall() == [(1, "theirs")]
            assert db.execute("SELECT to_regclass('results')").fetchone() == (None,)


def test_a_postgres_ledger_without_psycopg_says_which_extra_to_install():
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.argv = ['zfan', 'sink', '--ledger', 'postgresql://h/db']; "
        "from zfan.cli import main; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "zfan sink: error: a postgresql:// ledger needs psycopg: pip install 'zfan[postgres]'"


# --- PostgreSQL: one active sink, fenced in the database ------------------------------------------


def test_a_commit_under_an_old_epoch_is_refused_by_the_postgres_database():
    from zfan.errors import Fenced
    from zfan.ledger.postgres import PostgresLedger

    with ledgers.schema() as dsn:
        old = PostgresLedger(dsn, term=0.0)
        new = PostgresLedger(dsn, term=0.0)
        try:
            assert old.claim() and new.claim()
            assert (old.epoch, new.epoch) == (1, 2)
            # The old sink's late write, on a connection of its own (its first one was ended).
            late = PostgresLedger(dsn, holder=old.holder)
            late.epoch = old.epoch
            late.insert_batch("prod", 1, "t", 1, b"late")
            with pytest.raises(Fenced, match="another sink took over"):
                late.commit()
            late.close()
            new.insert_batch("prod", 2, "t", 1, b"new")
            new.commit()
            with closing(__import__("psycopg").connect(dsn)) as db:
                assert db.execute("SELECT seq FROM batches").fetchall() == [(2,)]
        finally:
            old.close()
            new.close()


@pytest.mark.timeout(20)
def test_a_postgres_takeover_is_not_held_up_by_a_frozen_sinks_locks():
    from zfan.errors import LedgerLost
    from zfan.ledger.postgres import PostgresLedger

    with ledgers.schema() as dsn:
        frozen = PostgresLedger(dsn, term=0.0)
        standby = PostgresLedger(dsn, term=0.0)
        try:
            assert frozen.claim()
            frozen.insert_batch("prod", 1, "t", 1, b"uncommitted")  # its transaction holds the row's locks
            assert standby.claim()  # and ends the frozen sink's sessions
            assert standby.insert_batch("prod", 1, "t", 1, b"resent") is not None  # not waiting on those locks
            standby.commit()
            with pytest.raises(LedgerLost):
                frozen.commit()
            assert standby.payload(1) == b"resent"
        finally:
            frozen.close()
            standby.close()


@pytest.mark.timeout(30)
def test_a_postgres_sink_frozen_mid_commit_does_not_keep_a_standby_out():
    import psycopg

    from zfan.ledger.postgres import PostgresLedger, _session_name

    with ledgers.schema() as dsn:
        active = PostgresLedger(dsn)
        standby = PostgresLedger(dsn, term=0.2)
        # The active sink frozen between its fence and its COMMIT: the claim's row stays locked,
        # in a session no server timeout ends.
        frozen = psycopg.connect(dsn, application_name=_session_name(active.holder))
        try:
            assert active.claim()
            frozen.execute("UPDATE leader SET renewed = renewed WHERE id = 1")
            wait_for(standby.claim, 15, interval=0.1, what="the standby taking over")
            assert standby.epoch == 2
            with pytest.raises(psycopg.OperationalError):
                frozen.execute("SELECT 1")  # its session was ended
        finally:
            frozen.close()
            active.close()
            standby.close()


def test_a_plain_error_after_a_postgres_takeover_is_said_as_fenced(monkeypatch):
    from zfan.errors import Fenced
    from zfan.ledger.postgres import PostgresLedger

    # The new sink may not end the old one's sessions (another database role): the old sink's
    # next write meets the new sink's rows (an id taken) before its fence does.
    monkeypatch.setattr(PostgresLedger, "_end_sessions", lambda self, holder: None)
    with ledgers.schema() as dsn:
        old, new = PostgresLedger(dsn, term=0.0), PostgresLedger(dsn, term=0.0)
        try:
            assert old.claim() and new.claim()
            new.insert_batch("prod", 1, "t", 1, b"new")
            new.commit()
            with pytest.raises(Fenced, match="another sink took over"):
                old.insert_batch("prod", 2, "t", 1, b"old")  # the same id: a primary key taken
        finally:
            old.close()
            new.close()


def test_only_a_process_of_this_host_and_pid_namespace_that_is_gone_loses_its_claim_at_once():
    from zfan.ledger.postgres import _gone, _where

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    assert _gone(f"{_where()}:{child.pid}:token")
    assert not _gone(f"{_where()}:{os.getpid()}:token"), "this process"
    assert not _gone(f"{_where()}:1:token"), "a live process"
    assert not _gone(f"{_where()}x:{child.pid}:token"), "another host, or a container's own pids"
