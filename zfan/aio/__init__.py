"""zfan's asyncio API: the producer and the subscriber as coroutines, for code that runs on an
event loop. A Worker (zfan.Worker, or `zfan worker --app`) takes an ``async def process(records)``
as it takes a plain function."""

from .producer import AsyncProducer
from .subscriber import AsyncSubscriber

__all__ = ["AsyncProducer", "AsyncSubscriber"]
