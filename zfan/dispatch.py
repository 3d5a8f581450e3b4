"""The sink's decisions, with no sockets: a state machine fed messages and a clock.

It takes what the sink's sockets received (``intake()``, ``control()``), the passing of time
(``tick()``) and failed sends (``unreachable()``), and at the end of each turn of the sink's
loop (``end_turn()``) leases pending batches to workers with free credit, commits the ledger
once, and returns what to send: acks, leases, heartbeats, replies, and results to publish.
Nothing leaves before the commit that makes it true.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from .config import Limits, Timing
from .errors import ProtocolError
from .heads import HeadLog
from .ledger import Ledger, Pending, Stored
from .liveness import Beat, LastHeard, Tracker

log = logging.getLogger(__name__)

INTAKE_TYPES: frozenset[type[p.Message]] = frozenset({p.Batch})
# Requests any peer may make without a hello: they change no peer's state.
STATELESS: frozenset[type[p.Message]] = frozenset({p.Hello, p.Status, p.Replay, p.Heads, p.GetCursor, p.Commit})
PRUNE_EVERY = 1.0  # seconds between retention passes
LOG_EVERY = 10.0  # seconds between two log lines about one peer's refused messages
# Writes that nothing sent waits for (leases, publish marks, cursors) are committed with the
# next ack or publish, or within this many seconds, so that a turn that only leased pays for no
# commit: commits are most of the sink's time.
COMMIT_WITHIN = 0.05
RECORDS_IN_FLIGHT = 4000  # records leased to one worker beyond which it gets no third batch
# A silent worker's batches cost an attempt only if another peer was heard this many heartbeat
# intervals after the worker's last message: proof that the sink's own link still worked when
# the worker missed its beat (see _silence_costs_an_attempt).
WITNESS_AFTER = 1.25


def _peer_name(peer: bytes | str) -> str:
    return peer if isinstance(peer, str) else f"connection {peer.hex()}"


@dataclass
class WorkerState:
    rid: bytes
    name: str
    credit: int
    # (batch_id, attempt) -> records, of every lease this worker holds, including leases the
    # sink has since revoked (timed out): the worker's credit returns only when it answers.
    held: dict[tuple[int, int], int] = field(default_factory=dict)
    records: int = 0  # records in the batches held
    alone: tuple[int, int] | None = None  # a suspect lease it runs with nothing beside it

    @property
    def free(self) -> int:
        """Leases it may take now: up to its credit, but beyond two only while it holds fewer
        than RECORDS_IN_FLIGHT records. Small batches need many in flight to hide the round
        trip; big ones only fill the worker's memory and delay a replay."""
        if self.alone is not None or (len(self.held) >= 2 and self.records >= RECORDS_IN_FLIGHT):
            return 0
        return self.credit - len(self.held)

    def hold(self, key: tuple[int, int], count: int) -> None:
        self.held[key] = count
        self.records += count

    def release(self, key: tuple[int, int]) -> None:
        self.records -= self.held.pop(key, 0)
        if key == self.alone:
            self.alone = None


@dataclass
class Lease:
    rid: bytes
    attempt: int
    deadline: float


@dataclass
class Outbox:
    """What one turn decided to send, in order: peers first, then the results to publish."""

    to_peers: list[tuple[bytes, list[bytes]]] = field(default_factory=list)
    publish: list[list[bytes]] = field(default_factory=list)


class SinkCore:
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
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        # With CURVE: whether a message's key is still allowed (keys can be removed while
        # their connections stay open).
        self.key_allowed = key_allowed
        self.limits = limits or Limits()
        self.timing = timing = timing or Timing()
        self.max_attempts = max_attempts
        self.batch_timeout = batch_timeout
        self.clock = clock
        self.wall = wall
        self.retain = (retain_count, retain_age)
        self._next_prune = clock() + PRUNE_EVERY
        self.epoch = ledger.next_epoch()
        self.recovered = ledger.recover()
        self.pending: deque[Pending] = deque(ledger.pending())
        self.leases: dict[int, Lease] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.producers: dict[str, bytes] = {}
        self.roles: dict[bytes, str] = {}
        self.peers = Tracker(timing.expiry)
        self.heard = LastHeard()  # anyone at all, intake included
        self.beat = Beat(timing.heartbeat, clock())
        self.topic_seq: dict[str, int] = ledger.topic_seqs()
        self._heads_changed: set[str] = set()
        self._head_log = HeadLog(self.epoch, self.topic_seq)  # what changed when, for paged heads
        self._keys = ledger.producer_keys()  # producer id -> the CURVE key it is bound to
        self._key: str | None = None  # the key of the control message being handled
        self._logged: dict[bytes | str, float] = {}  # peer -> when its last refusal was logged
        self.counts = ledger.counts()
        self.stats: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.cache_bytes = cache_bytes
        self._cache: dict[int, bytes] = {}
        self._cached = 0
        self._acks: dict[str, list[int]] = {}
        self._dirty_since: float | None = None  # when writes were first left uncommitted
        self._out = Outbox()
        # Results stored but not yet known to be published: an earlier sink's leftovers first.
        self._to_publish: list[Stored] = list(ledger.results_after(ledger.published_upto()))
        self._handlers: dict[type[p.Message], Callable[[bytes, Any], None]] = {
            p.Hello: self._hello,
            p.Heartbeat: self._heartbeat,
            p.Result: self._result,
            p.Failed: self._failed,
            p.Status: self._status,
            p.Bye: self._bye,
            p.Replay: self._replay,
            p.Heads: self._heads,
            p.GetCursor: self._get_cursor,
            p.Commit: self._commit,
        }
        self._control_types = frozenset(self._handlers)

    # --- events ----------------------------------------------------------------------------
    def intake(self, frames: list[bytes], key: str | None = None) -> None:
        """A message from a producer's PUSH: a batch to store, dedup and acknowledge. With CURVE,
        `key` is the sender's public key, which must be the one its producer id is bound to."""
        try:
            self._check_size(frames)
            self._check_key(key)
            batch = p.decode(frames, allowed=INTAKE_TYPES)
            assert isinstance(batch, p.Batch)
            if batch.topic.startswith("zfan."):
                raise ProtocolError("reserved topic", batch.topic)
            if key is not None and self._keys.get(batch.producer_id) != key:
                raise ProtocolError("producer id of another key", batch.producer_id)
        except ProtocolError as exc:
            self._reject(exc, key or "intake")
            return
        self.heard.heard("intake", self.clock())
        producer_id, seq, topic, count, payload = batch.producer_id, batch.seq, batch.topic, batch.count, batch.payload
        batch_id = self.ledger.insert_batch(producer_id, seq, topic, count, payload)
        if batch_id is None:
            self.stats["duplicate batches"] += 1
        else:
            self.pending.append(Pending(batch_id, topic, count, 0))
            self.counts["pending"] += 1
            self.stats["batches in"] += 1
            self.stats["records in"] += count
            if self._cached + len(payload) <= self.cache_bytes:
                self._cache[batch_id] = payload
                self._cached += len(payload)
        self._acks.setdefault(producer_id, []).append(seq)

    def control(self, rid: bytes, frames: list[bytes], key: str | None = None) -> None:
        """A message from a DEALER on the control socket (with CURVE, `key` is the sender's)."""
        self._key = key
        try:
            self._check_size(frames)
            self._check_key(key)
            msg = p.decode(frames, allowed=self._control_types)
        except ProtocolError as exc:
            self._reject(exc, rid)
            return
        now = self.clock()
        self.heard.heard(rid, now)
        if rid in self.roles:
            self.peers.seen(rid, now)
        elif type(msg) not in STATELESS:
            # A peer this sink does not know (it was declared dead, or the sink restarted).
            if isinstance(msg, (p.Result, p.Failed)):
                self.stats["fenced results"] += 1  # its lease went to another worker
            self._send(rid, p.Reset("unknown peer: send hello"))
            self.stats["resets"] += 1
            return
        try:
            self._handlers[type(msg)](rid, msg)
        except ProtocolError as exc:
            self._reject(exc, rid)

    def _check_key(self, key: str | None) -> None:
        if key is not None and self.key_allowed is not None and not self.key_allowed(key):
            raise ProtocolError("key not allowed", f"{key[:8]}... was removed from the allowed keys")

    def unreachable(self, rid: bytes) -> None:
        """A send to this peer failed (ROUTER_MANDATORY): treat it as gone now."""
        self.peers.forget(rid)
        self._drop_peer(rid, "unreachable", fault=True)

    def tick(self) -> None:
        now = self.clock()
        for rid, last in self.peers.expired(now):
            self._drop_peer(rid, "silent", fault=self._silence_costs_an_attempt(rid, last))  # type: ignore[arg-type]
        for batch_id in [b for b, lease in self.leases.items() if lease.deadline <= now]:
            lease = self.leases.pop(batch_id)
            # The worker keeps the batch in `held` (its credit stays used) until it answers.
            self.counts["leased"] -= 1
            self._lease_ended(batch_id, lease.attempt, f"batch timeout: no result after {self.batch_timeout:g} s")
            self.stats["batch timeouts"] += 1
        if self.beat.due(now):
            beat = p.encode(p.Heartbeat(self.epoch))
            for rid in self.peers.peers():
                self._out.to_peers.append((rid, beat))  # type: ignore[arg-type]
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            keep, max_age = self.retain
            if keep is not None or max_age is not None:
                results, batches = self.ledger.prune(keep=keep, max_age=max_age, now=self.wall())
                if results:
                    self.stats["results pruned"] += results
                if batches:
                    self.stats["batches pruned"] += batches
                    self.counts["done"] -= batches
                    self._keys = self.ledger.producer_keys()

    def end_turn(self) -> Outbox:
        """Lease what can be leased, commit, and hand back everything the commit made true."""
        self._dispatch()
        if self._heads_changed:
            # Kept apart from the results, so that numbering goes on after retention drops them all.
            self.ledger.save_heads({t: self.topic_seq[t] for t in self._heads_changed})
            self._heads_changed.clear()
        # Acks and publishes wait for the commit. A lease does not: lost uncommitted, the batch
        # is pending again, exactly what recover() makes of a lease after a crash.
        if self.ledger.uncommitted:
            now = self.clock()
            if (
                self._acks
                or self._to_publish
                or (self._dirty_since is not None and now >= self._dirty_since + COMMIT_WITHIN)
            ):
                self.ledger.commit()
                self._dirty_since = None
            elif self._dirty_since is None:
                self._dirty_since = now
        out, self._out = self._out, Outbox()
        for producer_id, seqs in self._acks.items():
            rid = self.producers.get(producer_id)
            if rid is not None:
                out.to_peers.append((rid, p.encode(p.Ack(seqs))))
        self._acks.clear()
        if self._to_publish:
            out.publish.extend([s.topic.encode(), *p.encode(self._published(s))] for s in self._to_publish)
            self.stats["published"] += len(self._to_publish)
            # Committed with a later turn (COMMIT_WITHIN): a crash before then publishes these
            # again with the same per-topic seq, and subscribers discard what they have seen.
            self.ledger.mark_published(self._to_publish[-1].id)
            self._to_publish = []
        return out

    def next_deadline(self) -> float:
        """Seconds until tick() has something to do: a heartbeat, a peer's or a lease's expiry."""
        now = self.clock()
        due = [self.beat.next, now + self.timing.heartbeat]
        expiry = self.peers.next_expiry()
        if expiry is not None:
            due.append(expiry + 1e-3)  # just past it: a peer is dead only once silent for *more* than expiry
        if self.leases:
            due.append(min(lease.deadline for lease in self.leases.values()))
        if self._dirty_since is not None:
            due.append(self._dirty_since + COMMIT_WITHIN)
        if self.pending and any(w.free > 0 and self._fresh(w, now) for w in self.workers.values()):
            return 0.0  # batches went back to pending after this turn's leasing (a send failed)
        return max(0.0, min(due) - now)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "epoch": self.epoch,
            "workers": [
                {
                    "name": w.name,
                    "credit": w.credit,
                    "in_flight": len(w.held),
                    "idle_ms": round(self.peers.idle(w.rid, now) * 1000) if w.rid in self.peers else None,
                }
                for w in self.workers.values()
            ],
            "producers": len(self.producers),
            **self.counts,
            "rejected": dict(self.rejected),
            **{k.replace(" ", "_"): v for k, v in self.stats.items()},
        }

    # --- control handlers ------------------------------------------------------------------
    def _hello(self, rid: bytes, msg: p.Hello) -> None:
        role, name, credit = msg.role, msg.name, msg.credit
        if role not in p.ROLES:
            raise ProtocolError("bad role", role)
        if role == "worker" and not 0 < credit <= p.MAX_CREDIT:
            raise ProtocolError("bad credit", str(credit))
        if role == "producer" and self._key is not None:
            # With CURVE a producer id belongs to the first key that says hello with it, so that
            # no other node can send batches or take acks in its name.
            bound = self._keys.setdefault(name, self._key)
            if bound != self._key:
                raise ProtocolError("producer id of another key", name)
            self.ledger.bind_key(name, bound)
        if role == "producer" and self.producers.get(name, rid) != rid and self.producers[name] in self.peers:
            # Two live connections with one producer id would split its acks: the second waits
            # until the first has gone quiet long enough to be dropped.
            raise ProtocolError("producer id in use", name)
        if rid in self.roles:
            self._drop_peer(rid, "said hello again")
        self.roles[rid] = role
        self.peers.seen(rid, self.clock())
        if role == "worker":
            self.workers[rid] = WorkerState(rid, name, credit)
            log.info("worker %s joined with credit %d", name, credit)
        elif role == "producer":
            self.producers[name] = rid
        t = self.timing
        self._send(rid, p.Welcome(self.epoch, round(t.heartbeat * 1000), t.liveness))

    def _heartbeat(self, rid: bytes, msg: p.Heartbeat) -> None:
        pass  # being heard from is all a heartbeat says

    def _bye(self, rid: bytes, msg: p.Bye) -> None:
        self.peers.forget(rid)
        self._drop_peer(rid, "said bye")

    def _status(self, rid: bytes, msg: p.Status) -> None:
        self._send(rid, p.StatusReply(self.status()))

    def _result(self, rid: bytes, msg: p.Result) -> None:
        for topic in msg.topics:
            if topic.startswith("zfan."):
                raise ProtocolError("reserved topic", topic)
        if not self._settle(rid, msg.epoch, msg.batch_id, msg.attempt):
            return
        rows = []
        for topic, count, payload in zip(msg.topics, msg.counts, msg.payloads, strict=True):
            rows.append((topic, self._next_seq(topic), count, payload))
        self._to_publish.extend(self.ledger.store_results(msg.batch_id, rows))
        self.counts["done"] += 1
        self.stats["batches done"] += 1

    def _failed(self, rid: bytes, msg: p.Failed) -> None:
        if self._settle(rid, msg.epoch, msg.batch_id, msg.attempt):
            self.stats["batches failed"] += 1
            self._lease_ended(msg.batch_id, msg.attempt, msg.error)

    def _settle(self, rid: bytes, epoch: int, batch_id: int, attempt: int) -> bool:
        """Close the lease a worker answered for; False (and counted) if the answer is fenced."""
        worker = self.workers.get(rid)
        if worker is None:
            raise ProtocolError("not a worker", "results come only from workers")
        worker.release((batch_id, attempt))  # its credit is back, whatever the verdict
        lease = self.leases.get(batch_id)
        if epoch != self.epoch or lease is None or lease.rid != rid or lease.attempt != attempt:
            self.stats["fenced results"] += 1
            return False
        del self.leases[batch_id]
        self.counts["leased"] -= 1
        return True

    # --- subscribers: replay, topic heads, durable cursors ---------------------------------
    def _replay(self, rid: bytes, msg: p.Replay) -> None:
        topic = msg.topic
        first, last = max(msg.first, 1), min(msg.last, self.topic_seq.get(topic, 0))
        if first > last:
            return  # nothing published there yet
        rows = self.ledger.results_range(topic, first, last, p.MAX_REPLAY)
        if not rows or rows[0].seq > first:
            gap_end = rows[0].seq - 1 if rows else last
            self._send(rid, p.Missing(topic, first, gap_end, "no longer retained by the sink"))
            self.stats["replays refused"] += 1
        for stored in rows:
            self._send(rid, self._published(stored))
        if rows:
            self.stats["results replayed"] += len(rows)

    def _heads(self, rid: bytes, msg: p.Heads) -> None:
        heads, upto, more = self._head_log.page(msg.after, tuple(msg.prefixes), self.topic_seq)
        self._send(rid, p.Topics(msg.after, [t for t, _ in heads], [s for _, s in heads], upto, more))

    def _get_cursor(self, rid: bytes, msg: p.GetCursor) -> None:
        name, after_topic = msg.name, msg.after_topic
        # One row beyond a page tells whether another page follows.
        rows = self.ledger.cursor_page(name, after_topic, p.MAX_TOPICS + 1)
        page = rows[: p.pairs_that_fit(rows)]
        self._send(rid, p.Cursor(name, after_topic, [t for t, _ in page], [s for _, s in page], len(page) < len(rows)))

    def _commit(self, rid: bytes, msg: p.Commit) -> None:
        positions: dict[str, int] = {}
        for topic, seq in zip(msg.topics, msg.seqs, strict=True):
            positions[topic] = max(seq, positions.get(topic, 0))
        self.ledger.save_cursor(msg.name, positions)

    # --- leases ----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if not self.pending or not self.workers:
            return
        now = self.clock()
        workers = [w for w in self.workers.values() if self._fresh(w, now)]
        while workers and self.pending:
            if self.pending[0].suspect:
                # Alone on an idle worker, so that if it kills that worker too, it is the one to pay.
                worker = next((w for w in workers if not w.held), None)
                if worker is None:
                    break  # suspects are the oldest work: the rest waits behind them
                worker.alone = (self.pending[0].batch_id, self.pending[0].attempts + 1)
            else:
                worker = max(workers, key=lambda w: w.free)
                if worker.free <= 0:
                    break
            batch = self.pending.popleft()
            attempt = batch.attempts + 1
            payload = self._cache.pop(batch.batch_id, None)
            if payload is None:
                payload = self.ledger.payload(batch.batch_id)
            else:
                self._cached -= len(payload)
            self.ledger.lease(batch.batch_id, attempt)
            worker.hold((batch.batch_id, attempt), batch.count)
            self.leases[batch.batch_id] = Lease(worker.rid, attempt, now + self.batch_timeout)
            self.counts["pending"] -= 1
            self.counts["leased"] += 1
            self._send(worker.rid, p.Lease(self.epoch, batch.batch_id, attempt, batch.topic, batch.count, payload))

    def _lease_ended(
        self, batch_id: int, attempt: int, error: str, *, charge: bool = True, suspect: bool = False
    ) -> None:
        """A lease ended without a result: replay the batch, or dead-letter it at max attempts.
        A lease that ended through no fault of the batch (`charge` false) gives its attempt back;
        one that may have been its fault (`suspect`) is replayed alone to find out."""
        topic, count, _, _ = self.ledger.batch_info(batch_id)
        if not charge:
            attempt -= 1
            self.ledger.release(batch_id, error, attempts=attempt)
            self.pending.appendleft(Pending(batch_id, topic, count, attempt, suspect))
            self.counts["pending"] += 1
            self.stats["replays"] += 1
            self.stats["replays not charged"] += 1
        elif attempt >= self.max_attempts:
            seq = self._next_seq(p.DEAD_TOPIC)
            self._to_publish.append(self.ledger.dead_letter(batch_id, p.DEAD_TOPIC, seq, error))
            self.counts["dead"] += 1
            log.warning(
                "batch %d dead-lettered after %d attempts: %s",
                batch_id,
                attempt,
                error.strip().splitlines()[-1] if error.strip() else "",
            )
        else:
            self.ledger.release(batch_id, error)
            # To the front: a replayed batch is the oldest work there is.
            self.pending.appendleft(Pending(batch_id, topic, count, attempt))
            self.counts["pending"] += 1
            self.stats["replays"] += 1

    def _silence_costs_an_attempt(self, rid: bytes, last: float) -> bool:
        """Whether a worker silent since `last` failed, rather than the sink's own link. If
        another peer was heard after the worker missed its beat, the sink was connected: the
        worker (or what its batch did to it) failed. If every peer fell silent together, the
        sink was cut off, and its workers' batches owe nothing. A worker that was the sink's
        only peer pays: nothing says the sink was cut off."""
        other = self.heard.latest_except(rid)
        if other > last + WITNESS_AFTER * self.timing.heartbeat:
            return True
        return other < last - self.timing.expiry

    def _fresh(self, worker: WorkerState, now: float) -> bool:
        """Heard from within a heartbeat interval: a silent worker, perhaps cut off with the
        sink's own link, is given nothing new to lose."""
        return worker.rid in self.peers and self.peers.idle(worker.rid, now) <= self.timing.heartbeat

    def _drop_peer(self, rid: bytes, why: str, *, fault: bool = False) -> None:
        """Forget a peer; a worker's leases go back to pending. With `fault` (it died or vanished,
        perhaps because of a batch it ran), a batch pays an attempt only where it is the one
        that can have done it: the worker held no other. When it held several, the one it was
        running cannot be told (its results may have died unsent with it), so none pays yet:
        each is run again alone, and pays if it kills that worker too."""
        role = self.roles.pop(rid, None)
        worker = self.workers.pop(rid, None)
        if role == "producer":
            self.producers = {k: v for k, v in self.producers.items() if v != rid}
        if worker is None:
            return
        live = [
            (b, a)
            for b, a in worker.held
            if (lease := self.leases.get(b)) is not None and lease.rid == rid and lease.attempt == a
        ]
        cut = why == "silent" and not fault
        (log.warning if live else log.info)(
            "worker %s gone (%s); replaying %d batch(es)%s",
            worker.name,
            why,
            len(live),
            " at no cost of an attempt: every peer fell silent at once, the sink's own link failed" if cut else "",
        )
        # Newest first, since each goes to the front of the queue: they end up oldest first.
        for batch_id, attempt in sorted(live, reverse=True):
            del self.leases[batch_id]
            self.counts["leased"] -= 1
            self._lease_ended(
                batch_id,
                attempt,
                f"worker {worker.name} {why} (attempt {attempt})",
                charge=fault and len(live) == 1,
                suspect=fault and len(live) > 1,
            )

    # --- helpers ---------------------------------------------------------------------------
    def _next_seq(self, topic: str) -> int:
        seq = self.topic_seq.get(topic, 0) + 1
        self.topic_seq[topic] = seq
        self._heads_changed.add(topic)
        self._head_log.changed(topic)
        return seq

    def _send(self, rid: bytes, msg: p.Message) -> None:
        self._out.to_peers.append((rid, p.encode(msg)))

    def _check_size(self, frames: list[bytes]) -> None:
        if len(frames) > self.limits.max_frames:
            raise ProtocolError("too many frames", str(len(frames)))
        if sum(map(len, frames)) > self.limits.max_message:
            raise ProtocolError("message too large", f"{sum(map(len, frames))} bytes")

    def _reject(self, exc: ProtocolError, peer: bytes | str) -> None:
        """Count a refused message; log it at most once per peer per LOG_EVERY seconds."""
        self.rejected[exc.reason] += 1
        now = self.clock()
        if now - self._logged.get(peer, -LOG_EVERY) >= LOG_EVERY:
            if len(self._logged) > 10_000:
                self._logged.clear()  # bounded however many peers misbehave
            self._logged[peer] = now
            log.warning(
                "refused a message from %s: %s (%d refused so far)", _peer_name(peer), exc, sum(self.rejected.values())
            )

    def _published(self, s: Stored) -> p.Publish | p.Dead:
        if s.kind == 0:
            return p.Publish(s.topic, s.seq, s.batch_id, s.count, s.payload)
        source, _, attempts, error = self.ledger.batch_info(s.batch_id)
        return p.Dead(s.topic, s.seq, s.batch_id, attempts, error or "", source, s.payload)
