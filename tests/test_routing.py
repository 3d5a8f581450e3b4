"""Routes and retry policies: each batch reaches only the app of its topic's route, exactly once;
a batch whose route has no worker waits in sight; failed batches wait out their backoff, and an
exception the route does not retry is dead-lettered at once."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import pytest

from tests.checker import check
from tests.helpers import run_cli, wait_for
from zfan import ConfigError, Producer, RetryPolicy, Sink, Subscriber, Worker, dead_letters, query_status
from zfan.routing import Routes, parse_app, parse_retry

pytestmark = pytest.mark.timeout(60)

ROUTES = {"orders.": "orders", "readings.": "sensors"}
TOPICS = {"orders.eu": "orders", "orders.us": "orders", "readings.t": "sensors", "misc": "default"}


def tagger(app: str):
    def process(records: list) -> list:
        return [{"id": r["id"], "app": app} for r in records]

    return process


def collect(sub: Subscriber, n: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while sum(len(m.records) for m in got) < n:
        assert time.monotonic() < deadline, f"{sum(len(m.records) for m in got)} of {n} records"
        msg = sub.recv(0.2)
        if msg is not None:
            got.append(msg)
    assert sub.recv(0.3) is None, "nothing more is published"
    return got


def send_all(sink, ctx, per_topic: int, size: int = 10) -> dict[str, list[int]]:
    """`per_topic` records on each topic of TOPICS, with ids unique across topics."""
    sent: dict[str, list[int]] = {}
    with Producer(intake=sink.intake, control=sink.control, batch_size=size, context=ctx) as prod:
        for t, topic in enumerate(TOPICS):
            ids = list(range(t * 100_000, t * 100_000 + per_topic))
            prod.send_many([{"id": i} for i in ids], topic=topic)
            sent[topic] = ids
        prod.flush(20)
    return sent


def test_several_apps_on_one_sink_each_get_only_their_routes_batches_once(tmp_path, ipc, ctx):
    with (
        Sink(ledger=str(tmp_path / "z.db"), routes=ROUTES, context=ctx, **ipc) as sink,
        Worker(tagger("orders"), control=sink.control, route="orders", context=ctx),
        Worker(tagger("orders"), control=sink.control, route="orders", context=ctx),
        Worker(tagger("sensors"), control=sink.control, route="sensors", context=ctx),
        Worker(tagger("default"), control=sink.control, context=ctx),
        Subscriber(results=sink.results, context=ctx) as sub,
    ):
        assert sub.wait_ready(10)
        sent = send_all(sink, ctx, 2000)
        got = collect(sub, 2000 * len(TOPICS))
    by_app: dict[str, set[str]] = defaultdict(set)
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in got:
        seqs[m.topic].append(m.seq)
        by_app[m.topic].update(r["app"] for r in m.records)
    assert dict(by_app) == {topic: {app} for topic, app in TOPICS.items()}
    verdict = check([i for ids in sent.values() for i in ids], [r["id"] for m in got for r in m.records], seqs)
    assert verdict.ok, verdict


def test_a_batch_whose_route_has_no_worker_waits_in_sight_then_goes_to_its_app(tmp_path, ipc, ctx, caplog):
    with (
        Sink(ledger=str(tmp_path / "z.db"), routes=ROUTES, context=ctx, **ipc) as sink,
        Worker(tagger("default"), control=sink.control, context=ctx),
        Subscriber(results=sink.results, topics=["orders."], context=ctx) as sub,
    ):
        assert sub.wait_ready(10)
        with caplog.at_level("WARNING", logger="zfan"):
            with Producer(intake=sink.intake, control=sink.control, batch_size=10, topic="orders.eu", context=ctx) as p:
                p.send_many([{"id": i} for i in range(100)])
                p.flush(10)
            wait_for(lambda: query_status(sink.control, context=ctx)["routes"]["orders"]["pending"] == 10, 10)
            wait_for(lambda: "batch(es) of route 'orders' wait: no worker serves it" in caplog.text, 5)
        info = query_status(sink.control, context=ctx)
        assert info["done"] == 0 and info["routes"]["orders"] == {"pending": 10, "backoff": 0, "workers": 0}
        assert info["routes"]["default"]["workers"] == 1
        with Worker(tagger("orders"), control=sink.control, route="orders", context=ctx):
            got = collect(sub, 100)
    assert {r["app"] for m in got for r in m.records} == {"orders"}
    assert sorted(r["id"] for m in got for r in m.records) == list(range(100))


def test_a_worker_of_a_route_no_topic_goes_to_is_told_so_and_gets_nothing(tmp_path, ipc, ctx, caplog):
    with Sink(ledger=str(tmp_path / "z.db"), routes=ROUTES, context=ctx, **ipc) as sink:
        with caplog.at_level("WARNING", logger="zfan"):
            with Worker(tagger("x"), control=sink.control, route="ordrs", name="w-typo", context=ctx) as w:
                wait_for(lambda: "worker w-typo serves route 'ordrs', which no topic is routed to" in caplog.text)
                send_all(sink, ctx, 10)
                assert w.connected.is_set()
                assert query_status(sink.control, context=ctx)["workers"][0]["in_flight"] == 0


def test_the_cli_routes_two_apps_on_one_sink(tmp_path, ipc, roles):
    ends = [f"--{k}={v}" for k, v in ipc.items()]
    sink = roles("sink", "--ledger", str(tmp_path / "z.db"), "--route", "orders.=orders", *ends)
    sink.wait_ready()
    control = f"--control={ipc['control']}"
    line = roles("worker", control, "--app", "orders=tests.apps:tagged_orders").wait_ready()
    assert "app=tests.apps:tagged_orders route=orders" in line
    roles("worker", control, "--app", "tests.apps:tagged_default").wait_ready()
    sub = roles("subscribe", f"--results={ipc['results']}", control, "--messages", "20")
    sub.wait_ready()
    for topic in ("orders.eu", "misc"):
        lines = "".join(json.dumps({"id": i}) + "\n" for i in range(100))
        done = run_cli(
            "produce", f"--intake={ipc['intake']}", control, "--topic", topic, "--batch-size", "10", input=lines
        )
        assert done.returncode == 0, done.stderr
    assert sub.wait(30) == 0, sub.stderr
    got = [json.loads(line) for line in sub.stdout.splitlines()]
    apps = {(m["topic"], r["app"]) for m in got for r in m["records"]}
    assert apps == {("orders.eu", "orders"), ("misc", "default")}
    status = run_cli("status", control)
    assert "routes: default 0 pending, 1 worker(s); orders 0 pending, 1 worker(s)" in status.stdout


class Flaky:
    """Fails each batch's first `fails` attempts with `error`, noting when each attempt began."""

    def __init__(self, error: BaseException, fails: int) -> None:
        self.error, self.fails = error, fails
        self.starts: dict[int, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def __call__(self, records: list) -> list:
        key = records[0]["id"]
        with self._lock:
            self.starts[key].append(time.monotonic())
            tries = len(self.starts[key])
        if tries <= self.fails:
            raise self.error
        return records


def run_flaky(tmp_path, ipc, ctx, app: Flaky, policy: RetryPolicy, batches: int = 5) -> dict:
    with (
        Sink(ledger=str(tmp_path / "z.db"), retries={"default": policy}, context=ctx, **ipc) as sink,
        Worker(app, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=1, context=ctx) as prod,
    ):
        prod.send_many([{"id": i} for i in range(batches)])
        prod.flush(10)
        outcomes = prod.join(30)
        info = query_status(sink.control, context=ctx)
        info["dead_letters"] = list(dead_letters(sink.control, context=ctx))
    info["outcomes"] = outcomes
    return info


def test_a_failed_batch_is_not_leased_again_before_its_backoff_is_over(tmp_path, ipc, ctx):
    app = Flaky(ConnectionError("database down"), fails=2)
    info = run_flaky(tmp_path, ipc, ctx, app, RetryPolicy(max_attempts=3, backoff=(0.2, 0.3), jitter=0))
    assert info["outcomes"].done_batches == 5 and info["dead"] == 0
    for starts in app.starts.values():
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert len(gaps) == 2 and gaps[0] >= 0.2 and gaps[1] >= 0.3, gaps  # 0.2, then doubled up to 0.3
    assert info["retries_delayed"] == 10


def test_an_exception_the_route_does_not_retry_is_dead_lettered_at_its_first_attempt(tmp_path, ipc, ctx):
    policy = RetryPolicy(max_attempts=5, retry_on=("ConnectionError", "TimeoutError"))
    app = Flaky(KeyError("value"), fails=99)
    info = run_flaky(tmp_path, ipc, ctx, app, policy)
    assert info["outcomes"].dead_batches == 5 and info["not_retried"] == 5
    assert {d["attempts"] for d in info["dead_letters"]} == {1}
    assert all(len(s) == 1 for s in app.starts.values())


def test_a_subclass_of_an_exception_retried_is_retried_to_the_routes_attempts(tmp_path, ipc, ctx):
    policy = RetryPolicy(max_attempts=4, retry_on=("OSError",))
    app = Flaky(ConnectionRefusedError("no"), fails=99)
    info = run_flaky(tmp_path, ipc, ctx, app, policy, batches=3)
    assert info["outcomes"].dead_batches == 3
    assert {d["attempts"] for d in info["dead_letters"]} == {4}
    assert all(len(s) == 4 for s in app.starts.values())


def test_an_exception_never_retried_wins_over_one_retried(tmp_path, ipc, ctx):
    policy = RetryPolicy(max_attempts=4, retry_on=("Exception",), no_retry_on=("ValueError",))
    app = Flaky(ValueError("bad input"), fails=99)
    info = run_flaky(tmp_path, ipc, ctx, app, policy, batches=2)
    assert {d["attempts"] for d in info["dead_letters"]} == {1}


def test_backoff_doubles_up_to_its_most_and_jitter_only_shortens_it():
    policy = RetryPolicy(backoff=(1.0, 10.0), jitter=0)
    assert [policy.delay(a) for a in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    low = RetryPolicy(backoff=(1.0, 10.0), jitter=0.5, _random=lambda: 1.0)
    assert [low.delay(a) for a in (1, 5)] == [0.5, 5.0]
    assert RetryPolicy().delay(3) == 0.0


@pytest.mark.parametrize(
    ("text", "route", "policy"),
    [
        ("orders", "orders", RetryPolicy()),
        ("orders:attempts=5", "orders", RetryPolicy(max_attempts=5)),
        (
            "default:attempts=2,backoff=0.5..60,jitter=0.2,on=ConnectionError|TimeoutError,not=KeyError",
            "default",
            RetryPolicy(2, (0.5, 60.0), 0.2, ("ConnectionError", "TimeoutError"), ("KeyError",)),
        ),
        ("x:backoff=3", "x", RetryPolicy(backoff=(3.0, 3.0))),
    ],
)
def test_retry_policies_as_flags_read(text, route, policy):
    assert parse_retry(text) == (route, policy)


@pytest.mark.parametrize(
    "text", ["orders:attempts=0", "orders:tries=3", "orders:backoff=5..1", "bad name:attempts=1", "o:attempts=x"]
)
def test_a_retry_flag_that_makes_no_sense_is_refused(text):
    with pytest.raises(ConfigError):
        parse_retry(text)


def test_the_longest_prefix_routes_and_an_app_names_its_route():
    routes = Routes({"orders.": "orders", "orders.vip.": "vip"})
    assert [routes.of(t) for t in ("orders.eu", "orders.vip.1", "ordersx", "x")] == [
        "orders",
        "vip",
        "default",
        "default",
    ]
    assert parse_app("vip=shop.apps:handle") == ("vip", "shop.apps:handle")
    assert parse_app("shop.apps:handle") == ("default", "shop.apps:handle")


def test_a_policy_without_attempts_takes_the_sinks_and_one_for_no_route_is_refused(tmp_path, ipc, ctx):
    app = Flaky(ConnectionError("down"), fails=99)
    with (
        Sink(
            ledger=str(tmp_path / "z.db"), max_attempts=4, retries={"default": RetryPolicy()}, context=ctx, **ipc
        ) as sink,
        Worker(app, control=sink.control, context=ctx),
        Producer(intake=sink.intake, control=sink.control, batch_size=1, context=ctx) as prod,
    ):
        prod.send({"id": 1})
        prod.flush(10)
        assert prod.join(30).dead_batches == 1
    assert len(app.starts[1]) == 4
    with pytest.raises(ConfigError, match="a retry policy for route 'orders', to which no topic is routed"):
        Sink(ledger=str(tmp_path / "y.db"), retries={"orders": RetryPolicy()}, **ipc)
