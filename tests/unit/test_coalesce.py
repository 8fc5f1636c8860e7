from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.coalesce import MAX_BUFFERED_CHUNKS, coalesced


@dataclass
class Chunk:
    text: str


async def stream(gaps_s: list[float], fail_at_end: bool = False) -> AsyncIterator[Chunk]:
    for i, gap in enumerate(gaps_s):
        await asyncio.sleep(gap)
        yield Chunk(f"t{i} ")
    if fail_at_end:
        raise ConnectionError("worker went away")


async def collect(source: AsyncIterator[Chunk], window_s: float, max_chars: int = 1000) -> list[list[str]]:
    return [[c.text for c in batch] async for batch in coalesced(source, window_s, max_chars)]


async def test_first_chunk_alone_then_bursts_merge() -> None:
    batches = await collect(stream([0, 0, 0, 0, 0.2, 0]), window_s=0.05)
    assert batches[0] == ["t0 "]  # time to first token is never delayed
    assert batches[1] == ["t1 ", "t2 ", "t3 "]
    assert batches[2] == ["t4 ", "t5 "]
    assert sum(len(b) for b in batches) == 6


async def test_per_token_mode_and_size_cap() -> None:
    assert await collect(stream([0, 0, 0]), window_s=0) == [["t0 "], ["t1 "], ["t2 "]]
    capped = await collect(stream([0] * 7), window_s=1.0, max_chars=6)
    assert [len(b) for b in capped] == [1, 2, 2, 2]


async def test_an_error_arrives_after_the_text_before_it() -> None:
    seen: list[str] = []
    with pytest.raises(ConnectionError):
        async for batch in coalesced(stream([0, 0, 0], fail_at_end=True), 0.05, 1000):
            seen.extend(c.text for c in batch)
    assert seen == ["t0 ", "t1 ", "t2 "]


async def test_a_slow_client_stops_the_reading_at_the_buffer_bound() -> None:
    produced = 0

    async def endless() -> AsyncIterator[Chunk]:
        nonlocal produced
        while True:
            produced += 1
            yield Chunk("x")
            await asyncio.sleep(0)

    batches = coalesced(endless(), 60, 10_000)
    await anext(batches)
    assert len(await anext(batches)) == MAX_BUFFERED_CHUNKS  # a full buffer goes out at once
    before = produced
    for _ in range(5 * MAX_BUFFERED_CHUNKS):  # the client reads nothing meanwhile
        await asyncio.sleep(0)
    assert MAX_BUFFERED_CHUNKS <= produced - before <= MAX_BUFFERED_CHUNKS + 2
    await batches.aclose()


async def test_closing_the_batches_closes_the_source_at_once() -> None:
    closed = asyncio.Event()

    async def upstream() -> AsyncIterator[Chunk]:
        try:
            yield Chunk("first")
            await asyncio.Event().wait()  # a worker still generating
            yield Chunk("never")
        finally:
            closed.set()

    batches = coalesced(upstream(), 0.05, 1000)
    assert [c.text for c in await anext(batches)] == ["first"]
    await batches.aclose()  # the client cancelled
    assert closed.is_set()


async def test_an_error_before_any_chunk_propagates() -> None:
    async def broken() -> AsyncIterator[Chunk]:
        raise ConnectionError("no worker")
        yield Chunk("unreachable")

    with pytest.raises(ConnectionError):
        await collect(broken(), window_s=0.05)
