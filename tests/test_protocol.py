"""The wire protocol: every message type survives encode/decode, and hostile headers and
payloads are refused with a short reason instead of reaching the sink's state."""

from __future__ import annotations

import msgpack
import pytest

from zfan import protocol as p
from zfan.errors import ProtocolError, SerializationError

pytestmark = pytest.mark.timeout(30)

SAMPLE = {
    "str": "x",
    "int": 7,
    "list[str]": ["a", "b"],
    "list[int]": [1, 2],
    "list[prefix]": ["", "a."],
    "map": {"k": 1},
    "bool": True,
}


def sample_fields(mtype: str) -> list:
    return [SAMPLE[kind] for _, kind in p.SCHEMA[mtype]]


def reason_of(frame: bytes, **kw) -> str:
    with pytest.raises(ProtocolError) as info:
        p.decode(frame, **kw)
    return info.value.reason


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("mtype", sorted(p.SCHEMA))
def test_every_message_type_round_trips(mtype):
    fields = sample_fields(mtype)
    assert p.decode(p.encode(mtype, *fields)) == (mtype, fields)


def test_status_reply_with_a_map_round_trips():
    info = {"epoch": 3, "pending": 2, "workers": [{"name": "w1", "idle_ms": None}], "rejected": {}}
    assert p.decode(p.encode(p.STATUS, info)) == (p.STATUS, [info])


def test_round_trip_at_the_limits():
    header = p.encode(p.BATCH, "p" * p.MAX_NAME, p.MAX_INT, "t" * p.MAX_TOPIC, 0)
    assert p.decode(header) == (p.BATCH, ["p" * p.MAX_NAME, p.MAX_INT, "t" * p.MAX_TOPIC, 0])
    big_error = "e" * p.MAX_ERROR
    assert p.decode(p.encode(p.FAILED, 1, 2, 3, big_error))[1][3] == big_error


def test_unicode_strings_round_trip():
    assert p.decode(p.encode(p.HELLO, "producer", "prodüct-ü✓", 0)) == (p.HELLO, ["producer", "prodüct-ü✓", 0])


def test_allowed_restricts_the_types_accepted():
    header = p.encode(p.HELLO, "worker", "w1", 2)
    assert p.decode(header, allowed=frozenset({p.HELLO}))[0] == p.HELLO
    assert reason_of(header, allowed=frozenset({p.BATCH})) == "unexpected type"


# --- rejections -----------------------------------------------------------------------------


def test_oversized_header_is_rejected_before_parsing():
    frame = p.encode(p.FAILED, 1, 1, 1, "x" * p.MAX_HEADER_BYTES)
    assert len(frame) > p.MAX_HEADER_BYTES
    with pytest.raises(ProtocolError) as info:
        p.decode(frame)
    assert info.value.reason == "header too large"
    assert str(len(frame)) in str(info.value)


@pytest.mark.parametrize("ext", [msgpack.ExtType(0, b"xyz"), msgpack.ExtType(5, b""), msgpack.ExtType(127, b"xyz")])
def test_extension_types_are_rejected(ext):
    frame = msgpack.packb([p.VERSION, p.HELLO, ext, "w1", 1])
    with pytest.raises(ProtocolError) as info:
        p.decode(frame)
    assert str(info.value) == "bad header: msgpack extension types are not allowed"


def test_extension_type_hidden_in_a_status_map_is_rejected():
    frame = msgpack.packb([p.VERSION, p.STATUS, {"k": msgpack.ExtType(9, b"x")}])
    assert reason_of(frame) == "bad header"


def test_timestamp_extension_in_a_status_map_is_rejected():
    frame = msgpack.packb([p.VERSION, p.STATUS, {"k": msgpack.Timestamp(1, 0)}])
    with pytest.raises(ProtocolError):
        p.decode(frame)


def test_timestamp_extension_in_a_typed_field_is_rejected():
    frame = msgpack.packb([p.VERSION, p.HELLO, msgpack.Timestamp(1, 0), "w1", 1])
    with pytest.raises(ProtocolError):
        p.decode(frame)


@pytest.mark.parametrize("value", [b"", b"bytes"])
def test_bin_fields_are_rejected(value):
    frame = msgpack.packb([p.VERSION, p.BATCH, value, 1, "t", 1])
    assert reason_of(frame) in ("bad header", "bad field")


def test_bin_where_a_string_list_is_expected_is_rejected():
    frame = msgpack.packb([p.VERSION, p.RESULT, 1, 1, 1, [b"topic"], [1]])
    assert reason_of(frame) in ("bad header", "bad field")


@pytest.mark.parametrize(
    "mtype,fields",
    [
        (p.BATCH, ["prod", -1, "t", 1]),
        (p.BATCH, ["prod", 1, "t", -5]),
        (p.LEASE, [-1, 1, 1, "t", 1]),
        (p.ACK, [[1, -2, 3]]),
        (p.RESULT, [1, 1, 1, ["t"], [-1]]),
    ],
)
def test_negative_ints_are_rejected(mtype, fields):
    assert reason_of(msgpack.packb([p.VERSION, mtype, *fields])) == "bad field"


def test_ints_past_uint64_cannot_be_sent_or_smuggled_as_floats():
    # msgpack has no encoding for ints >= 2**64: encode() refuses them outright ...
    with pytest.raises(OverflowError):
        p.encode(p.BATCH, "prod", 1 << 64, "t", 1)
    with pytest.raises(OverflowError):
        p.encode(p.ACK, [1 << 64])
    # ... and the float spelling of such a number is not an int.
    assert reason_of(msgpack.packb([p.VERSION, p.BATCH, "prod", float(1 << 64), "t", 1])) == "bad field"
    assert reason_of(msgpack.packb([p.VERSION, p.ACK, [1, float(1 << 64)]])) == "bad field"


def test_largest_int_is_accepted_in_int_lists():
    assert p.decode(p.encode(p.ACK, [0, p.MAX_INT])) == (p.ACK, [[0, p.MAX_INT]])


@pytest.mark.parametrize(
    "header",
    [
        [p.VERSION, p.BATCH, "prod", 1 << 63, "t", 1],  # SQLite cannot store it: refused at the door
        [p.VERSION, p.BATCH, "prod", 1, "t", (1 << 64) - 1],
        [p.VERSION, p.ACK, [1, 1 << 63]],
        [p.VERSION, p.RESULT, 1, 1, 1, ["t"], [1 << 63]],
    ],
)
def test_ints_from_two_to_the_63_are_refused(header):
    assert reason_of(msgpack.packb(header)) == "bad field"


@pytest.mark.parametrize(
    "header",
    [
        [True, p.HEARTBEAT, 0],
        [1.0, p.HEARTBEAT, 0],
    ],
)
def test_version_must_be_the_integer_1(header):
    assert reason_of(msgpack.packb(header)) == "bad version"


@pytest.mark.parametrize(
    "header",
    [
        [p.VERSION, p.BATCH, "prod", 1, "", 1],
        [p.VERSION, p.BATCH, "", 1, "t", 1],
        [p.VERSION, p.RESULT, 1, 1, 1, [""], [1]],
        [p.VERSION, p.HELLO, "worker", "", 4],
    ],
)
def test_empty_names_and_topics_are_refused(header):
    assert reason_of(msgpack.packb(header)) == "bad field"


@pytest.mark.parametrize(
    "mtype,fields",
    [
        (p.BATCH, ["prod", "1", "t", 1]),  # str for int
        (p.BATCH, [7, 1, "t", 1]),  # int for str
        (p.BATCH, ["prod", 1.0, "t", 1]),  # float for int
        (p.BATCH, ["prod", True, "t", 1]),  # bool for int
        (p.BATCH, ["prod", None, "t", 1]),  # nil for int
        (p.HELLO, ["worker", ["w1"], 2]),  # list for str
        (p.ACK, [5]),  # int for list[int]
        (p.ACK, [["1"]]),  # list[str] for list[int]
        (p.RESULT, [1, 1, 1, "t", [1]]),  # str for list[str]
        (p.RESULT, [1, 1, 1, [1], [1]]),  # list[int] for list[str]
        (p.STATUS, [[1, 2]]),  # list for the status map
        (p.BATCH, ["p" * (p.MAX_NAME + 1), 1, "t", 1]),  # producer id too long
        (p.BATCH, ["prod", 1, "t" * (p.MAX_TOPIC + 1), 1]),  # topic too long
        (p.HELLO, ["w" * 17, "w1", 1]),  # role too long
    ],
)
def test_wrong_field_types_are_rejected(mtype, fields):
    with pytest.raises(ProtocolError) as info:
        p.decode(msgpack.packb([p.VERSION, mtype, *fields]))
    assert info.value.reason == "bad field"
    assert mtype in str(info.value)


@pytest.mark.parametrize(
    "frame,reason",
    [
        (b"\xc1", "bad header"),  # never-used msgpack byte
        (b"", "bad header"),
        (b"\x93\x01", "bad header"),  # truncated array
        (msgpack.packb({"v": 1}), "bad header"),  # not an array
        (msgpack.packb([1]), "bad header"),  # no type
        (msgpack.packb("batch"), "bad header"),
        (msgpack.packb([2, p.HELLO, "worker", "w1", 1]), "bad version"),
        (msgpack.packb([0, p.HELLO, "worker", "w1", 1]), "bad version"),
        (msgpack.packb([1, "nope"]), "unknown type"),
        (msgpack.packb([1, 3, "x"]), "unknown type"),
        (msgpack.packb([1, p.HELLO, "worker", "w1"]), "bad header"),  # too few fields
        (msgpack.packb([1, p.HELLO, "worker", "w1", 1, 2]), "bad header"),  # too many fields
        (msgpack.packb([1, p.BYE, "extra"]), "bad header"),
        (msgpack.packb([1, p.STATUS, {"a": 1}, 2]), "bad header"),
        (msgpack.packb([1, p.STATUS, {1: 2}]), "bad header"),  # non-str map key
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(frame, reason):
    assert reason_of(frame) == reason


def test_error_message_names_the_field_count():
    with pytest.raises(ProtocolError, match="hello takes 3 fields, got 2"):
        p.decode(msgpack.packb([1, p.HELLO, "worker", "w1"]))


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 65535, 65536, 65537])
def test_join_records_decodes_to_the_list(n):
    records = [i % 100 for i in range(n)]
    packed = [msgpack.packb(r) for r in records]
    payload = p.join_records(packed)
    assert msgpack.unpackb(payload) == records
    assert p.decode_records(payload) == records


def test_join_records_of_mixed_records():
    records = [{"id": 1, "name": "ü"}, [1, 2.5, None], "s" * 40, b"raw", True, -3, {}]
    payload = p.join_records([msgpack.packb(r) for r in records])
    assert p.decode_records(payload) == records


def test_join_records_matches_packing_the_whole_list():
    for n in (0, 15, 16, 65535, 65536):
        records = list(range(n % 7, n % 7 + n))
        assert p.join_records([msgpack.packb(r) for r in records]) == msgpack.packb(records)


def test_encode_records_round_trips_and_refuses_what_msgpack_cannot_encode():
    assert p.decode_records(p.encode_records([1, "a", {"b": [2]}])) == [1, "a", {"b": [2]}]
    with pytest.raises(SerializationError, match="cannot be encoded with msgpack"):
        p.encode_records([object()])
    with pytest.raises(SerializationError):
        p.encode_records([1 << 70])


@pytest.mark.parametrize("value", [5, "text", {"a": 1}, None, b"bin"])
def test_decode_records_rejects_non_arrays(value):
    with pytest.raises(ProtocolError) as info:
        p.decode_records(msgpack.packb(value))
    assert info.value.reason == "bad payload"
    assert "not an array" in str(info.value)


@pytest.mark.parametrize("payload", [b"\xc1", b"", b"\x92\x01"])
def test_decode_records_rejects_garbage(payload):
    with pytest.raises(ProtocolError) as info:
        p.decode_records(payload)
    assert info.value.reason == "bad payload"


def test_decode_records_rejects_extension_types():
    with pytest.raises(ProtocolError, match="^bad payload: msgpack extension types are not allowed$"):
        p.decode_records(msgpack.packb([1, msgpack.ExtType(3, b"x")]))


@pytest.mark.parametrize("ts", [msgpack.Timestamp(1, 0), msgpack.Timestamp(1, 5), msgpack.Timestamp(2**40, 5)])
def test_decode_records_rejects_the_timestamp_extension(ts):
    # msgpack decodes its Timestamp extension without asking ext_hook: it must still be refused
    with pytest.raises(ProtocolError) as info:
        p.decode_records(msgpack.packb([{"at": ts}]))
    assert str(info.value) == "bad payload: msgpack extension types are not allowed"


def test_decode_rejects_the_timestamp_extension_in_a_header():
    with pytest.raises(ProtocolError) as info:
        p.decode(msgpack.packb([1, "heartbeat", msgpack.Timestamp(1, 0)]))
    assert str(info.value) == "bad header: msgpack extension types are not allowed"


def test_decode_records_enforces_max_records():
    payload = p.join_records([msgpack.packb(i) for i in range(11)])
    assert len(p.decode_records(payload, max_records=11)) == 11
    with pytest.raises(ProtocolError) as info:
        p.decode_records(payload, max_records=10)
    assert info.value.reason == "bad payload"


@pytest.mark.parametrize(
    "header",
    [
        [p.VERSION, p.BATCH, "prod", 1, "t", p.MAX_RECORDS + 1],
        [p.VERSION, p.RESULT, 1, 1, 1, ["t"], [p.MAX_RECORDS + 1]],
    ],
)
def test_a_count_past_max_records_is_refused(header):
    # A claimed count is summed into the sink's counters: a huge one must not overflow them.
    assert reason_of(msgpack.packb(header)) == "bad field"
