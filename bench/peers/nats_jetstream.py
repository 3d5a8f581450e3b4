"""Records per second (and latency) through "the NATS JetStream design", with zfan's guarantees.

    python -m bench.peers.nats_jetstream [--records N] [--batch-size B] [--workers W] [--runs R]
                                         [--latency RATE [--seconds S]] [--json]

The design: producer -> data stream -> processor(s) sharing one durable pull consumer -> results
stream -> consumer, on a private `nats-server -js` (`Server`), with nats-py (asyncio), each
party its own process. One message is one msgpack-packed batch (the same batches zfan gets).

Per batch:
- The producer publishes it with a `Nats-Msg-Id` header (the batch's number): within the
  stream's duplicate window (2 minutes) the server stores a resent id once, so a batch resent
  after a lost PubAck is not stored twice. Publishes are pipelined (nats-py's publish_async:
  WINDOW publishes in flight, their PubAcks gathered as they come); one that failed is sent again.
- A processor fetches up to READ messages at once from the shared durable pull consumer
  (explicit acks: each message goes to one processor, and comes back after the ack wait unless
  acked), runs bench/app.py:double on each batch, publishes each result to the results stream
  with the input's `Nats-Msg-Id` (so a result published again after a redelivery is stored
  once), waits for those PubAcks, and only then acks the inputs. `fetch` raises a timeout when
  the consumer has nothing: that is caught, and the processor fetches again.
- The consumer reads the results stream through its own pull consumer (no acks: it keeps its
  position), many messages per fetch, and counts every record id.
Durability: file storage. nats-server writes each message to its file before the PubAck (a crash
of the server process loses nothing acknowledged) and syncs the files to disk every 2 minutes
(2.9, Debian 12's, has no setting for it; later versions call it `sync_interval`): an OS crash
or power loss can lose what was acknowledged since, as with zfan's default `--fsync normal`.

Built for speed: pipelined publishes and fetches of many messages everywhere; acks sent without
waiting for the server's reply (an ack that is lost brings a redelivery, whose result the results
stream deduplicates).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any

import msgpack

try:
    import nats
    from nats.js import api
except ImportError:  # unavailable() says so; the module still imports for the caller
    nats = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import app  # noqa: E402
from bench.latency import LINGER_MS, STEP, Pacer, Sealer  # noqa: E402
from bench.peers import parties  # noqa: E402
from bench.peers.parties import Control, Paced, Tally  # noqa: E402

KEY, LABEL = "nats jetstream", "NATS JetStream design"
WINDOW = 256  # publishes in flight from the producer (zfan's producer window is 256 batches too)
READ = 256  # messages a processor fetches at once (zfan's worker credit is 256 batches)
CONSUME = 256  # messages the consumer fetches at once
FETCH_TIMEOUT = 0.25  # seconds an idle fetch waits, so that a party notices the run is over
WORKERS, COUNTER = "workers", "counter"  # the durable consumers: the processors' and the counter's
ACK_TIMEOUT = 10.0  # seconds for a PubAck before the publish is sent again
MSG_ID = "Nats-Msg-Id"


def unavailable() -> str | None:
    """Why this design cannot run here, in one line, or None if it can."""
    return Server().unavailable()


class Server(parties.Server):
    """A private nats-server with JetStream: its own port on 127.0.0.1, its store in a
    temporary folder."""

    name = "nats-server"

    def unavailable(self) -> str | None:
        if parties.find("nats-server") is None:
            return "nats-server not installed: apt-get install nats-server"
        if nats is None:
            return "nats-py not installed: pip install nats-py"
        return None

    def prepare(self) -> list[str]:
        (port,) = parties.free_ports(1)
        self.url = f"nats://127.0.0.1:{port}"
        return [
            parties.find("nats-server") or "nats-server",
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-sd",
            self.dir,
        ]

    def probe(self) -> None:
        socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), timeout=1).close()
        asyncio.run(_probe(self.url))  # a bare TCP probe first: nats-py prints every refused attempt


async def _quiet(_exc: Exception) -> None:
    pass


async def _probe(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, error_cb=_quiet)
    try:
        await nc.jetstream().account_info()
    finally:
        await nc.close()


async def _connect(url: str) -> Any:
    return await nats.connect(url, max_reconnect_attempts=0)


async def _wait_go(ctl: Control) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, ctl.wait_go)


# --- the parties ---------------------------------------------------------------------------


def _settled(failed: dict[str, bytes], mid: str, body: bytes, fut: Any) -> None:
    if fut.cancelled() or fut.exception() is not None:
        failed[mid] = body


async def _publish_all(js: Any, subject: str, bodies: Iterable[tuple[str, bytes]]) -> None:
    """Publish each body with its Nats-Msg-Id, WINDOW in flight (publish_async waits for room),
    then again those that failed or had no PubAck in time, until every one is acked."""
    while True:
        failed: dict[str, bytes] = {}
        futs = []
        for mid, body in bodies:
            fut = await js.publish_async(subject, body, headers={MSG_ID: mid})
            fut.add_done_callback(functools.partial(_settled, failed, mid, body))
            futs.append(fut)
        if futs:
            _, late = await asyncio.wait(futs, timeout=ACK_TIMEOUT)
            for fut in late:
                fut.cancel()  # counted as failed: sent again, and stored once
            await asyncio.sleep(0)  # the cancelled ones' callbacks run
        if not failed:
            return
        bodies = list(failed.items())


async def _produce(ctl: Control, url: str, subject: str, job: list[list[dict]] | Paced) -> None:
    pacer = Pacer(job.rate, job.n) if isinstance(job, Paced) else None  # before ready: it takes a while
    nc = await _connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=WINDOW)
        ctl.ready.set()
        if not await _wait_go(ctl):
            return
        if isinstance(job, Paced):
            assert pacer is not None
            await _paced(ctl, js, subject, pacer, Sealer(job.batch_size, job.linger))
        else:
            await _publish_all(
                js, subject, ((str(i), msgpack.packb(b)) for i, b in enumerate(job) if not ctl.stop.is_set())
            )
    finally:
        await nc.close()


async def _paced(ctl: Control, js: Any, subject: str, pacer: Pacer, sealer: Sealer) -> None:
    pacer.begin()
    sent, pending = 0, []
    while not ctl.stop.is_set():
        now = time.monotonic()
        bodies = sealer.add(pacer.due(now), now) + sealer.due(now, last=pacer.done)
        for body in bodies:
            pending.append(asyncio.ensure_future(_publish_all(js, subject, [(str(sent), body)])))
            sent += 1
        if not bodies:
            if pacer.done:
                break
            await asyncio.sleep(STEP)  # pacing: the next records are not due yet; PubAcks come meanwhile
    await asyncio.gather(*pending)


async def _fetch(sub: Any, n: int) -> list[Any]:
    try:
        msgs: list[Any] = await sub.fetch(n, timeout=FETCH_TIMEOUT)
        return msgs
    except asyncio.TimeoutError:  # nats.errors.TimeoutError is one: nothing came in time
        return []


async def _process(ctl: Control, url: str, stream: str, results: str, fn_name: str) -> None:
    fn = getattr(app, fn_name)
    nc = await _connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=READ)
        sub = await js.pull_subscribe_bind(durable=WORKERS, stream=stream)
        ctl.ready.set()
        while not ctl.stop.is_set():
            msgs = await _fetch(sub, READ)
            if not msgs:
                continue
            out = [(m.headers[MSG_ID], msgpack.packb(fn(msgpack.unpackb(m.data)))) for m in msgs]
            await _publish_all(js, results, out)  # every result stored before its input is acked
            for m in msgs:
                await m.ack()
    finally:
        await nc.close()


async def _consume(ctl: Control, url: str, stream: str, n: int, stamps: bool) -> None:
    tally = Tally(ctl, n, stamps)
    nc = await _connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(durable=COUNTER, stream=stream)
        ctl.ready.set()
        while not tally.done and not ctl.stop.is_set():
            for m in await _fetch(sub, CONSUME):
                tally.add(msgpack.unpackb(m.data))
    finally:
        tally.report()  # every record, or what came before the deadline
        await nc.close()


def _producer(ctl: Control, *args: Any) -> None:
    asyncio.run(_produce(ctl, *args))


def _worker(ctl: Control, *args: Any) -> None:
    asyncio.run(_process(ctl, *args))


def _consumer(ctl: Control, *args: Any) -> None:
    asyncio.run(_consume(ctl, *args))


# --- a run ---------------------------------------------------------------------------------


async def _streams(url: str, tag: str, create: bool) -> None:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        for name in ("DATA", "RESULTS"):
            stream = f"ZFANBENCH_{tag}_{name}"
            if not create:
                await js.delete_stream(stream)
                continue
            await js.add_stream(name=stream, subjects=[f"zfanbench.{tag}.{name.lower()}"], storage=api.StorageType.FILE)
            durable, ack = (WORKERS, api.AckPolicy.EXPLICIT) if name == "DATA" else (COUNTER, api.AckPolicy.NONE)
            await js.add_consumer(stream, api.ConsumerConfig(durable_name=durable, ack_policy=ack))
    finally:
        await nc.close()


def _run(url: str, job: list[list[dict]] | Paced, n: int, workers: int, fn: str, deadline: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    data, results = f"zfanbench.{tag}.data", f"zfanbench.{tag}.results"
    asyncio.run(_streams(url, tag, create=True))
    try:
        return parties.run_parties(
            (_consumer, (url, f"ZFANBENCH_{tag}_RESULTS", n, isinstance(job, Paced))),
            [(_worker, (url, f"ZFANBENCH_{tag}_DATA", results, fn))] * workers,
            (_producer, (url, data, job)),
            deadline,
        )
    finally:
        asyncio.run(_streams(url, tag, create=False))


def run(batches: list[list[dict]], url: str, workers: int = 1, *, deadline: float = parties.DEADLINE) -> dict[str, Any]:
    """Run the design once on the server at `url`; returns the same dict as Count.result."""
    return parties.throughput(_run(url, batches, sum(map(len, batches)), workers, "double", deadline))


def latency(
    rate: float,
    seconds: float = 5.0,
    batch_size: int = 1000,
    url: str | None = None,
    linger_ms: float = LINGER_MS,
) -> dict[str, Any]:
    """Latency from the producer to the consumer at `rate` records/s, as bench/latency.py
    measures zfan's; on a private server unless `url` is given."""
    job = parties.paced(rate, seconds, batch_size, linger_ms / 1000)
    with parties.serving(Server, url) as u:
        return parties.latency(_run(u, job, job.n, 1, "stamped", seconds + parties.DEADLINE), job, seconds)


def main() -> None:
    parties.main(__doc__, LABEL, unavailable, Server, run, latency)


if __name__ == "__main__":
    main()
