"""Who is alive: the last time each peer was heard from, against a clock.

Any message from a peer counts as a heartbeat (as in the zguide's Paranoid Pirate); a peer
silent for longer than ``expiry`` seconds is dead. The clock is passed in, so tests drive it.
"""

from __future__ import annotations

from collections.abc import Hashable


class Tracker:
    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        self._last: dict[Hashable, float] = {}

    def seen(self, peer: Hashable, now: float) -> None:
        self._last[peer] = now

    def forget(self, peer: Hashable) -> None:
        self._last.pop(peer, None)

    def __contains__(self, peer: Hashable) -> bool:
        return peer in self._last

    def __len__(self) -> int:
        return len(self._last)

    def peers(self) -> list[Hashable]:
        return list(self._last)

    def idle(self, peer: Hashable, now: float) -> float:
        return now - self._last[peer]

    def next_expiry(self) -> float | None:
        """When the quietest peer will have been silent too long (None with no peers)."""
        return min(self._last.values()) + self.expiry if self._last else None

    def expired(self, now: float) -> list[tuple[Hashable, float]]:
        """(peer, when last heard) of the peers silent past the expiry, forgotten as they are
        returned."""
        dead = [(p, t) for p, t in self._last.items() if now - t > self.expiry]
        for p, _ in dead:
            del self._last[p]
        return dead


class LastHeard:
    """When anyone but a given source was last heard from: the sink's evidence that its own
    link worked while one peer was silent. Keeps the two latest distinct sources, which is
    enough to answer for any one of them."""

    def __init__(self) -> None:
        self._latest: tuple[Hashable, float] = (None, float("-inf"))
        self._other: tuple[Hashable, float] = (None, float("-inf"))  # latest of any other source

    def heard(self, source: Hashable, now: float) -> None:
        if self._latest[0] != source:
            self._other = self._latest
        self._latest = (source, now)

    def latest_except(self, source: Hashable) -> float:
        return self._latest[1] if self._latest[0] != source else self._other[1]


class Beat:
    """When to send the next heartbeat: every ``interval`` seconds."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.next = now + interval

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        # Skip beats missed during a long stall instead of sending a burst.
        self.next = max(self.next + self.interval, now + self.interval / 2)
        return True
