"""Which app runs a batch, and how its failures are retried: routes and their retry policies.

A route is a name for an app. The sink maps topic prefixes to routes (`--route orders=orders`);
a batch's route is the one of the longest prefix its topic starts with, or DEFAULT_ROUTE. A
worker serves one route (`--app orders=mymodule:process`; a bare `module:function` serves
DEFAULT_ROUTE), and is leased only batches of that route: a batch whose route no worker
serves waits, counted in the status, instead of going to another app.

Each route has a retry policy: how many attempts, how long a failed batch waits before the next
one (exponential backoff with jitter, as Celery's retry_backoff and Dramatiq's Retries do), and
which exceptions are worth a retry at all.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

DEFAULT_ROUTE = "default"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_route_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"route name {name!r}: 1 to 128 letters, digits, '_', '.' or '-'")
    return name


class Routes:
    """Topic prefix -> route name; a topic's route is its longest matching prefix's."""

    def __init__(self, prefixes: Mapping[str, str] | None = None) -> None:
        self.prefixes = dict(prefixes or {})
        for prefix, name in self.prefixes.items():
            if not isinstance(prefix, str) or not prefix:
                raise ConfigError(f"route prefix {prefix!r}: a topic prefix of at least one character")
            check_route_name(name)
        # Longest first: the first that matches is the longest.
        self._ordered = sorted(self.prefixes.items(), key=lambda kv: -len(kv[0]))
        self._cache: dict[str, str] = {}

    @property
    def names(self) -> set[str]:
        return {DEFAULT_ROUTE, *self.prefixes.values()}

    def of(self, topic: str) -> str:
        route = self._cache.get(topic)
        if route is None:
            route = next((name for prefix, name in self._ordered if topic.startswith(prefix)), DEFAULT_ROUTE)
            if len(self._cache) < 100_000:  # topics are many in some pipelines: a bounded memo
                self._cache[topic] = route
        return route


def parse_route(text: str) -> tuple[str, str]:
    """`PREFIX=NAME`, as --route takes it."""
    prefix, sep, name = text.partition("=")
    if not sep or not prefix or not name:
        raise ConfigError(f"route {text!r}: write it TOPIC_PREFIX=ROUTE, e.g. orders.=orders")
    return prefix, check_route_name(name)


def parse_app(text: str) -> tuple[str, str]:
    """`[ROUTE=]module:function`, as a worker's --app takes it: (route, app)."""
    route, sep, app = text.rpartition("=")
    if not sep:
        return DEFAULT_ROUTE, text
    return check_route_name(route), app


@dataclass(frozen=True)
class RetryPolicy:
    """How a route's failed batches are retried.

    `max_attempts`: attempts before a batch is dead-lettered. `backoff`: (first, most) seconds a
    batch waits after a failed attempt before it is leased again; the wait doubles with each
    attempt up to the most, and a random part of it (`jitter`, 0 to 1) is taken off so that
    batches that failed together do not come back together. (0, 0): at once. `retry_on`:
    exception class names (a base class matches its subclasses, e.g. "OSError"); a failure
    whose exception is none of them is dead-lettered at once. Empty: every exception is retried.
    `no_retry_on`: exception class names never retried, checked first.

    A batch timeout, or a worker's death while it held that batch alone, is retried like a
    failure with no exception known. A worker's death while it held several costs none of them
    an attempt: they are leased again at once (see PROTOCOL.md section 8.4).
    """

    max_attempts: int | None = None  # None: the sink's max_attempts
    backoff: tuple[float, float] = (0.0, 0.0)
    jitter: float = 0.5
    retry_on: tuple[str, ...] = ()
    no_retry_on: tuple[str, ...] = ()
    _random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if attempts is not None and (not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1):
            raise ConfigError(f"max_attempts must be a whole number from 1, not {attempts!r}")
        first, most = self.backoff
        if not (0 <= first <= most < math.inf):
            raise ConfigError(f"backoff ({first}, {most}): seconds with 0 <= first <= most, and finite")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"jitter must be from 0 to 1, not {self.jitter!r}")

    def retried(self, kinds: list[str]) -> bool:
        """Whether a failure whose exception is of these classes (most derived first) gets another attempt."""
        names = {k.rpartition(".")[2] for k in kinds} | set(kinds)
        if names & set(self.no_retry_on):
            return False
        return not self.retry_on or bool(names & set(self.retry_on))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 for the first)."""
        first, most = self.backoff
        if most <= 0:
            return 0.0
        wait = min(most, first * 2.0 ** max(0, attempt - 1))
        return wait * (1 - self.jitter * self._random())


def parse_retry(text: str) -> tuple[str, RetryPolicy]:
    """`ROUTE:attempts=5,backoff=0.5..60,jitter=0.5,on=ConnectionError|TimeoutError,not=KeyError`,
    as --retry takes it; every part after the route is optional."""
    route, sep, rest = text.partition(":")
    check_route_name(route)
    values: dict[str, str] = {}
    for part in filter(None, rest.split(",")) if sep else []:
        key, eq, value = part.partition("=")
        if not eq or key not in ("attempts", "backoff", "jitter", "on", "not"):
            raise ConfigError(
                f"retry {text!r}: {part!r} is not one of attempts=N, backoff=FIRST..MOST, jitter=0..1, "
                "on=Error|Error, not=Error|Error"
            )
        values[key] = value
    try:
        attempts = int(values["attempts"]) if "attempts" in values else None
        first, _, most = values.get("backoff", "0..0").partition("..")
        backoff = (float(first), float(most or first))
        jitter = float(values.get("jitter", 0.5))
    except ValueError:
        raise ConfigError(f"retry {text!r}: attempts is a whole number, backoff FIRST..MOST seconds") from None
    names = [tuple(filter(None, values.get(k, "").split("|"))) for k in ("on", "not")]
    return route, RetryPolicy(attempts, backoff, jitter, names[0], names[1])
