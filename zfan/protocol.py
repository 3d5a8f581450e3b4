"""The wire protocol: message types, their header fields, and safe decoding.

Every message is a ZeroMQ multipart message whose header frame is a msgpack array
``[VERSION, type, field, ...]``; batches and results carry their records as further frames of
msgpack bytes, which the sink stores and forwards without decoding. docs/PROTOCOL.md is the
specification; this module is its one implementation.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from .errors import ProtocolError, SerializationError

VERSION = 1

# Sockets and who sends what on them.
# intake:  producer PUSH -> sink PULL
BATCH = "batch"
BATCHES = "batches"  # several batches of one producer (once the sink has said it takes groups)
# control: any DEALER -> sink ROUTER
HELLO = "hello"
HEARTBEAT = "heartbeat"
RESULT = "result"
FAILED = "failed"
STATUS = "status"
BYE = "bye"
WATCH = "watch"  # a producer: tell me how my batches end
DRAIN = "drain"  # a worker: lease me nothing more (the sink echoes it)
FEATURES = "features"  # after the welcome, both ways: what each side takes beyond version 1's basics
RESULTS = "results"  # a worker, with the groups feature: the answers of several leases
# control: a subscriber's DEALER -> sink ROUTER (no hello needed), and the answers
REPLAY = "replay"
HEADS = "heads"
GET_CURSOR = "get_cursor"
COMMIT = "commit"
MISSING = "missing"
TOPICS = "topics"
CURSOR = "cursor"
# control: any DEALER -> sink ROUTER (no hello needed): the dead letters, and the answer
DEAD_LIST = "dead_list"
DEAD_SHOW = "dead_show"
DEAD_REQUEUE = "dead_requeue"
DEAD_PURGE = "dead_purge"
DEAD_REPLY = "dead_reply"
# control: sink ROUTER -> DEALER
WELCOME = "welcome"
ACK = "ack"
LEASE = "lease"
LEASES = "leases"  # several leases, to a worker that takes groups
RESET = "reset"
OUTCOME = "outcome"  # to a producer that watches: how some of its batches ended
# results: sink XPUB -> SUB (first frame is the topic)
PUBLISH = "publish"
PUBLISHES = "publishes"  # several results of one topic
DEAD = "dead"
SYNC = "sync"

ROLES = ("producer", "worker", "subscriber", "client")
# Features a peer may name in `features`. GROUPS: several batches, leases, results or publishes
# of one topic in one message: the cost of a message is paid once for the group
# (docs/PROTOCOL.md, section 5.7).
GROUPS = "groups"
FEATURE_NAMES = (GROUPS,)
MAX_GROUP = 1000  # entries (batches, leases, results) in one group
DEAD_TOPIC = "zfan.dead"
SYNC_PREFIX = "zfan.sync."
SYNC_GROUPS_PREFIX = "zfan.sync.groups."  # the sync topic of a subscriber that takes `publishes`

# Limits on header fields; payload limits are in decode_records().
MAX_HEADER_BYTES = 1 << 20
MAX_NAME = 128  # producer ids, worker names
MAX_TOPIC = 255  # bytes of UTF-8
MAX_TOPICS = 10_000  # topics one result may fan out to
MAX_ERROR = 64 * 1024  # traceback text of a failed batch
MAX_SUMMARY = 1024  # bytes of the one-line error an outcome gives for a dead-lettered batch
MAX_SEQS = 100_000  # seqs one ack carries
MAX_CREDIT = 1000
MAX_REPLAY = 1000  # results the sink sends for one replay request
MAX_DEAD_PAGE = 100  # dead letters in one answer to dead_list
MAX_RECORDS = 10_000_000  # records one batch or result may claim to hold
# Integers are unsigned and below 2**63: SQLite stores signed 64-bit integers. Every integer
# zfan itself sends is below 2**53 (exact in a double); larger ones come only from producers of
# earlier versions, which numbered their batches from the wall clock in nanoseconds.
MAX_INT = (1 << 63) - 1
MAX_SAFE_INT = (1 << 53) - 1

_STR, _INT, _STRS, _INTS, _MAP, _BOOL = "str", "int", "list[str]", "list[int]", "map", "bool"
_PREFIXES = "list[prefix]"  # topic prefixes: strings that may be empty (the empty one matches all)
_KINDS = {"str": _STR, "int": _INT, "list[str]": _STRS, "list[int]": _INTS, "bool": _BOOL, "dict[str, Any]": _MAP}


_NON_EMPTY = frozenset({"producer_id", "name", "topic", "source_topic", "role", "token", "route"})
_STR_LIMITS = {
    "producer_id": MAX_NAME,
    "name": MAX_NAME,
    "topic": MAX_TOPIC,
    "source_topic": MAX_TOPIC,
    "role": 16,
    "error": MAX_ERROR,
    "reason": 1024,
    "token": MAX_TOPIC,
    "route": MAX_NAME,
}


def _validator(name: str, kind: str) -> Callable[[Any], bool]:
    """The check of one header field, made once per field of each message type."""
    if kind == _INT:
        top = MAX_RECORDS if name == "count" else MAX_INT
        return lambda v: type(v) is int and 0 <= v <= top
    if kind == _STR:
        limit, empty_ok = _STR_LIMITS.get(name, MAX_TOPIC), name not in _NON_EMPTY
        short = limit // 4  # characters that fit the limit in any encoding: no need to encode them
        return lambda v: type(v) is str and (empty_ok or v != "") and (len(v) <= short or len(v.encode()) <= limit)
    if kind == _INTS:
        top = MAX_RECORDS if name == "counts" else MAX_INT
        longest = max(MAX_SEQS, MAX_TOPICS)
        return lambda v: type(v) is list and len(v) <= longest and all(type(x) is int and 0 <= x <= top for x in v)
    if kind == _STRS and name == "errors":
        return lambda v: (
            type(v) is list and len(v) <= MAX_SEQS and all(type(x) is str and len(x.encode()) <= MAX_SUMMARY for x in v)
        )
    if kind in (_STRS, _PREFIXES):
        empty_ok = kind == _PREFIXES  # the empty prefix matches every topic; a topic is never empty
        return lambda v: (
            type(v) is list
            and len(v) <= MAX_TOPICS
            and all(
                type(x) is str and (empty_ok or x != "") and (len(x) <= MAX_TOPIC // 4 or len(x.encode()) <= MAX_TOPIC)
                for x in v
            )
        )
    if kind == _BOOL:
        return lambda v: type(v) is bool
    return lambda v: type(v) is dict and _plain(v)


def _plain(value: Any, depth: int = 0) -> bool:
    """Only plain values, a few levels deep."""
    if depth > 4:
        return False
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v, depth + 1) for k, v in value.items())
    return False


# --- the messages ---------------------------------------------------------------------------
# One frozen class per message type. Header fields come in the order declared; `payload`
# (one frame) and `payloads` (a frame per topic) are the frames after the header.


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]  # header fields: (name, kind)
    PAYLOADS: ClassVar[int | None]  # payload frames after the header; None: one per entry of a list
    # Worked out once per class, for the hot path: the header's values in order, a check per
    # field, the lists that must be of one length, and those the payload frames follow.
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]
    _checks: ClassVar[tuple[tuple[str, Callable[[Any], bool]], ...]]
    _parallel: ClassVar[tuple[tuple[int, ...], ...]]
    _framed: ClassVar[tuple[int, ...]]
    _sizes: ClassVar[int | None]  # a group's `sizes`: the bytes of each entry in its payload frame
    _spans: ClassVar[tuple[int, int] | None]  # a group of results' `spans` (each lease's topics), and `topics`
    # Trailing header fields that may be absent on the wire (added after version 1's first
    # form): their values when absent, in order.
    _defaults: ClassVar[tuple[Callable[[], Any], ...]]


MESSAGES: dict[str, type[Message]] = {}
# Messages that carry parallel lists must have them of equal length ("bad field")...
PARALLEL: dict[str, tuple[tuple[str, ...], ...]] = {
    TOPICS: (("topics", "seqs"),),
    CURSOR: (("topics", "seqs"),),
    COMMIT: (("topics", "seqs"),),
    OUTCOME: (("dead", "errors"),),
    BATCHES: (("seqs", "topics", "counts", "sizes"),),
    LEASES: (("batch_ids", "attempts", "topics", "counts", "sizes"),),
    RESULTS: (("batch_ids", "attempts", "spans"), ("topics", "counts", "sizes")),
    PUBLISHES: (("seqs", "batch_ids", "counts", "sizes"),),
}
# ... and a result, with a payload frame per topic, must have as many frames ("bad frame count").
FRAMED = {RESULT: ("topics", "counts")}
M = TypeVar("M", bound=type[Message])
T = TypeVar("T")


def _message(mtype: str) -> Callable[[M], M]:
    def register(cls: M) -> M:
        names = [f for f in dataclasses.fields(cls) if f.name not in ("payload", "payloads")]
        cls.TYPE = mtype
        cls.FIELDS = tuple((f.name, _PREFIXES if f.name == "prefixes" else _KINDS[str(f.type)]) for f in names)
        cls.PAYLOADS = None if "payloads" in cls.__dataclass_fields__ else int("payload" in cls.__dataclass_fields__)
        header = [name for name, _ in cls.FIELDS]
        get = operator.attrgetter(*header) if header else (lambda msg: ())
        cls._values = get if len(header) > 1 else (lambda msg: (get(msg),) if header else ())
        cls._checks = tuple((name, _validator(name, kind)) for name, kind in cls.FIELDS)
        cls._parallel = tuple(tuple(header.index(name) for name in group) for group in PARALLEL.get(mtype, ()))
        cls._framed = tuple(header.index(name) for name in FRAMED.get(mtype, ()))
        cls._sizes = header.index("sizes") if "sizes" in header else None
        cls._spans = (header.index("spans"), header.index("topics")) if "spans" in header else None
        cls._defaults = tuple(_default_of(f) for f in names if _default_of(f) is not None)  # type: ignore[misc]
        if mtype != STATUS or cls.FIELDS == ():  # the status reply shares its type with the request
            MESSAGES[mtype] = cls
        _set_slots_directly(cls)
        return cls

    return register


def _default_of(f: dataclasses.Field[Any]) -> Callable[[], Any] | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return lambda: value
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory
    return None


def _set_slots_directly(cls: type[Message]) -> None:
    """Give a message class an __init__ that fills its slots through their descriptors. A frozen
    dataclass's own __init__ goes through object.__setattr__ for each field, which costs more
    than the rest of decoding a message; the instances stay frozen all the same."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    scope: dict[str, Any] = {f"_set_{name}": getattr(cls, name).__set__ for name in names}
    params, body = [], ""
    for f in fields:
        default = _default_of(f)
        if default is None:
            params.append(f.name)
            body += f"\n    _set_{f.name}(self, {f.name})"
        else:  # a default made afresh for each message, as a dataclass's default_factory is
            scope[f"_default_{f.name}"] = default
            params.append(f"{f.name}=_MISSING")
            body += f"\n    _set_{f.name}(self, _default_{f.name}() if {f.name} is _MISSING else {f.name})"
    scope["_MISSING"] = dataclasses.MISSING
    code: dict[str, Any] = {}
    exec(f"def __init__(self, {', '.join(params)}):{body or chr(10) + '    pass'}", scope, code)
    code["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = code["__init__"]  # type: ignore[method-assign]


# intake: producer PUSH -> sink PULL
@_message(BATCH)
@dataclass(frozen=True, slots=True)
class Batch(Message):
    producer_id: str
    seq: int
    topic: str
    count: int
    payload: bytes


@_message(BATCHES)
@dataclass(frozen=True, slots=True)
class Batches(Message):
    """Several batches of one producer in one message: entry i is the batch (producer_id,
    seqs[i], topics[i], counts[i]) whose payload is the next sizes[i] bytes of `payload`."""

    producer_id: str
    seqs: list[int]
    topics: list[str]
    counts: list[int]
    sizes: list[int]
    payload: bytes

    def payloads(self) -> list[bytes]:
        return cut(self.payload, self.sizes)


# control: any DEALER -> sink ROUTER
@_message(HELLO)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    role: str
    name: str
    credit: int
    # The app a worker runs (section 8.6): it is leased only batches of that route. Optional on
    # the wire: a hello of three fields is one of DEFAULT_ROUTE.
    route: str = "default"


@_message(HEARTBEAT)
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    epoch: int


@_message(RESULT)
@dataclass(frozen=True, slots=True)
class Result(Message):
    epoch: int
    batch_id: int
    attempt: int
    topics: list[str]
    counts: list[int]
    payloads: list[bytes]


@_message(RESULTS)
@dataclass(frozen=True, slots=True)
class Results(Message):
    """The results of several leases: lease i (batch_ids[i], attempts[i]) has the next spans[i]
    entries of topics, counts and sizes (0 when its function returned nothing), and entry j's
    records are the next sizes[j] bytes of `payload`."""

    epoch: int
    batch_ids: list[int]
    attempts: list[int]
    spans: list[int]
    topics: list[str]
    counts: list[int]
    sizes: list[int]
    payload: bytes

    def split(self) -> list[Result]:
        """One result per lease, in order."""
        out, at = [], 0
        payloads = cut(self.payload, self.sizes)
        for batch_id, attempt, span in zip(self.batch_ids, self.attempts, self.spans, strict=False):
            end = at + span
            topics, counts, data = self.topics[at:end], self.counts[at:end], payloads[at:end]
            out.append(Result(self.epoch, batch_id, attempt, topics, counts, data))
            at = end
        return out


@_message(FEATURES)
@dataclass(frozen=True, slots=True)
class Features(Message):
    """What a peer takes beyond version 1's basics, and the largest frame and message it takes:
    a client sends it after its welcome, and the sink answers with the names it shares and its
    own limits."""

    names: list[str]
    max_frame: int
    max_message: int


@_message(FAILED)
@dataclass(frozen=True, slots=True)
class Failed(Message):
    epoch: int
    batch_id: int
    attempt: int
    error: str
    # The exception's class and its bases, most derived first ("ConnectionRefusedError",
    # "ConnectionError", "OSError", ...), for the route's retry policy (section 8.4). Optional on
    # the wire: absent, the sink reads the class from the error's last line.
    kinds: list[str] = dataclasses.field(default_factory=list)


@_message(STATUS)
@dataclass(frozen=True, slots=True)
class Status(Message):
    pass


@_message(STATUS)
@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    info: dict[str, Any]


@_message(BYE)
@dataclass(frozen=True, slots=True)
class Bye(Message):
    pass


@_message(WATCH)
@dataclass(frozen=True, slots=True)
class Watch(Message):
    """From a producer: send me an outcome for each of my batches as it ends, from now on in
    this session, and at once for these seqs if they have ended already."""

    seqs: list[int]


@_message(DRAIN)
@dataclass(frozen=True, slots=True)
class Drain(Message):
    """From a worker: lease me nothing more. The sink echoes it: every lease it sent before
    arrives before the echo."""


# control: sink ROUTER -> DEALER
@_message(WELCOME)
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    epoch: int
    heartbeat_ms: int
    liveness: int


@_message(ACK)
@dataclass(frozen=True, slots=True)
class Ack(Message):
    seqs: list[int]


@_message(OUTCOME)
@dataclass(frozen=True, slots=True)
class Outcome(Message):
    """To a producer that watches: its batches (by seq) whose results are stored (`done`), that
    were dead-lettered (`dead`, each with the last line of its error in `errors`), and that the
    sink no longer remembers (`unknown`: their rows were pruned)."""

    done: list[int]
    dead: list[int]
    errors: list[str]
    unknown: list[int]


@_message(LEASE)
@dataclass(frozen=True, slots=True)
class Lease(Message):
    epoch: int
    batch_id: int
    attempt: int
    topic: str
    count: int
    payload: bytes


@_message(LEASES)
@dataclass(frozen=True, slots=True)
class Leases(Message):
    """Several leases in one message: entry i is the lease (epoch, batch_ids[i], attempts[i],
    topics[i], counts[i]) whose payload is the next sizes[i] bytes of `payload`."""

    epoch: int
    batch_ids: list[int]
    attempts: list[int]
    topics: list[str]
    counts: list[int]
    sizes: list[int]
    payload: bytes

    def split(self) -> list[Lease]:
        """One lease per entry, in order."""
        e, payloads = self.epoch, cut(self.payload, self.sizes)
        parts = zip(self.batch_ids, self.attempts, self.topics, self.counts, payloads, strict=False)
        return [Lease(e, b, a, t, c, data) for b, a, t, c, data in parts]


@_message(RESET)
@dataclass(frozen=True, slots=True)
class Reset(Message):
    reason: str


# results: sink XPUB -> SUB, after a first frame that is the topic; also replayed on control
@_message(PUBLISH)
@dataclass(frozen=True, slots=True)
class Publish(Message):
    topic: str
    seq: int
    batch_id: int
    count: int
    payload: bytes


@_message(PUBLISHES)
@dataclass(frozen=True, slots=True)
class Publishes(Message):
    """Several results of one topic in one message: entry i is the publish (topic, seqs[i],
    batch_ids[i], counts[i]) whose records are the next sizes[i] bytes of `payload`."""

    topic: str
    seqs: list[int]
    batch_ids: list[int]
    counts: list[int]
    sizes: list[int]
    payload: bytes

    def split(self) -> list[Publish]:
        """One publish per entry, in order."""
        t = self.topic
        parts = zip(self.seqs, self.batch_ids, self.counts, cut(self.payload, self.sizes), strict=False)
        return [Publish(t, seq, b, c, data) for seq, b, c, data in parts]


@_message(DEAD)
@dataclass(frozen=True, slots=True)
class Dead(Message):
    topic: str
    seq: int
    batch_id: int
    attempts: int
    error: str
    source_topic: str
    payload: bytes


@_message(SYNC)
@dataclass(frozen=True, slots=True)
class Sync(Message):
    token: str


# control: any DEALER -> sink ROUTER (no hello needed): the dead letters
@_message(DEAD_LIST)
@dataclass(frozen=True, slots=True)
class DeadList(Message):
    """The dead-lettered batches with ids above `after` whose topic starts with `prefix`, at most
    `limit` (and MAX_DEAD_PAGE) of them, oldest first."""

    prefix: str
    after: int
    limit: int


@_message(DEAD_SHOW)
@dataclass(frozen=True, slots=True)
class DeadShow(Message):
    batch_id: int


@_message(DEAD_REQUEUE)
@dataclass(frozen=True, slots=True)
class DeadRequeue(Message):
    """Put dead-lettered batches back to pending, with their attempts from zero: `batch_ids`, or
    with `every` each one whose topic starts with `prefix`."""

    batch_ids: list[int]
    every: bool
    prefix: str


@_message(DEAD_PURGE)
@dataclass(frozen=True, slots=True)
class DeadPurge(Message):
    """Forget dead-lettered batches' records, chosen as for dead_requeue."""

    batch_ids: list[int]
    every: bool
    prefix: str


@_message(DEAD_REPLY)
@dataclass(frozen=True, slots=True)
class DeadReply(Message):
    """The answer to any of the four: `info` (see PROTOCOL.md), and for dead_show the batch's
    records as it came (msgpack), else an empty frame."""

    info: dict[str, Any]
    payload: bytes


# control: a subscriber's DEALER -> sink ROUTER (no hello needed), and the answers
@_message(REPLAY)
@dataclass(frozen=True, slots=True)
class Replay(Message):
    topic: str
    first: int
    last: int


@_message(MISSING)
@dataclass(frozen=True, slots=True)
class Missing(Message):
    topic: str
    first: int
    last: int
    reason: str


# Heads and cursors come in pages: `after` is where a page starts, echoed in its answer so
# that a repeated request's answer is told apart; `more` says another page follows.
@_message(HEADS)
@dataclass(frozen=True, slots=True)
class Heads(Message):
    prefixes: list[str]
    after: int


@_message(TOPICS)
@dataclass(frozen=True, slots=True)
class Topics(Message):
    after: int
    topics: list[str]
    seqs: list[int]
    upto: int
    more: bool


@_message(GET_CURSOR)
@dataclass(frozen=True, slots=True)
class GetCursor(Message):
    name: str
    after_topic: str


@_message(CURSOR)
@dataclass(frozen=True, slots=True)
class Cursor(Message):
    name: str
    after_topic: str
    topics: list[str]
    seqs: list[int]
    more: bool


@_message(COMMIT)
@dataclass(frozen=True, slots=True)
class Commit(Message):
    name: str
    topics: list[str]
    seqs: list[int]


# type -> the header fields after [VERSION, type], in order (docs/PROTOCOL.md's tables).
SCHEMA: dict[str, tuple[tuple[str, str], ...]] = {t: cls.FIELDS for t, cls in MESSAGES.items()}


class _Extension(ValueError):
    """An extension value in msgpack input: zfan's messages and records carry none."""


def _reject_ext(code: int, data: bytes) -> Any:
    raise _Extension(code)


def _not_msgpack(exc: Exception) -> str:
    """The detail for bytes msgpack refused. msgpack decodes its Timestamp extension (-1)
    itself, without asking ext_hook, so max_ext_len=0 is what refuses it: say so plainly."""
    if isinstance(exc, _Extension) or "max_ext_len" in str(exc) or "timestamp" in str(exc):
        return "msgpack extension types are not allowed"
    return f"not msgpack ({type(exc).__name__})"


def encode(msg: Message) -> list[bytes]:
    """The frames of a message: its header, then its payloads."""
    values = type(msg)._values(msg)
    if type(msg)._defaults:
        values = _without_defaults(type(msg), values)
    header: bytes = msgpack.packb((VERSION, msg.TYPE, *values))
    if msg.PAYLOADS is None:
        return [header, *msg.payloads]  # type: ignore[attr-defined]
    if msg.PAYLOADS:
        return [header, msg.payload]  # type: ignore[attr-defined]
    return [header]


def _without_defaults(cls: type[Message], values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The header's values less the optional ones at its end that hold their defaults: a
    receiver of the first form of the message (a sink of an earlier version) takes it as it is."""
    n = len(values)
    for make in reversed(cls._defaults):
        if values[n - 1] != make():
            break
        n -= 1
    return values[:n]


def header(msg: Message) -> bytes:
    """The header frame alone, of a message that has no payload."""
    return encode(msg)[0]


def decode(frames: list[bytes], *, allowed: frozenset[type[Message]] | None = None) -> Message:
    """Check a message's frames and return it; raises ProtocolError with a short reason."""
    if not frames:
        raise ProtocolError("bad frame count", "empty message")
    mtype, fields = _unpack(frames[0])
    cls = StatusReply if mtype == STATUS and len(fields) == 1 else MESSAGES[mtype]
    if allowed is not None and cls not in allowed:
        raise ProtocolError("unexpected type", mtype)
    if len(fields) != len(cls.FIELDS):
        missing = len(cls.FIELDS) - len(fields)
        if not 0 < missing <= len(cls._defaults):
            least = len(cls.FIELDS) - len(cls._defaults)
            takes = f"{least} to {len(cls.FIELDS)}" if cls._defaults else str(least)
            raise ProtocolError("bad header", f"{mtype} takes {takes} fields, got {len(fields)}")
        fields = [*fields, *(make() for make in cls._defaults[len(cls._defaults) - missing :])]
    for value, (name, ok) in zip(fields, cls._checks, strict=False):  # of one length: counted above
        if not ok(value):
            raise ProtocolError("bad field", f"{mtype}.{name}")
    payloads = frames[1:]
    if cls._parallel:
        _check_lists(cls, fields)
    make: Callable[..., Message] = cls
    if cls.PAYLOADS is None:
        if any(len(fields[i]) != len(payloads) for i in cls._framed):
            raise ProtocolError("bad frame count", f"{mtype} needs one count and one payload frame per topic")
        return make(*fields, payloads)
    if cls.PAYLOADS == 0:
        return make(*fields)  # frames after a header that takes none are ignored (PROTOCOL.md)
    if len(payloads) != cls.PAYLOADS:
        raise ProtocolError("bad frame count", f"{mtype} has {len(frames)} frames, expected {cls.PAYLOADS + 1}")
    if cls._sizes is not None and sum(fields[cls._sizes]) != len(payloads[0]):
        raise ProtocolError("bad field", f"{mtype}: sizes do not add up to the payload")
    return make(*fields, *payloads)


def _check_lists(cls: type[Message], fields: list[Any]) -> None:
    """Parallel lists are of one length, and a group of results' spans cover its topics."""
    for group in cls._parallel:
        first = len(fields[group[0]])
        if any(len(fields[i]) != first for i in group):
            raise ProtocolError("bad field", f"{cls.TYPE}: lists of different lengths")
    if cls._spans is not None and sum(fields[cls._spans[0]]) != len(fields[cls._spans[1]]):
        raise ProtocolError("bad field", f"{cls.TYPE}: spans do not add up to the topics")


def _unpack(frame: bytes) -> tuple[str, list[Any]]:
    """A header's type and fields, once it is known to be msgpack of the right shape."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError("header too large", f"{len(frame)} bytes")
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
            max_str_len=MAX_ERROR,
            max_bin_len=0,
            max_array_len=max(MAX_SEQS, MAX_TOPICS) + 8,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on hostile bytes
        raise ProtocolError("bad header", _not_msgpack(exc)) from None
    if not isinstance(msg, list) or len(msg) < 2:
        raise ProtocolError("bad header", "not an array [version, type, ...]")
    version, mtype, *fields = msg
    if type(version) is not int or version != VERSION:
        raise ProtocolError("bad version", repr(version)[:40])
    if not isinstance(mtype, str) or mtype not in MESSAGES:
        raise ProtocolError("unknown type", repr(mtype)[:40])
    return mtype, fields


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """A group's payload frame cut into its entries' payloads."""
    out, at = [], 0
    for n in sizes:
        out.append(data[at : at + n])
        at += n
    return out


def grouped(
    items: Iterable[T], sizes: Callable[[T], tuple[int, int]], max_frame: int, max_message: int
) -> Iterator[list[T]]:
    """Items in groups of at most MAX_GROUP: `sizes` gives an item's payload bytes and what it
    adds to the header; a group's payloads fit one frame of `max_frame` bytes, its header
    MAX_HEADER_BYTES, and the whole message `max_message` (with 1 KiB to spare)."""
    group: list[T] = []
    payload = header = 0
    for item in items:
        n, head = sizes(item)
        if group and (
            len(group) >= MAX_GROUP
            or payload + n > max_frame
            or header + head > MAX_HEADER_BYTES - 1024
            or payload + header + n + head > max_message - 1024
        ):
            yield group
            group, payload, header = [], 0, 0
        group.append(item)
        payload, header = payload + n, header + head
    if group:
        yield group


def pairs_that_fit(pairs: list[tuple[str, int]], reserve: int = 1024) -> int:
    """How many leading (topic, seq) pairs one header can carry: at most MAX_TOPICS, and few
    enough that the header stays under MAX_HEADER_BYTES (`reserve` is for its other fields).
    Each pair costs its topic's bytes, at most 2 of string header and at most 9 of uint."""
    room = MAX_HEADER_BYTES - reserve
    for i, (topic, _) in enumerate(pairs[:MAX_TOPICS]):
        room -= len(topic.encode()) + 11
        if room < 0:
            return i
    return min(len(pairs), MAX_TOPICS)


# --- records ------------------------------------------------------------------------------

# A payload is a msgpack array of records. Producers pack records one at a time, or many back
# to back (an array packed whole, less its header), and join the pieces under one header.


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def join_records(pieces: list[bytes], count: int | None = None) -> bytes:
    """A payload from packed records; `count` when a piece holds more than one record."""
    return array_header(len(pieces) if count is None else count) + b"".join(pieces)


def encode_records(records: list[Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(records)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"result cannot be encoded with msgpack: {exc}") from None
    return packed


def decode_records(payload: bytes, *, max_records: int = 10_000_000) -> list[Any]:
    """Unpack a payload of records, refusing extension types and oversized containers."""
    try:
        records = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            ext_hook=_reject_ext,
            max_array_len=max_records,
            max_bin_len=len(payload),
            max_str_len=len(payload),
            max_map_len=len(payload),
            max_ext_len=0,
        )
    except Exception as exc:
        raise ProtocolError("bad payload", _not_msgpack(exc)) from None
    if not isinstance(records, list):
        raise ProtocolError("bad payload", "not an array of records")
    return records
