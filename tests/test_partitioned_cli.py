"""Partitioned sinks from the command line: `zfan up --sinks N`, the clients' --sinks (and
produce's --key), `zfan status --sinks`, and the one-line errors, as a person runs them."""

from __future__ import annotations

import json
import re
import signal

import pytest

from tests.checker import check, from_json_lines
from tests.helpers import Role, Terminal, run_cli, wait_for
from tests.test_cli_lifecycle import children, interrupted_screen, no_traceback, none_running, up_env, up_folders
from zfan.partitions import parse_sinks, partition_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def two(tmp_path, roles):
    """Two sinks, each in a folder of its own; and the --sinks value naming them."""
    spec = ",".join(f"ipc://{tmp_path}/p{i}" for i in range(2))
    for i, part in enumerate(parse_sinks(spec)):
        (tmp_path / f"p{i}").mkdir()
        roles(
            "sink",
            "--ledger",
            str(tmp_path / f"p{i}" / "z.db"),
            f"--intake={part.intake}",
            f"--control={part.control}",
            f"--results={part.results}",
        ).wait_ready()
    return spec


def test_up_with_partitioned_sinks_counts_every_record_once():
    res = run_cli("up", "--sinks", "2", "--records", "40000", "--producers", "2", "--http", "off", timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "zfan up: ok" in res.stdout
    assert "2 workers, 2 sinks (partitioned by sensor)" in res.stdout
    assert "covering 40,000 records" in res.stdout
    assert "lost 0, duplicated 0" in res.stdout
    no_traceback(res.stderr)


def test_ctrl_c_stops_a_partitioned_up_in_order_and_leaves_nothing_behind(tmp_path):
    with Terminal("up", "--sinks", "3", "--seconds", "60", "--http", "off", env=up_env(tmp_path)) as term:
        # Three sinks and two workers spanning them, once records flow.
        procs = wait_for(lambda: len(c := children(term.proc.pid)) == 5 and c, 20, what="3 sinks and 2 workers")
        wait_for(lambda: re.search(r"delivered [1-9]", term.raw), 20, what="records flowing through")
        term.ctrl_c()
        assert term.wait(30) == 130, term.raw
    assert "3 sinks (partitioned by sensor)" in "\n".join(interrupted_screen(term))
    assert none_running(procs)
    assert up_folders(str(tmp_path)) == []


def test_a_partitioned_up_killed_outright_leaves_no_process_and_no_folder(tmp_path):
    up = Role("up", "--sinks", "2", "--seconds", "60", "--http", "off", env=up_env(tmp_path))
    try:
        procs = wait_for(lambda: len(c := children(up.proc.pid)) == 4 and c, 20, what="2 sinks and 2 workers")
        wait_for(lambda: up_folders(str(tmp_path)), what="zfan up's folder")
        up.proc.send_signal(signal.SIGKILL)
        up.wait(5)
    finally:
        up.kill()
    wait_for(lambda: none_running(procs), timeout=15, what="the sinks and workers to end")
    wait_for(lambda: up_folders(str(tmp_path)) == [], timeout=5, what="the folder to be removed")


def test_produce_worker_and_subscribe_span_the_sinks(two, tmp_path, roles):
    sub = roles("subscribe", "--sinks", two, "--messages", "1000000")
    sub.wait_ready()
    assert f"sinks={two}" in sub.stderr
    roles("worker", "--sinks", two, "--app", "tests.apps:echo").wait_ready()
    lines = "".join(json.dumps({"id": i, "key": f"k{i % 20}"}) + "\n" for i in range(3000))
    res = run_cli("produce", "--sinks", two, "--key", "key", "--batch-size", "100", input=lines, timeout=60)
    assert res.returncode == 0, res.stderr
    assert re.search(rf"zfan produce: ready sinks={re.escape(two)} key=key producer_id=\w+", res.stderr), res.stderr
    wait_for(lambda: len(from_json_lines(list(sub.out))[0]) >= 3000, 30, what="every record at the subscriber")
    ids, seqs = from_json_lines(list(sub.out))
    verdict = check(range(3000), ids, seqs)
    assert verdict.ok, verdict
    for msg in map(json.loads, list(sub.out)):
        assert {partition_of(r["key"], 2) for r in msg["records"]} == {msg["partition"]}, msg

    check_worker = run_cli("worker", "--sinks", two, "--check", timeout=30)
    assert check_worker.returncode == 0, check_worker.stderr
    assert check_worker.stderr.count("check passed: the sink at ipc://") == 2, check_worker.stderr


def test_status_shows_every_sink_and_exits_6_if_one_does_not_answer(two, tmp_path):
    shown = run_cli("status", "--sinks", two, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^partition 0 at ipc://.*/p0/control:\n  sink \S+, epoch 1", shown.stdout, re.M), shown.stdout
    assert re.search(r"^partition 1 at ipc://.*/p1/control:\n  sink \S+, epoch 1", shown.stdout, re.M), shown.stdout
    as_json = json.loads(run_cli("status", "--sinks", two, "--json", timeout=30).stdout)
    assert [(p["partition"], p["status"]["epoch"]) for p in as_json["partitions"]] == [(0, 1), (1, 1)]

    three = f"{two},ipc://{tmp_path}/nothing-here"
    partly = run_cli("status", "--sinks", three, "--timeout", "1", timeout=30)
    assert partly.returncode == 6, partly.stdout + partly.stderr
    assert "partition 0 at" in partly.stdout and "partition 1 at" in partly.stdout
    assert re.search(r"^partition 2 at ipc://.*/nothing-here/control:\n  no answer from a sink", partly.stdout, re.M)

    none = run_cli("status", "--sinks", f"ipc://{tmp_path}/a,ipc://{tmp_path}/b", "--timeout", "0.5", timeout=30)
    assert none.returncode == 6
    assert none.stderr.startswith("zfan status: error: no answer from a sink at ipc://"), none.stderr
    assert len(none.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["produce", "--key", "device"], "--key chooses one of several sinks: give them with --sinks"),
        (["produce", "--sinks", "a,b", "--intake", "tcp://a:1"], "give sinks or intake, not both"),
        (["worker", "--sinks", "a,,b"], "a sink is missing (two commas or bars in a row?)"),
        (["subscribe", "--sinks", "a:99999"], "sink 'a:99999' is not HOST, HOST:PORT, tcp://HOST:PORT"),
        (["status", "--sinks", "a,a"], "the sink with control tcp://a:5558 is named twice"),
    ],
)
def test_a_wrong_sinks_value_is_one_line_and_exit_2(args, line):
    res = run_cli(*args, input="", timeout=30)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and line in res.stderr, res.stderr
    no_traceback(res.stderr)


def test_sinks_in_the_settings_file_reach_every_client_and_not_up(tmp_path):
    (tmp_path / "zfan.toml").write_text('sinks = "host-a,host-b"\n')
    shown = json.loads(run_cli("config", "show", "--json", cwd=str(tmp_path), timeout=30).stdout)
    for command in ("produce", "worker", "subscribe", "status"):
        assert shown[command]["sinks"] == {"value": "host-a,host-b", "from": "file"}, command
    assert shown["up"]["sinks"] == {"value": 1, "from": "default"}
    # ZFAN_SINKS names running sinks for the clients; zfan up counts its own with ZFAN_UP_SINKS.
    listed = run_cli("config", "show", "up", "--json", cwd=str(tmp_path), env={"ZFAN_SINKS": "a,b"}, timeout=30)
    assert json.loads(listed.stdout)["up"]["sinks"] == {"value": 1, "from": "default"}


def test_a_record_without_its_key_is_skipped_and_said_or_with_strict_stops_the_run(two, roles):
    roles("worker", "--sinks", two, "--app", "tests.apps:echo").wait_ready()
    lines = [json.dumps({"id": i, "key": f"k{i % 20}"}) for i in range(100)]
    lines.insert(50, json.dumps({"id": "no key"}))
    res = run_cli("produce", "--sinks", two, "--key", "key", input="\n".join(lines) + "\n", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "WARNING record of type dict has no field 'key', the key that chooses its sink" in res.stderr
    last = res.stderr.splitlines()[-1]
    assert re.fullmatch(
        r"zfan produce: 100 record\(s\) processed in \d+ batch\(es\), 1 record\(s\) skipped without their --key field",
        last,
    ), res.stderr

    strict = run_cli("produce", "--sinks", two, "--key", "key", "--strict", input="\n".join(lines) + "\n", timeout=60)
    assert strict.returncode == 2, strict.stderr
    assert strict.stderr.splitlines()[-1].startswith("zfan produce: error: record of type dict has no field 'key'")
    assert strict.stderr.splitlines()[-1].endswith("; stopped (--strict)")
    no_traceback(strict.stderr)
