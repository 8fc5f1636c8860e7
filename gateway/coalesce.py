"""Coalesce a worker's token stream into fewer, larger client messages.

A worker sends one message per engine step per request; relaying each one costs a gRPC
message (and an HTTP/2 frame, and a Python round through the event loop) per token. The
first chunk goes out at once, so coalescing never adds to time-to-first-token; after it,
chunks that arrive within `window_s` (or until `max_chars` of text) go out as one message.
A bounded queue between the reader and the writer keeps a slow client from buffering a
whole answer in the gateway: when it fills, the reader stops reading and gRPC flow control
pushes back on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_BUFFERED_CHUNKS = 256


class _End:
    pass


class _Failed(Generic[T]):
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def coalesced(
    source: AsyncIterator[T], window_s: float, max_chars: int
) -> AsyncGenerator[list[T], None]:
    """Batches of source items; an item's `text` attribute counts toward max_chars."""
    if window_s <= 0:
        async for single in source:
            yield [single]
        return
    queue: asyncio.Queue[T | _End | _Failed[T]] = asyncio.Queue(MAX_BUFFERED_CHUNKS)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(item)
            await queue.put(_End())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which re-raises it in its own task
            await queue.put(_Failed(exc))

    reader = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    first = True
    try:
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            batch = [item]
            if first:
                first = False
                yield batch
                continue
            chars = len(getattr(item, "text", ""))
            deadline = loop.time() + window_s
            ending: _End | _Failed[T] | None = None
            while chars < max_chars:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if isinstance(nxt, _End | _Failed):
                    ending = nxt
                    break
                batch.append(nxt)
                chars += len(getattr(nxt, "text", ""))
            yield batch
            if isinstance(ending, _End):
                return
            if isinstance(ending, _Failed):
                raise ending.error
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
