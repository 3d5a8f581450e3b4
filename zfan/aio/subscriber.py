"""The asyncio subscriber: zfan.Subscriber's twin for code that runs on an event loop.

Like the threaded one it keeps no task of its own: its sockets (zmq.asyncio ones) are read
when the caller awaits recv(), wait_ready() or the next result of ``async for``, which turn
the same SubscriberBase. So its sockets go without ZeroMQ heartbeats (transport.socket's
`stallable`): a caller may leave them unread for long.

One thing blocks the event loop: on the way to an error (no sink answered in time, a handshake
broken off) the turn asks the endpoint what it is, as the threaded one does
(zfan.nodes.probe), which takes up to a second when something listens there and says nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from ..config import SubscriberSettings, settings_from
from ..errors import Closed
from ..nodes.subscriber import TURN, SubscriberBase
from ..partitions import unpartitioned
from ..subscription import Message
from .polling import Poll, aio_context

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import SubscriberOptions


class AsyncSubscriber(SubscriberBase):
    """``async with AsyncSubscriber(results=..., control=..., topics=["sensor."]) as sub:
    async for msg in sub: ...``

    Takes what zfan.Subscriber takes (SubscriberSettings, or their fields as keyword options),
    and `context`, a zmq context, plain or zmq.asyncio (zmq's global one if None). With
    ``control`` (the sink's control endpoint) gaps are repaired from the sink's ledger; with
    ``durable="name"`` as well, the position is saved at the sink, so that a subscriber of that
    name resumes where the last one stopped.
    """

    def __init__(
        self,
        settings: SubscriberSettings | None = None,
        *,
        context: zmq.Context[Any] | None = None,
        **options: Unpack[SubscriberOptions],
    ) -> None:
        s = settings_from("AsyncSubscriber", SubscriberSettings, settings, options)
        unpartitioned("AsyncSubscriber", s)
        super().__init__(s, aio_context(context))
        self._poll = Poll()
        self._turning = asyncio.Lock()  # one turn at a time, whichever task asks

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the sink has our subscriptions (and, with a control channel, until we know
        where each topic starts); True if that happened within the timeout. Raises NoSink once
        no sink has answered within connect_timeout (counted from the first wait_ready() or
        recv()), or at once if an endpoint is certainly no sink's; AuthError if a handshake
        was refused."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._turn(min(left, TURN))
        return True

    async def recv(self, timeout: float | None = None) -> Message | None:
        """The next result in order, or None if none comes within the timeout (seconds).
        Raises RetentionGap (once per gap) for results the sink no longer has, and NoSink or
        AuthError as wait_ready() does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self._next()
            if out is not None:
                return out
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            await self._turn(TURN if left is None else min(left, TURN))

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Message:
        while True:
            msg = await self.recv()
            if msg is not None:
                return msg

    async def run(
        self, callback: Callable[[Message], object], *, count: int | None = None, timeout: float | None = None
    ) -> int:
        """Call ``callback`` (a function, or an async one, which is awaited) with each result
        until ``count`` results, or ``timeout`` seconds with nothing new. Returns how many were
        delivered."""
        n = 0
        while count is None or n < count:
            msg = await self.recv(timeout)
            if msg is None:
                break
            done = callback(msg)
            if inspect.isawaitable(done):
                await done
            n += 1
        return n

    async def commit(self) -> None:
        """Save a durable subscriber's position at the sink now (it is also saved every second
        and on close)."""
        self._commit()

    async def close(self) -> None:
        """Commit a durable position, say bye, close the sockets; once a turn another task is
        taking has ended. Closing again does nothing."""
        async with self._turning:
            self._close()

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _turn(self, wait: float) -> None:
        """One turn: poll for at most `wait` seconds (less if the core has something due), then
        take what came. Cancelled while it polls, it leaves nothing waiting on the loop."""
        async with self._turning:
            if self._closed:  # closed meanwhile, by another task
                raise Closed("subscriber is closed")
            watched, seconds = self._before(wait)
            self._after(await self._poll(watched, seconds))
