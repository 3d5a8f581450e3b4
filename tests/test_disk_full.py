"""A ledger on a disk that fills up: the sink stops with one line and exit 5, acknowledges nothing
it could not commit, refuses to start while the disk is still full, and once space is back every
acknowledged record is delivered exactly once. A real full filesystem (a small tmpfs), real
`zfan` processes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing, suppress

import pytest

from tests.checker import check, from_json_lines
from tests.helpers import run_cli, wait_for
from zfan import Producer, ZfanError
from zfan.errors import LedgerFull
from zfan.ledger import SqliteLedger

pytestmark = pytest.mark.timeout(180)

RECORDS = 100_000  # some 4 MB of payloads: twice what the disk holds
BATCH = 500


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted in the test's folder, unmounted at teardown (lazily if still busy)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def endpoint_args(ipc: dict[str, str], *names: str) -> list[str]:
    return [f"--{n}={ipc[n]}" for n in names]


def fill(folder) -> None:
    """Take whatever space is left on the filesystem of `folder`, to the last page."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def ledger_records(path: str, producer: str) -> list[int]:
    """The record count of each batch of `producer` the ledger holds, read without writing."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT seq, count FROM batches WHERE producer=?", (producer,)).fetchall()
    assert len({seq for seq, _ in rows}) == len(rows)
    return [count for _, count in rows]


def the_error(stderr: str) -> str:
    """The one line a sink said besides its ready line; no traceback, no second line."""
    lines = [line for line in stderr.splitlines() if ": ready " not in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_full_disk_stops_the_sink_and_loses_nothing_acknowledged(small_disk, ipc, roles, ctx):
    ledger = str(small_disk / "z.db")
    full = f"zfan sink: error: {LedgerFull(ledger)}"
    sink = roles("sink", "--ledger", ledger, *endpoint_args(ipc, "intake", "control", "results"))
    sink.wait_ready()
    prod = Producer(
        intake=ipc["intake"], control=ipc["control"], topic="readings", batch_size=BATCH, linger_ms=60_000, context=ctx
    ).start()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(RECORDS):  # blocks on a full window while no sink acknowledges
                prod.send({"id": i, "sensor": f"s{i % 7}", "value": i * 0.5})
            prod.flush(timeout=120)
        except BaseException as exc:
            errors.append(exc)

    sending = threading.Thread(target=produce, daemon=True)
    sending.start()
    try:
        # No worker yet: every batch stays in the ledger with its payload, and the disk fills.
        assert sink.wait(60) == 5, sink.stderr
        assert the_error(sink.stderr) == full
        acked = prod.acked_records
        assert 0 < acked < RECORDS
        assert acked <= sum(ledger_records(ledger, prod.settings.producer_id)), (
            "an acknowledged batch is missing from the ledger"
        )

        # Started again while the disk is still full: the same line, before it says ready.
        fill(small_disk)
        again = run_cli("sink", "--ledger", ledger, *endpoint_args(ipc, "intake", "control", "results"))
        assert again.returncode == 5, again.stderr
        assert the_error(again.stderr) == full

        # Space is back: the sink serves again, the producer resends what was not acknowledged.
        os.unlink(small_disk / "filler")
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        sink = roles("sink", "--ledger", ledger, *endpoint_args(ipc, "intake", "control", "results"))
        sink.wait_ready()
        sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--topic", "readings")
        sub.wait_ready()
        roles("worker", "--control", ipc["control"], "--app", "tests.apps:ids")
        sending.join(150)
        assert not sending.is_alive() and not errors, errors
        assert prod.acked_records == RECORDS
        wait_for(
            lambda: len(from_json_lines(list(sub.out))[0]) >= RECORDS,
            timeout=60,
            what=f"{RECORDS} records at the subscriber",
        )
        ids, seqs = from_json_lines(list(sub.out))
        verdict = check(range(RECORDS), ids, seqs)
        assert verdict.ok, verdict
        assert sink.stop() == 0, sink.stderr
        assert "Traceback" not in sink.stderr
    finally:
        prod.stop()
        sending.join(10)
        with suppress(ZfanError):
            prod.close(timeout=0)  # stopped already: this only releases it, whatever was acknowledged
    with closing(sqlite3.connect(ledger)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_commit_on_a_full_disk_and_an_open_on_a_still_full_one_say_disk_full(small_disk):
    path = str(small_disk / "z.db")
    led = SqliteLedger(path)
    committed = 0
    with pytest.raises(LedgerFull) as info:
        for seq in range(1, 10_000):
            led.insert_batch("prod", seq, "t", 1, os.urandom(20_000))
            led.commit()  # one batch a turn: the WAL grows at each commit, and one finds no room
            committed = seq
    assert str(info.value) == str(LedgerFull(path))
    led.close()  # clean: SQLite rolled the failed commit back itself
    fill(small_disk)
    # The WAL has slack where the failed commit's pages went: a small write would fit, so only
    # folding the WAL into the file at open shows that the disk is still full.
    with pytest.raises(LedgerFull):
        SqliteLedger(path)
    os.unlink(small_disk / "filler")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    led = SqliteLedger(path)
    try:
        assert len(led.pending()) == committed > 0
        assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_up_on_a_full_disk_exits_as_the_sink_does(small_disk):
    res = subprocess.run(
        [sys.executable, "-m", "zfan", "up", "--records", "2000000", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(small_disk), "PYTHONUNBUFFERED": "1"},
    )
    assert res.returncode == 5, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith(f"zfan up: error: ledger {small_disk}/zfan-up-"), res.stderr
    assert last.endswith("/zfan.db: disk full; nothing acknowledged is lost (free space and start the sink again)")
    assert os.listdir(small_disk) == [], "its temporary folder is removed"
