"""Clients never hang: pointed at a port of the wrong kind, at nothing at all, or at a sink that
goes away, a producer, worker or subscriber says so in one line and stops (or, a worker, waits
and says so once), and a signal stops it at once. Real commands as subprocesses, a real sink on
127.0.0.1 random ports, real signals."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import pytest
import zmq

from tests.helpers import wait_for
from zfan import AuthError, Producer, Sink, Subscriber, Worker, query_status
from zfan.cli.options import RET_TIMEOUT
from zfan.config import ProducerSettings, SubscriberSettings, WorkerSettings
from zfan.errors import ConfigError, NoSink
from zfan.nodes.transport import send
from zfan.subscription import SubscriberCore

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"
PROMPT = 5.0  # seconds: "at once" for a command, with its interpreter's start on a busy machine
KINDS = {"intake": "PULL", "control": "ROUTER", "results": "XPUB"}


def echo(records):
    return records


def wrong_port(endpoint: str, dialled: str, found: str) -> str:
    """What a client says when it dialled its `dialled` port and found the sink's `found` port."""
    return (
        f"{endpoint}: that is not a zfan {dialled} port (the peer is a ZeroMQ {KINDS[found]} socket, "
        f"as a zfan sink's {found} port is)"
    )


def nothing_at(endpoint: str, port: str, timeout: float) -> str:
    return (
        f"no zfan sink answered at {endpoint} within {timeout:g} s: nothing listens there "
        f"(is the sink running, and is this its {port} port?)"
    )


def the_error_line(role, command: str) -> str:
    """The one line a failed command printed: no traceback, no other error line."""
    assert "Traceback" not in role.stderr, role.stderr
    errors = [line.rstrip("\n") for line in role.err if ": error: " in line]
    assert len(errors) == 1, role.stderr
    assert errors[0].startswith(f"zfan {command}: error: "), role.stderr
    return errors[0].removeprefix(f"zfan {command}: error: ")


# --- a port of the wrong kind: said at once, through the commands ----------------------------

WRONG = [
    # (command, its endpoint flags as (flag, the sink's port given), the port it says is wrong and what it found)
    ("worker", [("control", "intake")], ("control", "intake")),
    ("worker", [("control", "results")], ("control", "results")),
    ("produce", [("intake", "intake"), ("control", "intake")], ("control", "intake")),
    ("produce", [("intake", "control"), ("control", "control")], ("intake", "control")),
    ("subscribe", [("results", "control"), ("control", "control")], ("results", "control")),
    ("subscribe", [("results", "results"), ("control", "results")], ("control", "results")),
    ("status", [("control", "intake")], ("control", "intake")),
]


@pytest.mark.parametrize("command, flags, said", WRONG, ids=[f"{c}-{s[0]}-at-{s[1]}" for c, _, s in WRONG])
def test_a_client_pointed_at_a_port_of_the_wrong_kind_says_so_at_once(sink, roles, command, flags, said):
    ports = {"intake": sink.intake, "control": sink.control, "results": sink.results}
    extra = ["--count", "10"] if command == "produce" else []
    started = time.monotonic()
    role = roles(command, *[f"--{flag}={ports[given]}" for flag, given in flags], *extra)
    code = role.wait(timeout=30)
    assert time.monotonic() - started < PROMPT
    dialled, found = said
    assert the_error_line(role, command) == wrong_port(ports[found], dialled, found)
    assert code == RET_TIMEOUT  # no sink answered: the sink's own port of that kind is elsewhere
    info = query_status(sink.control, timeout=5)  # and the sink took no harm
    assert info["workers"] == [] and info.get("records_in", 0) == 0


def test_a_subscriber_at_a_plain_sinks_control_port_is_never_told_it_needs_encryption(sink, ctx):
    """Which side of an incompatible pair hangs up first is a race; when the sink's does, the
    client sees the failed handshake that a refused encryption also gives. Asked again, the
    endpoint says what it is, every time."""
    for _ in range(20):
        with Subscriber(results=sink.control, control=sink.control, context=ctx) as sub:
            with pytest.raises(NoSink) as raised:
                sub.wait_ready(10)
        assert str(raised.value) == wrong_port(sink.control, "results", "control")


# --- encryption: said only when it is what is wrong --------------------------------------------


def test_an_encrypted_client_at_an_encrypted_sinks_port_of_the_wrong_kind_is_told_the_port_not_the_key(
    keys, ipc, tmp_path, ctx
):
    server, client = keys
    with Sink(ledger=str(tmp_path / "z.db"), curve=server, **ipc):
        worker = Worker(echo, control=ipc["intake"], curve=client, context=ctx).start()
        try:
            assert worker.wait(PROMPT)
        finally:
            worker.close()
        assert isinstance(worker.error, NoSink)
        assert str(worker.error) == (
            f"{ipc['intake']}: that is not a zfan control port (with these keys the peer lets a ZeroMQ PUSH "
            "socket in, as a zfan sink's intake port does)"
        )
        with Subscriber(results=ipc["control"], control=ipc["control"], curve=client, context=ctx) as sub:
            with pytest.raises(NoSink, match="not a zfan results port .* a ZeroMQ DEALER socket in"):
                sub.wait_ready(10)
        # Without keys, what is wrong is the keys, whichever port it is.
        with Subscriber(results=ipc["control"], control=ipc["control"], context=ctx) as sub:
            with pytest.raises(AuthError, match="the sink requires encryption"):
                sub.wait_ready(10)


def test_an_encrypted_client_of_a_plain_sink_is_told_so_and_at_its_wrong_port_the_port(keys, sink, ctx):
    _, client = keys
    with pytest.raises(AuthError, match="disagree on encryption"):
        query_status(sink.control, timeout=10, curve=client, context=ctx)
    with pytest.raises(NoSink, match="not a zfan control port .* ZeroMQ PULL socket"):
        query_status(sink.intake, timeout=10, curve=client, context=ctx)


# --- the library: the same error, where its caller looks -------------------------------------


def test_a_producer_at_a_wrong_port_raises_from_send_flush_and_join(sink, ctx):
    prod = Producer(intake=sink.intake, control=sink.intake, context=ctx).start()
    try:
        wait_for(lambda: not prod.running, timeout=PROMPT, what="the producer to stop")
        expected = wrong_port(sink.intake, "control", "intake")
        assert isinstance(prod.error, NoSink) and str(prod.error) == expected
        for call in (lambda: prod.send({"id": 1}), lambda: prod.flush(5), lambda: prod.join(5)):
            with pytest.raises(NoSink, match="that is not a zfan control port"):
                call()
        assert not prod.connected.is_set()
    finally:
        prod.close(timeout=1)


def test_a_worker_at_a_wrong_port_ends_with_the_error(sink, ctx):
    worker = Worker(echo, control=sink.results, context=ctx).start()
    try:
        assert worker.wait(PROMPT)
        assert isinstance(worker.error, NoSink)
        assert str(worker.error) == wrong_port(sink.results, "control", "results")
    finally:
        worker.close()


@pytest.mark.parametrize(
    "results, control, dialled, found",
    [("control", "control", "results", "control"), ("results", "intake", "control", "intake")],
)
def test_a_subscriber_at_a_wrong_port_raises_from_wait_ready_and_recv(sink, ctx, results, control, dialled, found):
    ports = {"intake": sink.intake, "control": sink.control, "results": sink.results}
    with Subscriber(results=ports[results], control=ports[control], context=ctx) as sub:
        started = time.monotonic()
        with pytest.raises(NoSink) as raised:
            sub.wait_ready(10)
        assert time.monotonic() - started < PROMPT
        assert str(raised.value) == wrong_port(ports[found], dialled, found)
        with pytest.raises(NoSink):  # and again, at every call: it cannot go on
            sub.recv(1)
        with pytest.raises(NoSink):
            sub.wait_ready(1)


def test_a_status_query_at_a_wrong_port_says_so(sink, ctx):
    with pytest.raises(NoSink, match="that is not a zfan control port"):
        query_status(sink.results, timeout=10, context=ctx)


# --- nothing listening: the timeout, and its line ---------------------------------------------


def test_defaults_a_person_starts_by_hand_gives_up_a_worker_fleet_waits():
    assert ProducerSettings().connect_timeout == 10.0
    assert SubscriberSettings().connect_timeout == 10.0
    assert WorkerSettings().connect_timeout is None
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match="connect_timeout must be greater than 0"):
            ProducerSettings(connect_timeout=bad)


def test_commands_with_no_sink_at_all_say_so_after_their_connect_timeout(sink, roles, free_port):
    """The default 10 s, for a producer and a subscriber started by hand: each endpoint that
    never answered is named, whichever it is. All at once, so the test waits 10 s once."""
    other = free_port.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1 either
    cases = {
        "produce": (
            roles("produce", "--count", "10", f"--intake={other}", f"--control={free_port}"),
            nothing_at(free_port, "control", 10),
        ),
        "produce-intake": (
            roles("produce", "--count", "10", f"--intake={free_port}", f"--control={sink.control}"),
            nothing_at(free_port, "intake", 10),
        ),
        "subscribe": (
            roles("subscribe", f"--results={other}", f"--control={free_port}"),
            nothing_at(free_port, "control", 10),
        ),
        "subscribe-results": (
            roles("subscribe", f"--results={free_port}", f"--control={sink.control}"),
            nothing_at(free_port, "results", 10),
        ),
    }
    started = time.monotonic()
    for name, (role, line) in cases.items():
        assert role.wait(timeout=30) == RET_TIMEOUT, role.stderr
        assert the_error_line(role, name.split("-")[0]) == line
    assert 10 <= time.monotonic() - started < 10 + PROMPT + 5


def test_library_clients_with_no_sink_give_up_after_their_connect_timeout(ctx, free_port):
    prod = Producer(intake=free_port, control=free_port, connect_timeout=0.5, context=ctx).start()
    worker = Worker(echo, control=free_port, connect_timeout=0.5, context=ctx).start()
    sub = Subscriber(results=free_port, control=free_port, connect_timeout=0.5, context=ctx)
    try:
        prod.send({"id": 1})
        with pytest.raises(NoSink) as raised:
            prod.flush(10)
        assert str(raised.value) == nothing_at(free_port, "control", 0.5)
        assert worker.wait(10) and str(worker.error) == nothing_at(free_port, "control", 0.5)
        with pytest.raises(NoSink) as raised:
            sub.wait_ready(10)
        assert str(raised.value) == nothing_at(free_port, "control", 0.5)
        assert raised.value.endpoint == free_port
    finally:
        sub.close()
        worker.close()
        prod.close(timeout=1)


def test_a_peer_that_cuts_every_handshake_is_no_reason_to_ask_for_keys(ctx):
    """A connection closed mid-handshake gives a plain client the same failed handshake that a
    sink requiring encryption would: a sink that dies just then, or anything else. The
    endpoint, asked, says nothing of encryption, so the client waits out its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

    def cut() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the test is over
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4))
            conn.close()  # a reset, before any greeting

    cutter = threading.Thread(target=cut, daemon=True)
    cutter.start()
    try:
        prod = Producer(intake=endpoint, control=endpoint, connect_timeout=1.0, context=ctx).start()
        try:
            prod.send({"id": 1})
            with pytest.raises(NoSink) as raised:
                prod.flush(10)
        finally:
            prod.close(timeout=1)
        assert not isinstance(raised.value, AuthError)
        assert str(raised.value).startswith(f"no zfan sink answered at {endpoint} within 1 s")
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        listener.close()
        cutter.join(5)
        assert not cutter.is_alive()


def test_a_worker_at_a_port_where_something_else_than_zeromq_listens_says_so_at_once(ctx):
    """An HTTP server, say: it answers the greeting with bytes that are no ZMTP signature."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the test is over
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(100)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    server = threading.Thread(target=answer, daemon=True)
    server.start()
    try:
        worker = Worker(echo, control=endpoint, context=ctx).start()
        try:
            assert worker.wait(PROMPT)
        finally:
            worker.close()
        assert isinstance(worker.error, NoSink)
        assert str(worker.error) == (
            f"{endpoint}: that is not a zfan control port (what listens there does not speak ZeroMQ)"
        )
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        listener.close()
        server.join(10)
        assert not server.is_alive()


# --- signals while waiting --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "produce", "subscribe"])
def test_sigterm_while_waiting_for_a_sink_stops_the_command_at_once(roles, free_port, command):
    args = {
        "worker": [f"--control={free_port}"],
        "produce": ["--count", "10", f"--intake={free_port}", f"--control={free_port}"],
        "subscribe": [f"--results={free_port}", f"--control={free_port}"],
    }[command]
    role = roles(command, *args)
    wait_for(lambda: "no answer yet" in role.stderr, timeout=15, what=f"zfan {command} to wait for a sink")
    asked = time.monotonic()
    role.proc.send_signal(signal.SIGTERM)
    role.wait(timeout=15)
    assert time.monotonic() - asked < 2.0
    assert "Traceback" not in role.stderr and "internal error" not in role.stderr


# --- what a person reads while a sink is away: once when it goes, once when it is back -------


def sink_lines(caplog, endpoint: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith(f"sink {endpoint}")]


def test_a_worker_started_before_its_sink_waits_says_so_once_and_how_long_it_waited(tmp_path, ipc, ctx, caplog):
    caplog.set_level(logging.DEBUG, logger="zfan")
    with Worker(echo, control=ipc["control"], context=ctx) as worker:
        # Several dials meet no sink (each one logged at debug level only)...
        wait_for(lambda: len(sink_lines(caplog, ipc["control"])) >= 3, timeout=15, what="three dials")
        with Sink(ledger=str(tmp_path / "z.db"), context=ctx, **ipc):
            assert worker.connected.wait(10)
            lines = sink_lines(caplog, ipc["control"])
    warnings = [text for level, text in lines if level >= logging.WARNING]
    assert warnings == [f"sink {ipc['control']}: no answer yet; connecting again until a sink answers"]
    infos = [text for level, text in lines if level == logging.INFO]
    assert len(infos) == 1 and infos[0].startswith(f"sink {ipc['control']} answered after ")
    assert float(infos[0].split(" after ")[1].removesuffix(" s")) >= 1.0


def test_an_outage_is_one_warning_however_long_and_one_line_with_its_length(tmp_path, ipc, ctx, caplog):
    caplog.set_level(logging.DEBUG, logger="zfan")
    ledger = str(tmp_path / "z.db")
    sink = Sink(ledger=ledger, context=ctx, **ipc).start()
    worker = Worker(echo, control=ipc["control"], context=ctx).start()
    prod = Producer(intake=ipc["intake"], control=ipc["control"], context=ctx).start()
    try:
        assert worker.connected.wait(10) and prod.connected.wait(10)
        sink.close()
        went = time.monotonic()
        wait_for(
            lambda: sum("silent" in text for _, text in sink_lines(caplog, ipc["control"])) >= 6,
            timeout=20,
            what="each client to dial a silent sink three times",
        )
        sink = Sink(ledger=ledger, context=ctx, **ipc).start()
        assert worker.connected.wait(10) and prod.connected.wait(10)
        away = time.monotonic() - went
        lines = sink_lines(caplog, ipc["control"])
    finally:
        prod.close(timeout=5)
        worker.close()
        sink.close()
    warnings = [text for level, text in lines if level >= logging.WARNING]
    assert len(warnings) == 2  # one per client, for the whole outage
    assert all(text.startswith(f"sink {ipc['control']}: the sink has been silent for ") for text in warnings)
    backs = [text for level, text in lines if level == logging.INFO]
    assert len(backs) == 2 and all(text.startswith(f"sink {ipc['control']} back after ") for text in backs)
    for text in backs:
        assert 1.0 <= float(text.split(" after ")[1].removesuffix(" s")) <= away + 1.0


# --- the socket under it all -----------------------------------------------------------------


def test_a_dealer_that_met_a_peer_of_the_wrong_kind_refuses_a_send_rather_than_block(ctx):
    """Which side of the pair hangs up first is a race. If the DEALER does, libzmq never dials
    again and the DEALER has nowhere to queue; if the peer does, it dials again and again and
    queues up to its high-water mark. Either way a blocking send would wait forever."""
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.SNDHWM, 10)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        dealer.connect(f"tcp://127.0.0.1:{port}")
        assert monitor.poll(10_000)  # the connection is gone
        assert False in [send(dealer, [b"hello"]) for _ in range(50)]
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)
        pull.close(linger=0)


def test_the_results_sync_is_overdue_after_connect_timeout_of_listening():
    """Socket-free: the subscriber's core counts the wait for the sink's sync from its first
    look, and a caller away for long gives the sink a grace to answer before it is given up."""
    core = SubscriberCore(("",), 100.0, control=False, connect_timeout=2.0)
    assert core.sync_overdue(105.0) is None  # the first look: the wait starts here
    assert core.sync_overdue(106.0) is None
    assert core.sync_overdue(106.5) is None
    assert core.sync_overdue(107.0) == 2.0
    away = SubscriberCore(("",), 100.0, control=False, connect_timeout=2.0)
    assert away.sync_overdue(100.0) is None
    assert away.sync_overdue(130.0) is None  # the caller was away: one more second first
    assert away.sync_overdue(130.5) is None
    assert away.sync_overdue(131.0) == 31.0
    synced = SubscriberCore(("",), 100.0, control=False, connect_timeout=2.0)
    synced.sync_overdue(100.0)
    synced.synced_now()
    assert synced.sync_overdue(200.0) is None
    assert SubscriberCore(("",), 100.0, control=False).sync_overdue(1e9) is None  # no timeout: never


def test_connect_timeout_flags_and_produce_timeout_bound_the_wait_for_a_sink(roles, free_port):
    """`--connect-timeout` sets the wait for a first answer; `produce --timeout N` is N seconds of
    wall time at the end, sink or none."""
    produce = roles("produce", "--count", "10", "--timeout", "1.5", f"--intake={free_port}", f"--control={free_port}")
    others = {
        "subscribe": roles("subscribe", "--connect-timeout", "1", f"--results={free_port}", f"--control={free_port}"),
        "worker": roles("worker", "--connect-timeout", "1", f"--control={free_port}"),
    }
    started = time.monotonic()
    assert produce.wait(timeout=30) == RET_TIMEOUT, produce.stderr
    assert the_error_line(produce, "produce") == "1 batch(es) not acknowledged by the sink after 1.5 s"
    for name, role in others.items():
        assert role.wait(timeout=30) == RET_TIMEOUT, role.stderr
        assert the_error_line(role, name) == nothing_at(free_port, "control", 1)
    assert time.monotonic() - started < 1.5 + PROMPT


def test_close_does_not_raise_again_why_the_producer_stopped_once_flush_has(ctx, tmp_path):
    """The I/O thread hands its error to callers before it has quite ended: a close() right after
    the flush that raised it must not raise it a second time (it once did, now and then)."""
    prod = Producer(intake=f"ipc://{tmp_path}/i", control=f"ipc://{tmp_path}/c", context=ctx).start()
    try:
        prod._handoffs[0].stop(NoSink("ipc://x", "no sink"))  # as the I/O thread does as it ends
        assert prod.running  # and it has not ended yet
        with pytest.raises(NoSink):
            prod.flush(1)
    finally:
        prod.close(timeout=1)


def test_close_raises_why_the_producer_stopped_if_nothing_had_said_it(ctx, tmp_path):
    prod = Producer(intake=f"ipc://{tmp_path}/i", control=f"ipc://{tmp_path}/c", context=ctx).start()
    prod._handoffs[0].stop(NoSink("ipc://x", "no sink"))
    with pytest.raises(NoSink):
        prod.close(timeout=1)
