"""SimEngine on the wall clock: the `Engine` protocol around the pure simulated engine.

The pure engine says how long each step takes on the modelled GPU; this adapter
waits that long (times --time-scale) before delivering the step's tokens, so a
sim worker streams at the rate its GPU/model profile predicts.

A request's consumer that falls behind (its gRPC stream is slower than the steps) gets the
steps it missed merged into one chunk, as vLLM's AsyncLLM does for DELTA outputs
(`RequestOutputCollector.put` in vllm/v1/engine/output_processor.py): one message per
catch-up instead of a growing backlog of one-token messages. `merge_chunks=False` turns that
off, for measuring the naive one-message-per-step stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from gpu_worker.engine import EngineChunk, EngineError, EngineRequest, EngineStats, KvEventBatch
from gpu_worker.sim import EngineConfig, SimEngine, SimTokenizer
from gpu_worker.sim.tokenizer import render_chat

log = logging.getLogger(__name__)


class LiveSimEngine:
    kind = "sim"

    def __init__(self, config: EngineConfig, time_scale: float = 1.0, merge_chunks: bool = True) -> None:
        if time_scale <= 0:
            raise EngineError(f"--time-scale must be > 0, got {time_scale}")
        self._engine = SimEngine(config)
        self._tokenizer = SimTokenizer()
        self._time_scale = time_scale
        self._merge_chunks = merge_chunks
        self._streams: dict[str, asyncio.Queue[EngineChunk]] = {}
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.model = config.model
        self.block_size = self._engine.block_size
        self.num_blocks = self._engine.num_blocks
        self.max_model_len = self._engine.max_model_len

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._step_loop(), name="sim-engine-steps")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self._engine.has_unfinished():
                self._work.clear()
                await self._work.wait()
                deadline = loop.time()
            output = self._engine.step()
            # Pace against a running deadline so sleep jitter does not accumulate into drift.
            deadline = max(deadline + output.duration_s * self._time_scale, loop.time() - 0.05)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            for out in output.outputs:
                queue = self._streams.get(out.request_id)
                if queue is None:
                    continue
                queue.put_nowait(
                    EngineChunk(
                        text=self._tokenizer.decode(out.new_token_ids),
                        num_tokens=len(out.new_token_ids),
                        prompt_tokens=out.num_prompt_tokens,
                        cached_tokens=out.num_cached_tokens,
                        finished=out.finished,
                        finish_reason=out.finish_reason if out.finished else "",
                    )
                )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        prompt = render_chat(request.messages, request.assistant_prefix)
        token_ids = self._tokenizer.encode(prompt)
        queue: asyncio.Queue[EngineChunk] = asyncio.Queue()
        self._engine.add_request(request.request_id, token_ids, request.max_tokens, seed=request.seed)
        self._streams[request.request_id] = queue
        self._work.set()
        finished = False
        try:
            while not finished:
                chunk = await queue.get()
                if self._merge_chunks:
                    while not chunk.finished and not queue.empty():
                        chunk = merged(chunk, queue.get_nowait())
                finished = chunk.finished
                yield chunk
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                # The consumer went away (client cancel, failover): free the blocks now.
                self._engine.abort(request.request_id)

    async def abort(self, request_id: str) -> bool:
        queue = self._streams.pop(request_id, None)
        aborted = self._engine.abort(request_id)
        if queue is not None:
            queue.put_nowait(
                EngineChunk(
                    text="",
                    num_tokens=0,
                    prompt_tokens=0,
                    cached_tokens=0,
                    finished=True,
                    finish_reason="abort",
                )
            )
        return aborted

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def take_kv_events(self) -> KvEventBatch:
        return self._engine.take_kv_events()


def merged(earlier: EngineChunk, later: EngineChunk) -> EngineChunk:
    """Two successive chunks of one request as one: their text and tokens, the later state."""
    return EngineChunk(
        text=earlier.text + later.text,
        num_tokens=earlier.num_tokens + later.num_tokens,
        prompt_tokens=later.prompt_tokens or earlier.prompt_tokens,
        cached_tokens=later.cached_tokens or earlier.cached_tokens,
        finished=later.finished,
        finish_reason=later.finish_reason,
    )
