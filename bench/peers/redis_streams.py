"""Records per second (and latency) through "the Redis Streams design", with zfan's guarantees.

    python -m bench.peers.redis_streams [--records N] [--batch-size B] [--workers W] [--runs R]
                                        [--latency RATE [--seconds S]] [--json]

The design: producer -> data stream -> worker(s) in a consumer group -> results stream ->
consumer, on a private `redis-server` (`Server`), with redis-py and its hiredis parser, each
party its own process. One stream entry is one msgpack-packed batch (the same batches zfan gets).

Per batch:
- The producer XADDs it with an explicit id (batch i is entry `i+1-0`): Redis refuses an id
  that is not above the stream's last one, so a batch resent after a lost reply is refused, not
  stored twice (the producer takes that refusal as "already stored"). XADDs are pipelined: a
  window of WINDOW batches goes out in one write, and the window's replies come back together.
- A worker XREADGROUPs up to READ entries at once from the group (each entry goes to one worker
  of the group and stays pending until acked), runs bench/app.py:double on each batch, and then,
  in one MULTI/EXEC, XADDs every result to the results stream and XACKs the inputs: a result is
  stored if and only if its input is acked, so a worker that dies leaves its inputs pending and
  no result for them. Every CLAIM_EVERY seconds a worker XAUTOCLAIMs entries pending longer
  than CLAIM_IDLE_MS (a dead worker's) and processes them.
- The consumer XREADs the results stream from its last id, many entries at once, and counts
  every record id.
Durability: AOF on, `appendfsync everysec`, which matches zfan's default `--fsync normal`: Redis
writes each command to its append-only file before it replies, so a crash of the server process
loses nothing acknowledged; an OS crash or power loss can lose the last second or so, as
SQLite's WAL at synchronous=NORMAL can lose its last commits. (`--fsync full` would be
`appendfsync always`.)

Built for speed: pipelined XADDs, batch reads everywhere (XREADGROUP COUNT, XREAD COUNT), one
round trip per group of results, hiredis to parse replies. Results are kept in the results
stream (a real deployment would trim it once consumed; the benchmark deletes both streams at
the end of a run).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import msgpack

try:
    import redis
except ImportError:  # unavailable() says so; the module still imports for the caller
    redis = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import app  # noqa: E402
from bench.latency import LINGER_MS, STEP, Pacer, Sealer  # noqa: E402
from bench.peers import parties  # noqa: E402
from bench.peers.parties import Control, Paced, Tally  # noqa: E402

KEY, LABEL = "redis streams", "Redis Streams design"
WINDOW = 256  # batches the producer has in flight (zfan's producer window is 256 batches too)
READ = 256  # entries a worker reads at once (zfan's worker credit is 256 batches)
CONSUME = 256  # entries the consumer reads at once
BLOCK_MS = 50  # an idle read returns after this long, so that a party notices the run is over
CLAIM_EVERY, CLAIM_IDLE_MS = 2.0, 10_000  # a worker takes over entries pending this long
GROUP = "workers"
REFUSED = "equal or smaller"  # Redis's refusal of an XADD id at or below the stream's last one


def unavailable() -> str | None:
    """Why this design cannot run here, in one line, or None if it can."""
    return Server().unavailable()


class Server(parties.Server):
    """A private redis-server: its own port on 127.0.0.1, its AOF in a temporary folder."""

    name = "redis-server"

    def unavailable(self) -> str | None:
        if parties.find("redis-server") is None:
            return "redis-server not installed: apt-get install redis-server"
        if redis is None:
            return "redis (the Python client) not installed: pip install redis hiredis"
        return None

    def prepare(self) -> list[str]:
        (port,) = parties.free_ports(1)
        self.url = f"redis://127.0.0.1:{port}/0"
        return [
            parties.find("redis-server") or "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
            *("--daemonize", "no", "--logfile", "", "--loglevel", "warning"),
        ]

    def probe(self) -> None:
        with redis.Redis.from_url(self.url, socket_timeout=1) as r:
            r.ping()


def _connect(url: str) -> Any:
    return redis.Redis.from_url(url)


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream XREAD/XREADGROUP reply (RESP2 is a list, RESP3 a dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))[0]
    return reply[0][1]


# --- the parties ---------------------------------------------------------------------------


def _xadd_all(r: Any, data: str, bodies: list[bytes], first: int) -> None:
    """XADD bodies as batches first, first+1, ... in one round trip; a refused id was stored before."""
    pipe = r.pipeline(transaction=False)
    for i, body in enumerate(bodies, first):
        pipe.xadd(data, {"d": body}, id=f"{i + 1}-0")
    for reply in pipe.execute(raise_on_error=False):
        if isinstance(reply, Exception) and REFUSED not in str(reply):
            raise reply


def _producer(ctl: Control, url: str, data: str, job: list[list[dict]] | Paced) -> None:
    pacer = Pacer(job.rate, job.n) if isinstance(job, Paced) else None  # before ready: it takes a while
    with _connect(url) as r:
        r.ping()
        ctl.ready.set()
        if not ctl.wait_go():
            return
        if isinstance(job, Paced):
            assert pacer is not None
            _paced(ctl, r, data, pacer, Sealer(job.batch_size, job.linger))
            return
        for i in range(0, len(job), WINDOW):
            if ctl.stop.is_set():
                return
            _xadd_all(r, data, [msgpack.packb(b) for b in job[i : i + WINDOW]], i)


def _paced(ctl: Control, r: Any, data: str, pacer: Pacer, sealer: Sealer) -> None:
    sent = 0
    pacer.begin()
    while not ctl.stop.is_set():
        now = time.monotonic()
        bodies = sealer.add(pacer.due(now), now) + sealer.due(now, last=pacer.done)
        if bodies:
            _xadd_all(r, data, bodies, sent)
            sent += len(bodies)
        elif pacer.done:
            return
        else:
            time.sleep(STEP)  # pacing: the next records are not due yet


def _worker(ctl: Control, url: str, data: str, results: str, fn_name: str) -> None:
    fn = getattr(app, fn_name)
    me = f"worker-{os.getpid()}"
    with _connect(url) as r:
        r.ping()
        ctl.ready.set()
        claimed = time.monotonic()
        while not ctl.stop.is_set():
            entries = _entries(r.xreadgroup(GROUP, me, {data: ">"}, count=READ, block=BLOCK_MS))
            if time.monotonic() - claimed > CLAIM_EVERY:
                claimed = time.monotonic()
                entries += r.xautoclaim(data, GROUP, me, CLAIM_IDLE_MS, count=READ)[1]
            if not entries:
                continue
            pipe = r.pipeline(transaction=True)  # MULTI ... EXEC: results stored and inputs acked, or neither
            for _id, fields in entries:
                pipe.xadd(results, {"d": msgpack.packb(fn(msgpack.unpackb(fields[b"d"])))})
            pipe.xack(data, GROUP, *(entry_id for entry_id, _ in entries))
            pipe.execute()


def _consumer(ctl: Control, url: str, results: str, n: int, stamps: bool) -> None:
    tally = Tally(ctl, n, stamps)
    last = b"0-0"
    with _connect(url) as r:
        r.ping()
        ctl.ready.set()
        try:
            while not tally.done and not ctl.stop.is_set():
                for entry_id, fields in _entries(r.xread({results: last}, count=CONSUME, block=BLOCK_MS)):
                    tally.add(msgpack.unpackb(fields[b"d"]))
                    last = entry_id
        finally:
            tally.report()  # every record, or what came before the deadline


# --- a run ---------------------------------------------------------------------------------


def _run(url: str, job: list[list[dict]] | Paced, n: int, workers: int, fn: str, deadline: float) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    data, results = f"zfanbench:{tag}:data", f"zfanbench:{tag}:results"
    with _connect(url) as r:
        r.xgroup_create(data, GROUP, id="0", mkstream=True)
        try:
            return parties.run_parties(
                (_consumer, (url, results, n, isinstance(job, Paced))),
                [(_worker, (url, data, results, fn))] * workers,
                (_producer, (url, data, job)),
                deadline,
            )
        finally:
            r.delete(data, results)


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
