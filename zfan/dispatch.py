"""The sink's decisions, with no sockets: a state machine fed messages and a clock.

It takes what the sink's sockets received (``intake()``, ``control()``), the passing of time
(``tick()``) and failed sends (``unreachable()``), and at the end of each turn of the sink's
loop (``end_turn()``) leases pending batches to workers with free credit, commits the ledger
once, and returns what to send: acks, leases, heartbeats, replies, and results to publish.
Nothing leaves before the commit that makes it true.

SinkCore routes each message to the part whose job it is: refusals (what is refused, and how
that is told), intake (batches in), peers (who is connected), leasing (workers, leases,
attempts), publishing (numbering, heads, results out), history (subscribers' replays, heads
and cursors). It keeps for itself the turn (when to commit) and the retention.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from . import protocol as p
from .config import Limits, Timing
from .dead_admin import DeadLetters
from .errors import ProtocolError
from .history import History
from .intake import Intake
from .leasing import Backlog, Lease, Leasing, WorkerState
from .ledger import Ledger, Pending
from .metrics import SinkMetrics
from .outcomes import Outcomes
from .peers import Peers
from .publishing import Publishing
from .refusals import Refusals
from .routing import RetryPolicy, Routes

log = logging.getLogger(__name__)

# Requests any peer may make without a hello: they change no peer's state.
STATELESS: frozenset[type[p.Message]] = frozenset(
    {p.Hello, p.Status, p.Replay, p.Heads, p.GetCursor, p.Commit, p.DeadList, p.DeadShow, p.DeadRequeue, p.DeadPurge}
)
PRUNE_EVERY = 1.0  # seconds between retention passes
# Writes that nothing sent waits for (leases, publish marks, cursors) are committed with the
# next ack or publish, or within this many seconds, so that a turn that only leased pays for no
# commit: commits are most of the sink's time.
COMMIT_WITHIN = 0.05
TOP_TOPICS = 20  # topics in a status, those with the highest seqs
CURSORS_READ = 10_000  # durable positions read for a snapshot's lags at most
TOP_LAGS = 20  # durable subscribers in a status, those furthest behind


@dataclass
class Outbox:
    """What one turn decided to send, in order: peers first, then the results to publish."""

    to_peers: list[tuple[bytes, list[bytes]]] = field(default_factory=list)
    publish: list[list[bytes]] = field(default_factory=list)


class SinkCore:
    """The facade the sink's socket loop drives: events in, one Outbox out per turn."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        limits: Limits | None = None,
        timing: Timing | None = None,
        max_attempts: int = 3,
        batch_timeout: float = 300.0,
        cache_bytes: int = 256 << 20,
        retain_count: int | None = None,
        retain_age: float | None = None,
        key_allowed: Callable[[str], bool] | None = None,
        routes: Mapping[str, str] | None = None,
        retries: Mapping[str, RetryPolicy] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.limits = limits = limits or Limits()
        self.timing = timing = timing or Timing()
        self.max_attempts = max_attempts
        self.batch_timeout = batch_timeout
        self.clock = clock
        self.wall = wall
        self.retain = (retain_count, retain_age)
        self._next_prune = clock() + PRUNE_EVERY
        self.epoch = ledger.next_epoch()
        self.recovered = ledger.recover()  # before anything reads the batches' states
        self.counts = ledger.counts()
        self.stats: Counter[str] = Counter()
        self._refusals = Refusals(limits, key_allowed, clock)
        self._key: str | None = None  # the key of the control message being handled
        # Connections holding a producer id that another connection said hello with (see
        # _probe): old connection -> (new connection, its hello, its key); probing this turn,
        # and probed by the last turn's sends.
        self._probing: dict[bytes, tuple[bytes, p.Hello, str | None]] = {}
        self._probed: dict[bytes, tuple[bytes, p.Hello, str | None]] = {}
        self._dirty_since: float | None = None  # when writes were first left uncommitted
        self._out = Outbox()
        self._peers = Peers(ledger, timing, clock())
        self.metrics = SinkMetrics(clock, wall)
        self._publishing = Publishing(ledger, self.epoch, self.stats, self.metrics.published)
        self._outcomes = Outcomes(ledger, self._peers.producer, self.stats)
        self._backlog = Backlog(ledger, ledger.pending(), cache_bytes, Routes(routes))
        self._leasing = Leasing(
            ledger,
            self._backlog,
            epoch=self.epoch,
            max_attempts=max_attempts,
            batch_timeout=batch_timeout,
            counts=self.counts,
            stats=self.stats,
            send=self._send,
            fresh=self._peers.fresh,
            dead_letter=self._dead_letter,
            retries=dict(retries or {}),
            clock=clock,
        )
        self._intake = Intake(
            ledger, self._backlog, self.counts, self.stats, self._peers.owns, self._outcomes, self.metrics.arrived
        )
        self._history = History(ledger, self._publishing, self.stats, self._send)
        self._dead = DeadLetters(ledger, self._backlog, self.counts, self.stats, self._send)
        self._handlers: dict[type[p.Message], Callable[[bytes, Any], None]] = {
            p.Hello: self._hello,
            p.Heartbeat: self._heartbeat,
            p.Result: self._result,
            p.Results: self._results,
            p.Features: self._features,
            p.Failed: self._leasing.failed,
            p.Status: self._status,
            p.Bye: self._bye,
            p.Watch: self._watch,
            p.Drain: self._drain,
            p.Replay: self._history.replay,
            p.Heads: self._history.heads,
            p.GetCursor: self._history.get_cursor,
            p.Commit: self._history.commit,
            p.DeadList: self._dead.page,
            p.DeadShow: self._dead.show,
            p.DeadRequeue: self._dead.requeue,
            p.DeadPurge: self._dead.purge,
        }
        self._control_types = frozenset(self._handlers)

    # --- events ----------------------------------------------------------------------------
    def intake(self, frames: list[bytes], key: str | None = None) -> None:
        """A message from a producer's PUSH: a batch to store, dedup and acknowledge. With CURVE,
        `key` is the sender's public key, which must be the one its producer id is bound to."""
        try:
            self._refusals.check(frames, key)
            batch = self._intake.decode(frames, key)
        except ProtocolError as exc:
            self._refusals.refuse(exc, key or "intake")
            return
        self._peers.heard("intake", self.clock())
        self._intake.store(batch)

    def control(self, rid: bytes, frames: list[bytes], key: str | None = None) -> None:
        """A message from a DEALER on the control socket (with CURVE, `key` is the sender's)."""
        self._key = key
        try:
            self._refusals.check(frames, key)
            msg = p.decode(frames, allowed=self._control_types)
        except ProtocolError as exc:
            self._refusals.refuse(exc, rid)
            return
        if not self._peers.seen(rid, self.clock()) and type(msg) not in STATELESS:
            # A peer this sink does not know (it was declared dead, or the sink restarted).
            if isinstance(msg, (p.Result, p.Results, p.Failed)):
                self.stats["fenced results"] += 1  # its lease went to another worker
            if self._peers.should_reset(rid, self.clock()):
                self._send(rid, p.Reset("unknown peer: send hello"))
            self.stats["resets"] += 1
            return
        try:
            self._handlers[type(msg)](rid, msg)
        except ProtocolError as exc:
            self._refusals.refuse(exc, rid)

    def unreachable(self, rid: bytes) -> None:
        """A send to this peer failed (ROUTER_MANDATORY): treat it as gone now."""
        held = self._probed.pop(rid, None) or self._probing.pop(rid, None)
        self._peers.forget(rid)
        self._drop_peer(rid, "unreachable", fault=True)
        if held is not None:
            # The connection that held the producer id is gone: welcome the one that asked.
            new_rid, hello, key = held
            self._key = key
            try:
                self._hello(new_rid, hello)
            except ProtocolError as exc:
                self._refusals.refuse(exc, new_rid)

    def _probe(self, rid: bytes, msg: p.Hello) -> bool:
        """A hello for a producer id whose connection is still tracked: most often the same
        producer, which gave up on a sink that stalled and dialled again, its old connection
        closed. A heartbeat to the old one tells: if it cannot be sent, unreachable() welcomes
        the new one at once, instead of once the old one has been silent past the expiry; if
        it can, the next turn refuses the hello (see _refuse_probed)."""
        old = self._peers.producer(msg.name)
        if old is None or old in self._probing or old in self._probed:
            return False
        self._probing[old] = (rid, msg, self._key)
        self._out.to_peers.append((old, p.encode(p.Heartbeat(self.epoch))))
        return True

    def _refuse_probed(self) -> None:
        """The probes the last turn sent reached their connection: it is alive, and holds its
        producer id; the hellos that asked for it are refused."""
        for new_rid, hello, _ in self._probed.values():
            self._refusals.refuse(ProtocolError("producer id in use", hello.name), new_rid)
        self._probed, self._probing = self._probing, {}

    def tick(self) -> None:
        now = self.clock()
        for rid, fault in self._peers.expired(now):
            self._drop_peer(rid, "silent", fault=fault)
        self._leasing.expire(now)
        rids = self._peers.to_beat(now)
        if rids:
            beat = p.encode(p.Heartbeat(self.epoch))
            self._out.to_peers.extend((rid, beat) for rid in rids)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            self._prune()

    def end_turn(self) -> Outbox:
        """Lease what can be leased, commit, and hand back everything the commit made true."""
        self._refuse_probed()
        self._leasing.dispatch(self.clock())
        self._publishing.save_heads()
        # Acks and publishes wait for the commit. A lease does not: lost uncommitted, the batch
        # is pending again, exactly what recover() makes of a lease after a crash.
        if self.ledger.uncommitted:
            now = self.clock()
            if (
                self._intake.acks_waiting
                or self._publishing.waiting
                or self._outcomes.waiting
                or (self._dirty_since is not None and now >= self._dirty_since + COMMIT_WITHIN)
            ):
                started = self.clock()
                self.ledger.commit()
                self.metrics.committed(self.clock() - started)
                self._dirty_since = None
            elif self._dirty_since is None:
                self._dirty_since = now
        out, self._out = self._out, Outbox()
        for producer_id, seqs in self._intake.take_acks():
            rid = self._peers.producer(producer_id)
            if rid is not None:
                out.to_peers.append((rid, p.encode(p.Ack(seqs))))
        out.to_peers.extend(self._outcomes.take())  # after the acks: a batch is stored before it ends
        out.publish.extend(self._publishing.take())
        return out

    def subscriber_without_groups(self) -> None:
        """A subscriber synced that reads no `publishes`: one result per message from now on."""
        if self._publishing.groups:
            self._publishing.groups = False
            log.info("a subscriber that reads one result per message joined: results are published one by one")

    def drain(self) -> None:
        """The sink is stopping: lease nothing more (the backlog stays pending in the ledger)."""
        self._leasing.closed = True

    @property
    def drained(self) -> bool:
        """Nothing is leased: every batch is pending in the ledger, or ended."""
        return not self._leasing.leases

    def next_deadline(self) -> float:
        """Seconds until tick() has something to do: a heartbeat, a peer's or a lease's expiry."""
        now = self.clock()
        due = [self._peers.next_deadline(), now + self.timing.heartbeat]
        lease_due = self._leasing.next_deadline()
        if lease_due is not None:
            due.append(lease_due)
        if self._dirty_since is not None:
            due.append(self._dirty_since + COMMIT_WITHIN)
        if self._leasing.can_lease(now) or self._out.to_peers:
            # Batches went back to pending after this turn's leasing, or a welcome waits to be
            # sent, both after a failed send.
            return 0.0
        return max(0.0, min(due) - now)

    def status(self) -> dict[str, Any]:
        """What `zfan status` shows: counts, rates, peers, and the topics that went furthest."""
        now = self.clock()
        m = self.metrics
        span = m.snapshot_rates()
        return {
            "version": __version__,
            "epoch": self.epoch,
            "uptime_s": round(now - m.started, 3),
            "workers": self._leasing.status(lambda rid: self._peers.idle_ms(rid, now)),
            "producers": self._peers.producer_count(),
            "subscribers": len(m.subscribers),
            "draining": self._leasing.closed,
            **self.counts,
            "routes": self._leasing.routes(),
            "ledger_bytes": self.ledger.size_bytes(),
            "records_out": m.records_out,
            "rate_in": span[0],
            "rate_out": span[1],
            "topics": len(self._publishing.topic_seq),
            "top_topics": heapq.nlargest(TOP_TOPICS, self._publishing.topic_seq.items(), key=lambda kv: kv[1]),
            "cursor_lag": self._cursor_lag(),
            "rejected": dict(self.rejected),
            **{k.replace(" ", "_"): v for k, v in self.stats.items()},
        }

    def snapshot(self) -> dict[str, Any]:
        """status(), and what the metrics and the dashboard show beside it: histograms, history,
        the last dead letters."""
        return {**self.status(), **self.metrics.snapshot()}

    def _cursor_lag(self) -> dict[str, int]:
        """Results published past a durable subscriber's committed positions, over its topics: for
        the TOP_LAGS furthest behind (the status is one bounded message, and names are labels)."""
        lag: dict[str, int] = {}
        for name, topic, seq in self.ledger.cursors(CURSORS_READ):
            lag[name] = lag.get(name, 0) + max(0, self._publishing.head(topic) - seq)
        return dict(heapq.nlargest(TOP_LAGS, lag.items(), key=lambda kv: kv[1]))

    # --- control handlers ------------------------------------------------------------------
    def _hello(self, rid: bytes, msg: p.Hello) -> None:
        try:
            self._peers.check_hello(rid, msg, self._key)
        except ProtocolError as exc:
            if exc.reason == "producer id in use" and self._probe(rid, msg):
                return  # answered once the probe tells
            raise
        if self._peers.known(rid):
            self._drop_peer(rid, "said hello again")
        self._peers.join(rid, msg.role, msg.name, self.clock())
        if msg.role == "worker":
            self._leasing.join(rid, msg.name, msg.credit, msg.route)
        t = self.timing
        self._send(rid, p.Welcome(self.epoch, round(t.heartbeat * 1000), t.liveness))

    def _heartbeat(self, rid: bytes, msg: p.Heartbeat) -> None:
        pass  # being heard from is all a heartbeat says

    def _bye(self, rid: bytes, msg: p.Bye) -> None:
        self._peers.forget(rid)
        self._drop_peer(rid, "said bye")

    def _watch(self, rid: bytes, msg: p.Watch) -> None:
        if self.roles.get(rid) != "producer":
            raise ProtocolError("not a producer", "only a producer watches its batches")
        self._outcomes.watch(rid, self._peers.name(rid), msg.seqs)

    def _drain(self, rid: bytes, msg: p.Drain) -> None:
        self._leasing.drain(rid)
        self._send(rid, p.Drain())  # after every lease sent to it: it may stop once it has this

    def _status(self, rid: bytes, msg: p.Status) -> None:
        self._send(rid, p.StatusReply(self.status()))

    def _features(self, rid: bytes, msg: p.Features) -> None:
        shared = [name for name in msg.names if name in p.FEATURE_NAMES]
        worker = self._leasing.workers.get(rid)
        if worker is not None and p.GROUPS in shared:
            worker.groups = (msg.max_frame, msg.max_message)
        lim = self.limits
        self._send(rid, p.Features(shared, lim.max_frame, lim.max_message))

    def _result(self, rid: bytes, msg: p.Result) -> None:
        self._store([msg], rid)

    def _results(self, rid: bytes, msg: p.Results) -> None:
        self._store(msg.split(), rid)

    def _store(self, results: list[p.Result], rid: bytes) -> None:
        """Results from a worker: those of leases still its own are stored, in one statement."""
        for msg in results:
            for topic in msg.topics:
                if topic.startswith("zfan."):
                    raise ProtocolError("reserved topic", topic)
        settled = [msg for msg in results if self._leasing.settle(rid, msg.epoch, msg.batch_id, msg.attempt)]
        if not settled:
            return
        self._publishing.store_results([(msg.batch_id, msg.topics, msg.counts, msg.payloads) for msg in settled])
        for msg in settled:
            self._outcomes.ended(msg.batch_id)
        self.counts["done"] += len(settled)
        self.stats["batches done"] += len(settled)

    def _drop_peer(self, rid: bytes, why: str, *, fault: bool = False) -> None:
        """Forget a peer; a worker's leases go back to pending (see Leasing.drop for `fault`)."""
        self._peers.leave(rid)
        self._probing.pop(rid, None)  # a hello its id was probed for: refused, or asked again
        self._probed.pop(rid, None)
        self._outcomes.leave(rid)
        self._leasing.drop(rid, why, fault=fault)

    def _dead_letter(self, batch_id: int, error: str) -> None:
        self.metrics.dead_lettered(batch_id, error)
        self._publishing.dead_letter(batch_id, error)
        self._outcomes.ended(batch_id, error)

    # --- retention and sending -------------------------------------------------------------
    def _prune(self) -> None:
        keep, max_age = self.retain
        if keep is None and max_age is None:
            return
        results, batches = self.ledger.prune(keep=keep, max_age=max_age, now=self.wall())
        if results:
            self.stats["results pruned"] += results
        if batches:
            self.stats["batches pruned"] += batches
            for state in ("done", "purged"):
                self.counts[state] -= self.ledger.pruned.pop(state, 0)
            self._peers.reload_keys()

    def _send(self, rid: bytes, msg: p.Message) -> None:
        self._out.to_peers.append((rid, p.encode(msg)))

    # --- the parts' state, read-only, for tests and tools ----------------------------------
    @property
    def rejected(self) -> Counter[str]:
        return self._refusals.rejected

    @property
    def key_allowed(self) -> Callable[[str], bool] | None:
        return self._refusals.key_allowed

    @property
    def pending(self) -> deque[Pending]:
        return self._backlog.queue

    @property
    def leases(self) -> dict[int, Lease]:
        return self._leasing.leases

    @property
    def workers(self) -> dict[bytes, WorkerState]:
        return self._leasing.workers

    @property
    def producers(self) -> dict[str, bytes]:
        return self._peers.producers

    @property
    def roles(self) -> dict[bytes, str]:
        return self._peers.roles

    @property
    def topic_seq(self) -> dict[str, int]:
        return self._publishing.topic_seq

    @property
    def cache_bytes(self) -> int:
        return self._backlog.cache_bytes
