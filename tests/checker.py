"""What producers sent against what subscribers got: lost, duplicated and out-of-order.

Every fault test ends with ``assert check(...).ok, report``; the report is short enough to read
when it is not.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Verdict:
    expected: int
    delivered: int
    lost: list[Any] = field(default_factory=list)
    duplicated: dict[Any, int] = field(default_factory=dict)
    unexpected: list[Any] = field(default_factory=list)
    # per topic, places where the seqs a subscriber saw did not go 1, 2, 3, ...
    out_of_order: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.out_of_order)

    def __str__(self) -> str:
        def some(xs: Iterable[Any]) -> str:
            xs = list(xs)
            return f"{len(xs)} (e.g. {xs[:8]})"

        return (
            f"expected {self.expected}, delivered {self.delivered}; lost {some(sorted(self.lost))}, "
            f"duplicated {some(sorted(self.duplicated.items()))}, unexpected {some(self.unexpected)}, "
            f"out of order {some(self.out_of_order.items())}"
        )


def check(sent: Iterable[Any], received: Iterable[Any], seqs: dict[str, list[int]] | None = None) -> Verdict:
    """``sent``: the id of every record producers had acknowledged; ``received``: the id of every
    record result subscribers got, repeats included; ``seqs``: per topic, the seqs in the order a
    subscriber delivered them (they must run 1, 2, 3, ... or start later and run on by one)."""
    want = Counter(sent)
    got = Counter(received)
    verdict = Verdict(expected=sum(want.values()), delivered=sum(got.values()))
    verdict.lost = [k for k in want if got[k] < want[k]]
    verdict.duplicated = {k: n for k, n in got.items() if n > want.get(k, 0) and k in want}
    verdict.unexpected = [k for k in got if k not in want]
    for topic, order in (seqs or {}).items():
        bad = [(a, b) for a, b in zip(order, order[1:], strict=False) if b != a + 1]
        if bad:
            verdict.out_of_order[topic] = bad
    return verdict


def from_json_lines(lines: Iterable[str], key: str = "id") -> tuple[list[Any], dict[str, list[int]]]:
    """The record ids and per-topic seqs in `zfan subscribe` output (per partition and topic,
    "P/TOPIC", from partitioned sinks: each sink numbers its topics' results itself)."""
    ids: list[Any] = []
    seqs: dict[str, list[int]] = {}
    for line in lines:
        msg = json.loads(line)
        stream = msg["topic"] if "partition" not in msg else f"{msg['partition']}/{msg['topic']}"
        seqs.setdefault(stream, []).append(msg["seq"])
        ids.extend(r[key] if isinstance(r, dict) else r for r in msg["records"])
    return ids, seqs
