"""The wire protocol: message types, their header fields, and safe decoding.

Every message is a ZeroMQ multipart message whose header frame is a msgpack array
``[VERSION, type, field, ...]``; batches and results carry their records as further frames of
msgpack bytes, which the sink stores and forwards without decoding. docs/PROTOCOL.md is the
specification; this module is its one implementation.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ProtocolError

VERSION = 1

# Sockets and who sends what on them.
# intake:  producer PUSH -> sink PULL
BATCH = "batch"
# control: any DEALER -> sink ROUTER
HELLO = "hello"
HEARTBEAT = "heartbeat"
RESULT = "result"
FAILED = "failed"
STATUS = "status"
BYE = "bye"
# control: a subscriber's DEALER -> sink ROUTER (no hello needed), and the answers
REPLAY = "replay"
HEADS = "heads"
GET_CURSOR = "get_cursor"
COMMIT = "commit"
MISSING = "missing"
TOPICS = "topics"
CURSOR = "cursor"
# control: sink ROUTER -> DEALER
WELCOME = "welcome"
ACK = "ack"
LEASE = "lease"
RESET = "reset"
# results: sink XPUB -> SUB (first frame is the topic)
PUBLISH = "publish"
DEAD = "dead"
SYNC = "sync"

ROLES = ("producer", "worker", "subscriber", "client")
DEAD_TOPIC = "zfan.dead"
SYNC_PREFIX = "zfan.sync."

# Limits on header fields; payload limits are in decode_records().
MAX_HEADER_BYTES = 1 << 20
MAX_NAME = 128  # producer ids, worker names
MAX_TOPIC = 255  # bytes of UTF-8
MAX_TOPICS = 10_000  # topics one result may fan out to
MAX_ERROR = 64 * 1024  # traceback text of a failed batch
MAX_SEQS = 100_000  # seqs one ack carries
MAX_CREDIT = 1000
MAX_REPLAY = 1000  # results the sink sends for one replay request
MAX_RECORDS = 10_000_000  # records one batch or result may claim to hold
# Integers are unsigned and below 2**63: SQLite stores signed 64-bit integers.
MAX_INT = (1 << 63) - 1

_STR, _INT, _STRS, _INTS, _MAP, _BOOL = "str", "int", "list[str]", "list[int]", "map", "bool"
_PREFIXES = "list[prefix]"  # topic prefixes: strings that may be empty (the empty one matches all)

# type -> the fields after [VERSION, type], in order.
SCHEMA: dict[str, tuple[tuple[str, str], ...]] = {
    BATCH: (("producer_id", _STR), ("seq", _INT), ("topic", _STR), ("count", _INT)),
    HELLO: (("role", _STR), ("name", _STR), ("credit", _INT)),
    HEARTBEAT: (("epoch", _INT),),
    RESULT: (("epoch", _INT), ("batch_id", _INT), ("attempt", _INT), ("topics", _STRS), ("counts", _INTS)),
    FAILED: (("epoch", _INT), ("batch_id", _INT), ("attempt", _INT), ("error", _STR)),
    STATUS: (),
    BYE: (),
    WELCOME: (("epoch", _INT), ("heartbeat_ms", _INT), ("liveness", _INT)),
    ACK: (("seqs", _INTS),),
    LEASE: (("epoch", _INT), ("batch_id", _INT), ("attempt", _INT), ("topic", _STR), ("count", _INT)),
    RESET: (("reason", _STR),),
    PUBLISH: (("topic", _STR), ("seq", _INT), ("batch_id", _INT), ("count", _INT)),
    DEAD: (
        ("topic", _STR),
        ("seq", _INT),
        ("batch_id", _INT),
        ("attempts", _INT),
        ("error", _STR),
        ("source_topic", _STR),
    ),
    SYNC: (("token", _STR),),
    REPLAY: (("topic", _STR), ("first", _INT), ("last", _INT)),
    MISSING: (("topic", _STR), ("first", _INT), ("last", _INT), ("reason", _STR)),
    # Heads and cursors come in pages: `after` is where a page starts, echoed in its answer so
    # that a repeated request's answer is told apart; `more` says another page follows.
    HEADS: (("prefixes", _PREFIXES), ("after", _INT)),
    TOPICS: (("after", _INT), ("topics", _STRS), ("seqs", _INTS), ("upto", _INT), ("more", _BOOL)),
    GET_CURSOR: (("name", _STR), ("after_topic", _STR)),
    CURSOR: (("name", _STR), ("after_topic", _STR), ("topics", _STRS), ("seqs", _INTS), ("more", _BOOL)),
    COMMIT: (("name", _STR), ("topics", _STRS), ("seqs", _INTS)),
}
# Messages that carry parallel lists must have them of equal length.
PARALLEL = {TOPICS: (1, 2), CURSOR: (2, 3), COMMIT: (1, 2)}
# The status reply reuses the STATUS type with one field, a map; requests have none.
STATUS_REPLY_FIELDS = (("info", _MAP),)

# How many payload frames follow the header, per type (RESULT: one per topic).
PAYLOAD_FRAMES = {BATCH: 1, LEASE: 1, PUBLISH: 1, DEAD: 1}

_NON_EMPTY = frozenset({"producer_id", "name", "topic", "source_topic", "role", "token"})
_STR_LIMITS = {
    "producer_id": MAX_NAME,
    "name": MAX_NAME,
    "topic": MAX_TOPIC,
    "source_topic": MAX_TOPIC,
    "role": 16,
    "error": MAX_ERROR,
    "reason": 1024,
    "token": MAX_TOPIC,
}


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


def encode(mtype: str, *fields: Any) -> bytes:
    """The header frame for a message of this type. Callers pass fields in SCHEMA order."""
    return msgpack.packb([VERSION, mtype, *fields])


def decode(frame: bytes, *, allowed: frozenset[str] | None = None) -> tuple[str, list[Any]]:
    """Decode and check a header frame: (type, fields). Raises ProtocolError with a short reason."""
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
    if not isinstance(mtype, str) or mtype not in SCHEMA:
        raise ProtocolError("unknown type", repr(mtype)[:40])
    if allowed is not None and mtype not in allowed:
        raise ProtocolError("unexpected type", mtype)
    schema = SCHEMA[mtype]
    if mtype == STATUS and len(fields) == 1:
        schema = STATUS_REPLY_FIELDS
    if len(fields) != len(schema):
        raise ProtocolError("bad header", f"{mtype} takes {len(schema)} fields, got {len(fields)}")
    for value, (name, kind) in zip(fields, schema, strict=True):
        _check(mtype, name, kind, value)
    pair = PARALLEL.get(mtype)
    if pair and len(fields[pair[0]]) != len(fields[pair[1]]):
        raise ProtocolError("bad field", f"{mtype}: lists of different lengths")
    return mtype, fields


def _check(mtype: str, name: str, kind: str, value: Any) -> None:
    if kind == _INT:
        ok = type(value) is int and 0 <= value <= (MAX_RECORDS if name == "count" else MAX_INT)
    elif kind == _STR:
        ok = type(value) is str and len(value.encode()) <= _STR_LIMITS.get(name, MAX_TOPIC)
        if ok and name in _NON_EMPTY:
            ok = bool(value)
    elif kind == _INTS:
        top = MAX_RECORDS if name == "counts" else MAX_INT
        ok = (
            type(value) is list
            and len(value) <= max(MAX_SEQS, MAX_TOPICS)
            and all(type(v) is int and 0 <= v <= top for v in value)
        )
    elif kind == _STRS:
        ok = (
            type(value) is list
            and len(value) <= MAX_TOPICS
            and all(type(v) is str and v and len(v.encode()) <= MAX_TOPIC for v in value)
        )
    elif kind == _BOOL:
        ok = type(value) is bool
    elif kind == _PREFIXES:
        ok = (
            type(value) is list
            and len(value) <= MAX_TOPICS
            and all(type(v) is str and len(v.encode()) <= MAX_TOPIC for v in value)
        )
    else:
        ok = type(value) is dict and _plain(value)
    if not ok:
        raise ProtocolError("bad field", f"{mtype}.{name}")


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
        return msgpack.packb(records)
    except (TypeError, ValueError, OverflowError) as exc:
        from .errors import SerializationError

        raise SerializationError(f"result cannot be encoded with msgpack: {exc}") from None


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
