"""Calling the user's processing function on a worker's function thread: a plain function as it
is, an ``async def`` one (or an object whose ``__call__`` is one) on an event loop which that
thread keeps for the worker's life."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

Output: TypeAlias = "list[Any] | dict[str, list[Any]] | None"
# What a worker runs: ``process(records) -> list | dict[str, list] | None``, or an async def of it.
Process: TypeAlias = "Callable[[list[Any]], Output | Awaitable[Output]]"


def is_async(process: object) -> bool:
    """Whether calling `process` makes a coroutine to run: an async def function (or a partial
    of one), or an object whose __call__ is one."""
    if inspect.iscoroutinefunction(process):
        return True
    # A call looks __call__ up on the type, as this does: a class (whose call makes an instance) is not async.
    return callable(process) and inspect.iscoroutinefunction(type(process).__call__)


class Caller:
    """``with Caller(process) as call: out = call(records)``, on the thread that calls it.

    Whether `process` is async is decided here, once. An async one runs each batch to its end
    on an event loop made by entering and closed by leaving, on the same thread: kept between
    batches, so that what the function keeps across calls (a client session, a connection
    pool) stays bound to one loop. That loop runs only while a batch does; tasks the function
    left running are cancelled when the worker stops."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.is_async = is_async(process)
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> Caller:
        if self.is_async:
            self._loop = asyncio.new_event_loop()
        return self

    def __call__(self, records: list[Any]) -> Output:
        if self._loop is None:
            return cast(Output, self.process(records))
        return self._loop.run_until_complete(cast(Awaitable[Output], self.process(records)))

    def __exit__(self, *exc: object) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:  # as asyncio.run() ends
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
