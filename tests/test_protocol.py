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


# Every message class: those of p.MESSAGES, and the status reply, which shares its wire type
# with the status request.
CLASSES = sorted({*p.MESSAGES.values(), p.StatusReply}, key=lambda cls: cls.__name__)


def class_id(cls: type[p.Message]) -> str:
    return cls.__name__


# Fields whose samples must agree with others: a group of results has one span per lease,
# and its spans add up to its topics; a group's sizes add up to its payload frame (the sample
# payload, msgpack [0], is 2 bytes).
SAMPLE_OF = {"spans": [1, 1], "sizes": [1, 1]}


def sample_fields(cls: type[p.Message]) -> list:
    return [SAMPLE_OF.get(name, SAMPLE[kind]) for name, kind in cls.FIELDS]


def sample(cls: type[p.Message]) -> p.Message:
    """A message of this class: sample header fields, and a distinct payload frame for each
    payload it carries (a result: one per topic)."""
    fields = sample_fields(cls)
    if cls.PAYLOADS is None:
        return cls(*fields, [msgpack.packb([i]) for i in range(len(SAMPLE["list[str]"]))])
    return cls(*fields, *(msgpack.packb([i]) for i in range(cls.PAYLOADS)))


def payloads_of(msg: p.Message) -> list[bytes]:
    if msg.PAYLOADS is None:
        return list(msg.payloads)  # type: ignore[attr-defined]
    return [msg.payload] if msg.PAYLOADS else []  # type: ignore[attr-defined]


def reason_of(frames: bytes | list[bytes], **kw) -> str:
    """Why decode() refuses a message: all its frames, or a lone header frame."""
    with pytest.raises(ProtocolError) as info:
        p.decode([frames] if isinstance(frames, bytes) else frames, **kw)
    return info.value.reason


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_every_message_class_round_trips(cls):
    msg = sample(cls)
    frames = p.encode(msg)
    decoded = p.decode(frames)
    assert decoded == msg and type(decoded) is cls
    # On the wire: the header [VERSION, type, fields in FIELDS order], then the payload frames.
    header = msgpack.packb([p.VERSION, cls.TYPE, *sample_fields(cls)])
    assert frames == [header, *payloads_of(msg)]
    assert p.header(msg) == header


def test_wire_types_fields_and_payload_frames():
    assert all(cls.TYPE == mtype and p.SCHEMA[mtype] == cls.FIELDS for mtype, cls in p.MESSAGES.items())
    assert p.MESSAGES[p.STATUS] is p.Status and p.Status.FIELDS == ()
    assert p.StatusReply.TYPE == p.STATUS and p.StatusReply.FIELDS == (("info", "map"),)
    # batch, lease, publish and dead carry one payload frame, and so does a group of them
    # (its entries' payloads one after the other); a result has one per topic, the rest none.
    assert {cls.TYPE: cls.PAYLOADS for cls in CLASSES if cls.PAYLOADS != 0} == {
        p.BATCH: 1,
        p.LEASE: 1,
        p.PUBLISH: 1,
        p.DEAD: 1,
        p.RESULT: None,
        p.BATCHES: 1,
        p.LEASES: 1,
        p.RESULTS: 1,
        p.PUBLISHES: 1,
        p.DEAD_REPLY: 1,
    }


def test_status_reply_with_a_map_round_trips():
    info = {"epoch": 3, "pending": 2, "workers": [{"name": "w1", "idle_ms": None}], "rejected": {}}
    reply = p.StatusReply(info)
    assert p.encode(reply) == [msgpack.packb([p.VERSION, p.STATUS, info])]
    assert p.decode(p.encode(reply)) == reply


def test_round_trip_at_the_limits():
    batch = p.Batch("p" * p.MAX_NAME, p.MAX_INT, "t" * p.MAX_TOPIC, 0, b"\x90")
    assert p.decode(p.encode(batch)) == batch
    big_error = "e" * p.MAX_ERROR
    failed = p.decode(p.encode(p.Failed(1, 2, 3, big_error)))
    assert isinstance(failed, p.Failed) and failed.error == big_error


def test_unicode_strings_round_trip():
    hello = p.Hello("producer", "prodüct-ü✓", 0)
    assert p.decode(p.encode(hello)) == hello


def test_allowed_restricts_the_classes_accepted():
    frames = p.encode(p.Hello("worker", "w1", 2))
    assert p.decode(frames, allowed=frozenset({p.Hello})) == p.Hello("worker", "w1", 2)
    assert reason_of(frames, allowed=frozenset({p.Batch})) == "unexpected type"
    assert reason_of(frames, allowed=frozenset()) == "unexpected type"
    # A type that is not allowed is refused as such before its fields are looked at.
    assert reason_of(msgpack.packb([p.VERSION, p.LEASE, "junk"]), allowed=frozenset({p.Batch})) == "unexpected type"


def test_allowed_tells_the_status_request_from_its_reply():
    # One wire type, two classes: allowing the request does not allow the reply, nor the reverse.
    request, reply = p.encode(p.Status()), p.encode(p.StatusReply({"epoch": 1}))
    assert p.decode(request, allowed=frozenset({p.Status})) == p.Status()
    assert reason_of(reply, allowed=frozenset({p.Status})) == "unexpected type"
    assert p.decode(reply, allowed=frozenset({p.StatusReply})) == p.StatusReply({"epoch": 1})
    assert reason_of(request, allowed=frozenset({p.StatusReply})) == "unexpected type"


# --- frame counts ---------------------------------------------------------------------------


def test_a_message_of_no_frames_is_a_bad_frame_count():
    assert reason_of([]) == "bad frame count"
    assert reason_of([], allowed=frozenset({p.Batch})) == "bad frame count"


@pytest.mark.parametrize("cls", [cls for cls in CLASSES if cls.PAYLOADS == 1], ids=class_id)
def test_a_message_with_a_payload_has_exactly_one_payload_frame(cls):
    header, payload = p.encode(sample(cls))
    assert reason_of([header]) == "bad frame count"
    assert reason_of([header, payload, payload]) == "bad frame count"


@pytest.mark.parametrize("n", [0, 1, 3])
def test_a_result_has_one_payload_frame_per_topic(n):
    header = p.header(p.Result(1, 2, 1, ["a", "b"], [1, 1], []))
    with pytest.raises(ProtocolError) as info:
        p.decode([header, *[b"\x91\x01"] * n])
    assert info.value.reason == "bad frame count"
    assert p.RESULT in str(info.value)


def test_a_result_with_no_topics_has_no_payload_frame():
    empty = p.Result(1, 2, 1, [], [], [])
    assert p.encode(empty) == [p.header(empty)]
    assert p.decode([p.header(empty)]) == empty
    assert reason_of([p.header(empty), b"\x90"]) == "bad frame count"


def test_a_result_whose_counts_and_topics_differ_is_a_bad_frame_count():
    # PROTOCOL.md 3.3 and 8.3: in a result, topics and counts are checked together with the
    # payload frames (`bad frame count`), unlike the parallel lists below (`bad field`).
    header = msgpack.packb([p.VERSION, p.RESULT, 1, 1, 1, ["a", "b"], [1]])
    assert reason_of([header, b"\x91\x01", b"\x91\x01"]) == "bad frame count"


@pytest.mark.parametrize(
    "header",
    [
        [p.VERSION, p.TOPICS, 0, ["a", "b"], [1], 2, False],
        [p.VERSION, p.CURSOR, "n", "", ["a"], [], False],
        [p.VERSION, p.COMMIT, "n", ["a"], [1, 2]],
    ],
)
def test_parallel_lists_of_different_lengths_are_a_bad_field(header):
    assert reason_of(msgpack.packb(header)) == "bad field"


def test_header_errors_come_before_frame_count_errors():
    # A header that is wrong is refused for what is wrong in it, however many frames follow.
    negative_seq = msgpack.packb([p.VERSION, p.BATCH, "prod", -1, "t", 1])
    assert reason_of([negative_seq]) == "bad field"
    assert reason_of([negative_seq, b"\x90", b"\x90"]) == "bad field"
    empty_topic = msgpack.packb([p.VERSION, p.RESULT, 1, 1, 1, ["t", ""], [1, 1]])
    assert reason_of([empty_topic]) == "bad field"
    assert reason_of([msgpack.packb([p.VERSION, p.BATCH, "prod", 1, "t"])]) == "bad header"
    assert reason_of([b"\xc1"]) == "bad header"


# --- rejections -----------------------------------------------------------------------------


def test_oversized_header_is_rejected_before_parsing():
    (frame,) = p.encode(p.Failed(1, 1, 1, "x" * p.MAX_HEADER_BYTES))
    assert len(frame) > p.MAX_HEADER_BYTES
    with pytest.raises(ProtocolError) as info:
        p.decode([frame])
    assert info.value.reason == "header too large"
    assert str(len(frame)) in str(info.value)


@pytest.mark.parametrize("ext", [msgpack.ExtType(0, b"xyz"), msgpack.ExtType(5, b""), msgpack.ExtType(127, b"xyz")])
def test_extension_types_are_rejected(ext):
    frame = msgpack.packb([p.VERSION, p.HELLO, ext, "w1", 1])
    with pytest.raises(ProtocolError) as info:
        p.decode([frame])
    assert str(info.value) == "bad header: msgpack extension types are not allowed"


def test_extension_type_hidden_in_a_status_map_is_rejected():
    frame = msgpack.packb([p.VERSION, p.STATUS, {"k": msgpack.ExtType(9, b"x")}])
    assert reason_of(frame) == "bad header"


def test_timestamp_extension_in_a_status_map_is_rejected():
    frame = msgpack.packb([p.VERSION, p.STATUS, {"k": msgpack.Timestamp(1, 0)}])
    with pytest.raises(ProtocolError):
        p.decode([frame])


def test_timestamp_extension_in_a_typed_field_is_rejected():
    frame = msgpack.packb([p.VERSION, p.HELLO, msgpack.Timestamp(1, 0), "w1", 1])
    with pytest.raises(ProtocolError):
        p.decode([frame])


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
        p.encode(p.Batch("prod", 1 << 64, "t", 1, b"\x90"))
    with pytest.raises(OverflowError):
        p.encode(p.Ack([1 << 64]))
    # ... and the float spelling of such a number is not an int.
    assert reason_of(msgpack.packb([p.VERSION, p.BATCH, "prod", float(1 << 64), "t", 1])) == "bad field"
    assert reason_of(msgpack.packb([p.VERSION, p.ACK, [1, float(1 << 64)]])) == "bad field"


def test_largest_int_is_accepted_in_int_lists():
    assert p.decode(p.encode(p.Ack([0, p.MAX_INT]))) == p.Ack([0, p.MAX_INT])


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
    "header",
    [
        [p.VERSION, p.BATCH, "prod", 1, "é" * 128, 1],  # 128 characters, 256 bytes
        [p.VERSION, p.RESULT, 1, 1, 1, ["ok", "\U0001f600" * 64], [1, 1]],  # 64 characters, 256 bytes
        [p.VERSION, p.HELLO, "worker", "ü" * 65, 4],  # a name of 130 bytes
    ],
)
def test_limits_on_names_and_topics_are_in_bytes_not_characters(header):
    assert reason_of(msgpack.packb(header)) == "bad field"


def test_names_and_topics_up_to_their_limit_in_bytes_are_taken():
    topic = "\U0001f600" * 63 + "abc"  # 255 bytes in 66 characters
    msg = p.decode([msgpack.packb([p.VERSION, p.BATCH, "ü" * 64, 1, topic, 1]), b"\x90"])
    assert isinstance(msg, p.Batch) and msg.topic == topic and msg.producer_id == "ü" * 64


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
        p.decode([msgpack.packb([p.VERSION, mtype, *fields])])
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
        (msgpack.packb([1, p.HELLO, "worker", "w1", 1, "r", 2]), "bad header"),  # too many fields
        (msgpack.packb([1, p.HELLO, "worker", "w1", 1, 2]), "bad field"),  # a route is a name
        (msgpack.packb([1, p.BYE, "extra"]), "bad header"),
        (msgpack.packb([1, p.STATUS, {"a": 1}, 2]), "bad header"),
        (msgpack.packb([1, p.STATUS, {1: 2}]), "bad header"),  # non-str map key
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(frame, reason):
    assert reason_of(frame) == reason


def test_error_message_names_the_field_count():
    with pytest.raises(ProtocolError, match="hello takes 3 to 4 fields, got 2"):
        p.decode([msgpack.packb([1, p.HELLO, "worker", "w1"])])


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
        p.decode([msgpack.packb([1, "heartbeat", msgpack.Timestamp(1, 0)])])
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


def test_frames_after_a_header_that_takes_no_payload_are_ignored():
    frames = [p.header(p.Heartbeat(3)), b"stray", b"frames"]
    assert p.decode(frames) == p.Heartbeat(3)
