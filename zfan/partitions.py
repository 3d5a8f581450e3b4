"""Key-partitioned sinks: which of N sinks owns a record.

A record's key (a field of the record, or its topic), as msgpack, is hashed to 64 bits, stable
across processes, hosts and languages (BLAKE2b, not Python's salted `hash`), and the 64 bits to
one of N partitions by jump consistent hashing (Lamping and Veach, "A Fast, Minimal Memory,
Consistent Hash Algorithm", 2014): going from N to N + 1 partitions moves only the keys the new
one takes, about 1 / (N + 1) of them, and none between the old ones.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from .errors import ConfigError

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
