"""Key-partitioned sinks: which of N sinks owns a record.

A record's key (a field of the record, or its topic), as msgpack, is hashed to 64 bits, stable
across processes, hosts and languages (BLAKE2b, not Python's salted `hash`), and the 64 bits to
one of N partitions by jump consistent hashing (Lamping and Veach, "A Fast, Minimal Memory,
Consistent Hash Algorithm", 2014): going from N to N + 1 partitions moves only the keys the new
one takes, about 1 / (N + 1) of them, and none between the old ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from .errors import ConfigError, SerializationError

_JUMP = 2862933555777941757  # the multiplier of the paper's linear congruential generator
_MASK = (1 << 64) - 1


def key_bytes(key: Any) -> bytes:
    """A key as bytes that mean the same key everywhere: its msgpack encoding, the records' own
    format (so 7 and "7" are different keys, as are "a" and b"a"). Raises ConfigError for a
    key msgpack cannot encode."""
    try:
        packed: bytes = msgpack.packb(key)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"a partition key must be a msgpack value (text, a number...): {exc}") from None
    return packed


def key_hash(key: bytes) -> int:
    """64 stable bits of a key."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def jump(hashed: int, buckets: int) -> int:
    """The partition, 0 to `buckets` - 1, of a 64-bit hash."""
    if buckets < 1:
        raise ConfigError(f"partitions must be 1 or more, not {buckets}")
    b, j = -1, 0
    while j < buckets:
        b = j
        hashed = (hashed * _JUMP + 1) & _MASK
        j = int((b + 1) * ((1 << 31) / ((hashed >> 33) + 1)))
    return b


def partition_of(key: Any, partitions: int) -> int:
    """Which of `partitions` sinks owns `key`."""
    return jump(key_hash(key_bytes(key)), partitions)


# The types of keys whose owner is remembered: equal values of one of these have one msgpack
# encoding. Not bool (True == 1), float (-0.0 == 0.0) or containers, hashed every time.
CACHED_KINDS = frozenset({str, bytes, int})


class Router:
    """Which partition each record goes to: by its field `key` (a mapping's item), or by its
    topic when `key` is None. Owners of keys seen are remembered (up to CACHED of them), since
    a stream mostly repeats a bounded set of keys and hashing each record would cost more than
    packing it."""

    CACHED = 100_000

    def __init__(self, partitions: int, key: str | None) -> None:
        self.partitions = partitions
        self.key = key
        self._owners: dict[Any, int] = {}

    def of(self, record: Any, topic: str) -> int:
        if self.key is None:
            value: Any = topic
        else:
            try:
                value = record[self.key]
            except (KeyError, TypeError, IndexError):
                raise SerializationError(
                    f"record of type {type(record).__name__} has no field {self.key!r}, the key that "
                    "chooses its sink (give every record one, or partition by topic: no key)"
                ) from None
        kind = value.__class__
        if kind not in CACHED_KINDS:  # equal values of other types may differ in msgpack (-0.0 and 0.0)
            return self._hashed(value)
        seen = (kind, value)  # "a" and b"a" are different keys
        try:
            return self._owners[seen]
        except KeyError:
            pass
        owner = self._owners[seen] = self._hashed(value)
        if len(self._owners) > self.CACHED:
            self._owners.clear()
        return owner

    def split(self, records: list[Any], topic: str) -> list[list[Any]]:
        """`records` by partition, each in its order: of() for many records at a time, at a
        fraction of its cost per record (send_many's path)."""
        if self.key is None:  # all of one topic: one partition
            parts: list[list[Any]] = [[] for _ in range(self.partitions)]
            parts[self.of(None, topic)] = records
            return parts
        parts = [[] for _ in range(self.partitions)]
        appends = [part.append for part in parts]
        owners, key = self._owners, self.key
        for record in records:
            try:
                value = record[key]
                owner = owners[(value.__class__, value)]
            except (KeyError, TypeError, IndexError):  # not seen yet, or no key: of() says which
                owner = self.of(record, topic)
            appends[owner](record)
        return parts

    def _hashed(self, value: Any) -> int:
        try:
            return partition_of(value, self.partitions)
        except ConfigError as exc:
            raise SerializationError(f"the key of a record ({self.key!r}): {exc}") from None


# --- naming the sinks ------------------------------------------------------------------------------

BASE_PORT = 5557  # a sink's intake port by default; control and results follow it
KINDS = ("intake", "control", "results")


@dataclass(frozen=True)
class Partition:
    """One partition's sink: each kind of endpoint, as a client's setting takes it (several,
    separated by commas, where the partition is an active sink and its standbys)."""

    intake: str
    control: str
    results: str


def parse_sinks(value: str | list[str] | tuple[str, ...]) -> tuple[Partition, ...]:
    """The partitions a `--sinks` value names, in order: partitions separated by commas (or
    given as a list), each a sink, or an active sink and its standbys separated by `|`. A sink is
    a host (its ports 5557, 5558, 5559), `HOST:PORT` or `tcp://HOST:PORT` (intake PORT, control
    PORT+1, results PORT+2), or `ipc:///FOLDER` (FOLDER/intake, FOLDER/control, FOLDER/results).

    `a,b,c` is three partitions; `a|a2,b|b2` two, each with a standby."""
    items = value.split(",") if isinstance(value, str) else list(value)
    partitions = []
    seen: set[str] = set()
    for item in items:
        parts = [part.strip() for part in item.split("|")]
        if not all(parts):
            raise ConfigError(f"sinks {value!r}: a sink is missing (two commas or bars in a row?)")
        sinks = [_sink(part) for part in parts]
        for sink in sinks:
            if sink[1] in seen:
                raise ConfigError(f"sinks {value!r}: the sink with control {sink[1]} is named twice")
            seen.add(sink[1])
        partitions.append(Partition(*(",".join(sink[i] for sink in sinks) for i in range(len(KINDS)))))
    return tuple(partitions)


_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+)(?::(?P<port>\d{1,5}))?")


def _sink(text: str) -> tuple[str, str, str]:
    """A sink's three endpoints, from how --sinks names it."""
    if text.startswith("ipc://"):
        folder = text[len("ipc://") :].rstrip("/")
        if not folder:
            raise ConfigError(f"sink {text!r}: give a folder, as ipc:///run/zfan/sink1")
        return f"ipc://{folder}/intake", f"ipc://{folder}/control", f"ipc://{folder}/results"
    m = _HOST_PORT.fullmatch(text.removeprefix("tcp://"))
    port = int(m.group("port") or BASE_PORT) if m else 0
    if m is None or not 0 < port <= 65533:
        raise ConfigError(
            f"sink {text!r} is not HOST, HOST:PORT, tcp://HOST:PORT or ipc:///FOLDER "
            "(PORT is its intake, 1 to 65533; control and results take the next two)"
        )
    host = m.group("host")
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}", f"tcp://{host}:{port + 2}"


# --- a client's settings, one per partition --------------------------------------------------------

S = TypeVar("S")


def split(settings: S) -> list[S]:
    """A client's settings for each partition its `sinks` names (the settings as they are, if
    none): the same settings, with that partition's endpoints (those of the kinds the client
    has) in place of `sinks`."""
    sinks = getattr(settings, "sinks", None)
    if sinks is None:
        return [settings]
    kinds = [kind for kind in KINDS if hasattr(settings, kind)]
    routed = {"key": None} if hasattr(settings, "key") else {}  # a partition's own producer routes nothing
    return [
        dataclasses.replace(settings, sinks=None, **routed, **{kind: getattr(part, kind) for kind in kinds})  # type: ignore[type-var]
        for part in parse_sinks(sinks)
    ]


def unpartitioned(role: str, settings: Any) -> None:
    """ConfigError for `sinks` given to a client that takes one sink (and its standbys)."""
    if getattr(settings, "sinks", None) is not None:
        raise ConfigError(
            f"{role} takes one sink (with its standbys), not key-partitioned sinks: "
            f"use the threaded {role.removeprefix('Async')}, or one {role} per sink"
        )
