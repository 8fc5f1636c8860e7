"""VllmEngine: the `Engine` protocol on a real vLLM `AsyncLLM` (one GPU or one tensor-parallel group).

Written against vLLM 0.33.0 (commit 4ba787ec9); see docs/vllm.md for the API map.

This module is the engine's lifecycle and request bookkeeping (start, generate, abort, stats,
close) and its config; the parts it composes each live in their own module:
  gpu_worker/vllm_api.py       lazy import of vLLM's API (VllmApi) and one-line start-up errors
  gpu_worker/vllm_requests.py  chat -> prompt ids -> vLLM inputs; RequestOutput -> EngineChunk
  gpu_worker/vllm_stats.py     the stat logger vLLM calls and the stats it keeps (windows, EMAs)
  gpu_worker/vllm_kv_events.py KV events over ZMQ and the block-hash bookkeeping
Their public names are re-exported here (`__all__`) for callers that import them from this module.
Nothing imports vLLM at module level, so importing this module works without vLLM or a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gpu_worker.engine import EngineChunk, EngineError, EngineRequest, EngineStats, KvEventBatch
from gpu_worker.vllm_api import NO_GPU, VLLM_MISSING, VllmApi, load_vllm_api, one_line
from gpu_worker.vllm_kv_events import (
    KvEventAccumulator,
    KvEventSubscriber,
    block_hash_to_int,
    kv_events_config_kwargs,
)
from gpu_worker.vllm_requests import (
    make_sampling_params,
    make_tokens_prompt,
    map_request_output,
    normalize_token_ids,
    render_prompt_ids,
)
from gpu_worker.vllm_stats import StatsSink, blocks_from_usage, make_stat_logger_factory, stat_logger_class

__all__ = [
    "NO_GPU",
    "VLLM_MISSING",
    "KvEventAccumulator",
    "KvEventSubscriber",
    "StatsSink",
    "VllmApi",
    "VllmEngine",
    "VllmEngineConfig",
    "block_hash_to_int",
    "blocks_from_usage",
    "engine_args_kwargs",
    "kv_events_config_kwargs",
    "load_vllm_api",
    "make_sampling_params",
    "make_stat_logger_factory",
    "make_tokens_prompt",
    "map_request_output",
    "normalize_token_ids",
    "render_prompt_ids",
    "stat_logger_class",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    served_model_name: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    # None: vLLM's defaults (model's context length; scheduler limits from the hardware).
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    block_size: int | None = None
    dtype: str = "auto"
    seed: int = 0
    # Publish vLLM's KV block events over a private ipc:// ZMQ socket so take_kv_events() can feed
    # the scheduler's prefix index.  Only meaningful with prefix caching (no hashes without it).
    enable_kv_events: bool = True


def engine_args_kwargs(config: VllmEngineConfig) -> dict[str, Any]:
    """Keyword arguments for vLLM's `AsyncEngineArgs` (all are `EngineArgs` dataclass fields)."""
    return {
        "model": config.model,
        "served_model_name": config.served_model_name,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "enable_prefix_caching": config.enable_prefix_caching,
        "block_size": config.block_size,
        "dtype": config.dtype,
        "seed": config.seed,
        # Keep stats on even if vLLM stops auto-enabling them for custom loggers: our stat
        # logger is the only source of kv_cache_usage / running / waiting.
        "disable_log_stats": False,
    }


class VllmEngine:
    kind = "vllm"

    def __init__(self, config: VllmEngineConfig) -> None:
        self.config = config
        self.model = config.served_model_name or config.model
        # Known only after start(): vLLM profiles memory to size the KV cache.
        self.block_size = 0
        self.num_blocks = 0
        self.max_model_len = 0
        self.vllm_version = ""
        self._api: VllmApi | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._sink = StatsSink()
        self._kv = KvEventAccumulator()
        self._kv_sub: KvEventSubscriber | None = None
        self._kv_ipc_path: str | None = None
        # Request ids between generate() entry and exit, the subset submitted to vLLM, and the
        # subset whose first output arrived: vLLM streams nothing before a request's prefill
        # is done, so from then on its prompt KV is in the usage the stats report (telemetry
        # lists these for the scheduler to drop their reservations; a queued one keeps it).
        self._in_flight: set[str] = set()
        self._submitted: dict[str, None] = {}
        self._prefilled: dict[str, None] = {}
        # HF fast tokenizers raise "Already borrowed" when used from two threads at once; one
        # worker thread keeps chat rendering off the event loop and serialized.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvgate-tokenize")
        self._closed = False

    async def start(self) -> None:
        if self._llm is not None:
            return
        api = load_vllm_api(require_gpu=True)
        kwargs = engine_args_kwargs(self.config)
        if self.config.enable_kv_events and self.config.enable_prefix_caching:
            endpoint = self._open_kv_subscriber(api)
            if endpoint is not None:
                kwargs["kv_events_config"] = api.KVEventsConfig(**kv_events_config_kwargs(endpoint))
        try:
            engine_args = api.AsyncEngineArgs(**kwargs)
            # Built on the event loop thread, as vLLM's own servers do (entrypoints/launchers/
            # grpc_server.py): this blocks while the engine-core process loads the model and
            # profiles memory, which is fine at worker start-up, before it serves anything.
            llm = api.AsyncLLM.from_engine_args(
                engine_args, stat_loggers=[make_stat_logger_factory(api, self._sink)]
            )
        except EngineError:
            self._close_kv_subscriber()
            raise
        except Exception as e:
            self._close_kv_subscriber()
            raise EngineError(f"vLLM failed to start {self.config.model}: {one_line(e)}") from e
        self._api = api
        self.vllm_version = api.version
        await self._attach(llm)
        log.info(
            "vLLM %s engine up: model=%s blocks=%d x %d tokens, max_model_len=%d, kv_events=%s",
            api.version,
            self.model,
            self.num_blocks,
            self.block_size,
            self.max_model_len,
            self._kv_sub is not None,
        )

    def _open_kv_subscriber(self, api: VllmApi) -> str | None:
        # A short path: ipc:// socket paths are limited to ~107 bytes.
        path = os.path.join(tempfile.gettempdir(), f"kvgate-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        endpoint = f"ipc://{path}"
        try:
            self._kv_sub = KvEventSubscriber(endpoint, api.KVEventBatch)
        except Exception as e:
            log.warning("KV events disabled: cannot subscribe to %s: %s", endpoint, one_line(e))
            return None
        self._kv_ipc_path = path
        return endpoint

    def _close_kv_subscriber(self) -> None:
        if self._kv_sub is not None:
            self._kv_sub.close()
            self._kv_sub = None
        if self._kv_ipc_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._kv_ipc_path)
            self._kv_ipc_path = None

    async def _attach(self, llm: Any) -> None:
        """Read capacity and the tokenizer from a constructed AsyncLLM (unit tests pass a fake)."""
        vllm_config = llm.vllm_config
        cache_config = vllm_config.cache_config
        num_gpu_blocks = int(cache_config.num_gpu_blocks or 0)
        # vLLM reserves block 0 as the null block and computes usage over the rest
        # (v1/core/block_pool.py get_usage): that is the capacity requests can hold.
        self.num_blocks = max(0, num_gpu_blocks - 1)
        self.block_size = int(cache_config.block_size)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        # AsyncLLM.get_tokenizer() is a plain method in vLLM 0.33 and a coroutine in older releases.
        tokenizer = llm.get_tokenizer()
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer
        self._tokenizer = tokenizer
        self._llm = llm

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        llm = self._llm
        if llm is None or self._closed:
            raise EngineError("vLLM engine is not running")
        rid = request.request_id
        if rid in self._in_flight:
            raise EngineError(f"duplicate request id {rid!r}")
        if request.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {request.max_tokens}")
        self._in_flight.add(rid)
        finished = False
        try:
            loop = asyncio.get_running_loop()
            prompt_ids = await loop.run_in_executor(
                self._tokenize_pool,
                render_prompt_ids,
                self._tokenizer,
                request.messages,
                request.assistant_prefix,
            )
            prompt_len = len(prompt_ids)
            if prompt_len >= self.max_model_len:
                raise EngineError(
                    f"prompt of {prompt_len} tokens leaves no room to generate "
                    f"(max_model_len {self.max_model_len})"
                )
            # vLLM would stop at max_model_len anyway ("length"); clamping keeps its validation
            # quiet and makes the budget explicit.
            max_tokens = min(request.max_tokens, self.max_model_len - prompt_len)
            assert self._api is not None
            params = make_sampling_params(self._api, max_tokens, request.seed)
            prompt = make_tokens_prompt(self._api, prompt_ids)
            self._submitted[rid] = None
            try:
                # aclosing: if our consumer stops early, vLLM's generator sees GeneratorExit
                # and aborts the request itself (AsyncLLM.generate's except clause).
                async with contextlib.aclosing(llm.generate(prompt, params, rid)) as outputs:
                    async for out in outputs:
                        self._prefilled[rid] = None
                        chunk = map_request_output(out, prompt_len)
                        finished = chunk.finished
                        yield chunk
                        if finished:
                            break
            except EngineError:
                raise
            except Exception as e:
                finished = True  # vLLM already aborted/cleaned up on its own error path
                raise EngineError(f"vLLM generation failed: {type(e).__name__}: {one_line(e)}") from e
        finally:
            self._in_flight.discard(rid)
            submitted = rid in self._submitted
            self._submitted.pop(rid, None)
            self._prefilled.pop(rid, None)
            if submitted and not finished:
                # Consumer went away (GeneratorExit / cancellation): free the KV blocks now.
                # Redundant with vLLM's own abort on aclose, and harmless: aborting an unknown
                # external id is a no-op (OutputProcessor.abort_requests).
                with contextlib.suppress(Exception):
                    await llm.abort(rid)

    async def abort(self, request_id: str) -> bool:
        if self._llm is None or request_id not in self._submitted:
            return False
        # The request's generate() then yields a final chunk with finish_reason "abort".
        await self._llm.abort(request_id)
        return True

    def stats(self) -> EngineStats:
        self._drain_kv_events()
        sink = self._sink
        used = blocks_from_usage(sink.kv_cache_usage, self.num_blocks)
        # vLLM reports no count of cached-but-unreferenced blocks.  With KV events we know how
        # many blocks hold a cached hash (`live`); referenced full blocks are among them, so
        # live - used is a lower bound of the evictable cached blocks.  Without events: 0.
        cached = (
            max(0, min(self.num_blocks - used, len(self._kv.live) - used)) if self._kv_sub is not None else 0
        )
        return EngineStats(
            block_size=self.block_size,
            num_blocks_total=self.num_blocks,
            num_blocks_used=used,
            num_blocks_cached=cached,
            running=sink.running,
            waiting=sink.waiting,
            preemptions_total=sink.preemptions_total,
            step_ms=sink.step_ms,
            tokens_per_s=sink.tokens_per_s(),
            # Proxy: tokens computed per engine step (decode batch + prefill chunk).  Arithmetic
            # intensity on the weights grows with it; vLLM exposes no FLOP/byte counter.
            arithmetic_intensity=sink.tokens_per_step,
            prefix_hit_rate=sink.prefix_hit_rate(),
            admitted_request_ids=tuple(self._prefilled),
        )

    def take_kv_events(self) -> KvEventBatch:
        """Net block changes since the last call; always empty when KV events are off."""
        self._drain_kv_events()
        return self._kv.take()

    def _drain_kv_events(self) -> None:
        if self._kv_sub is not None:
            self._kv_sub.drain(self._kv)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is not None:
            # Sync in vLLM: stops the engine-core process and the output handler task.
            with contextlib.suppress(Exception):
                llm.shutdown()
        self._close_kv_subscriber()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
