"""Every program in examples/ runs to its end and says it worked, and the deploy recipes' command
lines start real roles that process records; as a user would run them."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT, Role, free_ports, run_cli

pytestmark = pytest.mark.timeout(120)

EXAMPLES = os.path.join(ROOT, "examples")
DEPLOY = os.path.join(ROOT, "deploy")


def run_example(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=100, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def test_fan_in_fan_out_gives_every_node_its_own_results_once():
    script = os.path.join(EXAMPLES, "fan_in_fan_out.py")
    done = run_example(sys.executable, script, "--nodes", "3", "--readings", "2000")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "every node got its own results, exactly once"
    assert done.stdout.count("2,000 readings summarised") == 3


def test_partitioned_sinks_give_each_device_one_sink_and_its_readings_in_order():
    done = run_example(sys.executable, os.path.join(EXAMPLES, "partitioned_sinks.py"), "--readings", "2000")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "every reading once, each device's in order through its own sink"
    assert [line.split(":")[0] for line in lines[:-1]] == ["sink 0", "sink 1", "sink 2"]


def test_routed_apps_requeue_their_dead_letters_and_end_exactly_once():
    done = run_example(sys.executable, os.path.join(EXAMPLES, "routed_apps.py"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "KeyError: 'price'" in done.stdout and re.search(r"fixed; \d+ batch\(es\) requeued", done.stdout)
    assert done.stdout.splitlines()[-1] == "orders 2,000, audit 500: exactly once"


def test_the_curve_example_runs_both_hosts_encrypted_and_leaves_nothing_behind(tmp_path):
    intake, control, results = free_ports(3)
    env = {
        "INTAKE_PORT": str(intake),
        "CONTROL_PORT": str(control),
        "RESULTS_PORT": str(results),
        "COUNT": "2000",
        "ZFAN": f"{sys.executable} -m zfan",
        "TMPDIR": str(tmp_path),
    }
    done = run_example("sh", os.path.join(EXAMPLES, "curve_two_hosts.sh"), "demo", env=env)
    assert done.returncode == 0, done.stderr
    assert "zfan produce: 2,000 record(s) processed" in done.stderr
    assert os.listdir(tmp_path) == [], "the demo's folder (keys, ledger, log) is removed"
    with socket.socket() as s:  # the sink is gone: nothing listens on its port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its closed connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", control))


def unit_command(unit: str) -> list[str]:
    """A systemd unit's ExecStart, as zfan's arguments, with its specifiers filled in."""
    with open(os.path.join(DEPLOY, unit)) as f:
        line = next(x for x in f if x.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart=").replace("%H", "host").replace("%i", "1"))
    assert argv[0] == "/usr/local/bin/zfan"
    return [a.replace("/etc/zfan/zfan.toml", os.path.join(DEPLOY, "zfan.toml")) for a in argv[1:]]


def procfile_commands() -> dict[str, list[str]]:
    with open(os.path.join(DEPLOY, "Procfile")) as f:
        entries = dict(line.split(":", 1) for line in f if line.strip())
    commands = {name: shlex.split(cmd) for name, cmd in entries.items()}
    assert all(argv[0] == "zfan" for argv in commands.values())
    return {name: argv[1:] for name, argv in commands.items()}


@pytest.mark.parametrize("recipe", ["systemd", "Procfile"])
def test_the_deploy_recipes_start_a_sink_and_a_worker_that_process_records(recipe, tmp_path):
    if recipe == "systemd":
        sink_args, worker_args = unit_command("zfan-sink.service"), unit_command("zfan-worker@.service")
    else:
        commands = procfile_commands()
        sink_args, worker_args = commands["sink"], commands["worker"]
    # This machine's paths and ports in place of a server's: the environment wins over the file.
    env = {f"ZFAN_{n.upper()}": f"ipc://{tmp_path}/{n}" for n in ("intake", "control", "results")}
    env |= {"ZFAN_LEDGER": str(tmp_path / "z.db"), "ZFAN_HTTP": "127.0.0.1:0", "ZFAN_LOG_FORMAT": "text"}
    sink = Role(*sink_args, env=env, cwd=ROOT)
    worker = None
    try:
        sink.wait_ready()
        worker = Role(*worker_args, env=env, cwd=ROOT)
        line = worker.wait_ready()
        if recipe == "systemd":
            assert "name=host-1" in line
        done = run_cli("produce", "--count", "500", "--control", env["ZFAN_CONTROL"], "--intake", env["ZFAN_INTAKE"])
        assert done.returncode == 0, done.stderr
        assert "500 record(s) processed" in done.stderr
        assert worker.stop(30) == 0, worker.stderr
        assert sink.stop(30) == 0, sink.stderr
    finally:
        for role in (worker, sink):
            if role is not None:
                role.kill()
