"""Records per second (and latency) through "the RabbitMQ design", with the guarantees zfan gives.

    python -m bench.peers.rabbitmq [--records N] [--batch-size B] [--workers W] [--runs R]
                                   [--latency RATE [--seconds S]] [--json]

The design: producer -> durable data queue -> central processor(s) -> durable result queue ->
consumer, on a private RabbitMQ node (`Server`) and pika, each party its own process. The
guarantees match zfan's: every message is persistent (delivery_mode 2) on a durable queue, every
publish waits for its publisher confirm, consumers ack by hand, and a processor acks its input
only once the broker has confirmed the result it published for it. Batching matches zfan's too:
one AMQP message is one msgpack-packed batch (a list of record dicts); the processors run
bench/app.py:double on it, and the consumer checks every record id arrived once. (RabbitMQ has
no deduplication of its own: a publish sent again after a lost confirm would be stored twice.)
For latency the producer publishes batches as they are sealed, with no window (the rate bounds
what is in flight).

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
deadline stops there and reports what was lost, it does not hang (bench/peers/parties.py).
Queues are fresh per run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import msgpack

try:
    import pika
    from pika import spec
except ImportError:  # unavailable() says so; the module still imports for the caller
    pika = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import app  # noqa: E402
from bench.latency import LINGER_MS, STEP, Pacer, Sealer  # noqa: E402
from bench.peers import parties  # noqa: E402
from bench.peers.parties import Control, Paced, Tally  # noqa: E402

KEY, LABEL = "rabbitmq", "RabbitMQ design"
WINDOW_RECORDS = 2000  # records in flight per hop: enough to hide the confirm latency (disk syncs)
WINDOW_MIN, WINDOW_MAX = 8, 500  # messages: measured best at batches of 1 to 10 000
DEB_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's /usr/sbin one su's to user rabbitmq


def _server() -> str | None:
    if os.access(DEB_SERVER, os.X_OK):
        return DEB_SERVER
    return parties.find("rabbitmq-server")


def unavailable() -> str | None:
    """Why this design cannot run here, in one line, or None if it can."""
    return Server().unavailable()


# --- the broker ----------------------------------------------------------------------------


class Server(parties.Server):
    """A private RabbitMQ node for one benchmark: its own node name, ports (AMQP, Erlang
    distribution and epmd, so nothing is shared with another node or a system epmd), HOME (so
    the Erlang cookie is its own) and data, log and config files in a temporary folder, which
    is removed on exit. The node is stopped on exit whatever happened, Ctrl-C included: SIGTERM
    is RabbitMQ's graceful stop (the script passes it on to the Erlang VM; rabbitmqctl stop does
    the same but first spends a second or two booting its own VM)."""

    name = "rabbitmq-server"

    def __init__(self, start_timeout: float = parties.START_TIMEOUT) -> None:
        super().__init__(start_timeout)
        self.node = f"zfanbench-{os.getpid()}@localhost"
        self._env: dict[str, str] = {}
        self._epmd_port = 0

    def unavailable(self) -> str | None:
        if _server() is None:
            return "rabbitmq-server not installed: apt-get install rabbitmq-server"
        if pika is None:
            return "pika not installed: pip install pika"
        return None

    def prepare(self) -> list[str]:
        d = self.dir
        port, dist, self._epmd_port = parties.free_ports(3)
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
        self._env = env
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
        return [_server() or "rabbitmq-server"]

    def environment(self) -> dict[str, str] | None:
        return self._env

    def probe(self) -> None:
        port = pika.URLParameters(self.url).port
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # first: pika logs every refusal
        pika.BlockingConnection(pika.URLParameters(self.url)).close()

    def cleanup(self) -> None:
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
    """One asynchronous connection with one channel, which stops when the run is stopped."""

    def __init__(self, ctl: Control, url: str) -> None:
        self.ctl = ctl
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
        if self.ctl.stop.is_set():
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
    def __init__(self, ctl: Control, url: str, data: str, job: list[list[dict]] | Paced, window: int) -> None:
        self.data, self.job, self.window = data, job, window
        self.sent = 0
        self.pending: dict[int, bytes] = {}  # seq -> body, until confirmed
        self.pacer = Pacer(job.rate, job.n) if isinstance(job, Paced) else None  # before ready: it takes a while
        self.sealer = Sealer(job.batch_size, job.linger) if isinstance(job, Paced) else None
        super().__init__(ctl, url)

    def setup(self) -> None:
        self.ch.confirm_delivery(self._confirmed, callback=self._begin)

    def _begin(self, _frame: Any) -> None:
        self.ctl.ready.set()
        if not self.ctl.wait_go():  # blocks the loop, but nothing else is due on it yet
            return
        if self.pacer is not None:
            self.pacer.begin()
            self._tick()
        else:
            self._fill()

    def _fill(self) -> None:
        assert isinstance(self.job, list)
        while len(self.pending) < self.window and self.sent < len(self.job):
            body = msgpack.packb(self.job[self.sent])
            self.pending[self._publish(self.data, body)] = body
            self.sent += 1
        if not self.pending:
            self.close()  # every batch confirmed: the broker has them on disk

    def _tick(self) -> None:
        """Paced: publish the batches sealed by now (no window: the rate bounds them)."""
        assert self.pacer is not None and self.sealer is not None
        now = time.monotonic()
        bodies = self.sealer.add(self.pacer.due(now), now) + self.sealer.due(now, last=self.pacer.done)
        for body in bodies:
            self.pending[self._publish(self.data, body)] = body
        if self.pacer.done and not self.sealer.open:
            if not self.pending:
                self.close()
            return  # the last confirm closes
        self.conn.ioloop.call_later(0 if bodies else STEP, self._tick)

    def _confirmed(self, frame: Any) -> None:
        done = _settle(self.pending, frame.method.delivery_tag, frame.method.multiple)
        if isinstance(frame.method, spec.Basic.Nack):
            for body in done:  # the broker could not take it: publish again
                self.pending[self._publish(self.data, body)] = body
        if self.pacer is None:
            self._fill()
        elif self.pacer.done and self.sealer is not None and not self.sealer.open and not self.pending:
            self.close()


class _Processor(_Party):
    def __init__(self, ctl: Control, url: str, data: str, results: str, window: int, fn_name: str) -> None:
        super().__init__(ctl, url)
        self.data, self.results, self.window = data, results, window
        self.fn = getattr(app, fn_name)
        self.pending: dict[int, tuple[int, bytes]] = {}  # seq -> (input's delivery tag, result body)

    def setup(self) -> None:
        self.ch.confirm_delivery(self._confirmed, callback=self._qos)

    def _qos(self, _frame: Any) -> None:
        self.ch.basic_qos(prefetch_count=self.window, callback=self._consume)

    def _consume(self, _frame: Any) -> None:
        self.ch.basic_consume(self.data, self._message, callback=lambda _frame: self.ctl.ready.set())

    def _message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        result = msgpack.packb(self.fn(msgpack.unpackb(body)))
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
    def __init__(self, ctl: Control, url: str, results: str, n: int, window: int, stamps: bool) -> None:
        super().__init__(ctl, url)
        self.results, self.window = results, window
        self.tally = Tally(ctl, n, stamps)
        self.unacked = 0

    def setup(self) -> None:
        self.ch.basic_qos(prefetch_count=self.window, callback=self._consume)

    def _consume(self, _frame: Any) -> None:
        self.ch.basic_consume(self.results, self._message, callback=lambda _frame: self.ctl.ready.set())

    def _message(self, ch: Any, method: Any, _props: Any, body: bytes) -> None:
        self.tally.add(msgpack.unpackb(body))
        self.unacked += 1
        if self.unacked * 2 >= self.window or self.tally.done:  # half the prefetch at once
            ch.basic_ack(method.delivery_tag, multiple=True)
            self.unacked = 0
        if self.tally.done:
            self.tally.report()
            self.close()

    def close(self) -> None:
        self.tally.report()  # stopped at the deadline: say what was missing
        super().close()


def _producer(ctl: Control, *args: Any) -> None:
    _Producer(ctl, *args).run()


def _worker(ctl: Control, *args: Any) -> None:
    _Processor(ctl, *args).run()


def _consumer(ctl: Control, *args: Any) -> None:
    _Consumer(ctl, *args).run()


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


def window_for(batch_size: int) -> int:
    """Messages in flight per hop (publisher window and prefetch) for a batch size."""
    return max(WINDOW_MIN, min(WINDOW_MAX, math.ceil(WINDOW_RECORDS / max(1, batch_size))))


def _run(
    url: str, job: list[list[dict]] | Paced, n: int, batch_size: int, workers: int, fn: str, deadline: float
) -> dict[str, Any]:
    window = window_for(batch_size)
    tag = uuid.uuid4().hex[:12]
    data, results = f"zfanbench-{tag}-data", f"zfanbench-{tag}-results"
    _queues(url, [data, results], declare=True)
    try:
        return parties.run_parties(
            (_consumer, (url, results, n, window, isinstance(job, Paced))),
            [(_worker, (url, data, results, window, fn))] * workers,
            (_producer, (url, data, job, window)),
            deadline,
        )
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            _queues(url, [data, results], declare=False)


def run(batches: list[list[dict]], url: str, workers: int = 1, *, deadline: float = parties.DEADLINE) -> dict[str, Any]:
    """Run the design once on the broker at `url`; returns the same dict as Count.result."""
    size = max((len(b) for b in batches), default=1)
    return parties.throughput(_run(url, batches, sum(map(len, batches)), size, workers, "double", deadline))


def latency(
    rate: float,
    seconds: float = 5.0,
    batch_size: int = 1000,
    url: str | None = None,
    linger_ms: float = LINGER_MS,
) -> dict[str, Any]:
    """Latency from the producer to the consumer at `rate` records/s, as bench/latency.py
    measures zfan's; on a private broker unless `url` is given."""
    job = parties.paced(rate, seconds, batch_size, linger_ms / 1000)
    with parties.serving(Server, url) as u:
        return parties.latency(_run(u, job, job.n, batch_size, 1, "stamped", seconds + parties.DEADLINE), job, seconds)


def main() -> None:
    parties.main(__doc__, LABEL, unavailable, Server, run, latency)


if __name__ == "__main__":
    main()
