"""Seeing a pipeline run: the sink's and a worker's /metrics, /healthz, /readyz and /api/status,
the metrics' socket-free parts, and what the CLI shows (`zfan status --watch`, JSON logs,
`zfan worker --check`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Terminal, run_cli, wait_for
from tests.test_dispatch import Turn, batch, hello_producer, hello_worker, make_core, send_failed, send_result
from zfan import BindError, Producer, Sink, Subscriber, Worker, __version__
from zfan.exporter import SinkCollector, registry
from zfan.metrics import DEAD_KEPT, PREFIXES, SinkMetrics

pytestmark = pytest.mark.timeout(60)


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(base: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels: {'zfan_workers': 1.0, 'zfan_x{a="b"}': 2.0}."""
    status, text = get(base + "metrics")
    assert status == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def identity(records: list) -> list:
    return records


# --- socket-free: the metrics the core keeps ---------------------------------------------------


def test_a_batch_is_counted_in_and_out_with_its_trip_and_the_turns_commits(ledger, clock):
    core = make_core(ledger, clock)
    hello_worker(core, b"w", 8)
    hello_producer(core, b"pr", "p")
    Turn(core)
    core.intake(batch("p", 1, topic="sensor.1", payload=msgpack.packb(["a", "b", "c"])))
    lease = Turn(core).leases[0]
    clock.advance(0.2)
    send_result(core, b"w", lease, {"out.x": msgpack.packb([1, 2])})
    Turn(core)
    snap = core.snapshot()
    assert (snap["records_in"], snap["records_out"], snap["results_out"]) == (3, 2, 1)
    assert snap["records_in_by_prefix"] == {"sensor": 3} and snap["records_out_by_prefix"] == {"out": 2}
    trip = snap["end_to_end_seconds"]
    assert trip["count"] == 1 and trip["sum"] == pytest.approx(0.2)
    bucket = dict(zip(trip["bounds"], trip["cumulative"], strict=False))  # the last count is +Inf's
    assert (bucket[0.1], bucket[0.25]) == (0, 1)  # 0.2 s lands in the bucket up to 0.25 s
    assert snap["commit_seconds"]["count"] == 2  # the turn that acked, the turn that published
    assert snap["top_topics"] == [("out.x", 1)] and snap["topics"] == 1
    assert snap["version"] == __version__ and snap["ledger_bytes"] > 0


def test_rates_are_over_the_last_10_seconds_and_history_has_a_row_per_second(ledger, clock):
    core = make_core(ledger, clock)
    hello_producer(core, b"pr", "p")
    Turn(core)
    clock.advance(20)
    for seq in range(1, 6):  # 5 batches of 2 records, one a second
        core.intake(batch("p", seq, payload=msgpack.packb([seq, seq])))
        Turn(core)
        clock.advance(1)
    snap = core.snapshot()
    assert snap["rate_in"] == pytest.approx(10 / 10)
    assert [row[1] for row in snap["history"][-6:]] == [2, 2, 2, 2, 2, 0]  # seconds ago 5..0
    assert [row[0] for row in snap["history"][-3:]] == [2, 1, 0]
    clock.advance(60)
    assert core.snapshot()["rate_in"] == 0


def test_the_last_dead_letters_are_kept_newest_first_and_no_more_than_DEAD_KEPT(ledger, clock):
    core = make_core(ledger, clock, max_attempts=1)
    hello_worker(core, b"w", 100)
    hello_producer(core, b"pr", "p")
    for seq in range(1, DEAD_KEPT + 6):
        core.intake(batch("p", seq))
    for lease in Turn(core).leases:
        send_failed(core, b"w", lease, error=f"boom {lease.batch_id}")
    Turn(core)
    snap = core.snapshot()
    assert snap["dead_total"] == DEAD_KEPT + 5 == snap["dead"]
    assert len(snap["dead_letters"]) == DEAD_KEPT
    assert snap["dead_letters"][0]["error"] == f"boom {DEAD_KEPT + 5}"  # the newest


def test_a_durable_subscribers_lag_is_in_the_status_and_its_table(ledger, clock):
    from zfan import protocol as p
    from zfan.cli.show import status_table

    core = make_core(ledger, clock)
    hello_worker(core, b"w", 8)
    hello_producer(core, b"pr", "p")
    for seq in (1, 2, 3):
        core.intake(batch("p", seq))
    for lease in Turn(core).leases:
        send_result(core, b"w", lease, {"t": msgpack.packb([1])})
    Turn(core)
    core.control(b"sub", p.encode(p.Commit("ops", ["t"], [1])))  # it has taken seq 1 of 3
    Turn(core)
    info = core.status()
    assert info["cursor_lag"] == {"ops": 2}
    assert "durable subscribers: ops 2 behind" in status_table(info).splitlines()
    # However many names committed a position (anyone may), the status stays one small message.
    for i in range(100):
        core.control(b"sub", p.encode(p.Commit(f"n{i:03}", ["t"], [3 if i else 2])))
    Turn(core)
    lag = core.status()["cursor_lag"]
    assert len(lag) == 20 and lag["ops"] == 2 and lag["n000"] == 1
    assert p.decode(p.encode(p.StatusReply(core.status()))).info["cursor_lag"] == lag


def test_topic_prefixes_past_the_limit_are_counted_as_other(clock):
    metrics = SinkMetrics(clock, clock)
    metrics.arrived([(i, f"p{i}.t", 2 if i < PREFIXES else 1) for i in range(PREFIXES + 10)])
    counted = metrics.snapshot()["records_in_by_prefix"]
    assert len(counted) == PREFIXES + 1 and counted["other"] == 10


def test_the_collector_exposes_the_snapshot_under_prometheus_names(ledger, clock):
    core = make_core(ledger, clock)
    hello_worker(core, b"w", 8)
    hello_producer(core, b"pr", "p")
    core.intake(batch("p", 1, payload=msgpack.packb(list(range(7)))))
    lease = Turn(core).leases[0]
    send_result(core, b"w", lease, {"t": msgpack.packb(list(range(7)))})
    Turn(core)
    reg = registry(SinkCollector(core.snapshot))
    from prometheus_client import generate_latest

    samples = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("zfan_records_in_total", ())] == 7
    assert samples[("zfan_records_out_total", ())] == 7
    assert samples[("zfan_batches_done_total", ())] == 1
    assert samples[("zfan_ledger_done_batches", ())] == 1
    assert samples[("zfan_workers", ())] == 1
    assert samples[("zfan_worker_in_flight_batches", (("worker", "w"),))] == 0
    assert samples[("zfan_end_to_end_seconds_count", ())] == 1
    assert samples[("zfan_end_to_end_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("zfan_build_info", (("role", "sink"), ("version", __version__)))] == 1


# --- a running pipeline ------------------------------------------------------------------------


@pytest.fixture
def pipeline(ipc, tmp_path):
    """A sink serving HTTP on a free port, and a worker thread running identity()."""
    with Sink(ledger=str(tmp_path / "z.db"), http="127.0.0.1:0", **ipc) as sink:
        with Worker(identity, control=ipc["control"]) as worker:
            wait_for(worker.connected.is_set, what="the worker to join")
            yield sink, ipc


def test_metrics_count_what_the_producer_sent_and_the_subscriber_received(pipeline):
    sink, ipc = pipeline
    assert sink.http.startswith("http://127.0.0.1:")
    n, size = 2500, 100
    with Subscriber(results=ipc["results"], topics=["sensor"]) as sub:
        assert sub.wait_ready(10)
        with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=size, topic="sensor.a") as prod:
            prod.send_many([{"i": i} for i in range(n)])
            prod.flush(20)
        got = 0
        while got < n:
            msg = sub.recv(timeout=10)
            assert msg is not None, f"only {got} of {n} records arrived"
            got += len(msg.records)
        want = {
            "zfan_records_in_total": n,
            "zfan_records_out_total": n,
            "zfan_batches_in_total": n // size,
            "zfan_batches_done_total": n // size,
            "zfan_ledger_done_batches": n // size,
            "zfan_ledger_pending_batches": 0,
            "zfan_workers": 1,
            "zfan_subscribers": 1,
            "zfan_end_to_end_seconds_count": n // size,
            'zfan_topic_records_in_total{prefix="sensor"}': n,
        }
        metrics = wait_for(
            lambda: (m := scrape(sink.http)) and all(m.get(k) == v for k, v in want.items()) and m,
            what="the metrics to count every record",
        )
    wait_for(lambda: scrape(sink.http)["zfan_subscribers"] == 0, what="the subscriber's leaving to be counted")
    assert metrics["zfan_commit_seconds_count"] >= 1
    assert metrics["zfan_ledger_size_bytes"] > 0
    assert metrics[f'zfan_build_info{{role="sink",version="{__version__}"}}'] == 1
    status, body = get(sink.http + "api/status")
    assert status == 200 and json.loads(body)["records_out"] == n
    status, page = get(sink.http)
    assert status == 200 and "<title>zfan sink</title>" in page
    assert get(sink.http + "nothing")[0] == 404


def test_readyz_needs_a_worker_and_a_writable_ledger_while_healthz_only_a_turning_loop(ipc, tmp_path):
    folder = tmp_path / "ledger"
    folder.mkdir()
    with Sink(ledger=str(folder / "z.db"), http="127.0.0.1:0", min_workers=1, **ipc) as sink:
        assert get(sink.http + "healthz") == (200, '{"ok": true, "reasons": []}\n')
        status, body = get(sink.http + "readyz")
        assert status == 503 and json.loads(body)["reasons"] == ["0 worker(s) connected, 1 needed"]
        with Worker(identity, control=ipc["control"]) as worker:
            wait_for(worker.connected.is_set, what="the worker to join")
            wait_for(lambda: get(sink.http + "readyz")[0] == 200, what="ready once a worker is connected")
            with read_only(folder):
                status, body = get(sink.http + "readyz")
                assert status == 503 and json.loads(body)["reasons"] == [f"ledger {folder / 'z.db'} is not writable"]
                assert get(sink.http + "healthz")[0] == 200
            assert get(sink.http + "readyz")[0] == 200


class read_only:
    """A folder nothing may be written in: `chattr +i` as root (whom modes do not stop), else
    mode 555."""

    def __init__(self, folder: os.PathLike) -> None:
        self.folder = str(folder)

    def __enter__(self) -> None:
        if os.geteuid() == 0:
            r = subprocess.run(["chattr", "+i", self.folder], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"running as root and chattr +i fails here: {r.stderr.strip()}")
        else:
            os.chmod(self.folder, 0o555)

    def __exit__(self, *exc: object) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", self.folder], check=True)
        else:
            os.chmod(self.folder, 0o755)


def test_a_worker_counts_its_batches_and_is_ready_only_with_a_sink(ipc, tmp_path):
    with Worker(identity, control=ipc["control"], http="127.0.0.1:0") as worker:
        status, body = get(worker.http + "readyz")
        assert status == 503 and json.loads(body)["reasons"] == ["no sink has welcomed this worker"]
        assert get(worker.http + "healthz")[0] == 200
        with Sink(ledger=str(tmp_path / "z.db"), **ipc):
            wait_for(lambda: get(worker.http + "readyz")[0] == 200, what="ready once welcomed")
            with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=10) as prod:
                prod.send_many([{"i": i} for i in range(50)])
                prod.flush(20)
            m = wait_for(
                lambda: (m := scrape(worker.http)) and m["zfan_worker_batches_total"] == 5 and m,
                what="the worker to count 5 batches",
            )
    assert m["zfan_worker_records_total"] == 50
    assert m["zfan_worker_app_errors_total"] == 0
    assert m["zfan_worker_batch_seconds_count"] == 5
    assert m["zfan_worker_connected"] == 1


def test_an_http_port_in_use_is_one_clear_error(ipc, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"http endpoint 127.0.0.1:{port}: Address already in use"):
            Sink(ledger=str(tmp_path / "z.db"), http=f"127.0.0.1:{port}", **ipc).start()
        res = run_cli("sink", "--ledger", str(tmp_path / "z2.db"), "--http", f"127.0.0.1:{port}", timeout=30)
    assert res.returncode == 4, res.stderr
    assert res.stderr.splitlines() == [f"zfan sink: error: http endpoint 127.0.0.1:{port}: Address already in use"]


def test_a_bad_http_address_is_refused_before_anything_starts(tmp_path):
    res = run_cli("sink", "--ledger", str(tmp_path / "z.db"), "--http", "nowhere")
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        "zfan sink: error: http address 'nowhere' is not HOST:PORT (e.g. 127.0.0.1:5560, or :5560 for localhost)"
    ]


# --- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def cli_sink(ipc, tmp_path, roles):
    sink = roles("sink", "--ledger", str(tmp_path / "z.db"), *[f"--{k}={v}" for k, v in ipc.items()])
    sink.wait_ready()
    return sink


def test_status_watch_redraws_in_place_until_ctrl_c(ipc, cli_sink):
    with Terminal("status", "--control", ipc["control"], "--watch", "0.2") as term:
        wait_for(lambda: term.raw.count("\x1b[H\x1b[J") >= 3, what="three redraws")
        assert "sink 0.1.0, epoch 1, up " in term.raw and "batches: pending 0" in term.raw
        term.ctrl_c()
        assert term.wait(10) == 130
    assert "Traceback" not in term.raw


def test_status_watch_json_is_one_object_per_line(ipc, cli_sink):
    proc = subprocess.Popen(
        [sys.executable, "-m", "zfan", "status", "--control", ipc["control"], "--watch", "0.1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.terminate()
        _, err = proc.communicate(10)
    assert [json.loads(line)["epoch"] for line in lines] == [1, 1, 1]
    assert proc.returncode == 143 and "Traceback" not in err


def test_status_of_a_sink_that_is_not_there_is_one_line(tmp_path):
    res = run_cli("status", "--control", f"ipc://{tmp_path}/none", "--timeout", "0.3", "--watch")
    assert res.returncode == 6
    assert res.stderr.splitlines() == [
        f"zfan status: error: no answer from a sink at ipc://{tmp_path}/none within 0.3 s (is it running?)"
    ]


def test_json_logs_are_one_object_per_line_with_the_structured_fields(ipc, tmp_path, roles):
    sink = roles(
        "sink", "--ledger", str(tmp_path / "z.db"), "--log-format", "json", *[f"--{k}={v}" for k, v in ipc.items()]
    )
    sink.wait_ready()  # as a JSON line
    worker = roles("worker", "--control", ipc["control"], "--name", "w1", "--app", "tests.test_observability:identity")
    worker.wait_ready()
    joined = wait_for(
        lambda: next((r for r in map(json.loads, list(sink.err)) if r.get("worker") == "w1"), None),
        what="the worker's join, logged",
    )
    assert joined["message"] == "worker w1 joined with credit 256"
    assert joined["level"] == "info" and joined["role"] == "sink" and joined["time"].endswith("Z")
    assert sink.stop() == 0
    records = [json.loads(line) for line in sink.err]  # every line is JSON
    assert any(r["message"].startswith("zfan sink: ready intake=") for r in records)


def test_a_log_file_takes_the_log_and_stderr_keeps_the_lines_for_a_person(ipc, tmp_path, roles):
    log = tmp_path / "sink.log"
    sink = roles(
        "sink", "--ledger", str(tmp_path / "z.db"), "--log-file", str(log), *[f"--{k}={v}" for k, v in ipc.items()]
    )
    sink.wait_ready()
    worker = roles("worker", "--control", ipc["control"], "--name", "w1", "--app", "tests.test_observability:identity")
    worker.wait_ready()
    wait_for(lambda: log.exists() and "worker w1 joined" in log.read_text(), what="the join in the log file")
    assert sink.stop() == 0
    assert all(": ready " in x or "stopping" in x for x in sink.err), sink.stderr


def test_worker_check_says_whether_the_sink_answers_and_the_worker_is_there(ipc, tmp_path, roles, cli_sink):
    app = "tests.test_observability:identity"
    res = run_cli("worker", "--check", "--control", ipc["control"], "--app", app)
    assert res.returncode == 0 and res.stderr.splitlines() == [
        f"zfan worker: check passed: the sink at {ipc['control']} answers, 0 worker(s) connected"
    ]
    res = run_cli("worker", "--check", "--control", ipc["control"], "--app", app, "--name", "w9")
    assert res.returncode == 1 and res.stderr.splitlines() == [
        f"zfan worker: check failed: no worker named 'w9' is connected to the sink at {ipc['control']}"
    ]
    roles("worker", "--control", ipc["control"], "--app", app, "--name", "w9").wait_ready()
    res = run_cli("worker", "--check", "--control", ipc["control"], "--app", app, "--name", "w9")
    assert res.returncode == 0, res.stderr
    res = run_cli("worker", "--check", "--control", f"ipc://{tmp_path}/none", "--app", app, "--connect-timeout", "0.3")
    assert res.returncode == 6 and len(res.stderr.splitlines()) == 1, res.stderr
