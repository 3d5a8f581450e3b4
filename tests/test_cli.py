"""The CLI as a user runs it: real `zfan` processes on ipc:// endpoints of the test's own."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
from contextlib import closing

import pytest

from tests.checker import check, from_json_lines
from tests.helpers import run_cli, wait_for

pytestmark = pytest.mark.timeout(120)


def endpoint_args(ipc: dict[str, str], *names: str) -> list[str]:
    return [f"--{n}={ipc[n]}" for n in names]


def test_four_processes_deliver_every_record_exactly_once(tmp_path, ipc, roles):
    n = 100_000
    sink = roles(
        "sink",
        "--workers",
        "2",
        "--app",
        "zfan.apps:echo",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--topic", "readings")
    sub.wait_ready()
    prod = roles("produce", "--count", str(n), *endpoint_args(ipc, "intake", "control"))
    assert prod.wait(90) == 0, prod.stderr
    assert f"zfan produce: {n:,} record(s) processed in " in prod.stderr

    wait_for(lambda: len(from_json_lines(list(sub.out))[0]) >= n, timeout=60, what=f"{n} records at the subscriber")
    ids, seqs = from_json_lines(list(sub.out))
    verdict = check(range(n), ids, seqs)
    assert verdict.ok, verdict
    assert seqs["readings"][0] == 1

    status = run_cli("status", *endpoint_args(ipc, "control"), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["records_in"] == n and info["done"] == info["batches_in"] and info["pending"] == 0
    assert len(info["workers"]) == 2

    assert sub.stop() == 143  # SIGTERM: a subscriber is never done by itself
    assert sink.stop() == 0, sink.stderr
    with closing(sqlite3.connect(tmp_path / "z.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_up_runs_the_main_job_and_counts_it():
    res = run_cli("up", "--records", "60000", "--producers", "3", timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "zfan up: ok" in res.stdout
    assert "records in:    60,000 from 3 producers (acknowledged 60,000)" in res.stdout
    assert "covering 60,000 records" in res.stdout
    assert "lost 0, duplicated 0" in res.stdout
    assert "Traceback" not in res.stderr


def test_status_table_and_subscribe_count(tmp_path, ipc, roles):
    sink = roles(
        "sink",
        "--workers",
        "1",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--topic", "sensor.", "--messages", "3")
    sub.wait_ready()
    prod = run_cli(
        "produce", "--count", "5000", "--sensors", "4", "--linger-ms", "60000", *endpoint_args(ipc, "intake", "control")
    )  # 5 batches of 1000, sealed by count
    assert prod.returncode == 0, prod.stderr
    assert sub.wait(30) == 0
    lines = [json.loads(x) for x in sub.out]
    assert len(lines) == 3 and all(x["topic"].startswith("sensor.") for x in lines)
    assert {"count", "mean", "min", "max", "sensor"} <= set(lines[0]["records"][0])
    wait_for(lambda: json.loads(run_cli("status", *endpoint_args(ipc, "control"), "--json").stdout)["done"] == 5)
    table = run_cli("status", *endpoint_args(ipc, "control"))
    assert table.returncode == 0
    assert "pending 0, leased 0, done 5, dead 0" in table.stdout
    assert "local-1" in table.stdout
    sink.stop()


def test_produce_reads_json_lines_and_skips_bad_ones(tmp_path, ipc, roles):
    sink = roles(
        "sink",
        "--workers",
        "1",
        "--app",
        "zfan.apps:echo",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"), "--messages", "1")
    sub.wait_ready()
    lines = '{"a": 1}\nnot json\n\n{"a": 2}\n'
    res = run_cli("produce", *endpoint_args(ipc, "intake", "control"), input=lines)
    assert res.returncode == 0, res.stderr
    assert "stdin line 2: not valid JSON" in res.stderr
    assert re.search(r"2 record\(s\) processed in \d batch\(es\), 1 line\(s\) skipped as not JSON", res.stderr)
    assert sub.wait(30) == 0
    assert json.loads(sub.out[0])["records"] == [{"a": 1}, {"a": 2}]

    strict = run_cli("produce", "--strict", *endpoint_args(ipc, "intake", "control"), input=lines)
    assert strict.returncode == 2
    assert "stdin line 2: not valid JSON" in strict.stderr and "--strict" in strict.stderr
    assert "Traceback" not in strict.stderr
    sink.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_roles_stop_cleanly_on_signals(tmp_path, ipc, roles, sig):
    sink = roles(
        "sink",
        "--workers",
        "1",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    sink.wait_ready()
    worker = roles("worker", *endpoint_args(ipc, "control"))
    worker.wait_ready()
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"))
    sub.wait_ready()
    wait_for(
        lambda: len(json.loads(run_cli("status", *endpoint_args(ipc, "control"), "--json").stdout)["workers"]) == 2,
        what="two workers",
    )
    # A subscriber's work is never complete: it says it was stopped. The others drained.
    for r, code in ((sub, 128 + sig), (worker, 0), (sink, 0)):
        r.proc.send_signal(sig)
        assert r.wait(15) == code, r.stderr
        assert "Traceback" not in r.stderr
    with closing(sqlite3.connect(tmp_path / "z.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --- a person's mistakes: one clear line, a non-zero exit, no traceback ----------------------


def one_line_error(res, code: int, *fragments: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_malformed_endpoint(tmp_path):
    res = run_cli("sink", "--intake", "tcp//nowhere", "--ledger", str(tmp_path / "z.db"))
    one_line_error(res, 2, "intake endpoint 'tcp//nowhere' is not a valid endpoint", "tcp://HOST:PORT")
    res = run_cli("produce", "--count", "1", "--control", "tcp://127.0.0.1:99999")
    one_line_error(res, 2, "port must be at most 65535")


def test_endpoint_from_environment(tmp_path):
    res = run_cli_env({"ZFAN_RESULTS": "udp://x"}, "sink", "--ledger", str(tmp_path / "z.db"))
    one_line_error(res, 2, "results endpoint 'udp://x'")


def run_cli_env(env: dict[str, str], *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "zfan", *args], capture_output=True, text=True, timeout=30, env={**os.environ, **env}
    )


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli(
            "sink",
            "--intake",
            f"tcp://127.0.0.1:{port}",
            "--control",
            "tcp://127.0.0.1:0",
            "--results",
            "tcp://127.0.0.1:0",
            "--ledger",
            str(tmp_path / "z.db"),
        )
    one_line_error(res, 4, f"intake endpoint tcp://127.0.0.1:{port}: address already in use")


@pytest.mark.parametrize(
    "app, message",
    [
        ("no_such_module_xyz:run", "no module named 'no_such_module_xyz'"),
        ("zfan.apps:nothing_here", "module zfan.apps has no attribute 'nothing_here'"),
        ("zfan.protocol:VERSION", "VERSION is a int, not a function"),
        ("zfan.apps", "expected module:function"),
    ],
)
def test_bad_app(app, message, ipc, tmp_path):
    res = run_cli("worker", "--app", app, *endpoint_args(ipc, "control"))
    one_line_error(res, 3, message)
    res = run_cli(
        "sink",
        "--workers",
        "1",
        "--app",
        app,
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    one_line_error(res, 3, message)


def test_app_that_fails_to_import(tmp_path, ipc):
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('config missing')\n")
    res = run_cli("worker", "--app", "broken_app:run", *endpoint_args(ipc, "control"), cwd=str(tmp_path))
    one_line_error(res, 3, "importing broken_app failed: RuntimeError: config missing")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_ledger_not_writable_as_user(tmp_path, ipc):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    res = run_cli("sink", "--ledger", str(folder / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    one_line_error(res, 5, "is not writable")


def test_ledger_where_nothing_can_be_written(ipc):
    # /sys refuses new files even to root, so this runs as any user.
    res = run_cli("sink", "--ledger", "/sys/zfan.db", *endpoint_args(ipc, "intake", "control", "results"))
    one_line_error(res, 5, "ledger /sys/zfan.db is not writable")


def test_ledger_in_missing_folder(tmp_path, ipc):
    res = run_cli(
        "sink", "--ledger", str(tmp_path / "nope" / "z.db"), *endpoint_args(ipc, "intake", "control", "results")
    )
    one_line_error(res, 5, "does not exist")


def test_ledger_path_is_a_directory(tmp_path, ipc):
    res = run_cli("sink", "--ledger", str(tmp_path), *endpoint_args(ipc, "intake", "control", "results"))
    one_line_error(res, 5, "is a directory")


def test_someone_elses_database_is_not_taken_over(tmp_path, ipc):
    path = tmp_path / "app.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.commit()
    before = path.read_bytes()
    res = run_cli("sink", "--ledger", str(path), *endpoint_args(ipc, "intake", "control", "results"))
    one_line_error(res, 5, "not a zfan ledger", "it holds other tables", "left untouched")
    assert path.read_bytes() == before


def test_corrupt_ledger_is_refused_and_left_untouched(tmp_path, ipc):
    path = tmp_path / "z.db"
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    res = run_cli("sink", "--ledger", str(path), *endpoint_args(ipc, "intake", "control", "results"))
    one_line_error(res, 5, "not a zfan ledger or is corrupt", "left untouched")
    assert path.read_bytes() == garbage


def test_status_without_a_sink(ipc):
    res = run_cli("status", *endpoint_args(ipc, "control"), "--timeout", "0.5")
    one_line_error(res, 6, "no answer from a sink", "within 0.5 s")


def test_produce_without_a_sink_says_how_many_are_unacked(ipc):
    res = run_cli("produce", "--count", "2500", "--timeout", "1", *endpoint_args(ipc, "intake", "control"))
    one_line_error(res, 6, " batch(es) not acknowledged by the sink after 1 s")
    # 2500 records in batches of at most 1000; a batch that lingers goes out smaller, so more.
    unacked = re.search(r"(\d+) batch\(es\) not acknowledged", res.stderr)
    assert unacked is not None and 3 <= int(unacked.group(1)) <= 2500, res.stderr


def test_bad_flag_is_a_usage_error():
    res = run_cli("sink", "--workers", "-1")
    assert res.returncode == 2
    assert "Invalid value for '--workers'" in res.stderr
    assert "Traceback" not in res.stderr


def test_garbage_is_refused_counted_and_logged_once_per_peer(tmp_path, ipc, roles):
    import zmq

    sink = roles("sink", "--ledger", str(tmp_path / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    sink.wait_ready()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(ipc["control"])
        for i in range(500):
            dealer.send_multipart([b"not msgpack \xc1", str(i).encode()])
        dealer.close(linger=2000)
    finally:
        ctx.term()

    def info():
        res = run_cli("status", *endpoint_args(ipc, "control"), "--json")
        return json.loads(res.stdout) if res.returncode == 0 else {}

    wait_for(lambda: info().get("rejected", {}).get("bad header", 0) == 500, what="500 refusals counted")
    table = run_cli("status", *endpoint_args(ipc, "control"))
    assert "rejected messages: 500 (bad header: 500)" in table.stdout
    assert sink.stop() == 0
    refusals = [line for line in sink.err if "refused a message" in line]
    assert len(refusals) == 1, refusals
    assert "bad header" in refusals[0]


def test_a_line_for_a_person_reaches_stderr_in_one_write(monkeypatch):
    """A sink's local workers share its stderr: a line written in two parts (text, then its
    newline) can have another process's line land in between, gluing two lines into one."""
    from zfan.cli import show

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            if text:
                writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    show.say("zfan worker: ready control=ipc:///x")
    assert writes == ["zfan worker: ready control=ipc:///x\n"]
