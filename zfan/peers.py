"""Who is connected to the sink: each peer's role, the connection of each producer id and the
CURVE key it is bound to, when each peer was last heard from, and when heartbeats are due.
"""

from __future__ import annotations

from typing import cast

from . import protocol as p
from .config import Timing
from .errors import ProtocolError
from .ledger import Ledger
from .liveness import Beat, LastHeard, Tracker

# A silent worker's batches cost an attempt only if another peer was heard this many heartbeat
# intervals after the worker's last message: proof that the sink's own link still worked when
# the worker missed its beat (see Peers.silence_was_theirs).
WITNESS_AFTER = 1.25
FRESH_BEATS = 1.5  # heartbeat intervals within which a worker was heard, for it to be given a lease


class Peers:
    def __init__(self, ledger: Ledger, timing: Timing, now: float) -> None:
        self._ledger = ledger
        self._timing = timing
        self.roles: dict[bytes, str] = {}
        self._names: dict[bytes, str] = {}  # what each peer called itself in its hello
        self.producers: dict[str, bytes] = {}  # producer id -> its connection
        self._tracker = Tracker(timing.expiry)
        self._heard = LastHeard()  # anyone at all, intake included
        self._beat = Beat(timing.heartbeat, now)
        self._keys = ledger.producer_keys()  # producer id -> the CURVE key it is bound to
        self._reset_at: dict[bytes, float] = {}  # unknown connections told to say hello, and when

    # --- joining and leaving ---------------------------------------------------------------
    def check_hello(self, rid: bytes, msg: p.Hello, key: str | None) -> None:
        """Refuse a hello from `rid` that cannot be welcomed; with CURVE (`key`), bind a
        producer id to the first key that says hello with it."""
        role, name, credit = msg.role, msg.name, msg.credit
        if role not in p.ROLES:
            raise ProtocolError("bad role", role)
        if role == "worker" and not 0 < credit <= p.MAX_CREDIT:
            raise ProtocolError("bad credit", str(credit))
        if role == "producer" and key is not None:
            # So that no other node can send batches or take acks in its name.
            bound = self._keys.setdefault(name, key)
            if bound != key:
                raise ProtocolError("producer id of another key", name)
            self._ledger.bind_key(name, bound)
        if role == "producer" and self.producers.get(name, rid) != rid and self.producers[name] in self._tracker:
            # Two live connections with one producer id would split its acks: the second waits
            # until the first has gone quiet long enough to be dropped.
            raise ProtocolError("producer id in use", name)

    def should_reset(self, rid: bytes, now: float) -> bool:
        """Whether to tell an unknown connection to say hello: once per expiry. A peer's burst
        of messages (heartbeats and results sent before it learnt it was forgotten) gets one
        reset, not one each: a peer that answered each with a hello would start its session
        over again and again, ending the leases each new session was given."""
        last = self._reset_at.get(rid)
        if last is not None and now - last <= self._timing.expiry:
            return False
        self._reset_at[rid] = now
        return True

    def known(self, rid: bytes) -> bool:
        return rid in self.roles

    def join(self, rid: bytes, role: str, name: str, now: float) -> None:
        self.roles[rid] = role
        self._names[rid] = name
        self._reset_at.pop(rid, None)
        self._tracker.seen(rid, now)
        if role == "producer":
            self.producers[name] = rid

    def leave(self, rid: bytes) -> None:
        """Forget a peer's role, and the producer ids it spoke for."""
        role = self.roles.pop(rid, None)
        self._names.pop(rid, None)
        if role == "producer":
            self.producers = {k: v for k, v in self.producers.items() if v != rid}

    def name(self, rid: bytes) -> str:
        """The name a peer gave in its hello (a producer's id)."""
        return self._names[rid]

    def forget(self, rid: bytes) -> None:
        """Stop watching a peer's liveness: it said bye, or cannot be reached."""
        self._tracker.forget(rid)

    def producer_count(self) -> int:
        return len(self.producers)

    def producer(self, producer_id: str) -> bytes | None:
        """The connection acks for this producer id go to."""
        return self.producers.get(producer_id)

    def owns(self, producer_id: str, key: str) -> bool:
        """Whether `key` is the one this producer id is bound to."""
        return self._keys.get(producer_id) == key

    def reload_keys(self) -> None:
        """Read the bindings again: retention drops those of producer ids it forgot."""
        self._keys = self._ledger.producer_keys()

    # --- liveness --------------------------------------------------------------------------
    def heard(self, source: bytes | str, now: float) -> None:
        """Anything at all came in: evidence that the sink's own link works."""
        self._heard.heard(source, now)

    def seen(self, rid: bytes, now: float) -> bool:
        """A control message came from `rid`; whether it is a peer that said hello."""
        self._heard.heard(rid, now)
        if rid in self.roles:
            self._tracker.seen(rid, now)
            return True
        return False

    def expired(self, now: float) -> list[tuple[bytes, bool]]:
        """The peers silent past the expiry, forgotten as they are returned, each with whether
        its silence was its own fault (see silence_was_theirs)."""
        if self._reset_at:  # connections told to say hello that never did
            self._reset_at = {r: t for r, t in self._reset_at.items() if now - t <= self._timing.expiry}
        dead = []
        for peer, last in self._tracker.expired(now):
            rid = cast(bytes, peer)  # the tracker watches only routing ids
            dead.append((rid, self.silence_was_theirs(rid, last)))
        return dead

    def silence_was_theirs(self, rid: bytes, last: float) -> bool:
        """Whether a peer silent since `last` failed, rather than the sink's own link: whether
        a silent worker's batches cost an attempt. If another peer was heard after the worker
        missed its beat, the sink was connected: the worker (or what its batch did to it)
        failed. If every peer fell silent together, the sink was cut off, and its workers'
        batches owe nothing. A worker that was the sink's only peer pays: nothing says the
        sink was cut off."""
        other = self._heard.latest_except(rid)
        if other > last + WITNESS_AFTER * self._timing.heartbeat:
            return True
        return other < last - self._timing.expiry

    def fresh(self, rid: bytes, now: float) -> bool:
        """Heard from within FRESH_BEATS heartbeat intervals: a worker that missed a beat, perhaps
        cut off with the sink's own link, is given nothing new to lose. (One interval would be
        too tight: a worker that beats on time is heard just about one interval apart.)"""
        return rid in self._tracker and self._tracker.idle(rid, now) <= FRESH_BEATS * self._timing.heartbeat

    def idle_ms(self, rid: bytes, now: float) -> int | None:
        return round(self._tracker.idle(rid, now) * 1000) if rid in self._tracker else None

    def to_beat(self, now: float) -> list[bytes]:
        """The peers to send a heartbeat to now: all of them, when one is due."""
        if not self._beat.due(now):
            return []
        return [cast(bytes, rid) for rid in self._tracker.peers()]

    def next_deadline(self) -> float:
        """When the next heartbeat is due, or the quietest peer is about to be silent too long."""
        due = self._beat.next
        expiry = self._tracker.next_expiry()
        if expiry is not None:
            due = min(due, expiry + 1e-3)  # just past it: a peer is dead only once silent for *more* than expiry
        return due
