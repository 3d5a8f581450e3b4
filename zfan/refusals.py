"""What the sink refuses before reading a message (one beyond its limits, or from a CURVE key no
longer allowed), and how refusals are told: counted by reason, logged at most once per peer per
LOG_EVERY seconds, so that a misbehaving peer cannot flood the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from .config import Limits
from .errors import ProtocolError

log = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two log lines about one peer's refused messages


def _peer_name(peer: bytes | str) -> str:
    return peer if isinstance(peer, str) else f"connection {peer.hex()}"


class Refusals:
    def __init__(self, limits: Limits, key_allowed: Callable[[str], bool] | None, clock: Callable[[], float]) -> None:
        self._limits = limits
        # With CURVE: whether a message's key is still allowed (keys can be removed while
        # their connections stay open).
        self.key_allowed = key_allowed
        self._clock = clock
        self.rejected: Counter[str] = Counter()  # reason -> messages refused
        self._logged: dict[bytes | str, float] = {}  # peer -> when its last refusal was logged

    def check(self, frames: list[bytes], key: str | None) -> None:
        """Raise ProtocolError for a message too big to read, or whose key was removed."""
        if len(frames) > self._limits.max_frames:
            raise ProtocolError("too many frames", str(len(frames)))
        if sum(map(len, frames)) > self._limits.max_message:
            raise ProtocolError("message too large", f"{sum(map(len, frames))} bytes")
        if key is not None and self.key_allowed is not None and not self.key_allowed(key):
            raise ProtocolError("key not allowed", f"{key[:8]}... was removed from the allowed keys")

    def refuse(self, exc: ProtocolError, peer: bytes | str) -> None:
        """Count a refused message; log it at most once per peer per LOG_EVERY seconds."""
        self.rejected[exc.reason] += 1
        now = self._clock()
        if now - self._logged.get(peer, -LOG_EVERY) >= LOG_EVERY:
            if len(self._logged) > 10_000:
                self._logged.clear()  # bounded however many peers misbehave
            self._logged[peer] = now
            log.warning(
                "refused a message from %s: %s (%d refused so far)", _peer_name(peer), exc, sum(self.rejected.values())
            )
