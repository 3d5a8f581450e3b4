"""The README's embedded-API example, exactly as the README prints it, run again and again."""

from __future__ import annotations

import contextlib
import io
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
RUNS = 100


def example() -> str:
    """The first Python block of the README's embedded API section, verbatim."""
    section = README.read_text().split("## The embedded API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README has no Python example under 'The embedded API'"
    return match.group(1)


@pytest.mark.timeout(300)
def test_the_readme_example_processes_every_record_on_every_run(tmp_path, monkeypatch):
    code = compile(example(), "README.md", "exec")
    monkeypatch.chdir(tmp_path)  # its ledger, zfan.db, lands here, one for all the runs
    heads: dict[str, int] = {}  # each topic's last seq when the run before ended
    for run in range(RUNS):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__readme__"})
        first, second = out.getvalue().splitlines()[:2]
        assert first == "10000 records processed, 0 dead-lettered", (run, out.getvalue())
        # A result of this run, not a stale one of an earlier run.
        topic, seq, _ = second.split(" ", 2)
        assert topic in {f"sensor.s{i}" for i in range(4)} and int(seq) > heads.get(topic, 0), (run, second, heads)
        with closing(sqlite3.connect("zfan.db")) as db:
            heads = dict(db.execute("SELECT topic, max(seq) FROM results GROUP BY topic"))
