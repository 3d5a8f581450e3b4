"""The CLI's lifecycle as a person meets it: what `zfan produce` waits for and how it ends,
Ctrl-C and SIGTERM for every role and `zfan up`, a stdout that its reader closed, the progress
bar on a terminal. Real `zfan` processes, real signals, a real pseudo-terminal where the
terminal matters; no process and no temporary folder is left behind."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import ROOT, Role, Terminal, logged, render, run_cli, wait_for
from zfan.nodes.status import query_status

pytestmark = pytest.mark.timeout(60)

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


def endpoint_args(ipc: dict[str, str], *names: str) -> list[str]:
    return [f"--{n}={ipc[n]}" for n in names]


def status(ipc: dict[str, str]) -> dict:
    try:
        return query_status(ipc["control"], timeout=1.0)
    except Exception:
        return {}


def no_traceback(text: str) -> None:
    for sign in ("Traceback", "Exception ignored", "BrokenPipeError", "ContextTerminated"):
        assert sign not in text, text


# --- processes, seen through /proc -------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    except (FileNotFoundError, ProcessLookupError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and int(stat[1]) == pid:
            out.append(int(entry))
    return out


def running(pid: int) -> bool:
    """Alive: a zombie, ended and not yet reaped by whoever inherited it, is not."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def none_running(pids: list[int]) -> bool:
    return not any(running(p) for p in pids)


def up_folders(tmp: str) -> list[str]:
    return [name for name in os.listdir(tmp) if name.startswith("zfan-up-")]


# --- a terminal ------------------------------------------------------------------------------


# --- a sink to talk to -------------------------------------------------------------------------


@pytest.fixture
def sink(tmp_path, ipc, roles):
    """A sink with one local worker running the roll-up (readings need 'sensor' and 'value')."""
    s = roles(
        "sink",
        "--workers",
        "1",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    s.wait_ready()
    wait_for(lambda: len(status(ipc).get("workers", [])) == 1, what="the local worker")
    return s


SLOW_APP = "import time\n\ndef run(records):\n    time.sleep(1.0)\n    return [len(records)]\n"


# --- zfan produce: waits for outcomes ---------------------------------------------------------


def test_produce_waits_until_every_batch_is_processed(sink, ipc):
    # Batches sealed by count alone (a batch that lingers goes out smaller, so more of them).
    res = run_cli("produce", "--count", "10000", "--linger-ms", "60000", *endpoint_args(ipc, "intake", "control"))
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert lines[-1] == "zfan produce: 10,000 record(s) processed in 10 batch(es)", res.stderr
    assert lines[0].startswith("zfan produce: ready "), res.stderr
    assert "\r" not in res.stderr and "records/s" not in res.stderr, "no bar when stderr is not a terminal"
    info = status(ipc)
    assert info["done"] == 10 and info["pending"] == 0 and info["leased"] == 0


def test_produce_says_when_batches_are_dead_lettered_and_exits_8(sink, ipc):
    # The case: the roll-up needs 'value', and these orders have none.
    orders = [json.dumps({"sensor": f"s{i % 4}", "amount": i}) + "\n" for i in range(2000)]
    args = ["produce", "--topic", "orders", "--linger-ms", "60000", *endpoint_args(ipc, "intake", "control")]
    res = run_cli(*args, input="".join(orders))
    assert res.returncode == 8, res.stderr
    assert res.stderr.splitlines()[-1] == (
        "zfan produce: error: 2,000 record(s) in 2 batch(es) dead-lettered (first error: KeyError: 'value'); "
        "0 processed"
    ), res.stderr
    no_traceback(res.stderr)

    readings = [json.dumps({"sensor": f"s{i % 4}", "value": i}) + "\n" for i in range(1000)]
    res = run_cli(*args, input="".join(readings + orders[:1000]))
    assert res.returncode == 8, res.stderr
    assert res.stderr.splitlines()[-1] == (
        "zfan produce: error: 1,000 record(s) in 1 batch(es) dead-lettered (first error: KeyError: 'value'); "
        "1,000 processed"
    ), res.stderr


def test_produce_no_wait_ends_once_everything_is_acknowledged(tmp_path, ipc, roles):
    # No worker: nothing is ever processed, and --no-wait does not wait for that.
    s = roles("sink", "--ledger", str(tmp_path / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    s.wait_ready()
    res = run_cli("produce", "--count", "2500", "--no-wait", *endpoint_args(ipc, "intake", "control"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[-1] == "zfan produce: 2,500 record(s) sent and acknowledged", res.stderr


def test_produce_timeout_bounds_the_whole_wait_and_says_what_is_not_processed(tmp_path, ipc, roles):
    s = roles("sink", "--ledger", str(tmp_path / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    s.wait_ready()
    started = time.monotonic()
    res = run_cli(
        "produce", "--count", "2000", "--linger-ms", "60000", "--timeout", "1", *endpoint_args(ipc, "intake", "control")
    )
    took = time.monotonic() - started
    assert res.returncode == 6, res.stderr
    assert res.stderr.splitlines()[-1] == (
        "zfan produce: error: 2 batch(es) acknowledged but not processed after 1 s "
        "(they are in the sink's ledger: a worker will take them)"
    ), res.stderr
    assert took < 1 + 3, f"took {took:.1f} s for a 1 s timeout (the rest is starting Python)"


# --- zfan produce: interrupted ----------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
def test_produce_interrupted_while_reading_stdin_says_how_far_it_got(sink, ipc, roles, sig):
    prod = roles("produce", *endpoint_args(ipc, "intake", "control"), stdin=subprocess.PIPE)
    with prod.proc.stdin:
        prod.wait_ready()
        for i in range(3):
            prod.proc.stdin.write(json.dumps({"sensor": "s1", "value": i}) + "\n")
        prod.proc.stdin.flush()
        wait_for(lambda: status(ipc).get("done") == 1, what="the three records processed")
        prod.proc.send_signal(sig)  # stdin stays open: the read is what the signal must end
        assert prod.wait(10) == 128 + sig, prod.stderr
    assert prod.err[-1] == "zfan produce: interrupted: 3 sent, 3 acknowledged, 3 processed\n", prod.stderr
    assert "processed in" not in prod.stderr
    no_traceback(prod.stderr)


def test_ctrl_c_at_the_terminal_ends_produce_reading_what_a_person_types(sink, ipc):
    with Terminal("produce", *endpoint_args(ipc, "intake", "control")) as term:
        wait_for(lambda: any(x.startswith("zfan produce: ready ") for x in term.screen()), what="the producer")
        term.type('{"sensor": "s1", "value": 1}\n{"sensor": "s2", "value": 2}\n')
        wait_for(
            lambda: (i := status(ipc)).get("records_in") == 2 and i["done"] == i["batches_in"],
            what="what was typed processed",
        )
        term.ctrl_c()
        assert term.wait(10) == 130, term.raw
    screen = [line for line in term.screen() if line]
    assert screen[-2:] == ["^C", "zfan produce: interrupted: 2 sent, 2 acknowledged, 2 processed"], screen
    assert "records/s" not in term.raw, "no bar over what a person types"
    no_traceback(term.raw)


def test_produce_blocked_on_a_full_window_is_interrupted_at_once(ipc, roles):
    # No sink: the window of one batch fills, and send() waits for room that never comes.
    prod = roles(
        "produce", "--count", "100", "--batch-size", "1", "--window", "1", *endpoint_args(ipc, "intake", "control")
    )
    wait_for(lambda: any("no answer yet" in x for x in prod.err), what="the producer waiting")
    prod.proc.send_signal(signal.SIGTERM)
    assert prod.wait(5) == 143, prod.stderr
    assert re.fullmatch(r"zfan produce: interrupted: \d sent, 0 acknowledged, 0 processed\n", prod.err[-1]), prod.stderr
    no_traceback(prod.stderr)


def test_produce_and_worker_say_ready_only_once_a_sink_welcomes_them(tmp_path, ipc, roles):
    prod = roles("produce", *endpoint_args(ipc, "intake", "control"), stdin=subprocess.PIPE)
    with prod.proc.stdin:
        say_ready_after_the_welcome(tmp_path, ipc, roles, prod)


def say_ready_after_the_welcome(tmp_path, ipc, roles, prod) -> None:
    worker = roles("worker", *endpoint_args(ipc, "control"))
    for r, name in ((prod, "produce"), (worker, "worker")):
        waiting = f"zfan {name}: WARNING sink {ipc['control']}: no answer yet; connecting again"
        wait_for(
            lambda r=r, waiting=waiting: any(logged(x, waiting) for x in r.err),
            what=f"zfan {name} to say what it waits for",
        )
        assert not any(": ready " in x for x in r.err), r.stderr
    s = roles("sink", "--ledger", str(tmp_path / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    s.wait_ready()
    assert prod.wait_ready().startswith("zfan produce: ready intake=")
    assert worker.wait_ready().startswith("zfan worker: ready control=")
    prod.proc.stdin.write(json.dumps({"sensor": "s1", "value": 1}) + "\n")
    prod.proc.stdin.close()
    assert prod.wait(10) == 0, prod.stderr
    assert prod.err[-1] == "zfan produce: 1 record(s) processed in 1 batch(es)\n", prod.stderr
    assert worker.stop() == 0


# --- zfan worker and zfan sink drain ----------------------------------------------------------


def slow_app(tmp_path) -> str:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    return str(tmp_path)


def slow_worker_holding(tmp_path, ipc, roles, records: int):
    """A sink, a worker of the slow app, and `records` records in batches of 10 stored: the worker."""
    s = roles("sink", "--ledger", str(tmp_path / "z.db"), *endpoint_args(ipc, "intake", "control", "results"))
    s.wait_ready()
    worker = roles("worker", "--app", "slowapp:run", *endpoint_args(ipc, "control"), cwd=slow_app(tmp_path))
    worker.wait_ready()
    prod = run_cli(
        "produce",
        "--count",
        str(records),
        "--batch-size",
        "10",
        "--linger-ms",
        "60000",
        "--no-wait",
        *endpoint_args(ipc, "intake", "control"),
    )
    assert prod.returncode == 0, prod.stderr
    return worker


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signalled_worker_finishes_its_batches_then_exits_0(tmp_path, ipc, roles, sig):
    worker = slow_worker_holding(tmp_path, ipc, roles, 20)
    wait_for(lambda: status(ipc).get("leased") == 2, what="the worker holding both batches")
    worker.proc.send_signal(sig)
    assert worker.wait(10) == 0, worker.stderr
    assert worker.err[-1] == "zfan worker: stopping: finishing the batches held (Ctrl-C again to stop at once)\n"
    no_traceback(worker.stderr)
    # Its bye follows its answers on one connection: once it is gone, every answer is in.
    info = wait_for(lambda: (i := status(ipc)) and i["workers"] == [] and i, what="the worker's bye")
    assert info["done"] == 2 and info.get("replays", 0) == 0, info


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_second_signal_stops_a_worker_at_once(tmp_path, ipc, roles, sig):
    worker = slow_worker_holding(tmp_path, ipc, roles, 50)
    wait_for(lambda: status(ipc).get("leased", 0) >= 1, what="the worker holding batches")
    worker.proc.send_signal(sig)
    wait_for(lambda: any("stopping:" in x for x in worker.err), what="the worker draining")
    worker.proc.send_signal(sig)
    started = time.monotonic()
    assert worker.wait(5) == 128 + sig, worker.stderr
    assert time.monotonic() - started < 1.0
    assert worker.err[-1] == "zfan worker: stopped at once\n", worker.stderr
    no_traceback(worker.stderr)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signalled_sink_drains_and_stops_its_workers(tmp_path, ipc, roles, sig):
    s = roles(
        "sink",
        "--workers",
        "2",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    s.wait_ready()
    wait_for(lambda: len(status(ipc).get("workers", [])) == 2, what="two local workers")
    workers = children(s.proc.pid)
    assert len(workers) == 2
    s.proc.send_signal(sig)
    assert s.wait(15) == 0, s.stderr
    assert (
        "zfan sink: stopping: waiting for the batches leased to come back (Ctrl-C again to stop at once)\n" in s.err
    ), s.stderr
    no_traceback(s.stderr)
    assert "WARNING" not in s.stderr, s.stderr
    assert none_running(workers)


def test_a_second_signal_stops_a_sink_at_once_and_its_workers_with_it(tmp_path, ipc, roles):
    s = roles(
        "sink",
        "--workers",
        "1",
        "--app",
        "slowapp:run",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
        cwd=slow_app(tmp_path),
    )
    s.wait_ready()
    prod = run_cli(
        "produce",
        "--count",
        "50",
        "--batch-size",
        "10",
        "--linger-ms",
        "60000",
        "--no-wait",
        *endpoint_args(ipc, "intake", "control"),
    )
    assert prod.returncode == 0, prod.stderr
    wait_for(lambda: status(ipc).get("leased", 0) >= 1, what="the local worker holding batches")
    workers = children(s.proc.pid)
    s.proc.send_signal(signal.SIGINT)
    wait_for(lambda: any("stopping:" in x for x in s.err), what="the sink draining")
    s.proc.send_signal(signal.SIGINT)
    assert s.wait(5) == 130, s.stderr
    assert s.err[-1] == "zfan sink: stopped at once\n", s.stderr
    wait_for(lambda: none_running(workers), timeout=5, what="the local worker to end with its sink")


# --- zfan subscribe ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS)
def test_subscribe_ends_quietly_on_a_signal(sink, ipc, roles, sig):
    sub = roles("subscribe", *endpoint_args(ipc, "results", "control"))
    sub.wait_ready()
    sub.proc.send_signal(sig)
    assert sub.wait(5) == 128 + sig, sub.stderr
    assert [x for x in sub.err if ": ready " not in x] == [], sub.stderr


def test_subscribe_into_head_ends_quietly(sink, ipc):
    # The shell's own pipe: head takes one line and goes; subscribe must end, quietly and with 0.
    cmd = " ".join([sys.executable, "-m", "zfan", "subscribe", *endpoint_args(ipc, "results", "control")])
    shell = subprocess.Popen(
        ["bash", "-c", f"set -o pipefail; {cmd} 2>sub.err | head -n 1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=sink_dir(ipc),
        start_new_session=True,
    )
    try:
        wait_for(lambda: "ready" in read(sink_dir(ipc), "sub.err"), what="the subscriber")
        for _ in range(2):  # the second result finds the reader gone, or is never written
            assert run_cli("produce", "--count", "10", *endpoint_args(ipc, "intake", "control")).returncode == 0
        out, _ = shell.communicate(timeout=10)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    assert shell.returncode == 0, read(sink_dir(ipc), "sub.err")
    assert json.loads(out)["topic"].startswith("sensor.")
    no_traceback(read(sink_dir(ipc), "sub.err"))


def sink_dir(ipc: dict[str, str]) -> str:
    return os.path.dirname(ipc["control"].removeprefix("ipc://"))


def read(folder: str, name: str) -> str:
    try:
        with open(os.path.join(folder, name)) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def test_subscribe_stops_at_once_when_its_reader_closes_stdout(sink, ipc):
    sub = subprocess.Popen(
        [sys.executable, "-m", "zfan", "subscribe", *endpoint_args(ipc, "results", "control")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        ready = wait_for(lambda: select.select([sub.stderr], [], [], 0.1)[0], what="the subscriber")
        assert b"ready" in ready[0].readline()
        assert run_cli("produce", "--count", "10", *endpoint_args(ipc, "intake", "control")).returncode == 0
        assert json.loads(sub.stdout.readline())["topic"].startswith("sensor.")
        sub.stdout.close()  # nothing more comes: the subscriber must see the reader gone by itself
        assert sub.wait(5) == 0
        no_traceback(sub.stderr.read().decode())
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        sub.stderr.close()


def test_subscribe_counts_messages_and_says_when_they_did_not_all_come(tmp_path, ipc, roles):
    s = roles(
        "sink",
        "--workers",
        "1",
        "--app",
        "zfan.apps:echo",
        "--ledger",
        str(tmp_path / "z.db"),
        *endpoint_args(ipc, "intake", "control", "results"),
    )
    s.wait_ready()
    prod = run_cli(
        "produce",
        "--count",
        "50",
        "--batch-size",
        "10",
        "--linger-ms",
        "60000",
        *endpoint_args(ipc, "intake", "control"),
    )
    assert prod.returncode == 0, prod.stderr  # 5 batches: 5 messages of 10 records on 'readings'
    sub = ["subscribe", *endpoint_args(ipc, "results", "control")]

    three = run_cli(*sub, "--durable", "a", "--messages", "3")
    assert three.returncode == 0, three.stderr
    assert [len(json.loads(x)["records"]) for x in three.stdout.splitlines()] == [10, 10, 10]

    short = run_cli(*sub, "--durable", "b", "--messages", "10", "--idle-timeout", "1")
    assert short.returncode == 6, short.stderr
    assert len(short.stdout.splitlines()) == 5
    assert short.stderr.splitlines()[-1] == (
        "zfan subscribe: error: 5 of 10 message(s) came before 1 s passed without one (--idle-timeout)"
    )

    old = run_cli(*sub, "--durable", "c", "--count", "2")  # the old name still works
    assert old.returncode == 0, old.stderr
    assert len(old.stdout.splitlines()) == 2

    idle = run_cli(*sub, "--durable", "d", "--idle-timeout", "1")  # no count to fall short of
    assert idle.returncode == 0, idle.stderr
    assert len(idle.stdout.splitlines()) == 5


# --- the progress bar ----------------------------------------------------------------------------


def test_log_lines_and_final_line_never_land_on_the_bar(sink, ipc):
    lines = '{"sensor": "s1", "value": 1}\nnot json\n{"sensor": "s2", "value": 2}\n'
    proc = subprocess.run(
        [sys.executable, "-m", "zfan", "produce", "--progress", *endpoint_args(ipc, "intake", "control")],
        input=lines.encode(),
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    raw = proc.stderr.decode()
    assert "\r" in raw and "records/s" in raw, "a bar was drawn"
    screen = [line for line in render(raw) if line]
    warning = [line for line in screen if "not valid JSON" in line]
    assert len(warning) == 1 and logged(warning[0], "zfan produce: WARNING stdin line 2: not valid JSON"), screen
    assert [line for line in screen if "ready" in line][0].startswith("zfan produce: ready "), screen
    assert screen[-2].startswith("sent 2  acked 2  processed 2  "), screen  # the bar's last state
    assert screen[-1] == "zfan produce: 2 record(s) processed in 1 batch(es), 1 line(s) skipped as not JSON"


# --- zfan up ----------------------------------------------------------------------------------


def up_env(tmp_path) -> dict[str, str]:
    return {"TMPDIR": str(tmp_path)}


def wait_streaming(pid: int, tmp_path) -> tuple[int, list[int], str]:
    """The sink child and its two workers, once batches flow; and the run's folder."""
    folder = wait_for(lambda: up_folders(str(tmp_path)), what="zfan up's folder")[0]
    control = {"control": f"ipc://{tmp_path}/{folder}/control"}
    wait_for(lambda: status(control).get("batches_in", 0) > 0, timeout=20, what="batches flowing")
    (sink,) = children(pid)
    workers = wait_for(lambda: len(w := children(sink)) == 2 and w, what="the sink's two workers")
    return sink, workers, folder


def interrupted_screen(term: Terminal) -> list[str]:
    """What `zfan up` left on the terminal, once Ctrl-C stopped it: said plainly, and counted."""
    screen = term.screen()
    no_traceback("\n".join(screen))
    assert "zfan up: interrupted" in screen, screen
    assert any(re.fullmatch(r"  lost 0, duplicated 0  \(.*\)", line) for line in screen), screen
    return screen


def test_ctrl_c_at_the_terminal_stops_up_in_order(tmp_path):
    with Terminal("up", "--seconds", "60", env=up_env(tmp_path)) as term:
        sink, workers, _ = wait_streaming(term.proc.pid, tmp_path)
        wait_for(lambda: "records/s" in term.raw, what="the progress bar")
        term.ctrl_c()
        assert term.wait(30) == 130, term.raw
    screen = interrupted_screen(term)
    assert any(re.search(r"sent [\d,]+  acked [\d,]+  delivered [\d,]+  [\d,]+ records/s", x) for x in screen)
    assert none_running([sink, *workers])
    assert up_folders(str(tmp_path)) == []


def test_sigterm_stops_up_in_order(tmp_path):
    up = Role("up", "--seconds", "60", env=up_env(tmp_path))
    try:
        sink, workers, _ = wait_streaming(up.proc.pid, tmp_path)
        # The one line it says: where its dashboard is, served while it runs.
        url = re.fullmatch(r"zfan up: dashboard at (http://\S+/) and metrics at \S+ while it runs\n", up.err[0])
        assert url is not None, up.stderr
        with urllib.request.urlopen(url.group(1) + "healthz", timeout=5) as r:
            assert r.status == 200
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(30) == 143, up.stderr
    finally:
        up.kill()
    assert up.out[0] == "zfan up: interrupted\n", up.stdout
    assert "lost 0, duplicated 0" in up.stdout
    no_traceback(up.stderr)
    assert len(up.err) == 1, up.stderr
    assert none_running([sink, *workers])
    assert up_folders(str(tmp_path)) == []


def test_up_killed_outright_leaves_no_process_and_no_folder(tmp_path):
    up = Role("up", "--seconds", "60", env=up_env(tmp_path))
    try:
        sink, workers, _ = wait_streaming(up.proc.pid, tmp_path)
        up.proc.send_signal(signal.SIGKILL)
        up.wait(5)
    finally:
        up.kill()
    wait_for(lambda: none_running([sink, *workers]), timeout=10, what="the sink and its workers to end")
    wait_for(lambda: up_folders(str(tmp_path)) == [], timeout=5, what="the folder to be removed")
