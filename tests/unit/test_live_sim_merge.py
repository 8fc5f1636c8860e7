"""A lagging consumer of the live sim gets the steps it missed as one chunk, like vLLM's DELTA outputs."""

from __future__ import annotations

import asyncio

from gpu_worker.engine import ChatMessage, EngineChunk, EngineRequest
from gpu_worker.live_sim import LiveSimEngine
from gpu_worker.sim import EngineConfig

TOKENS = 40


async def lagging_read(merge_chunks: bool) -> list[EngineChunk]:
    """Reads the first chunk, then nothing until the engine has generated every token."""
    engine = LiveSimEngine(
        EngineConfig(gpu="h100", model="llama-3-8b"), time_scale=0.001, merge_chunks=merge_chunks
    )
    await engine.start()
    try:
        request = EngineRequest("r1", [ChatMessage("user", "Tell me about KV caches.")], TOKENS, seed=7)
        stream = engine.generate(request)
        chunks = [await anext(stream)]
        # Until the final chunk is queued for this stream (not merely computed: the step loop
        # hands a step's outputs over after pacing it), so the rest is waiting, all of it.
        queue = engine._streams["r1"]
        for _ in range(10_000):
            if queue.qsize() and queue._queue[-1].finished:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.001)
        chunks += [chunk async for chunk in stream]
        return chunks
    finally:
        await engine.close()


async def test_missed_steps_arrive_merged_and_unchanged() -> None:
    merged, per_step = await lagging_read(True), await lagging_read(False)
    assert [c.num_tokens for c in per_step] == [1] * TOKENS
    assert [c.num_tokens for c in merged] == [1, TOKENS - 1]
    assert "".join(c.text for c in merged) == "".join(c.text for c in per_step)
    assert merged[-1].finished and merged[-1].finish_reason == per_step[-1].finish_reason == "length"
    assert merged[-1].prompt_tokens == per_step[-1].prompt_tokens > 0
