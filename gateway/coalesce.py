"""Coalesce a worker's token stream into fewer, larger client messages.

A worker sends one message per engine step per request (fewer when it is behind: it merges
pending steps, as vLLM does); relaying each one costs a gRPC message, an HTTP/2 frame and a
Python round through the event loop per token. The first chunk goes out at once, so
coalescing never adds to time-to-first-token; after it, a batch opens when a chunk arrives
and goes out `window_s` after its oldest chunk arrived (sooner once it holds `max_chars` of
text) with every chunk received meanwhile, so no chunk waits longer than the window.

One reader task per stream receives chunks into a bounded buffer; the writer sleeps on one
future and one timer per batch, never per chunk (an `asyncio.wait_for` per chunk costs a task
each on Python 3.11). When the buffer is full the reader stops reading, so a slow client
exerts gRPC flow control back to the worker instead of the gateway buffering a whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_BUFFERED_CHUNKS = 256


class _Buffer(Generic[T]):
    """Chunks the reader has received and the writer has not taken yet."""

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self.chars = 0
        self.oldest_at = 0.0  # loop time the oldest buffered chunk arrived
        self.ended = False
        self.error: Exception | None = None
        self._loop = asyncio.get_running_loop()
        self._writer_waits: asyncio.Future[None] | None = None
        self._writer_wants_chars = 0  # 0: wake on any chunk; n: wake once n chars are buffered
        self._reader_waits: asyncio.Future[None] | None = None

    async def fill(self, source: AsyncIterable[T]) -> None:
        try:
            async for item in source:
                if not self.items:
                    self.oldest_at = self._loop.time()
                self.items.append(item)
                self.chars += len(getattr(item, "text", ""))
                self._wake_writer_if_ready()
                if len(self.items) >= MAX_BUFFERED_CHUNKS:
                    self._reader_waits = self._loop.create_future()
                    await self._reader_waits
        except Exception as exc:  # handed to the writer, which raises it after the chunks before it
            self.error = exc
        finally:
            self.ended = True
            self._wake_writer()

    async def wait_for_chunk(self) -> None:
        if not self.items and not self.ended:
            await self._writer_wait(0)

    async def wait_until(self, deadline: float, max_chars: int) -> None:
        """Until `deadline`, or sooner once max_chars of text (or the end) is buffered."""
        if self._full(max_chars):
            return
        timer = self._loop.call_at(deadline, self._wake_writer)
        try:
            await self._writer_wait(max_chars)
        finally:
            timer.cancel()

    def take(self, max_chars: int) -> list[T]:
        """Buffered chunks in order, up to and including the one that reaches max_chars."""
        batch: list[T] = []
        chars = 0
        while self.items and chars < max_chars:
            item = self.items.popleft()
            batch.append(item)
            chars += len(getattr(item, "text", ""))
        self.chars -= chars
        if self.items:  # left over past max_chars: due with the next batch at the latest
            self.oldest_at = self._loop.time()
        if self._reader_waits is not None and len(self.items) < MAX_BUFFERED_CHUNKS:
            if not self._reader_waits.done():
                self._reader_waits.set_result(None)
            self._reader_waits = None
        return batch

    def _full(self, max_chars: int) -> bool:
        return self.ended or self.chars >= max_chars or len(self.items) >= MAX_BUFFERED_CHUNKS

    async def _writer_wait(self, wants_chars: int) -> None:
        self._writer_wants_chars = wants_chars
        self._writer_waits = self._loop.create_future()
        try:
            await self._writer_waits
        finally:
            self._writer_waits = None

    def _wake_writer_if_ready(self) -> None:
        if self._writer_waits is not None and (
            self._writer_wants_chars == 0 or self._full(self._writer_wants_chars)
        ):
            self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writer_waits is not None and not self._writer_waits.done():
            self._writer_waits.set_result(None)


async def coalesced(
    source: AsyncIterable[T], window_s: float, max_chars: int
) -> AsyncGenerator[list[T], None]:
    """Batches of source items; an item's `text` attribute counts toward max_chars.

    Closing the batches closes the source at once (a client cancel aborts the worker's stream).
    """
    items = aiter(source)
    try:
        if window_s <= 0:
            async for single in items:
                yield [single]
            return
        # The first chunk is read here rather than by the reader task, and goes out alone and
        # at once: time to first token pays neither a task hop nor a window.
        try:
            first = await anext(items)
        except StopAsyncIteration:
            return
        yield [first]
        buffer: _Buffer[T] = _Buffer()
        reader = asyncio.create_task(buffer.fill(items))
        try:
            while True:
                await buffer.wait_for_chunk()
                if not buffer.items:
                    break
                await buffer.wait_until(buffer.oldest_at + window_s, max_chars)
                yield buffer.take(max_chars)
            if buffer.error is not None:
                raise buffer.error
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
