"""The settings file (zfan.toml, or [tool.zfan] in pyproject.toml) and ZFAN_<OPTION>, read by
the real commands: what they run with, which wins, and what a person reads when a file is wrong."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from contextlib import closing

import pytest

from tests.helpers import ROOT, Role, run_cli, wait_for
from zfan.cli import cli
from zfan.cli.options import configurable, every_command
from zfan.config_file import NOT_SHARED

pytestmark = pytest.mark.timeout(60)


def write(folder, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def ipc_settings(folder) -> str:
    return "\n".join(f'{n} = "ipc://{folder}/{n}"' for n in ("intake", "control", "results")) + "\n"


def shown(folder, *args: str, env: dict[str, str] | None = None) -> dict:
    done = run_cli("config", "show", "--json", *args, cwd=str(folder), env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_pipeline_runs_on_a_settings_file_alone(tmp_path):
    """Endpoints shared at the top, each role's own in its table: no flag on any command line."""
    write(
        tmp_path,
        "zfan.toml",
        ipc_settings(tmp_path)
        + '[sink]\nledger = "from-file.db"\nworkers = 1\n'
        + "[produce]\ncount = 500\nbatch-size = 50\ntimeout = 30\n",
    )
    sink = Role("sink", cwd=str(tmp_path))
    try:
        line = sink.wait_ready()
        assert f"intake=ipc://{tmp_path}/intake" in line and "ledger=from-file.db" in line and "workers=1" in line
        done = run_cli("produce", cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert "500 record(s) processed in 10 batch(es)" in done.stderr
    finally:
        assert sink.stop() == 0, sink.stderr
    with closing(sqlite3.connect(tmp_path / "from-file.db")) as db:  # (a connection's own `with` only commits)
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 10


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(tmp_path):
    write(tmp_path, "zfan.toml", ipc_settings(tmp_path) + '[sink]\nledger = "file.db"\nretain = "30m"\n')
    env = {"ZFAN_LEDGER": "env.db", "ZFAN_MAX_ATTEMPTS": "7"}
    sink = Role("sink", "--ledger", "flag.db", cwd=str(tmp_path), env=env)
    try:
        assert "ledger=flag.db" in sink.wait_ready()
    finally:
        assert sink.stop() == 0, sink.stderr
    assert os.path.exists(tmp_path / "flag.db") and not os.path.exists(tmp_path / "env.db")

    settings = shown(tmp_path, "sink", env=env)["sink"]
    assert settings["ledger"] == {"value": "env.db", "from": "env ZFAN_LEDGER"}
    assert settings["max-attempts"] == {"value": 7, "from": "env ZFAN_MAX_ATTEMPTS"}
    assert settings["retain"] == {"value": "30m", "from": "file"}
    assert settings["intake"] == {"value": f"ipc://{tmp_path}/intake", "from": "file"}
    assert settings["fsync"] == {"value": "normal", "from": "default"}


def test_a_table_wins_over_the_top_and_only_commands_with_the_option_take_a_top_key(tmp_path):
    write(
        tmp_path,
        "zfan.toml",
        'control = "tcp://10.0.0.1:5558"\nresults = "tcp://10.0.0.1:5559"\n[worker]\ncontrol = "tcp://10.0.0.2:5558"\n',
    )
    got = shown(tmp_path)
    assert got["file"] == "./zfan.toml"
    assert got["worker"]["control"]["value"] == "tcp://10.0.0.2:5558"
    assert got["subscribe"]["control"]["value"] == "tcp://10.0.0.1:5558"
    assert got["subscribe"]["results"] == {"value": "tcp://10.0.0.1:5559", "from": "file"}
    assert "results" not in got["worker"] and "results" not in got["produce"]


def test_pyproject_tool_zfan_is_read_when_there_is_no_zfan_toml(tmp_path):
    write(
        tmp_path,
        "pyproject.toml",
        '[project]\nname = "mine"\n\n[tool.zfan]\nheartbeat = 0.5\n\n[tool.zfan.worker]\ncredit = 8\n',
    )
    got = shown(tmp_path, "worker")
    assert got["file"] == "./pyproject.toml"
    assert got["worker"]["credit"] == {"value": 8, "from": "file"}
    assert got["worker"]["heartbeat"] == {"value": 0.5, "from": "file"}
    write(tmp_path, "zfan.toml", "[worker]\ncredit = 9\n")
    assert shown(tmp_path, "worker")["worker"]["credit"] == {"value": 9, "from": "file"}


def test_config_names_a_file_anywhere_and_zfan_config_too(tmp_path):
    path = write(tmp_path, "elsewhere.toml", "[status]\ntimeout = 1.5\n")
    assert shown(tmp_path, "--config", path, "status")["status"]["timeout"]["value"] == 1.5
    got = shown(tmp_path, "status", env={"ZFAN_CONFIG": path})
    assert got["file"] == path and got["status"]["timeout"]["value"] == 1.5


def test_the_toml_shown_is_a_file_the_commands_read_back(tmp_path):
    write(tmp_path, "zfan.toml", '[sink]\nledger = "a.db"\nmax-attempts = 4\n')
    done = run_cli("config", "show", "sink", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert 'ledger = "a.db"' in done.stdout and "# file" in done.stdout
    os.rename(tmp_path / "zfan.toml", tmp_path / "old.toml")
    write(tmp_path, "zfan.toml", done.stdout)
    again = shown(tmp_path, "sink")["sink"]
    assert again["ledger"]["value"] == "a.db" and again["max-attempts"]["value"] == 4
    assert again["intake"]["from"] == "file"  # the defaults shown were written out too


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[sink]\nledgr = 'x.db'\n", "zfan.toml: [sink] --ledgr is no option of zfan sink"),
        ("[sinks]\nledger = 'x.db'\n", "zfan.toml: [sinks] is no zfan command (tables: [produce], [sink]"),
        ("contrl = 'tcp://a:1'\n", "zfan.toml: --contrl is no option of any zfan command"),
        ("[sink\n", "zfan.toml: not valid TOML"),
    ],
)
def test_a_wrong_file_is_one_line_naming_it_and_exit_2(tmp_path, text, says):
    write(tmp_path, "zfan.toml", text)
    done = run_cli("sink", cwd=str(tmp_path), timeout=15)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("zfan sink: error: ./"), done.stderr
    assert says in done.stderr
    assert not os.path.exists(tmp_path / "zfan.db"), "a sink started on a file it could not read"


def test_a_config_file_that_is_not_there_is_an_error_not_a_default(tmp_path):
    done = run_cli("worker", "--config", str(tmp_path / "nope.toml"), cwd=str(tmp_path), timeout=15)
    assert done.returncode == 2
    assert done.stderr == f"zfan worker: error: config file {tmp_path}/nope.toml: no such file\n"


def test_every_option_of_every_command_has_its_zfan_variable():
    for name, keys in every_command(cli).items():
        command = cli.commands[name]
        for key, param_name in keys.items():
            param = next(p for p in command.params if p.name == param_name)
            # An option the shared key does not set (zfan up's count of sinks) has a variable of its own.
            want = f"ZFAN_{name.upper()}_{key.upper()}" if (name, key) in NOT_SHARED else f"ZFAN_{key.upper()}"
            assert param.envvar == want, (name, key, param.envvar)
    assert "check" not in configurable(cli.commands["worker"])


def test_the_readme_settings_file_is_one_the_commands_read(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    write(tmp_path, "zfan.toml", block)
    got = shown(tmp_path)
    assert got["sink"]["ledger"] == {"value": "/var/lib/zfan/zfan.db", "from": "file"}
    assert got["worker"]["control"] == {"value": "tcp://sink-host:5558", "from": "file"}
    assert got["worker"]["credit"]["value"] == 64


def test_no_variable_answers_a_question_or_widens_a_command_for_a_person(tmp_path):
    """ZFAN_YES or ZFAN_ALL left in an environment must not purge every dead letter unasked."""
    done = run_cli(
        "dead",
        "purge",
        "--control",
        f"ipc://{tmp_path}/none",
        cwd=str(tmp_path),
        env={"ZFAN_YES": "1", "ZFAN_ALL": "1"},
    )
    assert done.returncode == 2 and done.stderr.startswith("zfan dead: error: name the batches"), done.stderr


def test_a_sinks_local_workers_take_no_setting_meant_for_the_sink(tmp_path):
    """ZFAN_HTTP and the file's [worker] table are for `zfan sink` and `zfan worker` run by a
    person: a local worker binding the sink's port too would fail, and the sink with it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write(tmp_path, "zfan.toml", ipc_settings(tmp_path) + "[worker]\ncredit = 1\n")
    sink = Role("sink", "--workers", "2", "--ledger", "z.db", cwd=str(tmp_path), env={"ZFAN_HTTP": f"127.0.0.1:{port}"})
    try:
        assert f"http=http://127.0.0.1:{port}/" in sink.wait_ready()

        def workers() -> list:
            return json.loads(run_cli("status", "--json", cwd=str(tmp_path)).stdout)["workers"]

        assert [w["credit"] for w in wait_for(lambda: len(workers()) == 2 and workers(), 20)] == [256, 256]
        done = run_cli("produce", "--count", "200", cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr + sink.stderr
    finally:
        assert sink.stop() == 0, sink.stderr


def test_a_dead_command_takes_endpoints_from_the_top_of_the_file_but_not_a_producers_topic(tmp_path):
    write(tmp_path, "zfan.toml", f'control = "ipc://{tmp_path}/control"\ntopic = "readings"\ntimeout = 99\n')
    sink = Role(
        "sink", "--ledger", "z.db", f"--intake=ipc://{tmp_path}/i", f"--results=ipc://{tmp_path}/r", cwd=str(tmp_path)
    )
    try:
        sink.wait_ready()
        done = run_cli("dead", "list", cwd=str(tmp_path), env={"ZFAN_TOPIC": "x", "ZFAN_JSON": "1"})
        assert (done.returncode, done.stdout) == (0, "no dead-lettered batch\n"), done.stderr
    finally:
        assert sink.stop() == 0, sink.stderr
