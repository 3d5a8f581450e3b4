"""Which sink owns a key (zfan.partitions): stable, balanced, and minimal movement when a sink
is added."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections import Counter

import pytest

from tests.helpers import ROOT
from zfan.errors import ConfigError, SerializationError
from zfan.partitions import Partition, Router, jump, key_bytes, key_hash, parse_sinks, partition_of

pytestmark = pytest.mark.timeout(30)

KEYS = [f"sensor-{i}" for i in range(20_000)]


def test_a_key_has_the_same_partition_in_another_process_with_another_hash_seed():
    here = [partition_of(k, 7) for k in KEYS[:200]]
    code = "from zfan.partitions import partition_of; print([partition_of(f'sensor-{i}', 7) for i in range(200)])"
    env = {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(here)


def test_known_values_pin_the_hash_for_clients_in_other_languages():
    # Jump consistent hashing as the paper's C++ has it (the values other implementations
    # publish), of BLAKE2b-64 (big-endian) of the key's msgpack.
    assert [jump(1, 1), jump(42, 57), jump(256, 1024), jump(3735883980, 666)] == [0, 43, 520, 361]
    assert jump(16045690984833335023, 255) == 237
    assert key_bytes("a") == b"\xa1a" and key_bytes(7) == b"\x07"
    assert key_hash(b"\xa1a") == int.from_bytes(hashlib.blake2b(b"\xa1a", digest_size=8).digest(), "big")


def test_keys_spread_evenly_over_the_partitions():
    for n in (2, 3, 4, 8):
        counts = Counter(partition_of(k, n) for k in KEYS)
        assert sorted(counts) == list(range(n))
        assert max(counts.values()) / min(counts.values()) < 1.1, counts


def test_adding_a_partition_moves_only_the_keys_the_new_one_takes():
    for n in (1, 2, 3, 4, 7):
        before = {k: partition_of(k, n) for k in KEYS}
        after = {k: partition_of(k, n + 1) for k in KEYS}
        moved = [k for k in KEYS if before[k] != after[k]]
        assert all(after[k] == n for k in moved), "a moved key goes to the new partition only"
        assert abs(len(moved) / len(KEYS) - 1 / (n + 1)) < 0.02


def test_different_kinds_of_key_are_different_keys():
    assert key_bytes(7) != key_bytes("7") != key_bytes(b"7")
    with pytest.raises(ConfigError, match="a partition key must be a msgpack value"):
        key_bytes(object())
    with pytest.raises(ConfigError, match="partitions must be 1 or more"):
        partition_of("k", 0)


# --- naming the sinks ---------------------------------------------------------------------------


def test_sinks_are_named_by_host_port_or_folder_and_a_partition_may_have_standbys():
    a, b = parse_sinks("a, tcp://b:6000|b2:7000")
    assert a == Partition("tcp://a:5557", "tcp://a:5558", "tcp://a:5559")
    assert b == Partition("tcp://b:6000,tcp://b2:7000", "tcp://b:6001,tcp://b2:7001", "tcp://b:6002,tcp://b2:7002"), (
        "each kind lists the partition's sinks in one order, as a failover client takes them"
    )
    (c,) = parse_sinks(["ipc:///run/zfan/p0"])
    assert c == Partition("ipc:///run/zfan/p0/intake", "ipc:///run/zfan/p0/control", "ipc:///run/zfan/p0/results")
    assert parse_sinks("[::1]:6000")[0].control == "tcp://[::1]:6001"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a,,b", "a sink is missing"),
        ("a|", "a sink is missing"),
        ("a:70000", "is not HOST, HOST:PORT"),
        ("a:65534", "1 to 65533"),
        ("http://a:80", "is not HOST, HOST:PORT"),
        ("ipc://", "give a folder"),
        ("a,a:5557", "named twice"),
    ],
)
def test_a_wrong_sinks_value_is_one_clear_error(value, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_sinks(value)


def test_a_router_splits_many_records_as_it_routes_each_keeping_their_order():
    router = Router(4, "key")
    records = [{"key": k, "n": n} for n, k in enumerate([7, "7", True, 1.0, b"a", "a", [1, 2], None] * 50)]
    parts = router.split(records, "t")
    assert [r for part in parts for r in part] != records  # (spread, so this test is not vacuous)
    for i, part in enumerate(parts):
        assert part == [r for r in records if Router(4, "key").of(r, "t") == i]
    by_topic = Router(3, None).split(records, "t")
    assert by_topic[partition_of("t", 3)] == records and sum(map(len, by_topic)) == len(records)
    with pytest.raises(SerializationError, match="record of type str has no field 'key'"):
        router.split([{"key": 1}, "no key"], "t")


def test_equal_keys_of_other_encodings_go_where_a_fresh_router_sends_them_whatever_came_first():
    # -0.0 == 0.0, True == 1 and (1, True) == (1, 1), and each pair packs to different bytes.
    pairs = [(0.0, -0.0), (1, True), ((1, 1), (1, True)), (1, 1.0)]
    for n in (3, 7):
        for a, b in pairs:
            router = Router(n, "key")
            router.of({"key": a}, "t")
            assert router.of({"key": b}, "t") == partition_of(b, n), (a, b, n)
            assert router.split([{"key": a}, {"key": b}], "t") == Router(n, "key").split([{"key": a}, {"key": b}], "t")
