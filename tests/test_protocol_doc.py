"""docs/PROTOCOL.md is enough to talk to a sink.

A producer, a worker, a subscriber and a status client are written here from the document
alone, with nothing but ``zmq`` and ``msgpack``, and run against a real ``Sink``. Nothing
else from zfan is imported: if these peers work, the document says what they need to know.
Section numbers in comments refer to docs/PROTOCOL.md.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq

from tests.helpers import wait_for
from zfan import Sink

VERSION = 1
DEFAULT_HEARTBEAT_MS = 250  # section 13, until a welcome says otherwise
DEFAULT_LIVENESS = 3


# --- encoding (sections 3 and 4) -----------------------------------------------------------


def header(mtype: str, *fields: Any) -> bytes:
    return msgpack.packb([VERSION, mtype, *fields])


def parse(frame: bytes) -> tuple[str, list[Any]]:
    msg = msgpack.unpackb(frame, raw=False)
    assert isinstance(msg, list) and len(msg) >= 2 and msg[0] == VERSION, msg
    return msg[1], msg[2:]


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def payload_of(records: list[Any]) -> bytes:
    """Records packed one by one behind an array header (section 4)."""
    return array_header(len(records)) + b"".join(msgpack.packb(r) for r in records)


def records_of(payload: bytes) -> list[Any]:
    records = msgpack.unpackb(payload, raw=False)
    assert isinstance(records, list)
    return records


def drain(sock: zmq.Socket) -> list[list[bytes]]:
    out = []
    while True:
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return out


# --- the roles ------------------------------------------------------------------------------


class ControlPeer:
    """A DEALER on the control socket: hello/welcome, heartbeats, reset, epochs (section 6)."""

    role = ""

    def __init__(self, make: Callable[[int], zmq.Socket], control: str, name: str, credit: int) -> None:
        self.make, self.control, self.name, self.credit = make, control, name, credit
        self.heartbeat = DEFAULT_HEARTBEAT_MS / 1000
        self.liveness = DEFAULT_LIVENESS
        self.epoch = 0
        self.welcomed = False
        self.welcomes = 0
        self.resets = 0
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.make(zmq.DEALER)
        sock.connect(self.control)
        now = time.monotonic()
        self.heard, self.next_beat = now, now + self.heartbeat
        self.welcomed = False
        sock.send(header("hello", self.role, self.name, self.credit))
        return sock

    def hello(self) -> None:
        self.welcomed = False
        self.sock.send(header("hello", self.role, self.name, self.credit))

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock]

    def pump(self) -> None:
        now = time.monotonic()
        for frames in drain(self.sock):
            self.heard = now  # any message is a sign of life (6.2)
            mtype, fields = parse(frames[0])
            if mtype == "welcome":
                changed = fields[0] != self.epoch
                self.epoch, self.welcomed = fields[0], True
                self.heartbeat, self.liveness = fields[1] / 1000, fields[2]
                self.welcomes += 1
                self.on_welcome(changed)
            elif mtype == "reset" or (mtype == "heartbeat" and self.welcomed and fields[0] != self.epoch):
                self.resets += 1
                if self.welcomed:  # 6.4: no second hello while one is unanswered
                    self.on_reset()
                    self.hello()  # 6.4: say hello again
            elif mtype != "heartbeat":
                self.on_message(mtype, fields, frames[1:])
        if now - self.heard > self.heartbeat * self.liveness:
            # 6.2: the sink is silent: a new connection, and hello again.
            self.sock.close(linger=0)
            self.sock = self._connect()
            self.on_reset()
        if self.welcomed and now >= self.next_beat:  # 6.1: heartbeats only once welcomed
            self.sock.send(header("heartbeat", self.epoch))
            self.next_beat = now + self.heartbeat
        self.tick(now)

    def on_welcome(self, epoch_changed: bool) -> None:
        pass

    def on_reset(self) -> None:
        pass

    def on_message(self, mtype: str, fields: list[Any], payloads: list[bytes]) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


class HandProducer(ControlPeer):
    """Section 7: hello, then PUSH batches; keep each until acked; resend when due."""

    role = "producer"

    def __init__(
        self,
        make: Callable[[int], zmq.Socket],
        endpoints: dict[str, str],
        producer_id: str,
        resend_after: float | None = 2.0,
    ) -> None:
        super().__init__(make, endpoints["control"], producer_id, 0)
        self.push = make(zmq.PUSH)
        self.push.connect(endpoints["intake"])
        self.resend_after = resend_after
        self.unacked: dict[int, list[Any]] = {}  # seq -> [frames, sent_at]
        self.acks: Counter[int] = Counter()
        self.pushed: Counter[int] = Counter()
        self.watching = False  # 7.4: ask for outcomes after each welcome
        self.waiting: set[int] = set()  # acknowledged, no outcome yet
        self.outcomes: dict[int, tuple[str, str | None]] = {}  # seq -> ("done" | "dead" | "unknown", error)

    def send(self, seq: int, topic: str, records: list[Any]) -> list[bytes]:
        frames = [header("batch", self.name, seq, topic, len(records)), payload_of(records)]
        self.unacked[seq] = [frames, 0.0]
        self.tick(time.monotonic())
        return frames

    def push_again(self, seq: int, frames: list[bytes]) -> None:
        """Push a batch once more, as a producer that lost an ack would."""
        assert self.welcomed
        self.push.send_multipart(frames)
        self.pushed[seq] += 1

    def tick(self, now: float) -> None:
        if not self.welcomed:
            return  # 7.1: batches only after welcome, or their acks have nowhere to go
        for seq, entry in self.unacked.items():
            frames, sent_at = entry
            if not sent_at or (self.resend_after is not None and now - sent_at >= self.resend_after):
                self.push.send_multipart(frames)
                self.pushed[seq] += 1
                entry[1] = now

    def on_welcome(self, epoch_changed: bool) -> None:
        if epoch_changed:  # 6.5: a new sink: everything unacked goes again
            for entry in self.unacked.values():
                entry[1] = 0.0
        if self.watching:
            self.watch(sorted(self.waiting))

    def watch(self, seqs: list[int]) -> None:
        self.watching = True
        self.sock.send(header("watch", seqs))

    def on_message(self, mtype: str, fields: list[Any], payloads: list[bytes]) -> None:
        if mtype == "ack":
            for seq in fields[0]:
                self.acks[seq] += 1
                if self.unacked.pop(seq, None) is not None and self.watching:
                    self.waiting.add(seq)
        elif mtype == "outcome":
            done, dead, errors, unknown = fields
            told = [(seq, "done", None) for seq in done] + [
                (seq, "dead", e) for seq, e in zip(dead, errors, strict=True)
            ]
            for seq, state, error in told + [(seq, "unknown", None) for seq in unknown]:
                self.waiting.discard(seq)
                self.unacked.pop(seq, None)  # 7.4: an outcome also means stored
                self.outcomes[seq] = (state, error)


class HandWorker(ControlPeer):
    """Section 8: hello with credit; answer every lease of the current epoch exactly once."""

    role = "worker"

    def __init__(
        self,
        make: Callable[[int], zmq.Socket],
        control: str,
        name: str,
        credit: int,
        process: Callable[[str, list[Any]], dict[str, list[Any]]],
    ) -> None:
        super().__init__(make, control, name, credit)
        self.process = process
        self.leases: list[tuple[int, int, int, str, int]] = []
        # Called with each lease before it is answered; may send extra (stale) answers.
        self.before_answer: Callable[[HandWorker, tuple[int, int, int, str, int]], None] | None = None
        self.hold = False  # keep leases unanswered until answer_held()
        self.held: list[tuple[list[Any], list[bytes]]] = []
        self.drain_answered = False

    def drain(self) -> None:
        """8.5: lease me nothing more."""
        self.sock.send(header("drain"))

    def answer_held(self) -> None:
        held, self.held = self.held, []
        for fields, payloads in held:
            self.answer(fields, payloads)

    def on_message(self, mtype: str, fields: list[Any], payloads: list[bytes]) -> None:
        if mtype == "drain":
            self.drain_answered = True
            return
        if mtype != "lease" or len(payloads) != 1 or fields[0] != self.epoch:
            return
        self.leases.append(tuple(fields))  # type: ignore[arg-type]
        if self.hold:
            self.held.append((fields, payloads))
        else:
            self.answer(fields, payloads)

    def answer(self, fields: list[Any], payloads: list[bytes]) -> None:
        epoch, batch_id, attempt, topic, count = fields
        records = records_of(payloads[0])
        assert len(records) == count
        if self.before_answer is not None:
            self.before_answer(self, (epoch, batch_id, attempt, topic, count))
        try:
            out = self.process(topic, records)
        except Exception as exc:
            self.sock.send(header("failed", epoch, batch_id, attempt, f"{type(exc).__name__}: {exc}"))
            return
        topics = list(out)
        self.sock.send_multipart(
            [
                header("result", epoch, batch_id, attempt, topics, [len(out[t]) for t in topics]),
                *(payload_of(out[t]) for t in topics),
            ]
        )


class HandSubscriber:
    """Section 9: SUB with prefixes, the sync handshake, per-topic seq checks."""

    def __init__(self, make: Callable[[int], zmq.Socket], results: str, prefixes: list[str]) -> None:
        self.sock = make(zmq.SUB)
        self.sock.connect(results)
        for prefix in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.synced: set[str] = set()
        self.last: dict[str, int] = {}
        self.messages: list[dict[str, Any]] = []
        self.gaps = 0
        self.duplicates = 0
        self.foreign_syncs = 0

    def start_sync(self) -> str:
        """Subscribe to a private sync topic, after every real subscription (9.2)."""
        token = f"zfan.sync.{uuid.uuid4().hex}"
        self.sock.setsockopt(zmq.SUBSCRIBE, token.encode())
        return token

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock]

    def pump(self) -> None:
        for frames in drain(self.sock):
            topic_frame = frames[0].decode()
            if topic_frame.startswith("zfan.sync."):
                mtype, fields = parse(frames[1])
                assert mtype == "sync" and len(frames) == 2
                if fields[0] == topic_frame and topic_frame not in self.synced:
                    self.synced.add(topic_frame)
                    self.sock.setsockopt(zmq.UNSUBSCRIBE, frames[0])
                else:
                    self.foreign_syncs += 1
                continue
            assert len(frames) == 3, frames
            mtype, fields = parse(frames[1])
            assert mtype in ("publish", "dead"), mtype
            topic, seq = fields[0], fields[1]
            assert topic == topic_frame
            last = self.last.get(topic)
            if last is not None and seq <= last:
                self.duplicates += 1
                continue
            if last is not None and seq > last + 1:
                self.gaps += seq - last - 1
            self.last[topic] = seq
            msg = {"type": mtype, "topic": topic, "seq": seq, "batch_id": fields[2], "records": records_of(frames[2])}
            if mtype == "publish":
                msg["count"] = fields[3]
            else:
                msg.update(attempts=fields[3], error=fields[4], source_topic=fields[5])
            self.messages.append(msg)

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["topic"] == topic]


class Loop:
    """Polls every role's sockets and lets each one read, heartbeat and resend."""

    def __init__(self, *roles: Any) -> None:
        self.roles = list(roles)

    def turn(self, timeout: float = 0.05) -> None:
        poller = zmq.Poller()
        for role in self.roles:
            for sock in role.sockets():
                poller.register(sock, zmq.POLLIN)
        poller.poll(timeout * 1000)
        for role in self.roles:
            role.pump()

    def until(self, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        def step() -> Any:
            self.turn()
            return condition()

        return wait_for(step, timeout=timeout, interval=0.001, what=what)

    def sync(self, sub: HandSubscriber) -> None:
        token = sub.start_sync()
        self.until(lambda: token in sub.synced, what="the sink's sync answer")


def query_status(make: Callable[[int], zmq.Socket], control: str) -> dict[str, Any]:
    """Section 10: [1,"status"] from any DEALER, no hello needed."""
    sock = make(zmq.DEALER)
    sock.connect(control)
    sock.send(header("status"))
    assert sock.poll(10_000), "no status reply"
    frames = sock.recv_multipart()
    sock.close(linger=0)
    mtype, fields = parse(frames[0])
    assert mtype == "status" and len(fields) == 1 and isinstance(fields[0], dict)
    return fields[0]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def make(ctx):
    """Sockets of the test's own, every one closed with linger 0 at teardown."""
    made: list[zmq.Socket] = []

    def socket(kind: int) -> zmq.Socket:
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        made.append(s)
        return s

    yield socket
    for s in made:
        s.close(linger=0)


@pytest.fixture
def sink(ctx, ipc, tmp_path):
    s = Sink(
        intake=ipc["intake"],
        control=ipc["control"],
        results=ipc["results"],
        ledger=str(tmp_path / "ledger.db"),
        context=ctx,
    )
    s.start()
    yield s
    s.close()
    assert s.error is None, s.error


def fan_out(topic: str, records: list[Any]) -> dict[str, list[Any]]:
    """Every record goes to two topics (a result with two payload frames)."""
    return {
        "doc.square": [{"n": r["n"], "sq": r["n"] * r["n"]} for r in records],
        "doc.parity": [{"n": r["n"], "odd": r["n"] % 2 == 1} for r in records],
    }


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_roles_written_from_the_spec_deliver_every_record_once(sink, make, ipc):
    batches, per_batch = 20, 50
    sub = HandSubscriber(make, ipc["results"], ["doc."])
    loop = Loop(sub)
    loop.sync(sub)  # before anything is published, so nothing can be missed

    worker = HandWorker(make, ipc["control"], "hand-worker", 4, fan_out)
    producer = HandProducer(make, ipc, f"hand-{uuid.uuid4().hex}")
    loop.roles += [worker, producer]
    loop.until(lambda: worker.welcomed and producer.welcomed, what="both welcomes")
    assert worker.epoch == producer.epoch == sink.epoch >= 1

    for seq in range(1, batches + 1):
        first = (seq - 1) * per_batch
        producer.send(seq, "numbers", [{"n": n} for n in range(first, first + per_batch)])

    loop.until(lambda: not producer.unacked, what="acks for every seq")
    loop.until(
        lambda: len(sub.on("doc.square")) == batches and len(sub.on("doc.parity")) == batches, what="every result"
    )
    loop.sync(sub)  # a barrier: everything published before the answer has arrived

    assert set(producer.acks) == set(range(1, batches + 1))
    assert len(worker.leases) == batches
    assert {lease[2] for lease in worker.leases} == {1}  # every batch on its first attempt
    assert {lease[0] for lease in worker.leases} == {sink.epoch}

    for topic in ("doc.square", "doc.parity"):
        msgs = sub.on(topic)
        assert [m["seq"] for m in msgs] == list(range(1, batches + 1)), topic
        assert len({m["batch_id"] for m in msgs}) == batches
        assert all(m["count"] == per_batch == len(m["records"]) for m in msgs)
    assert sub.gaps == 0 and sub.duplicates == 0
    assert len(sub.messages) == 2 * batches

    squares = sorted((r for m in sub.on("doc.square") for r in m["records"]), key=lambda r: r["n"])
    assert squares == [{"n": n, "sq": n * n} for n in range(batches * per_batch)]
    parity = sorted((r for m in sub.on("doc.parity") for r in m["records"]), key=lambda r: r["n"])
    assert parity == [{"n": n, "odd": n % 2 == 1} for n in range(batches * per_batch)]

    status = query_status(make, ipc["control"])
    assert status["epoch"] == sink.epoch
    assert status["batches_in"] == batches and status["records_in"] == batches * per_batch
    assert status["done"] == status["batches_done"] == batches
    assert status["published"] == 2 * batches
    assert status["pending"] == status["leased"] == status["dead"] == 0
    assert status["rejected"] == {}
    assert "fenced_results" not in status
    assert [w["name"] for w in status["workers"]] == ["hand-worker"]
    assert status["producers"] == 1


@pytest.mark.timeout(30)
def test_duplicate_batch_is_acked_twice_and_processed_once(sink, make, ipc):
    sub = HandSubscriber(make, ipc["results"], ["doc."])
    loop = Loop(sub)
    loop.sync(sub)
    worker = HandWorker(make, ipc["control"], "hand-worker", 2, fan_out)
    producer = HandProducer(make, ipc, "dup-producer", resend_after=None)  # only the pushes we make
    loop.roles += [worker, producer]
    loop.until(lambda: worker.welcomed and producer.welcomed, what="both welcomes")

    first = producer.send(1, "numbers", [{"n": n} for n in range(10)])
    loop.until(lambda: producer.acks[1] == 1, what="the first ack of seq 1")
    producer.push_again(1, first)  # as if the ack had been lost
    loop.until(lambda: producer.acks[1] == 2, what="the second ack of seq 1")
    producer.send(2, "numbers", [{"n": n} for n in range(10, 20)])
    loop.until(lambda: producer.acks[2] == 1, what="the ack of seq 2")
    loop.until(lambda: len(sub.messages) == 4, what="the results of two batches")

    status = loop.until(
        lambda: (s := query_status(make, ipc["control"]))["published"] == 4 and s,
        what="the sink to have published both batches",
    )
    loop.sync(sub)  # everything published so far has arrived

    assert producer.pushed == {1: 2, 2: 1}
    assert producer.acks == {1: 2, 2: 1}
    assert [lease[1] for lease in worker.leases] == sorted({lease[1] for lease in worker.leases})
    assert len(worker.leases) == 2
    for topic in ("doc.square", "doc.parity"):
        assert [m["seq"] for m in sub.on(topic)] == [1, 2]
    assert sorted(r["n"] for m in sub.on("doc.square") for r in m["records"]) == list(range(20))
    assert sub.duplicates == 0 and sub.gaps == 0
    assert status["duplicate_batches"] == 1
    assert status["batches_in"] == 2 and status["done"] == 2


@pytest.mark.timeout(30)
def test_failed_batch_is_replayed_then_dead_lettered_and_stale_answers_are_fenced(sink, make, ipc):
    sub = HandSubscriber(make, ipc["results"], ["doc.", "zfan.dead"])
    loop = Loop(sub)
    loop.sync(sub)

    def process(topic: str, records: list[Any]) -> dict[str, list[Any]]:
        if topic == "doom":
            raise ValueError("cannot process doom")
        return fan_out(topic, records)

    def stale_answers(w: HandWorker, lease: tuple[int, int, int, str, int]) -> None:
        epoch, batch_id, attempt, topic, count = lease
        if topic == "doom" and attempt == 1:  # answers no lease asked for: fenced (8.3)
            payload = payload_of([{"n": -1, "sq": 1}])
            w.sock.send_multipart([header("result", epoch, batch_id, attempt + 1, ["doc.square"], [1]), payload])
            w.sock.send_multipart([header("result", epoch + 1, batch_id, attempt, ["doc.square"], [1]), payload])

    worker = HandWorker(make, ipc["control"], "hand-worker", 4, process)
    worker.before_answer = stale_answers
    producer = HandProducer(make, ipc, "doom-producer")
    loop.roles += [worker, producer]
    loop.until(lambda: worker.welcomed and producer.welcomed, what="both welcomes")

    doomed = [{"n": n, "why": "doomed"} for n in range(5)]
    producer.send(1, "doom", doomed)
    producer.send(2, "numbers", [{"n": n} for n in range(5)])
    loop.until(lambda: not producer.unacked, what="both acks")
    loop.until(lambda: sub.on("zfan.dead") and len(sub.on("doc.square")) == 1, what="the dead letter")
    status = loop.until(
        lambda: (s := query_status(make, ipc["control"]))["published"] == 3 and s, what="everything published"
    )
    loop.sync(sub)

    doom_leases = [lease for lease in worker.leases if lease[3] == "doom"]
    assert [lease[2] for lease in doom_leases] == [1, 2, 3]  # max attempts is 3
    assert len({lease[1] for lease in doom_leases}) == 1

    [dead] = sub.on("zfan.dead")
    assert dead["type"] == "dead" and dead["seq"] == 1
    assert dead["batch_id"] == doom_leases[0][1]
    assert dead["attempts"] == 3
    assert dead["source_topic"] == "doom"
    assert "cannot process doom" in dead["error"]
    assert dead["records"] == doomed  # the batch's own payload

    # The fenced answers published nothing: only the good batch's result is on doc.square.
    [square] = sub.on("doc.square")
    assert square["seq"] == 1 and square["records"] == [{"n": n, "sq": n * n} for n in range(5)]
    assert status["fenced_results"] == 2
    assert status["batches_failed"] == 3 and status["replays"] == 2
    assert status["dead"] == 1 and status["done"] == 1
    assert status["rejected"] == {}


@pytest.mark.timeout(30)
def test_rejected_messages_are_dropped_and_counted_without_reply(sink, make, ipc):
    push = make(zmq.PUSH)
    push.connect(ipc["intake"])
    push.send_multipart([header("batch", "p", 1, "zfan.mine", 1), payload_of([1])])  # reserved topic
    push.send_multipart([header("batch", "p", 2, "t", 1)])  # no payload frame
    push.send_multipart([msgpack.packb([2, "batch", "p", 3, "t", 1]), payload_of([1])])  # version 2

    peer = make(zmq.DEALER)
    peer.connect(ipc["control"])
    peer.send(header("hello", "worker", "greedy", 0))  # credit must be 1..1000
    peer.send_multipart([b"", header("status")])  # a REQ-style empty delimiter first
    peer.send(header("ack", [1]))  # a sink-to-peer type
    peer.send(header("heartbeat", 0))  # from a connection the sink does not know
    mtype, fields = parse(wait_for(lambda: peer.poll(50) and peer.recv_multipart(), what="a reset")[0])
    assert (mtype, fields) == ("reset", ["unknown peer: send hello"])

    expected = {
        "reserved topic": 1,
        "bad frame count": 1,
        "bad version": 1,
        "bad credit": 1,
        "bad header": 1,
        "unexpected type": 1,
    }
    status = wait_for(
        lambda: (s := query_status(make, ipc["control"]))["rejected"] == expected and s, what="every rejection counted"
    )
    assert status["resets"] == 1
    assert "batches_in" not in status and status["workers"] == []
    # The rejected messages were answered by nothing: the reset above was the first reply, and
    # a status request on the same connection is answered next.
    peer.send(header("status"))
    frames = wait_for(lambda: peer.poll(50) and peer.recv_multipart(), what="the status reply")
    assert parse(frames[0])[0] == "status"


def ask(sock: zmq.Socket, *request: Any) -> tuple[str, list[Any]]:
    """One request on a subscriber's control DEALER (section 5.4) and its one answer."""
    sock.send(header(*request))
    assert sock.poll(10_000), f"no answer to {request[0]}"
    return parse(sock.recv_multipart()[0])


def heads_sweep(sock: zmq.Socket, prefixes: list[str], after: int) -> tuple[dict[str, int], int, int]:
    """Pages of `topics` from `after` until one says no more (sections 5.4, 9.5): the heads,
    the position of the next poll, and the pages read."""
    heads: dict[str, int] = {}
    pages = 0
    more = True
    while more:
        mtype, (echoed, topics, seqs, upto, more) = ask(sock, "heads", prefixes, after)
        assert mtype == "topics" and echoed == after and len(topics) == len(seqs)
        heads.update(zip(topics, seqs, strict=True))
        after, pages = upto, pages + 1
    return heads, after, pages


def cursor_pages(sock: zmq.Socket, name: str) -> list[list[tuple[str, int]]]:
    pages: list[list[tuple[str, int]]] = []
    after, more = "", True
    while more:
        mtype, (echoed_name, echoed, topics, seqs, more) = ask(sock, "get_cursor", name, after)
        assert (mtype, echoed_name, echoed) == ("cursor", name, after)
        pages.append(list(zip(topics, seqs, strict=True)))
        if more:
            after = topics[-1]
    return pages


@pytest.mark.timeout(60)
def test_heads_and_a_cursor_of_more_topics_than_one_answer_holds_come_in_pages(sink, make, ipc):
    n = 12_000  # more than the 10 000 topics one answer may list

    def own_topic(topic: str, records: list[Any]) -> dict[str, list[Any]]:
        return {f"many.{r['n']:05d}": [r] for r in records}

    worker = HandWorker(make, ipc["control"], "hand-worker", 2, own_topic)
    producer = HandProducer(make, ipc, "many-producer")
    loop = Loop(worker, producer)
    loop.until(lambda: worker.welcomed and producer.welcomed, what="both welcomes")
    producer.send(1, "numbers", [{"n": i} for i in range(n // 2)])
    producer.send(2, "numbers", [{"n": i} for i in range(n // 2, n)])
    loop.until(lambda: query_status(make, ipc["control"]).get("published") == n, what="every result published")

    sock = make(zmq.DEALER)
    sock.connect(ipc["control"])  # no hello needed (5.4)
    topics = [f"many.{i:05d}" for i in range(n)]
    heads, upto, pages = heads_sweep(sock, ["many."], 0)
    assert heads == dict.fromkeys(topics, 1) and pages == 2
    assert heads_sweep(sock, ["many."], upto) == ({}, upto, 1), "a poll lists only what changed since"
    assert heads_sweep(sock, ["nothing."], 0)[0] == {}

    positions = [(t, 1) for t in topics]
    for part in (positions[: n // 2], positions[n // 2 :]):
        sock.send(header("commit", "doc-durable", [t for t, _ in part], [s for _, s in part]))
    assert cursor_pages(sock, "nobody") == [[]], "nothing stored: a first run"
    pages_read = loop.until(
        lambda: (c := cursor_pages(sock, "doc-durable")) and len(c) > 1 and c, what="the committed positions"
    )
    assert [pair for page in pages_read for pair in page] == positions


@pytest.mark.timeout(30)
def test_a_watching_producer_is_told_what_became_of_each_batch(sink, make, ipc):
    """7.4: outcomes after acks, dead ones with their error's last line; a second watch is
    answered at once from the ledger, with the seqs the sink never had as unknown."""

    def process(topic: str, records: list[Any]) -> dict[str, list[Any]]:
        if any(r.get("bad") for r in records):
            raise KeyError("value")  # the worker's error line: "KeyError: 'value'"
        return fan_out(topic, records)

    worker = HandWorker(make, ipc["control"], "hand-worker", 4, process)
    producer = HandProducer(make, ipc, "watching-producer")
    loop = Loop(worker, producer)
    loop.until(lambda: worker.welcomed and producer.welcomed, what="both welcomes")
    producer.watch([])
    for seq in (1, 2, 3):
        producer.send(seq, "numbers", [{"n": seq, "bad": seq == 2}])
    loop.until(lambda: len(producer.outcomes) == 3, what="three outcomes")
    assert producer.outcomes == {1: ("done", None), 2: ("dead", "KeyError: 'value'"), 3: ("done", None)}
    assert producer.acks == Counter({1: 1, 2: 1, 3: 1})  # each acknowledged before it ended

    producer.outcomes.clear()
    producer.watch([1, 2, 3, 77])  # 77 was never sent
    loop.until(lambda: len(producer.outcomes) == 4, what="the answer to a second watch")
    assert producer.outcomes[2] == ("dead", "KeyError: 'value'") and producer.outcomes[77] == ("unknown", None)
    assert producer.outcomes[1] == producer.outcomes[3] == ("done", None)


@pytest.mark.timeout(30)
def test_a_draining_worker_finishes_what_it_holds_and_nothing_is_replayed(sink, make, ipc):
    """8.5: after drain no new lease; leases sent before it arrive before its echo."""
    first = HandWorker(make, ipc["control"], "drainer", 2, fan_out)
    first.hold = True
    producer = HandProducer(make, ipc, "drain-producer")
    loop = Loop(first, producer)
    loop.until(lambda: first.welcomed and producer.welcomed, what="both welcomes")
    for seq in range(1, 5):
        producer.send(seq, "numbers", [{"n": seq}])
    loop.until(lambda: len(first.held) == 2 and not producer.unacked, what="two leases held, all acked")
    first.drain()
    loop.until(lambda: first.drain_answered, what="the sink's drain answer")
    producer.send(5, "numbers", [{"n": 5}])
    loop.until(lambda: not producer.unacked, what="the ack of batch 5")
    assert len(first.leases) == 2  # nothing after the drain, credit or not
    first.answer_held()
    first.sock.send(header("bye"))
    status = loop.until(
        lambda: (s := query_status(make, ipc["control"]))["done"] == 2 and not s["workers"] and s,
        what="the drained worker's answers and bye",
    )
    assert status.get("replays", 0) == 0 and status["pending"] == 3 and status["leased"] == 0

    second = HandWorker(make, ipc["control"], "finisher", 4, fan_out)
    loop.roles.append(second)
    loop.until(lambda: query_status(make, ipc["control"])["done"] == 5, what="the rest, by another worker")


@pytest.mark.timeout(30)
def test_a_burst_from_an_unknown_connection_gets_one_reset(sink, make, ipc):
    """6.4: at most one reset per connection and expiry, however many messages needed one."""
    sock = make(zmq.DEALER)
    sock.connect(ipc["control"])
    for _ in range(3):
        sock.send(header("heartbeat", 0))  # what a forgotten peer sends before it knows
    sock.send(header("status"))  # answered after the three: the same connection keeps order
    types = []
    while not types or types[-1] != "status":
        assert sock.poll(10_000), "no answer from the sink"
        types.append(parse(sock.recv_multipart()[0])[0])
    assert types == ["reset", "status"]


def test_the_numbers_the_document_gives_agree_with_each_other_and_the_sink():
    """The publish high-water mark appears in sections 2, 13 and 17.2; heartbeats come only after
    a welcome; every integer the reference peers send is below 2^53 (section 3.3)."""
    import re
    from pathlib import Path

    from zfan.config import SinkSettings  # only the defaults, to compare with what the text says

    text = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    hwm = SinkSettings().publish_hwm
    said = [
        re.search(r"`XPUB` \(([\d ]+) messages by default", text),
        re.search(r"\| results `SNDHWM` \| ([\d ]+) messages per subscriber", text),
        re.search(r"\| results queued to one subscriber \| `SNDHWM` = ([\d ]+) \(`publish_hwm`\)", text),
    ]
    assert all(said), said
    assert {int(m.group(1).replace(" ", "")) for m in said if m} == {hwm}
    assert "or 0 before the first one" not in text  # 5.2 once allowed a heartbeat before welcome
    assert "MUST NOT send\n  `heartbeat`" in text
    assert "below 2^53" in text


@pytest.mark.timeout(30)
def test_the_reference_producer_numbers_its_batches_below_2_53(sink, ipc, tmp_path):
    """3.3 and 7.2: a double holds every seq exactly."""
    import sqlite3
    from contextlib import closing

    from zfan import Producer

    with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=1) as prod:
        prod.send({"n": 1})
        prod.send({"n": 2})
        prod.flush(10)
    with closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        seqs = [seq for (seq,) in db.execute("SELECT seq FROM batches")]
    assert len(seqs) == 2 and all(0 < seq < 2**53 for seq in seqs)
