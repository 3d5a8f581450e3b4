"""The worker: a DEALER on the sink's control socket, and the user's function.

The I/O thread owns the socket, heartbeats and reconnects; the user's function runs on a
second thread, so heartbeats keep flowing while a long batch runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from .. import protocol as p
from ..config import Limits, WorkerSettings
from ..errors import ProtocolError, SerializationError
from .security import Handshakes, secure_client
from .service import Service
from .transport import Backoff, connect, drain, socket, welcome_timing

log = logging.getLogger(__name__)

Process = Callable[[list[Any]], "list[Any] | dict[str, list[Any]] | None"]
CONTROL_TYPES = frozenset({p.WELCOME, p.HEARTBEAT, p.LEASE, p.RESET, p.STATUS})
DEFAULT_LIMITS = Limits()


def run_batch(
    process: Process,
    epoch: int,
    batch_id: int,
    attempt: int,
    topic: str,
    payload: bytes,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> list[bytes]:
    """Run the function on one batch; return the RESULT or FAILED message to send back."""
    try:
        out = process(p.decode_records(payload))
        topics, counts, payloads = _split(out, topic)
        header = p.encode(p.RESULT, epoch, batch_id, attempt, topics, counts)
        _check_fits(header, topics, payloads, limits)
    except Exception:
        # The end of a traceback says most; cut by bytes, since the limit is in bytes.
        error = traceback.format_exc().encode()[-p.MAX_ERROR :].decode(errors="ignore")
        return [p.encode(p.FAILED, epoch, batch_id, attempt, error)]
    return [header, *payloads]


def _check_fits(header: bytes, topics: list[str], payloads: list[bytes], limits: Limits) -> None:
    """Sent as it is, a result over a limit would be dropped by the sink (or ZeroMQ would drop the
    connection) and the batch would wait out its timeout: a failure the user can read is better."""
    for t, data in zip(topics, payloads, strict=True):
        if len(data) > limits.max_frame:
            raise ValueError(
                f"process() returned {len(data):,} bytes of records for topic {t!r}, more "
                f"than one frame may hold ({limits.max_frame:,}): return fewer or smaller records"
            )
    if len(topics) > p.MAX_TOPICS or len(header) > p.MAX_HEADER_BYTES:
        raise ValueError(
            f"process() returned {len(topics):,} topics, more than one result may name "
            f"({p.MAX_TOPICS:,} topics, {p.MAX_HEADER_BYTES:,} bytes of topic names)"
        )
    total = len(header) + sum(map(len, payloads))
    if total > limits.max_message:
        raise ValueError(
            f"process() returned {total:,} bytes in all, more than one message may hold "
            f"({limits.max_message:,}): return fewer or smaller records"
        )


def _split(out: Any, topic: str) -> tuple[list[str], list[int], list[bytes]]:
    """A list is published on the batch's topic; a dict maps topic -> records."""
    if out is None:
        return [], [], []
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


class Worker(Service):
    """Runs ``process(records) -> list | dict[str, list] | None`` on batches leased by a sink."""

    role = "worker"

    def __init__(
        self,
        process: Process,
        settings: WorkerSettings | None = None,
        *,
        context: zmq.Context | None = None,
        **overrides: Any,
    ) -> None:
        if not callable(process):
            raise TypeError(f"process must be callable, not {type(process).__name__}")
        super().__init__(context)
        self.settings = settings or WorkerSettings(**overrides)
        self.process = process
        self.processed = 0  # batches answered, successfully or not
        self._jobs: queue.Queue[tuple[int, int, int, str, bytes] | None] = queue.Queue()
        self._done: deque[tuple[int, list[bytes]]] = deque()
        # State of the I/O thread only: the sink's epoch and heartbeat timing, from its welcome.
        self._epoch = 0
        self._welcomed = False
        self._handshakes = Handshakes()
        self._beat = self._expiry = 0.0

    # --- the function's thread -------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            epoch = job[0]
            self._done.append((epoch, run_batch(self.process, *job, limits=self.settings.limits)))
            self._wakeup.set()

    # --- the I/O thread --------------------------------------------------------------------
    def _serve(self) -> None:
        worker_thread = threading.Thread(target=self._work, name="zfan-worker-process", daemon=True)
        worker_thread.start()
        try:
            self._ready.set()
            backoff = Backoff(self.settings.timing.heartbeat)
            while not self._stopping.is_set():
                if self._session():
                    backoff.reset()  # we were welcomed: a fresh loss starts over
                self._stopping.wait(backoff.next())
        finally:
            self._jobs.put(None)

    def _session(self) -> bool:
        """One connection to the sink, until it goes silent or we stop. True if welcomed."""
        s = self.settings
        sock = socket(self._ctx, zmq.DEALER, max_frame=s.limits.max_frame)
        watch = secure_client(sock, s.curve, s.control, self._handshakes)
        connect(sock, s.control, "control endpoint")
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        self._epoch, self._welcomed = 0, False
        self._beat, self._expiry = s.timing.heartbeat, s.timing.expiry  # until the sink says its own
        heard = time.monotonic()
        next_beat = heard + self._beat
        sock.send(p.encode(p.HELLO, "worker", s.name, s.credit))
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
                now = time.monotonic()
                watch.check()
                if self._wakeup.fileno() in ready:
                    self._wakeup.clear()
                self._send_done(sock)
                if sock in ready:
                    for frames in drain(sock):
                        heard = now
                        self._on_message(sock, frames)
                    next_beat = min(next_beat, now + self._beat)  # a welcome may ask for a faster pace
                if now - heard > self._expiry:
                    log.warning("sink %s silent for %.1f s; reconnecting", s.control, now - heard)
                    return self._welcomed
                if now >= next_beat:
                    sock.send(p.encode(p.HEARTBEAT, self._epoch))
                    next_beat = now + self._beat
            if self._welcomed:
                sock.send(p.encode(p.BYE))  # lets the sink replay our batches at once
            return self._welcomed
        finally:
            watch.close()
            sock.close(linger=100 if self._welcomed else 0)

    def _send_done(self, sock: zmq.Socket) -> None:
        while self._done:
            epoch, frames = self._done.popleft()
            self.processed += 1
            if epoch == self._epoch:  # an older sink's lease is fenced: not worth sending
                sock.send_multipart(frames)

    def _on_message(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            mtype, fields = p.decode(frames[0], allowed=CONTROL_TYPES)
        except ProtocolError as exc:
            log.warning("ignored a message from the sink: %s", exc)
            return
        if mtype == p.WELCOME:
            if self._welcomed and fields[0] != self._epoch:
                self._drop_jobs()
            self._epoch, self._welcomed = fields[0], True
            self._beat, self._expiry = welcome_timing(fields, self.settings.timing)
            log.info("joined sink %s (epoch %d)", self.settings.control, self._epoch)
        elif mtype == p.LEASE and len(frames) == 2 and fields[0] == self._epoch:
            self._jobs.put((*fields[:4], frames[1]))
        elif mtype == p.RESET or (mtype == p.HEARTBEAT and self._welcomed and fields[0] != self._epoch):
            # The sink forgot us or restarted: what we hold is fenced already.
            self._drop_jobs()
            self._welcomed = False
            s = self.settings
            sock.send(p.encode(p.HELLO, "worker", s.name, s.credit))

    def _drop_jobs(self) -> None:
        """Forget leases not yet started: the sink replays them."""
        try:
            while True:
                self._jobs.get_nowait()
        except queue.Empty:
            pass
