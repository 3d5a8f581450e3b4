"""One error root for everything zfan raises on purpose.

Each message is written for a person: one line saying what went wrong and what to do.
"""

from __future__ import annotations

from typing import Any


class ZfanError(Exception):
    """Root of every error zfan raises on purpose."""


class ConfigError(ZfanError):
    """A setting is malformed: an endpoint, a number out of range, a bad combination."""


class BindError(ZfanError):
    """A socket could not bind: port in use, address not available, ipc path not writable."""


class AuthError(ZfanError):
    """An encrypted handshake failed: a key refused, a wrong server key, CURVE on one side only."""


class NoSink(ZfanError):
    """No zfan sink answers at an endpoint: nothing welcomed the client within its
    connect_timeout, or what listens there is certainly no zfan sink's port of that kind."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class LedgerError(ZfanError):
    """The ledger cannot be opened, written or trusted."""


class LedgerFull(LedgerError):
    """The disk under the ledger is full: nothing more can be committed until space is freed."""

    def __init__(self, ledger: str) -> None:
        # Acks follow commits, so what was acknowledged is in the ledger; the rest is resent.
        super().__init__(
            f"ledger {ledger}: disk full; nothing acknowledged is lost (free space and start the sink again)"
        )
        self.ledger = ledger


class LedgerLost(LedgerError):
    """A shared ledger is out of this sink's hands: the database is unreachable, or another
    sink took it over. The sink stops serving at once and stands by; what it acknowledged is in
    the ledger, what it did not is resent by its producers to the sink that took over."""


class Fenced(LedgerLost):
    """Another sink took the shared ledger over (a higher epoch): this one's writes are refused."""


class AppError(ZfanError):
    """The user's processing function cannot be imported or called."""


class ProtocolError(ZfanError):
    """An inbound message does not follow docs/PROTOCOL.md. Carries a short reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SerializationError(ZfanError):
    """A record msgpack cannot encode."""


class DeliveryTimeout(ZfanError):
    """flush() or close() gave up with batches still unacknowledged by the sink."""

    def __init__(self, unacked: int, timeout: float, held: str = "") -> None:
        super().__init__(
            f"{unacked} batch(es) not acknowledged by the sink after {timeout:g} s"
            + (f" ({held})" if held else "")
            + "; they are kept and will be resent if the producer stays open"
        )
        self.unacked = unacked


class OutcomeTimeout(ZfanError):
    """join() gave up with batches whose outcome has not come; `outcomes` is what did come."""

    def __init__(self, unended: int, timeout: float, outcomes: Any, held: str = "") -> None:
        super().__init__(
            f"{unended} batch(es) not processed after {timeout:g} s"
            + (f" ({held})" if held else "")
            + " (acknowledged: stored in the sink's ledger, and processed when a worker takes them)"
        )
        self.unended = unended
        self.outcomes = outcomes


class Closed(ZfanError):
    """The object was used after close()."""
