from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.coalesce import coalesced


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
