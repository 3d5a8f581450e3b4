"""What the asyncio API's loops wait on: zmq.asyncio sockets from an asyncio view of the
caller's context, polled by a zmq.asyncio poller together with a future that wakes the loop
early (as the threaded loops poll a wake-up pipe next to their sockets)."""

from __future__ import annotations

import asyncio
import math
from typing import Any, cast

import zmq
import zmq.asyncio


def aio_context(context: zmq.Context[Any] | None) -> zmq.asyncio.Context:
    """`context` (zmq's global one if None) as a zmq.asyncio context, whose sockets an event
    loop can wait on. A plain context is shadowed, not copied: the sockets are its own, and
    terminating it stays its owner's to do."""
    ctx = context if context is not None else zmq.Context.instance()
    if isinstance(ctx, zmq.asyncio.Context):
        return ctx
    return zmq.asyncio.Context.shadow(ctx)


class Poll:
    """A zmq.asyncio poller kept while the sockets it watches stay the same (as
    zfan.nodes.transport.Poll is for a thread)."""

    def __init__(self) -> None:
        self._watched: list[tuple[Any, int]] = []
        self._poller = zmq.asyncio.Poller()

    async def __call__(
        self, watched: list[tuple[Any, int]], seconds: float, wake: asyncio.Future[None] | None = None
    ) -> dict[Any, int]:
        """Wait up to `seconds` (inf: no limit) for one of (socket, POLLIN/POLLOUT), or for `wake`
        to be done; what is ready. Cancelled, it leaves nothing registered on the event loop."""
        if watched != self._watched:
            self._poller = zmq.asyncio.Poller()
            for sock, flags in watched:
                self._poller.register(sock, flags)
            self._watched = watched
        timeout = None if seconds == math.inf else math.ceil(max(0.0, seconds) * 1000)
        polled = self._poll(timeout)
        if not polled.done():
            try:
                waited: list[asyncio.Future[Any]] = [polled] if wake is None else [polled, wake]
                await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not polled.done():
                    polled.cancel()  # (which unregisters what it watched)
        if polled.cancelled():  # woken first: what is ready now
            polled = self._poll(0)
        return dict(polled.result())

    def _poll(self, timeout: int | None) -> asyncio.Future[list[tuple[Any, int]]]:
        return cast("asyncio.Future[list[tuple[Any, int]]]", self._poller.poll(timeout))  # a Future, typed Awaitable
