"""Dead letters as a workflow: listed, shown, requeued once the app is fixed (and then delivered
exactly once), or purged; through the API and through `zfan dead` as a person runs it."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from tests.checker import check
from tests.helpers import run_cli, wait_for
from zfan import (
    Producer,
    Sink,
    Subscriber,
    Worker,
    dead_letters,
    purge_dead_letters,
    query_status,
    requeue_dead_letters,
    show_dead_letter,
)
from zfan.config import Curve
from zfan.nodes.security import generate

pytestmark = pytest.mark.timeout(60)

POISON = 7  # records whose id is a multiple of this fail until the app is fixed


class App:
    """A function that raises on poisoned records until fixed() is called: a bug, then its fix."""

    def __init__(self) -> None:
        self._fixed = threading.Event()

    def fix(self) -> None:
        self._fixed.set()

    def __call__(self, records: list) -> list:
        if not self._fixed.is_set() and any(r["id"] % POISON == 0 for r in records):
            raise KeyError("value")
        return records


def records(n: int) -> list[dict]:
    return [{"id": i} for i in range(n)]


def poisoned_batches(n: int, size: int) -> int:
    return sum(1 for first in range(0, n, size) if any(i % POISON == 0 for i in range(first, min(n, first + size))))


def dead_count(control: str, ctx) -> int:
    return query_status(control, context=ctx)["dead"]


@pytest.fixture
def sink(tmp_path, ipc, ctx):
    with Sink(ledger=str(tmp_path / "z.db"), max_attempts=2, context=ctx, **ipc) as s:
        yield s


def send(sink, ctx, n: int, size: int, topic: str = "orders.eu") -> None:
    with Producer(intake=sink.intake, control=sink.control, batch_size=size, topic=topic, context=ctx) as prod:
        prod.send_many(records(n))
        prod.flush(20)
        prod.join(30)


def test_requeued_after_the_fix_every_record_reaches_the_subscriber_once(sink, ctx):
    n, size = 1000, 10
    app = App()
    with (
        Worker(app, control=sink.control, context=ctx),
        Subscriber(results=sink.results, control=sink.control, topics=["orders."], context=ctx) as sub,
    ):
        assert sub.wait_ready(10)
        ends = {"intake": sink.intake, "control": sink.control}
        with Producer(**ends, batch_size=size, topic="orders.eu", context=ctx) as prod:
            prod.send_many(records(n))
            prod.flush(20)
            outcomes = prod.join(30)
        dead = poisoned_batches(n, size)
        assert outcomes.dead_batches == dead and outcomes.first_error == "KeyError: 'value'"
        listed = list(dead_letters(sink.control, context=ctx))
        assert len(listed) == dead and {d["error"] for d in listed} == {"KeyError: 'value'"}

        app.fix()
        done = requeue_dead_letters(sink.control, every=True, context=ctx)
        assert done["requeued"] == dead and done["not_dead"] == []

        got: list = []
        wait_for(lambda: _take(sub, got) >= n, 30, what="every record at the subscriber")
        assert sub.recv(0.3) is None, "nothing more is published"
    ids = [r["id"] for m in got for r in m.records]
    seqs: dict[str, list[int]] = {}
    for m in got:
        seqs.setdefault(m.topic, []).append(m.seq)
    verdict = check(range(n), ids, seqs)
    assert verdict.ok, verdict
    info = query_status(sink.control, context=ctx)
    assert (info["dead"], info["pending"], info["batches_requeued"]) == (0, 0, dead)
    assert list(dead_letters(sink.control, context=ctx)) == []


def _take(sub, got: list) -> int:
    msg = sub.recv(0.1)
    if msg is not None:
        got.append(msg)
    return sum(len(m.records) for m in got)


def test_a_requeue_is_in_the_ledger_before_it_is_answered(tmp_path, ipc, ctx):
    ledger = str(tmp_path / "z.db")
    with Sink(ledger=ledger, max_attempts=1, context=ctx, **ipc) as sink:
        with Worker(App(), control=sink.control, context=ctx):
            send(sink, ctx, 100, 10)
        ids = [d["batch_id"] for d in dead_letters(sink.control, context=ctx)]
        assert len(ids) == poisoned_batches(100, 10)
        # No worker now: the requeued batches stay pending while the sink stops.
        assert requeue_dead_letters(sink.control, ids[:1], context=ctx)["batch_ids"] == ids[:1]
        sink.close()  # at once, as far as this batch is concerned
    app = App()
    app.fix()
    with (
        Sink(ledger=ledger, max_attempts=1, context=ctx, **ipc) as sink,
        Worker(app, control=sink.control, context=ctx),
    ):
        # Pending drops to 0 as soon as the batch is leased; wait until it is settled.
        def settled() -> bool:
            info = query_status(sink.control, context=ctx)
            return info["pending"] == info["leased"] == 0

        wait_for(settled, 20, what="the requeued batch done")
        info = query_status(sink.control, context=ctx)
        assert info["dead"] == len(ids) - 1 and info["done"] == 10 - len(ids) + 1


def test_show_gives_the_traceback_and_the_records_and_purge_drops_them(sink, ctx):
    with Worker(App(), control=sink.control, context=ctx):
        send(sink, ctx, 30, 5, topic="orders.eu")
        send(sink, ctx, 30, 5, topic="orders.us")
    eu = [d["batch_id"] for d in dead_letters(sink.control, topic="orders.eu", context=ctx)]
    us = [d["batch_id"] for d in dead_letters(sink.control, topic="orders.us", context=ctx)]
    assert len(eu) == len(us) == poisoned_batches(30, 5)

    shown = show_dead_letter(sink.control, eu[0], context=ctx)
    assert shown is not None
    assert shown["error"].startswith("Traceback (most recent call last):")
    assert shown["error"].rstrip().endswith("KeyError: 'value'")
    assert shown["records"] == records(5) and shown["count"] == 5 and shown["attempts"] == 2
    assert show_dead_letter(sink.control, 10_000, context=ctx) is None

    purged = purge_dead_letters(sink.control, every=True, topic="orders.us", context=ctx)
    assert purged["purged"] == len(us) and purged["batch_ids"] == us
    assert [d["batch_id"] for d in dead_letters(sink.control, context=ctx)] == eu
    assert show_dead_letter(sink.control, us[0], context=ctx) is None
    again = requeue_dead_letters(sink.control, [us[0], eu[0]], context=ctx)
    assert again["batch_ids"] == [eu[0]] and again["not_dead"] == [us[0]]
    info = query_status(sink.control, context=ctx)
    assert (info["dead"], info["purged"]) == (len(eu) - 1, len(us))
    # The notices on zfan.dead, replayed from the ledger: a purged batch's carry no records.
    with Subscriber(
        results=sink.results, control=sink.control, topics=["zfan.dead"], durable="audit", context=ctx
    ) as sub:
        notices = [sub.recv(10) for _ in range(len(eu) + len(us))]
    assert all(m is not None for m in notices)
    carried = {m.batch_id: m.records for m in notices}
    assert all(carried[b] == [] for b in us) and all(len(carried[b]) == 5 for b in eu)


def dead(*args: str, control: str) -> tuple[int, str, str]:
    done = run_cli("dead", *args, "--control", control, timeout=20)
    assert "Traceback" not in done.stderr or args[0] == "show", done.stderr
    return done.returncode, done.stdout, done.stderr


def test_zfan_dead_as_a_person_uses_it(tmp_path, ipc, ctx):
    # Past one page (100) of dead letters: every batch of one record fails on its only attempt.
    with Sink(ledger=str(tmp_path / "z.db"), max_attempts=1, context=ctx, **ipc) as sink:
        with Worker(App(), control=sink.control, context=ctx):
            send(sink, ctx, 150 * POISON, 1)  # 150 poisoned records, one per batch
        code, out, _ = dead("list", control=sink.control)
        lines = out.splitlines()
        assert code == 0 and lines[-1] == "150 dead-lettered batch(es)" and len(lines) == 152
        assert lines[0].split() == ["batch", "topic", "records", "attempts", "dead-lettered", "error"]
        assert lines[1].split()[1:4] == ["orders.eu", "1", "1"] and lines[1].endswith("KeyError: 'value'")

        code, out, _ = dead("list", "--json", control=sink.control)
        listed = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(listed) == 150 and len({d["batch_id"] for d in listed}) == 150
        first, second = listed[0]["batch_id"], listed[1]["batch_id"]

        code, out, _ = dead("show", str(first), control=sink.control)
        assert code == 0
        assert out.startswith(f"batch {first} on topic orders.eu: 1 record(s), 1 attempt(s), dead-lettered 20")
        assert "  KeyError: 'value'" in out and out.rstrip().endswith('records:\n{"id": 0}')
        code, out, _ = dead("show", "--json", str(second), control=sink.control)
        assert code == 0 and json.loads(out)["records"] == [{"id": POISON}]
        code, _, err = dead("show", "99999", control=sink.control)
        assert (code, err) == (1, f"zfan dead: error: the sink at {sink.control} holds no dead-lettered batch 99999\n")

        code, _, err = dead("requeue", str(first), control=sink.control)
        assert (code, err) == (0, "zfan dead: 1 batch(es) requeued\n")
        code, _, err = dead("requeue", str(first), control=sink.control)
        assert code == 1 and err.endswith(f"not dead-lettered (unknown, or requeued or purged already): {first}\n")
        code, _, err = dead("requeue", control=sink.control)
        assert code == 2 and err.startswith("zfan dead: error: name the batches")

        code, _, err = dead("purge", "--all", control=sink.control)  # stdin is no terminal here
        assert code == 2 and err == "zfan dead: error: purging every dead-lettered batch cannot be undone: add --yes\n"
        assert dead_count(sink.control, ctx) == 149
        code, _, err = dead("purge", "--all", "--yes", control=sink.control)
        assert (code, err) == (0, "zfan dead: 149 batch(es) purged\n")
        code, out, _ = dead("list", control=sink.control)
        assert (code, out) == (0, "no dead-lettered batch\n")


def test_zfan_dead_with_no_sink_says_so_and_exits_6(tmp_path):
    code, _, err = dead("list", "--timeout", "0.5", control=f"ipc://{tmp_path}/nothing")
    assert code == 6 and err.count("\n") == 1 and "no answer from a sink" in err


def test_zfan_dead_over_curve_needs_an_allowed_key(tmp_path, ipc, ctx):
    folder, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("sink", "ops", "intruder"):
        generate(str(folder), name)
    shutil.copy(folder / "ops.key", allowed)
    server = Curve(secret_file=str(folder / "sink.key_secret"), allow_keys=str(allowed))
    ops = Curve(secret_file=str(folder / "ops.key_secret"), server_key=str(folder / "sink.key"))
    with Sink(ledger=str(tmp_path / "z.db"), max_attempts=1, curve=server, context=ctx, **ipc) as sink:
        with Worker(App(), control=sink.control, curve=ops, context=ctx):
            with Producer(intake=sink.intake, control=sink.control, batch_size=10, curve=ops, context=ctx) as prod:
                prod.send_many(records(20))
                prod.flush(20)
                prod.join(30)
        server_key = ["--curve-server-key", str(folder / "sink.key")]
        code, out, err = dead(
            "list", "--json", "--curve-secret", str(folder / "ops.key_secret"), *server_key, control=sink.control
        )
        assert code == 0, err
        assert len(out.splitlines()) == 2
        code, _, err = dead(
            "list",
            "--timeout",
            "3",
            "--curve-secret",
            str(folder / "intruder.key_secret"),
            *server_key,
            control=sink.control,
        )
        assert code == 7, err
