"""Records per second through "the RabbitMQ design", with the guarantees zfan gives.

    python bench/rabbit.py [--records N] [--batch-size B] [--workers W] [--runs R] [--json]

The design: producer -> durable data queue -> central processor(s) -> durable result queue ->
consumer, on a private RabbitMQ node (`Broker`) and pika, each party its own process. The
guarantees match zfan's: every message is persistent (delivery_mode 2) on a durable queue, every
publish waits for its publisher confirm, consumers ack by hand, and a processor acks its input
only once the broker has confirmed the result it published for it. Batching matches zfan's too:
one AMQP message is one msgpack-packed batch (a list of record dicts); the processors run
bench/app.py:double on it, and the consumer checks every record id arrived once.

Built the way an expert would for speed: every party uses pika's asynchronous SelectConnection,
so publisher confirms are pipelined (a window of unconfirmed publishes, settled as the broker's
possibly-multiple confirms arrive) and consumers prefetch (basic_qos) a window of messages and
ack several at once (multiple=True). The window is about WINDOW_RECORDS records per hop, kept
within 8 to 500 messages (500 at batch 1, 8 at batch 1000 and up: measured best). The simple
variant (BlockingConnection with confirm_delivery: every publish waits for its own confirm) was
measured beside it on 2 cores and lost everywhere but at batches of 10 000, where the two were
level: 0.8 k against 8.8 k records/s at batch 1, 73 k against 135 k at 100, 0.30 M against
0.37 M at 1000, 0.29 M against 0.48 M at 1000 with 2 processors. So it is not kept. At small
batches the broker itself, persisting every message, takes most of the CPU. Queue arguments
(x-queue-version 2, lazy mode) were tried and gained nothing, so the queues are plain durable
classic queues.

The clock starts when the consumer and every processor are consuming (and the producer is
connected), and stops when the consumer has seen every record id; a run that passes its
deadline stops there and reports what was lost, it does not hang. Queues are fresh per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import msgpack

try:
    import pika
    from pika import spec
except ImportError:  # unavailable() says so; the module still imports for the caller
    pika = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.app import double  # noqa: E402
from bench.throughput import make_batches  # noqa: E402

WINDOW_RECORDS = 2000  # records in flight per hop: enough to hide the confirm latency (disk syncs)
WINDOW_MIN, WINDOW_MAX = 8, 500  # messages: measured best at batches of 1 to 10 000
START_TIMEOUT = 60.0  # seconds for the broker, or every party of a run, to come up
DEB_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's /usr/sbin one su's to user rabbitmq


def _server() -> str | None:
    if os.access(DEB_SERVER, os.X_OK):
        return DEB_SERVER
    return shutil.which("rabbitmq-server", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def unavailable() -> str | None:
    """Why this benchmark cannot run here, in one line, or None if it can."""
    if _server() is None:
        return "rabbitmq-server not installed: apt-get install rabbitmq-server"
    if pika is None:
        return "pika not installed: pip install pika"
    return None


# --- the broker ----------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]  # held open together, so the ports differ
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Broker:
    """A private RabbitMQ node for one benchmark: its own node name, ports (AMQP, Erlang
    distribution and epmd, so nothing is shared with another node or a system epmd), HOME (so
    the Erlang cookie is its own) and data, log and config files in a temporary folder, which
    is removed on exit. The node is stopped on exit whatever happened, Ctrl-C included."""

    def __init__(self, start_timeout: float = START_TIMEOUT) -> None:
        self.start_timeout = start_timeout
        self.node = f"zfanbench-{os.getpid()}@localhost"
        self.url = ""
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd_port = 0

    def __enter__(self) -> Broker:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        d = self._dir = tempfile.mkdtemp(prefix="zfanbench-rabbit-")
        port, dist, self._epmd_port = _free_ports(3)
        with open(os.path.join(d, "enabled_plugins"), "w") as f:
            f.write("[].\n")  # no plugins: a faster start, and nothing listening but AMQP
        with open(os.path.join(d, "rabbitmq.conf"), "w") as f:
            f.write("log.file.level = warning\nlog.console = false\n")
        open(os.path.join(d, "rabbitmq-env.conf"), "w").close()  # not /etc/rabbitmq's
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            {
                "HOME": d,
                "ERL_EPMD_PORT": str(self._epmd_port),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(port),
                "RABBITMQ_DIST_PORT": str(dist),
                "RABBITMQ_CONF_ENV_FILE": os.path.join(d, "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": os.path.join(d, "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(d, "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(d, "enabled_plugins"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": os.path.join(d, "plugins"),
                "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
                "RABBITMQ_LOG_BASE": os.path.join(d, "log"),
                "RABBITMQ_PID_FILE": os.path.join(d, "rabbitmq.pid"),
            }
        )
        with open(os.path.join(d, "server.out"), "wb") as out:
            # Its own session: a Ctrl-C in the terminal reaches us, and we stop the node in order.
            self._proc = subprocess.Popen(
                [_server() or "rabbitmq-server"],
                env=env,
                cwd=d,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
        self._await_ready(port)

    def _await_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self._proc.returncode}: {self._tail()}")
            try:  # a bare TCP probe first: pika logs every refused attempt as an error
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return
            except (OSError, pika.exceptions.AMQPError):
                time.sleep(0.1)  # polling, within the deadline
        raise RuntimeError(f"RabbitMQ did not accept connections within {self.start_timeout:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        assert self._dir is not None
        with contextlib.suppress(OSError), open(os.path.join(self._dir, "server.out"), "rb") as f:
            return f.read()[-600:].decode(errors="replace").strip()
        return ""

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            # SIGTERM is RabbitMQ's graceful stop (the script passes it on to the Erlang VM);
            # rabbitmqctl stop does the same but first spends a second or two booting its own VM.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)  # the script waits for the VM, so both are gone when it returns
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the script and the VM it started
                proc.wait()
        if self._epmd_port:  # the node started a private epmd (a daemon, outside our session)
            epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [epmd, "-port", str(self._epmd_port), "-kill"],
                    timeout=10,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            self._epmd_port = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --- the parties ---------------------------------------------------------------------------


def _settle(pending: dict[int, Any], tag: int, multiple: bool) -> list[Any]:
    """Pop what a confirm (or nack) settles. `pending` is keyed by publish sequence number in
    rising order (new publishes only ever get higher numbers), so a multiple one is a prefix."""
    if not multiple:
        return [pending.pop(tag)] if tag in pending else []
    done = []
    for seq in pending:
        if seq > tag:
            break
        done.append(seq)
    return [pending.pop(seq) for seq in done]


class _Party:
    """One asynchronous connection with one channel, which stops when `stop` is set."""

    def __init__(self, url: str, stop: Any) -> None:
        self.stop = stop
        self.ch: Any = None
        self.seq = 0  # publish sequence number: the channel's, once confirm_delivery is on
        self.conn = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=self._opened,
            on_open_error_callback=self._died,
            on_close_callback=self._died,
        )

    def run(self) -> None:
        self._watch()
        self.conn.ioloop.start()

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()  # then _died stops the loop

    def setup(self) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        if self.stop.is_set():
            self.close()
        else:
            self.conn.ioloop.call_later(0.05, self._watch)

    def _opened(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._channel)

    def _channel(self, ch: Any) -> None:
        self.ch = ch
        ch.add_on_close_callback(lambda _ch, _reason: self.close())
        self.setup()

    def _died(self, conn: Any, reason: BaseException) -> None:
        conn.ioloop.stop()

    def _publish(self, queue_name: str, body: bytes) -> int:
        self.ch.basic_publish("", queue_name, body, pika.BasicProperties(delivery_mode=2))
        self.seq += 1
        return self.seq


class _Producer(_Party):
    def __init__(
        self, url: str, stop: Any, data: str, batches: list[list[dict]], window: int, ready: Any, go: Any
    ) -> None:
        super().__init__(url, stop)
        self.data, self.batches, self.window, self.ready, self.go = data, batches, window, ready, go
        self.sent = 0
        self.pending: dict[int, bytes] = {}  # seq -> body, until confirmed

    def setup(self) -> None:
        self.ch.confirm_delivery(self._confirmed, callback=self._begin)

    def _begin(self, _frame: Any) -> None:
        self.ready.set()
        while not self.go.wait(0.1):  # blocks the loop, but nothing else is due on it yet
            if self.stop.is_set():
                return
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.window and self.sent < len(self.batches):
            body = msgpack.packb(self.batches[self.sent])
            self.pending[self._publish(self.data, body)] = body
            self.sent += 1
        if not self.pending:
            self.close()  # every batch confirmed: the broker has them on disk

    def _confirmed(self, frame: Any) -> None:
        done = _settle(self.pending, frame.method.delivery_tag, frame.method.multiple)
        if isinstance(frame.method, spec.Basic.Nack):
            for body in done:  # the broker could not take it: publish again
                self.pending[self._publish(self.data, body)] = body
        self._fill()


class _Processor(_Party):
    def __init__(self, url: str, stop: Any, data: str, results: str, window: int, ready: Any) -> None:
        super().__init__(url, stop)
        self.data, self.results, self.window, self.ready = data, results, window, ready
        self.pending: dict[int, tuple[int, bytes]] = {}  # seq -> (input's delivery tag, result body)

    def setup(self) -> None:
        self.ch.confirm_delivery(self._confirmed, callback=self._qos)

    def _qos(self, _frame: Any) -> None:
        self.ch.basic_qos(prefetch_count=self.window, callback=self._consume)

    def _consume(self, _frame: Any) -> None:
        self.ch.basic_consume(self.data, self._message, callback=lambda _frame: self.ready.set())

    def _message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        result = msgpack.packb(double(msgpack.unpackb(body)))
        self.pending[self._publish(self.results, result)] = (method.delivery_tag, result)

    def _confirmed(self, frame: Any) -> None:
        done = _settle(self.pending, frame.method.delivery_tag, frame.method.multiple)
        if not done:
            return
        if isinstance(frame.method, spec.Basic.Nack):
            for tag, body in done:  # the result did not make it: publish it again, input still held
                self.pending[self._publish(self.results, body)] = (tag, body)
            return
        # The result is safe, so its input may go. One multiple ack covers them all unless an
        # input below the highest is still waiting for its result's confirm.
        top = max(tag for tag, _ in done)
        if not self.pending or top < min(tag for tag, _ in self.pending.values()):
            self.ch.basic_ack(top, multiple=True)
        else:
            for tag, _ in done:
                self.ch.basic_ack(tag)


class _Consumer(_Party):
    def __init__(self, url: str, stop: Any, results: str, ids: list[int], window: int, ready: Any, out: Any) -> None:
        super().__init__(url, stop)
        self.results, self.window, self.ready, self.out = results, window, ready, out
        self.remaining = set(ids)
        self.duplicated = 0
        self.unacked = 0
        self.reported = False

    def setup(self) -> None:
        self.ch.basic_qos(prefetch_count=self.window, callback=self._consume)

    def _consume(self, _frame: Any) -> None:
        self.ch.basic_consume(self.results, self._message, callback=lambda _frame: self.ready.set())

    def _message(self, ch: Any, method: Any, _props: Any, body: bytes) -> None:
        for r in msgpack.unpackb(body):
            try:
                self.remaining.remove(r["id"])
            except KeyError:
                self.duplicated += 1
        self.unacked += 1
        if self.unacked * 2 >= self.window or not self.remaining:  # half the prefetch at once
            ch.basic_ack(method.delivery_tag, multiple=True)
            self.unacked = 0
        if not self.remaining:
            self._report()
            self.close()

    def close(self) -> None:
        self._report()  # stopped at the deadline: say what was missing
        super().close()

    def _report(self) -> None:
        if not self.reported:
            self.reported = True
            # time.monotonic() is CLOCK_MONOTONIC, one clock for every process on the machine
            self.out.put((time.monotonic(), len(self.remaining), self.duplicated))


def _serve(kind: type[_Party], *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops us, in order
    kind(*args).run()


# --- a run ---------------------------------------------------------------------------------


def _queues(url: str, names: list[str], declare: bool) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for name in names:
            if declare:
                ch.queue_declare(name, durable=True)
            else:
                ch.queue_delete(name)
    finally:
        conn.close()


def _reap(procs: list[Any]) -> None:
    for p in procs:
        if p.pid is not None:
            p.join(10)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def window_for(batch_size: int) -> int:
    """Messages in flight per hop (publisher window and prefetch) for a batch size."""
    return max(WINDOW_MIN, min(WINDOW_MAX, math.ceil(WINDOW_RECORDS / max(1, batch_size))))


def run(batches: list[list[dict]], url: str, workers: int = 1, *, deadline: float = 120.0) -> dict[str, Any]:
    """Run the design once; returns records, seconds, records_per_s, lost and duplicated."""
    ids = [r["id"] for b in batches for r in b]
    window = window_for(max((len(b) for b in batches), default=1))
    tag = uuid.uuid4().hex[:12]
    data, results = f"zfanbench-{tag}-data", f"zfanbench-{tag}-results"
    ctx = mp.get_context("spawn")  # children share nothing with whatever state the caller has
    stop, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    ready = [ctx.Event() for _ in range(workers + 2)]
    procs = [ctx.Process(target=_serve, args=(_Consumer, url, stop, results, ids, window, ready[0], out))]
    procs += [
        ctx.Process(target=_serve, args=(_Processor, url, stop, data, results, window, ready[1 + i]))
        for i in range(workers)
    ]
    procs.append(ctx.Process(target=_serve, args=(_Producer, url, stop, data, batches, window, ready[-1], go)))
    _queues(url, [data, results], declare=True)
    try:
        for p in procs:
            p.start()
        until = time.monotonic() + START_TIMEOUT
        for ev in ready:
            while not ev.wait(0.1):
                if time.monotonic() > until or not all(p.is_alive() for p in procs):
                    raise RuntimeError("the RabbitMQ parties did not all come up")
        start = time.monotonic()
        go.set()
        report = None
        while report is None:
            try:
                report = out.get(timeout=0.1)
            except queue.Empty:
                late = time.monotonic() - start - deadline
                if not procs[0].is_alive():
                    raise RuntimeError(f"the consumer died (exit code {procs[0].exitcode})") from None
                if late > 30:
                    raise RuntimeError("the consumer did not report after the deadline") from None
                if late > 0:
                    stop.set()  # the consumer reports what it has, then stops
    finally:
        stop.set()
        _reap(procs)
        with contextlib.suppress(pika.exceptions.AMQPError):
            _queues(url, [data, results], declare=False)
    end, lost, duplicated = report
    seconds = end - start
    return {
        "records": len(ids),
        "seconds": seconds,
        "records_per_s": (len(ids) - lost) / seconds,
        "lost": lost,
        "duplicated": duplicated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON dict instead of lines")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the broker is stopped too
    reason = unavailable()
    if reason:
        raise SystemExit(f"RabbitMQ: skipped ({reason})")
    batches = make_batches(args.records, args.batch_size)
    t = time.monotonic()
    with Broker() as broker:
        started = time.monotonic() - t
        if not args.json:
            print(
                f"RabbitMQ: {args.records:,} records in batches of {args.batch_size}, {args.workers} "
                f"processor(s), window {window_for(args.batch_size)} messages, broker up in {started:.1f} s"
            )
        runs = []
        for i in range(args.runs):
            runs.append(run(batches, broker.url, args.workers))
            if not args.json:
                r = runs[-1]
                print(
                    f"  run {i + 1}: {r['records_per_s']:>12,.0f} records/s  ({r['seconds']:.2f} s, "
                    f"lost {r['lost']}, duplicated {r['duplicated']})"
                )
    median = statistics.median(r["records_per_s"] for r in runs)
    if args.json:
        print(
            json.dumps(
                {
                    "records": args.records,
                    "batch_size": args.batch_size,
                    "workers": args.workers,
                    "window": window_for(args.batch_size),
                    "runs": runs,
                    "median_records_per_s": median,
                }
            )
        )
    else:
        print(f"  median: {median:>11,.0f} records/s")


if __name__ == "__main__":
    main()
