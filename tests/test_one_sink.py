"""One sink per ledger: a second sink is refused before it reads or writes anything, and the
running one goes on untouched."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
from contextlib import closing

import pytest

from tests.helpers import run_cli, wait_for
from zfan import LedgerError, Producer, Sink, Subscriber, Worker, query_status
from zfan.ledger import LEASED
from zfan.lock import STALE_AFTER, LedgerLock

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"


def rows(path: str) -> list[tuple[int, int]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT state, attempts FROM batches ORDER BY id").fetchall()


@pytest.fixture
def running(tmp_path, ctx):
    """A sink whose one worker holds a lease until the test lets it go."""
    release = threading.Event()

    def held(records):
        release.wait(30)
        return records

    path = str(tmp_path / "z.db")
    with (
        Sink(intake=ANY, control=ANY, results=ANY, ledger=path, context=ctx) as sink,
        Worker(held, control=sink.control, credit=1, context=ctx),
        Subscriber(results=sink.results, control=sink.control, context=ctx) as sub,
    ):
        assert sub.wait_ready(5)
        with Producer(intake=sink.intake, control=sink.control, batch_size=10, context=ctx) as prod:
            prod.send_many(range(30))
            prod.flush()
        wait_for(lambda: [s for s, _ in rows(path)] == [LEASED, 0, 0], what="one batch leased")
        yield sink, path, release, sub
        release.set()


def second_sink_line(res, running_pid: int) -> str:
    assert res.returncode == 5, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr
    assert f"pid {running_pid} on host {socket.gethostname()}" in line
    return line


@pytest.mark.parametrize("ports", ["other ports", "the same ports"])
def test_a_second_sink_on_a_running_ledger_exits_5_and_leaves_the_first_untouched(running, ports, tmp_path, ctx):
    sink, path, release, sub = running
    before = rows(path)
    if ports == "the same ports":
        endpoints = [f"--intake={sink.intake}", f"--control={sink.control}", f"--results={sink.results}"]
    else:
        endpoints = [f"--{n}=ipc://{tmp_path}/{n}" for n in ("intake", "control", "results")]
    res = run_cli("sink", "--ledger", path, *endpoints, timeout=20)
    line = second_sink_line(res, os.getpid())
    assert line.startswith(f"zfan sink: error: ledger {path} is in use by the sink with pid")
    # Nothing changed: same epoch, the lease still held with its attempt, nothing reset.
    assert rows(path) == before
    assert query_status(sink.control, timeout=2, context=ctx)["epoch"] == sink.epoch == 1
    release.set()
    got = []
    wait_for(
        lambda: (m := sub.recv(0.05)) is not None and got.extend(m.records) or len(got) == 30, what="every record, once"
    )
    assert sorted(got) == list(range(30))


def test_the_first_sink_wins_whichever_starts_first(tmp_path, roles):
    path = str(tmp_path / "z.db")
    first = roles("sink", "--ledger", path, *[f"--{n}=ipc://{tmp_path}/{n}1" for n in ("intake", "control", "results")])
    first.wait_ready()
    with pytest.raises(LedgerError, match=f"in use by the sink with pid {first.proc.pid}"):
        Sink(intake=ANY, control=ANY, results=ANY, ledger=path).start()
    assert first.proc.poll() is None
    # Once it is gone, even killed, the next sink takes the ledger at once.
    first.kill()
    with Sink(intake=ANY, control=ANY, results=ANY, ledger=path) as sink:
        assert sink.epoch == 2


def test_a_sink_on_another_host_is_seen_through_its_stamp(tmp_path):
    """Where the OS lock does not reach (a network file system), the lock file's stamp does."""
    path = str(tmp_path / "z.db")
    wall = [1_000_000.0]
    other = {"host": "elsewhere", "pid": 4242, "token": "x", "stamp": wall[0]}
    with open(f"{path}.lock", "w") as f:
        json.dump(other, f)
    lock = LedgerLock(path, wall=lambda: wall[0])
    with pytest.raises(LedgerError, match="in use by the sink with pid 4242 on host elsewhere"):
        lock.acquire()
    wall[0] += STALE_AFTER + 1  # that sink stopped stamping long ago: it is dead
    with lock, open(f"{path}.lock") as f:
        assert json.load(f)["host"] == socket.gethostname()


def test_a_sink_whose_ledger_was_taken_over_stops(tmp_path):
    path = str(tmp_path / "z.db")
    wall = [1_000_000.0]
    with LedgerLock(path, wall=lambda: wall[0]) as lock:
        with open(f"{path}.lock", "w") as f:  # what a sink on another host would write
            json.dump({"host": "elsewhere", "pid": 4242, "token": "x", "stamp": wall[0]}, f)
        wall[0] += 10
        with pytest.raises(LedgerError, match="was taken over by the sink with pid 4242 on host elsewhere"):
            lock.renew()


def test_the_lock_is_released_on_a_clean_stop(tmp_path):
    path = str(tmp_path / "z.db")
    for epoch in (1, 2, 3):
        with Sink(intake=ANY, control=ANY, results=ANY, ledger=path) as sink:
            assert sink.epoch == epoch
    with open(f"{path}.lock") as f:
        assert f.read() == ""
