"""Settings for every role, as keyword-only dataclasses.

Nothing here reads the environment: the CLI does that, once, and passes values in.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

from .errors import ConfigError
from .partitions import parse_sinks
from .routing import DEFAULT_ROUTE, RetryPolicy, Routes, check_route_name

DEFAULT_INTAKE = "tcp://127.0.0.1:5557"
DEFAULT_CONTROL = "tcp://127.0.0.1:5558"
DEFAULT_RESULTS = "tcp://127.0.0.1:5559"
# In flight, in batches: a worker's leases (the sink holds back past 4 000 records), and a
# producer's unacknowledged batches. With small batches, 64 of each left every process idle a
# third of the time, waiting on the round trip; 256 gave 1.4 times the records/s at batches of
# 10 and the same at 100 and 1000 (bench/README.md).
DEFAULT_CREDIT = 256
DEFAULT_WINDOW = 256

_TCP = re.compile(r"^tcp://(?P<host>\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\*|\d{1,5})$")
_IPC = re.compile(r"^ipc://(?P<path>.+)$")


def check_endpoint(endpoint: str, *, what: str = "endpoint") -> str:
    """Return the endpoint if it is a tcp:// or ipc:// address zfan can use, else raise ConfigError."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"{what} must be a string like tcp://127.0.0.1:5557, not {type(endpoint).__name__}")
    m = _TCP.match(endpoint)
    if m:
        port = m.group("port")
        if port != "*" and not 0 <= int(port) < 65536:
            raise ConfigError(f"{what} {endpoint!r}: port must be at most 65535 (* or 0 binds any free port)")
        return endpoint
    m = _IPC.match(endpoint)
    if m and m.group("path").strip():
        return endpoint
    raise ConfigError(f"{what} {endpoint!r} is not a valid endpoint: use tcp://HOST:PORT or ipc:///path/to/socket")


def endpoints(value: str, *, what: str = "endpoint") -> list[str]:
    """A client's endpoints of one kind: one sink's, or several sinks' separated by commas (an
    active sink and its standbys on a shared ledger, tried in turn); each checked."""
    if not isinstance(value, str):
        return [check_endpoint(value, what=what)]
    return [check_endpoint(part.strip(), what=what) for part in value.split(",")]


def check_sinks(**kinds: str | None) -> int:
    """How many sinks a client's endpoint settings name, each kind listing them in one order;
    ConfigError if the lists differ in length."""
    counts = {
        kind: len(endpoints(value, what=f"{kind} endpoint")) for kind, value in kinds.items() if value is not None
    }
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        raise ConfigError(f"endpoints name the sinks in one order, as many of each kind: got {listed}")
    return max(counts.values(), default=1)


def sink_endpoint(value: str, sink: int) -> str:
    """The endpoint of sink number `sink` in a setting that lists one or several."""
    listed = [part.strip() for part in value.split(",")]
    return listed[sink % len(listed)]


_HTTP = re.compile(r"^(?:(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]*):)?(?P<port>\d{1,5})$")


def split_http(address: str) -> tuple[str, int]:
    """(host, port) of an HTTP address 'HOST:PORT', ':PORT' or 'PORT' (the host then 127.0.0.1;
    port 0 takes any free port), else ConfigError."""
    m = _HTTP.match(address) if isinstance(address, str) else None
    if m is None or int(m.group("port")) > 65535:
        raise ConfigError(f"http address {address!r} is not HOST:PORT (e.g. 127.0.0.1:5560, or :5560 for localhost)")
    host = (m.group("host") or "127.0.0.1").strip("[]")
    return host, int(m.group("port"))


def connect_address(bound: str) -> str:
    """The address a local client uses to reach an endpoint bound on a wildcard host."""
    m = _TCP.match(bound)
    if m and m.group("host") in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{m.group('port')}"
    if m and m.group("host") in ("[::]",):
        return f"tcp://[::1]:{m.group('port')}"
    return bound


def check_name(what: str, value: str, limit: int = 128) -> None:
    if not isinstance(value, str) or not value or len(value.encode()) > limit:
        raise ConfigError(f"{what} must be 1 to {limit} bytes of text, not {value!r}")


def check_topic(topic: str) -> None:
    check_name("topic", topic, 255)
    if topic.startswith("zfan."):
        raise ConfigError(f"topic {topic!r}: topics starting with 'zfan.' are reserved")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_retention(text: str) -> tuple[int | None, float | None]:
    """'100000' keeps that many results; '30m', '12h', '7d' keeps results that young."""
    text = text.strip().lower()
    try:
        if text[-1:] in _UNITS:
            age = float(text[:-1]) * _UNITS[text[-1]]
            if age > 0:
                return None, age
        elif int(text) > 0:
            return int(text), None
    except ValueError:
        pass
    raise ConfigError(f"retention {text!r}: give a number of results (100000) or an age (30m, 12h, 7d)")


def _positive(name: str, value: float, *, integer: bool = False) -> None:
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be greater than 0, not {value!r}")


def _check_connect_timeout(value: float | None) -> None:
    if value is not None:
        _positive("connect_timeout", value)


def _check_partitions(settings: Any, **defaults: tuple[str | None, ...]) -> None:
    """`sinks` names every endpoint of a partitioned client: given with one of them set too (to
    other than its `defaults`), which wins would be a guess, so it is a ConfigError."""
    sinks = settings.sinks
    if sinks is None:
        return
    if not isinstance(sinks, str) or not sinks.strip():
        raise ConfigError(f"sinks must name one or more sinks (as 'host1,host2'), not {sinks!r}")
    parse_sinks(sinks)
    for name, default in defaults.items():
        if getattr(settings, name) not in default:
            raise ConfigError(f"give sinks or {name}, not both: sinks names each sink's {name} endpoint")


# Seconds a client waits for its first welcome before it stops with NoSink. A producer or a
# subscriber is mostly started by hand or by a script that wants to know soon; a worker is a
# service, often started (by a supervisor, with its fleet) before its sink: it waits.
CLIENT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Application heartbeats: a peer silent for heartbeat x liveness seconds is dead."""

    heartbeat: float = 0.25
    liveness: int = 3

    def __post_init__(self) -> None:
        _positive("heartbeat", self.heartbeat)
        _positive("liveness", self.liveness, integer=True)

    @property
    def expiry(self) -> float:
        return self.heartbeat * self.liveness


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one inbound message may weigh. ZeroMQ enforces `max_frame` on every receiving
    socket (a larger frame drops the connection); zfan checks the rest before decoding."""

    max_frame: int = 16 << 20  # bytes in one frame: a batch's or a result's payload
    max_frames: int = 10_002  # frames in one message: a header and a payload per topic
    max_message: int = 64 << 20  # bytes in one message, all frames together

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_frames", "max_message"):
            _positive(name, getattr(self, name), integer=True)


@dataclass(frozen=True, kw_only=True)
class Curve:
    """CURVE keys for one node: its own secret key file, and either the sink's public key file
    (a client) or a folder of the client public keys it lets in (the sink)."""

    secret_file: str
    server_key: str | None = None
    allow_keys: str | None = None


@dataclass(frozen=True, kw_only=True)
class SinkSettings:
    intake: str = DEFAULT_INTAKE
    control: str = DEFAULT_CONTROL
    results: str = DEFAULT_RESULTS
    ledger: str = "zfan.db"
    fsync: str = "normal"
    timing: Timing = field(default_factory=Timing)
    max_attempts: int = 3
    batch_timeout: float = 300.0
    # Payloads of batches not yet leased are kept in memory up to this many bytes;
    # beyond it they are read back from the ledger when leased.
    cache_bytes: int = 256 * 1024 * 1024
    # Results queued for each subscriber before PUB drops for it (ZeroMQ's SNDHWM, in
    # messages). What it drops, the subscriber repairs from the ledger; what it queues is the
    # sink's memory: 1000 results of 1000 records are about 40 MB per slow subscriber.
    publish_hwm: int = 1000
    # Published results kept in the ledger for subscribers to repair gaps and replay from:
    # the newest `retain_count`, and (if set) none older than `retain_age` seconds.
    retain_count: int | None = 100_000
    retain_age: float | None = None
    curve: Curve | None = None
    limits: Limits = field(default_factory=Limits)
    # Seconds a stopping sink waits for the batches leased to come back before it closes.
    drain_timeout: float = 30.0
    # HOST:PORT for /metrics, the dashboard, /healthz and /readyz; None serves no HTTP.
    http: str | None = None
    # Workers connected for /readyz to say ready (with local workers, at least 1 all the same).
    min_workers: int = 0
    # Topic prefix -> route (app name): a batch goes only to workers serving its topic's route,
    # that of the longest prefix it starts with, or "default" (see zfan.routing).
    routes: Mapping[str, str] = field(default_factory=dict)
    # Route -> how its failed batches are retried; a route not named here gets max_attempts
    # attempts, retried at once.
    retries: Mapping[str, RetryPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        routed = Routes(self.routes).names  # refuses a bad prefix or name
        for route, policy in self.retries.items():
            check_route_name(route)
            if route not in routed:
                raise ConfigError(
                    f"a retry policy for route {route!r}, to which no topic is routed: "
                    f"add a route (PREFIX={route}), or name one of {', '.join(sorted(routed))}"
                )
            if not isinstance(policy, RetryPolicy):
                raise ConfigError(f"retries[{route!r}] must be a zfan.RetryPolicy, not {type(policy).__name__}")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be at least 0, not {self.drain_timeout}")
        if self.http is not None:
            split_http(self.http)
        if not isinstance(self.min_workers, int) or self.min_workers < 0:
            raise ConfigError(f"min_workers must be 0 or more, not {self.min_workers!r}")
        for name in ("intake", "control", "results"):
            check_endpoint(getattr(self, name), what=f"{name} endpoint")
        if self.fsync not in ("normal", "full"):
            raise ConfigError(f"fsync must be 'normal' or 'full', not {self.fsync!r}")
        _positive("max_attempts", self.max_attempts, integer=True)
        _positive("batch_timeout", self.batch_timeout)
        if self.retain_count is not None:
            _positive("retain_count", self.retain_count, integer=True)
        if self.retain_age is not None:
            _positive("retain_age", self.retain_age)
        if not isinstance(self.ledger, str) or not self.ledger:
            raise ConfigError("ledger must be a file path or ':memory:'")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    control: str = DEFAULT_CONTROL
    credit: int = DEFAULT_CREDIT
    name: str = field(default_factory=lambda: f"worker-{uuid.uuid4().hex[:8]}")
    timing: Timing = field(default_factory=Timing)
    curve: Curve | None = None
    limits: Limits = field(default_factory=Limits)
    # Seconds a stopping worker takes to finish the batches it holds before it hands them back.
    drain_timeout: float = 30.0
    # Seconds to wait for the first welcome before stopping with NoSink; None waits for a sink
    # as long as it takes. Once welcomed, a worker whose sink goes away dials until stopped.
    connect_timeout: float | None = None
    # HOST:PORT for the worker's own /metrics, /healthz and /readyz; None serves no HTTP.
    http: str | None = None
    # The route (app name) this worker serves: it is leased only batches of that route.
    route: str = DEFAULT_ROUTE
    # Key-partitioned sinks (zfan.partitions), in place of `control`: the worker spans them all.
    sinks: str | None = None

    def __post_init__(self) -> None:
        check_sinks(control=self.control)
        _check_partitions(self, control=(DEFAULT_CONTROL,))
        check_route_name(self.route)
        if self.http is not None:
            split_http(self.http)
        _check_connect_timeout(self.connect_timeout)
        _positive("credit", self.credit, integer=True)
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be at least 0, not {self.drain_timeout}")
        if self.credit > 1000:
            raise ConfigError(f"credit must be at most 1000, not {self.credit}")
        check_name("worker name", self.name)


@dataclass(frozen=True, kw_only=True)
class ProducerSettings:
    intake: str = DEFAULT_INTAKE
    control: str = DEFAULT_CONTROL
    producer_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    topic: str = "default"
    batch_size: int = 1000
    linger_ms: float = 5.0
    # Batches sent but not yet acknowledged; send() blocks when this many are out.
    window: int = DEFAULT_WINDOW
    # An unacknowledged batch is sent again after this many seconds.
    resend_after: float = 2.0
    timing: Timing = field(default_factory=Timing)
    curve: Curve | None = None
    limits: Limits = field(default_factory=Limits)
    # Seconds to wait for the first welcome before stopping with NoSink (None: no limit). Once
    # welcomed, a producer whose sink goes away dials until closed; flush() bounds that wait.
    connect_timeout: float | None = CLIENT_CONNECT_TIMEOUT
    # Key-partitioned sinks (zfan.partitions), in place of `intake` and `control`: each record
    # goes to the sink that owns its key, the field `key` of the record (None: its topic).
    sinks: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        check_sinks(intake=self.intake, control=self.control)
        _check_partitions(self, intake=(DEFAULT_INTAKE,), control=(DEFAULT_CONTROL,))
        if self.key is not None:
            check_name("key", self.key, 255)
            if self.sinks is None:
                raise ConfigError("key chooses one of several sinks: give them with sinks")
        _check_connect_timeout(self.connect_timeout)
        _positive("batch_size", self.batch_size, integer=True)
        if not isinstance(self.linger_ms, (int, float)) or self.linger_ms < 0:
            raise ConfigError(f"linger_ms must be 0 or more, not {self.linger_ms!r}")
        _positive("window", self.window, integer=True)
        _positive("resend_after", self.resend_after)
        check_name("producer_id", self.producer_id)
        check_topic(self.topic)


@dataclass(frozen=True, kw_only=True)
class SubscriberSettings:
    results: str = DEFAULT_RESULTS
    # The sink's control endpoint: with it, gaps are repaired from the sink's ledger.
    control: str | None = None
    topics: tuple[str, ...] = ("",)
    # Keep the position at the sink under this name, to resume after a restart.
    durable: str | None = None
    # Results queued on the subscriber's side before ZeroMQ drops (RCVHWM, in messages); gaps
    # are repaired over `control`.
    hwm: int = 1000
    curve: Curve | None = None
    limits: Limits = field(default_factory=Limits)
    # Seconds to wait for the sink's first answer (its welcome on control, and on results the
    # answer that says it has our subscriptions) before wait_ready() and recv() raise NoSink;
    # None: no limit. Once answered, a subscriber whose sink goes away dials until closed.
    connect_timeout: float | None = CLIENT_CONNECT_TIMEOUT
    # Key-partitioned sinks (zfan.partitions), in place of `results` and `control`: the
    # subscriber takes every sink's results, each sink's topics in order, gaps repaired.
    sinks: str | None = None

    def __post_init__(self) -> None:
        check_sinks(results=self.results, control=self.control)
        _check_partitions(self, results=(DEFAULT_RESULTS,), control=(None, DEFAULT_CONTROL))
        _check_connect_timeout(self.connect_timeout)
        for prefix in self.topics:
            if not isinstance(prefix, str) or len(prefix.encode()) > 255:
                raise ConfigError(f"topic prefix {prefix!r}: at most 255 bytes of text")
        if self.durable is not None:
            check_name("durable name", self.durable)
            if self.control is None and self.sinks is None:
                raise ConfigError("a durable subscriber needs the sink's control endpoint")
        if isinstance(self.topics, str):
            raise ConfigError("topics must be a list of prefixes, not a single string")
        if isinstance(self.topics, list):
            object.__setattr__(self, "topics", tuple(self.topics))
        _positive("hwm", self.hwm, integer=True)


# The keyword options each role's constructor takes: the fields of its settings, typed, so that
# `Producer(intak=...)` is an error under a type checker (and a TypeError at run time).
class SinkOptions(TypedDict, total=False):
    intake: str
    control: str
    results: str
    ledger: str
    fsync: str
    timing: Timing
    max_attempts: int
    batch_timeout: float
    cache_bytes: int
    publish_hwm: int
    retain_count: int | None
    retain_age: float | None
    curve: Curve | None
    limits: Limits
    drain_timeout: float
    http: str | None
    min_workers: int
    routes: Mapping[str, str]
    retries: Mapping[str, RetryPolicy]


class WorkerOptions(TypedDict, total=False):
    control: str
    credit: int
    name: str
    timing: Timing
    curve: Curve | None
    limits: Limits
    drain_timeout: float
    connect_timeout: float | None
    http: str | None
    route: str
    sinks: str | None


class ProducerOptions(TypedDict, total=False):
    intake: str
    control: str
    producer_id: str
    topic: str
    batch_size: int
    linger_ms: float
    window: int
    resend_after: float
    timing: Timing
    curve: Curve | None
    limits: Limits
    connect_timeout: float | None
    sinks: str | None
    key: str | None


class SubscriberOptions(TypedDict, total=False):
    results: str
    control: str | None
    topics: tuple[str, ...] | list[str]
    durable: str | None
    hwm: int
    curve: Curve | None
    limits: Limits
    connect_timeout: float | None
    sinks: str | None


S = TypeVar("S")


def settings_from(role: str, cls: type[S], settings: S | None, options: Mapping[str, Any]) -> S:
    """A role's settings: `settings` as given, with keyword `options` in place of its fields. An
    unknown option is a TypeError that names the role and the option it may have meant."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{role}() got an unexpected keyword argument {key!r}{hint}")
    if settings is None:
        return cls(**options)
    return dataclasses.replace(settings, **options)  # type: ignore[type-var]
