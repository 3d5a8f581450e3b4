"""The worker: a DEALER on the sink's control socket, and the user's function.

The I/O thread owns the socket, heartbeats and reconnects; the user's function runs on a
second thread, so heartbeats keep flowing while a long batch runs (an async def function on an
event loop that thread keeps: zfan.calling). A worker stops by draining:
it asks for no new lease, finishes the ones it holds, answers them, then says bye.
"""

from __future__ import annotations

import inspect
import logging
import math
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .. import protocol as p
from ..calling import Caller, Process
from ..config import Limits, WorkerSettings, check_sinks, settings_from, sink_endpoint
from ..errors import SerializationError
from ..exporter import WorkerCollector, registry
from ..jobs import WorkerCore
from ..metrics import WorkerMetrics
from ..partitions import split
from ..session import AllWelcomed, Dial, GaveUp, Joined, Lost, Welcomed, said
from .probe import no_answer
from .security import Handshakes, HandshakeWatch, secure_client
from .service import Service
from .transport import Ctx, Poll, Sock, connect, drain, send, socket
from .web import Web

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import WorkerOptions

log = logging.getLogger(__name__)

DEFAULT_LIMITS = Limits()
STALLED = 10.0  # seconds without a turn of the I/O thread's loop before /healthz says it is stuck


def run_batch(
    process: Callable[[list[Any]], Any], lease: p.Lease, *, limits: Limits = DEFAULT_LIMITS
) -> p.Result | p.Failed:
    """Run the function on one batch (an async one through a zfan.calling.Caller); return the
    result or failure to send back."""
    epoch, batch_id, attempt = lease.epoch, lease.batch_id, lease.attempt
    try:
        out = process(p.decode_records(lease.payload))
        topics, counts, payloads = _split(out, lease.topic)
        _check_fits(topics, payloads, limits)
    except Exception as exc:
        # The end of a traceback says most; cut by bytes, since the limit is in bytes.
        error = traceback.format_exc().encode()[-p.MAX_ERROR :].decode(errors="ignore")
        return p.Failed(epoch, batch_id, attempt, error, kinds_of(exc))
    return p.Result(epoch, batch_id, attempt, topics, counts, payloads)


def kinds_of(exc: BaseException) -> list[str]:
    """The exception's class and its bases, most derived first, as a route's retry policy names
    them: builtins by their name (OSError), others with their module (mymodule.Invalid)."""
    kinds = []
    for cls in type(exc).__mro__[:32]:
        if cls in (BaseException, object):
            break
        name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        if len(name.encode()) <= p.MAX_TOPIC:
            kinds.append(name)
    return kinds


def _header_bound(topics: list[str]) -> int:
    """At most the bytes of a result's header: a topic (at most 255 bytes) costs its UTF-8 and a
    string header of at most 2 bytes, its count (below 2**32) at most 5; the rest fits in 64."""
    return 64 + sum(len(t.encode()) + 7 for t in topics) if len(topics) > 1000 else 64 + 262 * len(topics)


def _check_fits(topics: list[str], payloads: list[bytes], limits: Limits) -> None:
    """Sent as it is, a result over a limit would be dropped by the sink (or ZeroMQ would drop the
    connection) and the batch would wait out its timeout: a failure the user can read is better."""
    for t, data in zip(topics, payloads, strict=True):
        if len(data) > limits.max_frame:
            raise ValueError(
                f"process() returned {len(data):,} bytes of records for topic {t!r}, more "
                f"than one frame may hold ({limits.max_frame:,}): return fewer or smaller records"
            )
    header = _header_bound(topics)
    if len(topics) > p.MAX_TOPICS or header > p.MAX_HEADER_BYTES:
        raise ValueError(
            f"process() returned {len(topics):,} topics, more than one result may name "
            f"({p.MAX_TOPICS:,} topics, {p.MAX_HEADER_BYTES:,} bytes of topic names)"
        )
    total = header + sum(map(len, payloads))
    if total > limits.max_message:
        raise ValueError(
            f"process() returned {total:,} bytes in all, more than one message may hold "
            f"({limits.max_message:,}): return fewer or smaller records"
        )


def answer_frames(answers: list[p.Result | p.Failed], sink_groups: tuple[int, int] | None) -> tuple[int, list[bytes]]:
    """The frames of the next message to send, and how many of the leading `answers` it holds:
    a failure alone, results in a group as big as the sink takes (`sink_groups`: its most bytes
    in one frame and in one message) when it takes groups."""
    first = answers[0]
    if sink_groups is None or isinstance(first, p.Failed):
        return 1, p.encode(first)
    max_frame, max_message = sink_groups
    group: list[p.Result] = []
    topics = header = size = 0
    for answer in answers[: p.MAX_GROUP]:
        if isinstance(answer, p.Failed) or answer.epoch != first.epoch:
            break
        n, n_bytes = len(answer.topics), sum(map(len, answer.payloads))
        head = _header_bound(answer.topics) + 5 * n + 32  # each topic's size; the lease's id, attempt, span
        if group and (
            topics + n > p.MAX_TOPICS
            or header + head > p.MAX_HEADER_BYTES
            or size + n_bytes > max_frame
            or header + head + size + n_bytes > max_message
        ):
            break
        group.append(answer)
        topics, header, size = topics + n, header + head, size + n_bytes
    if len(group) == 1:
        return 1, p.encode(first)
    msg = p.Results(
        first.epoch,
        [r.batch_id for r in group],
        [r.attempt for r in group],
        [len(r.topics) for r in group],
        [t for r in group for t in r.topics],
        [c for r in group for c in r.counts],
        [len(data) for r in group for data in r.payloads],
        b"".join(data for r in group for data in r.payloads),
    )
    return len(group), p.encode(msg)


def _split(out: Any, topic: str) -> tuple[list[str], list[int], list[bytes]]:
    """A list is published on the batch's topic; a dict maps topic -> records."""
    if out is None:
        return [], [], []
    if inspect.isawaitable(out):
        if inspect.iscoroutine(out):
            out.close()  # never to be awaited: said here, not by a warning when it is collected
        raise TypeError(
            f"process() returned {type(out).__name__}, which a worker does not await: make process "
            "itself an async def function (or give its class an async def __call__)"
        )
    if isinstance(out, (list, tuple)):
        out = {topic: out}
    if not isinstance(out, dict):
        raise TypeError(f"process() returned {type(out).__name__}; expected a list, a dict of topic -> list, or None")
    topics, counts, payloads = [], [], []
    for t, records in out.items():
        if not isinstance(t, str) or not t or len(t.encode()) > p.MAX_TOPIC or t.startswith("zfan."):
            raise ValueError(
                f"process() returned topic {t!r}; topics are non-empty strings of at most "
                f"{p.MAX_TOPIC} bytes, not starting with 'zfan.'"
            )
        if not isinstance(records, (list, tuple)):
            raise TypeError(f"process() returned {type(records).__name__} for topic {t!r}; expected a list")
        if records:
            try:
                payloads.append(p.encode_records(list(records)))
            except SerializationError as exc:
                raise TypeError(str(exc)) from None
            topics.append(t)
            counts.append(len(records))
    return topics, counts, payloads


class SinkLink:
    """A worker's session and socket with one sink (one partition's, with `sinks`)."""

    def __init__(self, index: int, settings: WorkerSettings, connected: Welcomed, core: WorkerCore) -> None:
        self.index = index
        self.settings = settings
        self.connected = connected
        self.core = core
        core.session.sinks = check_sinks(control=settings.control)
        core.session.connect_timeout = settings.connect_timeout
        self.dialled = sink_endpoint(settings.control, 0)  # the sink dialled last
        self.handshakes = Handshakes()  # (a refused key is told apart from silence per sink)
        self.sock: Sock | None = None
        self.watch: HandshakeWatch | None = None
        # What the function finished of this sink's leases, for the I/O thread to answer.
        self.done: deque[tuple[p.Lease, p.Result | p.Failed]] = deque()

    def close(self, linger: int = 0) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.sock is not None:
            self.sock.close(linger=linger)
        self.sock = self.watch = None


class Worker(Service):
    """Runs ``process(records) -> list | dict[str, list] | None`` on batches leased by a sink."""

    role = "worker"

    def __init__(
        self,
        process: Process,
        settings: WorkerSettings | None = None,
        *,
        context: Ctx | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        if not callable(process):
            raise TypeError(f"process must be callable, not {type(process).__name__}")
        self.settings = settings_from("Worker", WorkerSettings, settings, options)
        super().__init__(context)
        self.process = process
        self._caller = Caller(process)  # decides once whether process is async
        # Leases for the function's thread, each with the index of the sink that leased it (its
        # answers go to that sink's link).
        self._jobs: queue.SimpleQueue[tuple[int, p.Lease] | None] = queue.SimpleQueue()
        self._links: list[SinkLink] = []  # made by the I/O thread
        self._poll = Poll()
        self.connected = threading.Event()  # set while every sink has welcomed us
        self.metrics = WorkerMetrics()
        self.http = ""  # the HTTP port's URL, once serving (settings.http)
        self._turned = 0.0  # when the I/O thread's loop last turned
        self._in_flight = 0  # leases held, as the I/O thread last counted them

    def drain(self, timeout: float | None = None) -> bool:
        """Stop gracefully: take no new batch, finish and answer the ones held, then stop. Past
        `timeout` the batches still held go back to the sink (with no attempt counted against
        them) and the worker stops all the same. True if every batch held was finished."""
        return self._drain(self.settings.drain_timeout if timeout is None else timeout, grace=1.0)

    def close(self, timeout: float = 10.0) -> None:
        """Stop at once: the batches held go back to the sink, to be replayed at no cost of
        an attempt. drain() finishes them first."""
        super().close(timeout)

    def __exit__(self, *exc: object) -> None:
        self.drain()  # leaving a `with` block finishes what the worker holds

    # --- the function's thread -------------------------------------------------------------
    def _work(self) -> None:
        with self._caller as call:
            while (job := self._jobs.get()) is not None:
                index, lease = job
                started = time.perf_counter()
                answer = run_batch(call, lease, limits=self.settings.limits)
                self.metrics.ran(lease.count, time.perf_counter() - started, isinstance(answer, p.Failed))
                self._links[index].done.append((lease, answer))
                self._wakeup.set()  # (writes nothing while a wake-up is pending: see Wakeup)

    # --- the I/O thread --------------------------------------------------------------------
    def _serve(self) -> None:
        s = self.settings
        parts = split(s)
        # One budget: the credit is shared among the sinks, so that the batches held in all are
        # what one sink's would be (and no fewer than one each).
        credit = max(1, s.credit // len(parts))
        welcomed = AllWelcomed(self.connected, len(parts))
        links = self._links = [
            SinkLink(
                i,
                part,
                welcomed.flag(i),
                WorkerCore(s.name, credit, s.timing, time.monotonic(), groups=s.limits, route=s.route),
            )
            for i, part in enumerate(parts)
        ]
        worker_thread = threading.Thread(target=self._work, name="zfan-worker-process", daemon=True)
        worker_thread.start()
        ready: dict[Any, int] = {}
        web: Web | None = None
        try:
            web = self._web(s.http)
            self._ready.set()
            while not self._stopping.is_set():
                now = self._turned = time.monotonic()
                self._in_flight = sum(len(link.core.held) for link in links)
                if self._wakeup.fileno() in ready:
                    self._wakeup.clear()
                for link in links:
                    self._answer(link)
                    if link.sock is not None:
                        self._take(link, ready, now)  # first: a sink heard from is not a sink lost
                if self._drain_until is not None and self._drain_over(links, now):
                    break
                for link in links:
                    self._tick(link, now)
                ready = self._wait(links)
            for link in links:
                if link.sock is not None:
                    link.core.session.close()  # bye lets the sink replay our batches at once
                    self._send(link, link.core.session.take())
                    link.close(linger=100)  # time for the bye to leave
        finally:
            self._jobs.put(None)
            for link in links:
                link.close()
            if web is not None:
                web.close()

    def _drain_over(self, links: list[SinkLink], now: float) -> bool:
        """Draining: ask for no new lease; True once every one held is answered, or time is up."""
        assert self._drain_until is not None
        for link in links:
            link.core.drain()
        if all(link.core.drained for link in links):
            self._drained = True
            return True
        if now >= self._drain_until:
            held = sum(len(link.core.held) for link in links)
            log.warning("drain timed out with %d batch(es) held; handing them back", held)
            return True
        return False

    def _tick(self, link: SinkLink, now: float) -> None:
        """What time does to one sink's session: dial, give up, or say it is lost."""
        s = link.settings
        event = link.core.tick(now)
        if isinstance(event, (Lost, GaveUp)) and link.watch is not None:
            link.watch.check()  # a refused handshake, not silence, may be why
        if isinstance(event, GaveUp):
            raise no_answer(s.control, "control", s.connect_timeout or event.waited)
        if isinstance(event, Lost):
            self._say(link, event)
            link.connected.clear()
            self._drop_jobs(link.index)
            link.close()
        elif isinstance(event, Dial):
            self._open(link, event.sink)
        if link.sock is not None:
            self._send(link, link.core.session.take())

    def _answer(self, link: SinkLink) -> None:
        """Send back what the function finished of the batches this sink leased."""
        done, core = link.done, link.core
        while done:
            lease, _ = done[0]
            if link.sock is None or not core.holds(lease):  # void once its lease is no longer ours
                done.popleft()
                core.finished(lease)
                continue
            # By index: the function's thread appends while we read, which an iterator refuses.
            held = []
            for i in range(min(len(done), p.MAX_GROUP if core.sink_groups else 1)):
                job, answer = done[i]
                if not core.holds(job):
                    break
                held.append(answer)
            n, frames = answer_frames(held, core.sink_groups)
            # Answers wait for room (a sink reading slowly) rather than be lost or block us.
            if not send(link.sock, frames):
                break
            for _ in range(n):
                core.finished(done.popleft()[0])

    def _take(self, link: SinkLink, ready: dict[Any, int], now: float) -> None:
        """Take what the sink sent."""
        assert link.sock is not None
        core = link.core
        for frames in drain(link.sock) if link.sock in ready else ():
            event, jobs = core.received(frames, now)
            self._say(link, event)
            if isinstance(event, Joined):
                link.connected.set()
            elif isinstance(event, Lost):
                link.connected.clear()
            if isinstance(event, Lost) or (isinstance(event, Joined) and event.new_epoch):
                self._drop_jobs(link.index)
            for job in jobs:
                self._jobs.put((link.index, job))

    def _wait(self, links: list[SinkLink]) -> dict[Any, int]:
        """Poll until a sink sends, the function finishes a batch, or a core's next deadline."""
        watched: list[tuple[Sock | int, int]] = [(self._wakeup.fileno(), zmq.POLLIN)]
        due = math.inf
        for link in links:
            if link.sock is not None:  # with answers waiting for room, room is news too
                watched.append((link.sock, zmq.POLLIN | zmq.POLLOUT if link.done else zmq.POLLIN))
            if link.watch is not None:  # a failed handshake is news at once
                watched.append((link.watch.monitor, zmq.POLLIN))
            due = min(due, link.core.next_deadline())
        if self._drain_until is not None:
            due = min(due, self._drain_until)
        ready = self._poll(watched, due - time.monotonic())
        for link in links:
            if link.watch is not None and link.watch.monitor in ready:
                link.watch.check()
        return ready

    def _send(self, link: SinkLink, messages: list[p.Message]) -> None:
        assert link.sock is not None
        for msg in messages:
            if not send(link.sock, p.encode(msg)):
                # No connection to queue on, or the sink reads nothing: the session notices
                # the silence and dials again.
                log.debug("sink %s takes nothing on control; %s not sent", link.dialled, type(msg).__name__)

    def _say(self, link: SinkLink, event: object) -> None:
        if isinstance(event, (Joined, Lost)) and (line := said(event, link.dialled)) is not None:
            log.log(*line)

    def _open(self, link: SinkLink, sink: int) -> None:
        link.close()
        s = link.settings
        link.dialled = endpoint = sink_endpoint(s.control, sink)
        sock = socket(self._ctx, zmq.DEALER, max_frame=s.limits.max_frame)
        link.watch = secure_client(sock, s.curve, endpoint, link.handshakes)
        link.sock = sock
        connect(sock, endpoint, "control endpoint")  # (a failure ends the loop, which closes it)

    def _web(self, address: str | None) -> Web | None:
        if address is None:
            return None
        web = Web(
            address,
            registry=registry(WorkerCollector(self._snapshot)),
            snapshot=self._snapshot,
            healthy=self._healthy,
            ready=lambda: self._healthy() or self._unwelcomed(),
        ).start()
        self.http = web.url
        log.info("metrics on %smetrics", web.url)
        return web

    def _unwelcomed(self) -> list[str]:
        """Why /readyz says no: the sinks that have not welcomed us (or are silent since)."""
        if self.connected.is_set():
            return []
        if len(self._links) <= 1:
            return ["no sink has welcomed this worker"]
        away = [link.dialled for link in self._links if not link.core.session.joined]
        return [f"no welcome from the sink at {endpoint}" for endpoint in away]

    def _snapshot(self) -> dict[str, Any]:
        return {**self.metrics.snapshot(), "in_flight": self._in_flight, "connected": int(self.connected.is_set())}

    def _healthy(self) -> list[str]:
        if self._thread is None or not self._thread.is_alive():
            return ["the worker is not running"]
        stalled = time.monotonic() - self._turned
        return [f"the worker's loop has not turned for {stalled:.0f} s"] if stalled > STALLED else []

    def _drop_jobs(self, index: int) -> None:
        """Forget the leases of sink `index` not yet started: the sink replays them."""
        kept = []
        try:
            while True:
                job = self._jobs.get_nowait()
                if job is not None and job[0] != index:
                    kept.append(job)
        except queue.Empty:
            pass
        for job in kept:
            self._jobs.put(job)
