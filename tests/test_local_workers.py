"""A sink's local workers (`Sink(workers=N, app=...)`): an app they cannot run stops the sink with
one clear error instead of restarting workers forever."""

from __future__ import annotations

import os

import pytest

from zfan import AppError, Sink

from .helpers import wait_for

pytestmark = pytest.mark.timeout(60)


def test_an_app_that_cannot_be_imported_is_refused_at_once(tmp_path):
    with pytest.raises(AppError) as info:
        Sink(ledger=str(tmp_path / "zfan.db"), workers=2, app="no_such_module:process")
    assert str(info.value) == "app='no_such_module:process': no module named 'no_such_module'"


def test_a_sink_whose_workers_all_exit_at_start_stops_with_one_error(tmp_path, ipc, monkeypatch):
    monkeypatch.setenv("ZFAN_TEST_SINK_PID", str(os.getpid()))  # the module ends any other process
    sink = Sink(
        ledger=str(tmp_path / "zfan.db"),
        **ipc,
        workers=2,
        app="tests.apps_exiting:process",
    )
    sink.start()
    try:
        wait_for(lambda: not sink.running, 30, what="the sink to stop")
        assert isinstance(sink.error, AppError)
        assert str(sink.error) == (
            "every local worker running app 'tests.apps_exiting:process' ended within 5 s of starting, "
            "3 times in a row (the last with exit code 4); the sink stops"
        )
    finally:
        sink.close()
