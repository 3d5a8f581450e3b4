"""The sink: binds intake (PULL), control (ROUTER) and results (XPUB), and feeds what arrives
to the socket-free SinkCore. One thread owns all three sockets.

It stops by draining: it takes no more batches (producers keep what is unacknowledged and
send it again to the next sink), leases nothing more, and waits for the batches leased to come
back before it closes the ledger.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .. import protocol as p
from ..config import DEFAULT_CREDIT, SinkSettings, connect_address, settings_from
from ..dispatch import SinkCore
from ..errors import ConfigError, LedgerError, LedgerLost
from ..exporter import SinkCollector, registry
from ..ledger import Ledger, SqliteLedger, is_postgres, postgres, redact
from ..loading import load_app
from ..lock import LedgerLock
from ..routing import parse_app
from .local import LocalWorkers
from .security import make_server, start_authenticator
from .service import Service
from .transport import Ctx, Sock, bind, drain, drain_keyed, remove_ipc, socket
from .web import Snapshots, Web

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import SinkOptions
    from ..ledger.postgres import PostgresLedger

log = logging.getLogger(__name__)

STALLED = 10.0  # seconds without a turn of the sink's loop before /healthz says it is stuck
CLAIM_EVERY = 0.5  # seconds between a standby's tries to take a shared ledger over
ACTIVE, STANDBY = "active", "standby"


class Sink(Service):
    """Receives batches from producers, records them in the ledger, leases them to workers and
    publishes their results.

    ``Sink(ledger="zfan.db", workers=2, app="zfan.apps:rollup")`` also runs two local worker
    processes with that app; other workers may join over the network at any time.
    """

    role = "sink"

    def __init__(
        self,
        settings: SinkSettings | None = None,
        *,
        workers: int = 0,
        app: str | None = None,
        worker_credit: int = DEFAULT_CREDIT,
        context: Ctx | None = None,
        on_state: Callable[[str], None] | None = None,
        **options: Unpack[SinkOptions],
    ) -> None:
        self.settings = settings_from("Sink", SinkSettings, settings, options)
        # The ZAP authenticator is one per context: an encrypted sink gets a context of its own.
        self._own_ctx = context is None and self.settings.curve is not None
        super().__init__(zmq.Context() if self._own_ctx else context)
        if workers and not app:
            raise ConfigError("local workers need app='module:function', e.g. app='zfan.apps:rollup'")
        if workers and app:
            load_app(parse_app(app)[1])  # fail here, once and clearly, rather than in every worker
        if is_postgres(self.settings.ledger):
            postgres()  # psycopg is there, or one line says how to get it
        self._local = (workers, app, worker_credit)
        self._workers: LocalWorkers | None = None
        self.intake = self.control = self.results = ""
        self.epoch = 0
        # On a shared ledger (PostgreSQL) a sink is active or stands by; `on_state` hears
        # "active" and "standby" as it changes, on the sink's thread.
        self.active = threading.Event()
        self.standby = False
        self._on_state = on_state
        self._holder = ""  # how this sink's claim on a shared ledger names it
        self.http = ""  # the HTTP port's URL, once serving (settings.http)
        self._snapshots = Snapshots(self._wakeup.set)
        self._turned = 0.0  # when the loop last turned (time.monotonic)
        self._draining = False
        self._drain_began: float | None = None

    @property
    def ledger(self) -> str:
        """Where the ledger is, as a person may read it (a DSN without its password)."""
        return redact(self.settings.ledger)

    def wait_active(self, timeout: float | None = None) -> bool:
        """Block until this sink is the active one on its ledger (at once on an SQLite ledger)."""
        return self.active.wait(timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop gracefully: take no more batches, lease nothing more, wait up to `timeout` for
        the batches leased to come back, then stop (local workers drain too). True if none
        was left leased (one that was is pending again for the next start, at no attempt's cost)."""
        return self._drain(self.settings.drain_timeout if timeout is None else timeout, grace=5.0)

    def __exit__(self, *exc: object) -> None:
        self.drain()

    def _serve(self) -> None:
        s = self.settings
        auth, allow = start_authenticator(self._ctx, s.curve) if s.curve is not None else (None, None)
        web: Web | None = None
        try:
            if is_postgres(s.ledger):
                from ..ledger.postgres import holder_name

                self._holder = holder_name()
                web = self._web(s.http)  # a standby serves its probes too
                ledger = postgres()(s.ledger, holder=self._holder)  # a wrong DSN or a foreign database: one line
                self._take_turns(ledger, allow)
                return
            # The ledger is this sink's alone before anything in it is read or written, and its
            # endpoints are bound before recovery changes it: a sink refused either way leaves a
            # running one untouched.
            lock = LedgerLock(s.ledger) if s.ledger != ":memory:" else None
            if lock is not None:
                lock.acquire()
            try:
                sqlite = SqliteLedger(s.ledger, fsync=s.fsync)
                try:
                    web = self._web(s.http)
                    self._run(sqlite, allow, lock)
                finally:
                    sqlite.close()
            finally:
                if lock is not None:
                    lock.release()
        finally:
            _close(web)
            self._stop_auth(auth)

    # --- a shared ledger: active, or standing by ---------------------------------------------------
    def _take_turns(self, ledger: PostgresLedger, allow: Any) -> None:
        """Stand by until this sink's claim on the ledger is taken, serve while it lasts, and
        stand by again when it is lost (the database out of reach, or another sink took over)."""
        while True:
            try:
                if not self._stand_by(ledger):
                    return
                self._run(ledger, allow, None)
                return
            except LedgerLost as exc:
                # Nothing more of this sink's lands in the ledger: producers resend what it did
                # not acknowledge, to the sink that takes over.
                log.warning("%s%s; standing by", "stepped down: " if self.active.is_set() else "", exc)
                self._became(ACTIVE, False)  # also when it was lost while starting to serve
                if self._stopping.is_set() or self._drain_until is not None:
                    return  # not drained: what it held is the next active sink's to recover
            finally:
                ledger.close()
            again = self._reconnect()
            if again is None:
                return
            ledger = again

    def _stand_by(self, ledger: PostgresLedger) -> bool:
        """Wait until this sink holds the ledger's claim (True), or is asked to stop (False)."""
        told = False
        while not self._stopping.is_set() and self._drain_until is None:
            self._turned = time.monotonic()
            if ledger.claim():
                return True
            if not told:
                found = ledger.claimed_by()
                who = f"sink {found[1]} holds it (epoch {found[0]})" if found is not None else "no claim yet"
                log.info("standing by on ledger %s: %s; taking over when it stops renewing", ledger.path, who)
                self._became(STANDBY, True)
                self._ready.set()
                told = True
            self._wakeup.wait(CLAIM_EVERY)
        self._drained = True  # a standby holds nothing to drain
        return False

    def _reconnect(self) -> PostgresLedger | None:
        """The ledger again, after its connection was lost: tried every CLAIM_EVERY until it
        answers, or None once the sink is asked to stop."""
        said = False
        while not self._stopping.is_set() and self._drain_until is None:
            self._turned = time.monotonic()
            try:
                return postgres()(self.settings.ledger, holder=self._holder)
            except LedgerError as exc:
                if not said:
                    log.warning("%s; trying again", exc)
                    said = True
            self._wakeup.wait(CLAIM_EVERY)
        self._drained = True
        return None

    def _became(self, state: str, on: bool) -> None:
        self._snapshots.serving(state == ACTIVE and on)
        if state == ACTIVE:
            (self.active.set if on else self.active.clear)()
            if not on:
                self.intake = self.control = self.results = ""
        self.standby = state == STANDBY and on
        if self._on_state is not None and on:
            self._on_state(state)

    # --- serving -----------------------------------------------------------------------------------
    def _run(self, ledger: Ledger, allow: Any, lock: LedgerLock | None) -> None:
        """Bind, recover and serve on a ledger this sink holds, until stopped or drained."""
        s = self.settings
        began = time.monotonic()
        pull = router = xpub = None
        try:
            pull = socket(self._ctx, zmq.PULL, max_frame=s.limits.max_frame)
            router = socket(self._ctx, zmq.ROUTER, max_frame=s.limits.max_frame)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.SNDHWM, 20 * p.MAX_REPLAY)  # room for several replay answers at once
            # It receives only subscriptions (and, with CURVE, handshake commands of a few hundred bytes).
            xpub = socket(self._ctx, zmq.XPUB, max_frame=4096)
            xpub.setsockopt(zmq.SNDHWM, s.publish_hwm)
            if s.curve is not None:
                for sock in (pull, router, xpub):
                    make_server(sock, s.curve)
            self.intake = connect_address(bind(pull, s.intake, "intake endpoint"))
            self.control = connect_address(bind(router, s.control, "control endpoint"))
            self.results = connect_address(bind(xpub, s.results, "results endpoint"))
            core = SinkCore(
                ledger,
                limits=s.limits,
                timing=s.timing,
                max_attempts=s.max_attempts,
                batch_timeout=s.batch_timeout,
                cache_bytes=s.cache_bytes,
                retain_count=s.retain_count,
                retain_age=s.retain_age,
                key_allowed=allow.allows if allow is not None else None,
                routes=s.routes,
                retries=s.retries,
            )
            self.epoch = core.epoch
            workers, app, credit = self._local
            if workers:
                self._workers = LocalWorkers(
                    workers, control=self.control, app=app or "", credit=credit, timing=s.timing, curve=s.curve
                )
            if core.recovered:
                log.info(
                    "recovered %d leased batch(es) from the ledger in %.3f s",
                    core.recovered,
                    time.monotonic() - began,
                    extra={"count": core.recovered, "seconds": round(time.monotonic() - began, 3)},
                )
            self._turned = time.monotonic()
            self._became(ACTIVE, True)
            self._ready.set()
            self._loop(core, pull, router, xpub, lock)
        finally:
            for opened in (pull, router, xpub):
                if opened is not None:
                    opened.close(linger=0)
            for bound in (self.intake, self.control, self.results):
                remove_ipc(bound)
            if self._workers is not None:
                self._workers.stop()
                self._workers = None

    def _stop_auth(self, auth: Any) -> None:
        if auth is not None:
            auth.stop()
        if self._own_ctx:
            self._ctx.term()

    def _loop(self, core: SinkCore, pull: Sock, router: Sock, xpub: Sock, lock: LedgerLock | None) -> None:
        poller = zmq.Poller()
        for sock in (pull, router, xpub):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        until: float | None = None  # once draining: when to stop waiting for leases to come back
        while not self._stopping.is_set():
            now = self._turned = time.monotonic()
            if self._snapshots.due(now):
                self._snapshots.put(core.snapshot(), now)
            if until is None and self._drain_until is not None:
                until = self._drain_until
                poller.unregister(pull)  # what producers send now waits for the next sink
                self._draining = True
                self._drain_began = now
                core.drain()
                log.info("draining: waiting for %d leased batch(es)", len(core.leases))
            # A shared ledger's claim is renewed in time however long the loop would wait.
            wait = min(core.next_deadline(), max(0.0, core.ledger.next_renewal() - now))
            if until is not None:
                left = self._drain_left(core, until)
                if left is None:
                    break
                wait = min(wait, left)
            self._read(core, dict(poller.poll(math.ceil(wait * 1000))), pull, router, xpub)
            core.tick()
            self._send(core, router, xpub)
            if self._workers is not None:
                self._workers.check()
            if lock is not None:
                lock.renew()
            core.ledger.renew()
        self._send(core, router, xpub)  # acks for what the last turn committed
        core.ledger.commit()  # and what it left uncommitted

    def _read(self, core: SinkCore, ready: dict[Any, int], pull: Sock, router: Sock, xpub: Sock) -> None:
        curve = self.settings.curve is not None
        if pull in ready:
            for frames, key in drain_keyed(pull, curve):
                core.intake(frames, key)
        if router in ready:
            for (rid, *frames), key in drain_keyed(router, curve):
                core.control(rid, frames, key)
        if xpub in ready:
            self._subscriptions(core, xpub)
        if self._wakeup.fileno() in ready:
            self._wakeup.clear()

    def _drain_left(self, core: SinkCore, until: float) -> float | None:
        """Seconds left to wait for leased batches to come back; None once none is leased, or
        the time is up."""
        if core.drained:
            self._drained = True
            if self._drain_began is not None:
                took = time.monotonic() - self._drain_began
                log.info("drained in %.3f s", took, extra={"seconds": round(took, 3)})
            return None
        left = until - time.monotonic()
        if left <= 0:
            log.warning("drain timed out: %d leased batch(es) are pending at the next start", len(core.leases))
            return None
        return left

    def _send(self, core: SinkCore, router: Sock, xpub: Sock) -> None:
        out = core.end_turn()
        failed: list[bytes] = []
        for rid, frames in out.to_peers:
            if rid in failed:
                continue
            try:
                router.send_multipart([rid, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                    raise
                failed.append(rid)
        for frames in out.publish:
            xpub.send_multipart(frames)
        if failed:
            # A peer that said bye and closed is gone before its bye is read: read what came,
            # so that a clean goodbye is not taken for a crash (which costs its batches an attempt).
            for (rid, *frames), key in drain_keyed(router, self.settings.curve is not None):
                core.control(rid, frames, key)
            for rid in failed:
                if rid in core.roles:
                    core.unreachable(rid)

    def _subscriptions(self, core: SinkCore, xpub: Sock) -> None:
        """A subscriber announces itself by subscribing to a private sync topic; since ZeroMQ
        delivers a connection's subscriptions in order, answering on that topic tells it that
        all its real subscriptions are in place."""
        for frames in drain(xpub):
            sub = frames[0]
            topic = sub[1:]
            if topic.startswith(p.SYNC_PREFIX.encode()) and len(topic) <= p.MAX_TOPIC:
                try:
                    token = topic.decode()
                except UnicodeDecodeError:
                    continue
                # A subscriber's sync topic is its own: it comes with it and goes with it.
                core.metrics.subscribed(token, joined=sub[:1] == b"\x01")
                if sub[:1] != b"\x01":
                    continue
                if not token.startswith(p.SYNC_GROUPS_PREFIX):
                    core.subscriber_without_groups()
                xpub.send_multipart([topic, p.header(p.Sync(token))])

    # --- the HTTP port --------------------------------------------------------------------------
    def _web(self, address: str | None) -> Web | None:
        if address is None:
            return None
        web = Web(
            address,
            registry=registry(SinkCollector(self._snapshots.get, self.active.is_set)),
            snapshot=self._snapshots.get,
            healthy=self._healthy,
            ready=self._ready_reasons,
            page="dashboard.html",
        ).start()
        self.http = web.url
        log.info("dashboard and metrics on %s (metrics at %smetrics)", web.url, web.url)
        return web

    def _healthy(self) -> list[str]:
        if not self._ready.is_set() or self._thread is None or not self._thread.is_alive():
            return ["the sink is not running"]
        stalled = time.monotonic() - self._turned
        return [f"the sink's loop has not turned for {stalled:.0f} s"] if stalled > STALLED else []

    def _ready_reasons(self) -> list[str]:
        reasons = self._healthy()
        if self._draining:
            reasons.append("draining: taking no more batches")
        if self.standby:
            reasons.append("standing by: another sink holds the ledger")
        path = self.settings.ledger
        if path != ":memory:" and not is_postgres(path):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
                reasons.append(f"ledger {path} is not writable")
        need = max(self.settings.min_workers, 1 if self._local[0] else 0)
        snap = self._snapshots.get() if need else None
        have = len(snap["workers"]) if snap is not None else 0
        if have < need:
            reasons.append(f"{have} worker(s) connected, {need} needed")
        return reasons


def _close(web: Web | None) -> None:
    if web is not None:
        web.close()
