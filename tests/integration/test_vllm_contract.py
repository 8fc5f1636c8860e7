"""Contract tests: VllmEngine's mapping against vLLM's REAL classes (run with `make test-vllm`).

Deselected from normal runs (`-m 'not vllm'` in pyproject).  Everything except the last test
needs only `pip install -e '.[vllm,dev]'` (no GPU: nothing here loads a model); the last test
also runs a real tiny generation when a CUDA GPU is visible and KVGATE_VLLM_MODEL names a small
chat model (e.g. Qwen/Qwen2.5-0.5B-Instruct, or a local path to one).

vLLM is imported inside fixtures, never at module level, so that collecting this file on a host
without vLLM (every normal `pytest` run) does not error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import inspect
import os
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from gpu_worker.engine import ChatMessage, EngineError, EngineRequest
from gpu_worker.vllm_engine import (
    KvEventAccumulator,
    StatsSink,
    VllmApi,
    VllmEngine,
    VllmEngineConfig,
    block_hash_to_int,
    engine_args_kwargs,
    kv_events_config_kwargs,
    load_vllm_api,
    make_sampling_params,
    make_stat_logger_factory,
    make_tokens_prompt,
    map_request_output,
    stat_logger_class,
)
from gpu_worker.vllm_kv_events import KvEventSubscriber as _KvEventSubscriber

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def api() -> VllmApi:
    try:
        return load_vllm_api(require_gpu=False)
    except EngineError as e:
        pytest.fail(f"{e} (the vllm contract tests need vLLM installed)")


def test_reports_vllm_version(api: VllmApi) -> None:
    # Shown with -rA / -s: which vLLM the contract was checked against.
    print(f"vLLM {api.version}")
    assert api.version != "?"


# ---------------------------------------------------------------- request side


def test_sampling_params_as_we_build_them(api: VllmApi) -> None:
    params = make_sampling_params(api, max_tokens=8, seed=1234)
    assert isinstance(params, api.SamplingParams)
    assert params.max_tokens == 8
    assert params.seed == 1234
    assert params.output_kind == api.RequestOutputKind.DELTA
    assert params.n == 1  # we read outputs[0] only
    # seed 0 is the EngineRequest default and must stay a real seed, not "unset".
    assert make_sampling_params(api, max_tokens=1, seed=0).seed == 0


def test_tokens_prompt(api: VllmApi) -> None:
    prompt = make_tokens_prompt(api, [1, 2, 3])
    assert prompt == {"prompt_token_ids": [1, 2, 3]}
    from vllm.inputs import TokensPrompt

    assert api.TokensPrompt is TokensPrompt


def test_engine_args_accept_our_kwargs(api: VllmApi) -> None:
    cfg = VllmEngineConfig(
        model="facebook/opt-125m",
        served_model_name="opt",
        max_model_len=1024,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        block_size=16,
        seed=3,
    )
    kwargs = engine_args_kwargs(cfg)
    fields = {f.name for f in dataclasses.fields(api.AsyncEngineArgs)}
    assert set(kwargs) <= fields, set(kwargs) - fields
    assert "kv_events_config" in fields
    kv_cfg = api.KVEventsConfig(**kv_events_config_kwargs("ipc:///tmp/kvgate-contract"))
    assert kv_cfg.enable_kv_cache_events and kv_cfg.publisher == "zmq"
    # Constructing the args validates types but loads nothing (that is create_engine_config).
    args = api.AsyncEngineArgs(**kwargs, kv_events_config=kv_cfg)
    assert args.enable_prefix_caching is True
    assert args.disable_log_stats is False
    assert args.kv_events_config is kv_cfg


def test_async_llm_signatures(api: VllmApi) -> None:
    from_args = inspect.signature(api.AsyncLLM.from_engine_args).parameters
    assert "engine_args" in from_args and "stat_loggers" in from_args
    gen = list(inspect.signature(api.AsyncLLM.generate).parameters)
    assert gen[:4] == ["self", "prompt", "sampling_params", "request_id"]  # we pass them positionally
    assert "request_id" in inspect.signature(api.AsyncLLM.abort).parameters
    assert callable(api.AsyncLLM.get_tokenizer)
    assert callable(api.AsyncLLM.shutdown)


# ---------------------------------------------------------------- output side


def test_map_real_request_output() -> None:
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(
        index=0,
        text=" world",
        token_ids=[11, 12],
        cumulative_logprob=None,
        logprobs=None,
        finish_reason="stop",
    )
    out = RequestOutput(
        request_id="r",
        prompt=None,
        prompt_token_ids=[1, 2, 3],
        prompt_logprobs=None,
        outputs=[completion],
        finished=True,
        num_cached_tokens=2,
    )
    chunk = map_request_output(out, prompt_len=3)
    assert (chunk.text, chunk.num_tokens, chunk.prompt_tokens, chunk.cached_tokens) == (" world", 2, 3, 2)
    assert chunk.finished and chunk.finish_reason == "stop"


# ---------------------------------------------------------------- stats side


def test_stat_logger_is_a_stat_logger_base(api: VllmApi) -> None:
    from vllm.v1.metrics.loggers import StatLoggerBase

    cls = stat_logger_class(api)
    assert issubclass(cls, StatLoggerBase)
    assert not inspect.isabstract(cls)
    # Our record() accepts every parameter vLLM's abstract record() declares.
    ours = inspect.signature(cls.record).parameters
    for name in inspect.signature(StatLoggerBase.record).parameters:
        assert name in ours or any(p.kind is p.VAR_KEYWORD for p in ours.values()), name


def test_record_accepts_real_stats_through_vllm_adapter(api: VllmApi) -> None:
    from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter
    from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerStats

    sink = StatsSink()
    # The wrapper StatLoggerManager puts around per-engine factories like ours; it only passes
    # vllm_config through to the factory, so None is enough here.
    adapter = PerEngineStatLoggerAdapter(
        vllm_config=None,
        engine_indexes=[0],
        per_engine_stat_logger_factory=make_stat_logger_factory(api, sink),
    )
    adapter.log_engine_initialized()
    adapter.record(SchedulerStats(), None, mm_cache_stats=None, engine_idx=0)  # defaults only

    stats = SchedulerStats(
        num_running_reqs=3,
        num_waiting_reqs=1,
        kv_cache_usage=0.5,
        prefix_cache_stats=PrefixCacheStats(requests=2, queries=100, hits=25),
    )
    it = IterationStats()
    it.num_generation_tokens = 5
    it.num_preempted_reqs = 1
    adapter.record(stats, it, mm_cache_stats=None, engine_idx=0)
    assert (sink.running, sink.waiting, sink.kv_cache_usage) == (3, 1, 0.5)
    assert sink.preemptions_total == 1
    assert sink.prefix_hit_rate() == pytest.approx(0.25)
    assert sink.tokens_per_s() > 0


# ---------------------------------------------------------------- KV events side


def _stored(hashes: list[Any], medium: str = "GPU") -> Any:
    from vllm.distributed.kv_events import BlockStored

    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=[1] * 16,
        block_size=16,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


def test_block_hash_conversion_matches_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.envs as envs
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    digest = hashlib.sha256(b"block").digest()
    monkeypatch.setattr(envs, "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", True, raising=False)
    assert block_hash_to_int(digest) == maybe_convert_block_hash(digest)
    monkeypatch.setattr(envs, "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", False, raising=False)
    assert block_hash_to_int(maybe_convert_block_hash(digest)) == block_hash_to_int(digest)


def test_accumulator_on_real_event_classes() -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved

    acc = KvEventAccumulator()
    acc.apply([_stored([1, 2]), BlockRemoved(block_hashes=[1], medium="GPU"), _stored([3], medium="CPU")])
    batch = acc.take()
    assert (batch.stored, batch.removed, batch.all_cleared) == ([2], [1], False)
    acc.apply([AllBlocksCleared()])
    assert acc.take().all_cleared


def test_real_zmq_publisher_to_our_subscriber(api: VllmApi) -> None:
    from vllm.distributed.kv_events import BlockRemoved, EventPublisherFactory

    path = os.path.join(tempfile.gettempdir(), f"kvgate-kv-test-{uuid.uuid4().hex[:8]}")
    endpoint = f"ipc://{path}"
    sub = _KvEventSubscriber(endpoint, api.KVEventBatch)  # connect first, as VllmEngine does
    pub = EventPublisherFactory.create(api.KVEventsConfig(**kv_events_config_kwargs(endpoint)), 0)
    try:
        time.sleep(0.3)  # ZMQ slow joiner: let the SUB connection complete
        digest = hashlib.sha256(b"x").digest()
        pub.publish(
            api.KVEventBatch(
                ts=time.time(), events=[_stored([digest, 7]), BlockRemoved(block_hashes=[7], medium="GPU")]
            )
        )
        acc = KvEventAccumulator()
        deadline = time.monotonic() + 5
        batch = acc.take()
        while not batch and time.monotonic() < deadline:
            time.sleep(0.05)
            sub.drain(acc)
            batch = acc.take()
        assert batch.stored == [block_hash_to_int(digest)]
        assert batch.removed == [7]
        assert not batch.all_cleared
    finally:
        pub.shutdown()
        sub.close()
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------- a real engine (GPU only)


def _gpu_model() -> str | None:
    model = os.environ.get("KVGATE_VLLM_MODEL")
    if not model:
        return None
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError:
        return None
    return model if torch.cuda.is_available() else None


@pytest.mark.timeout(900)
@pytest.mark.skipif(_gpu_model() is None, reason="needs a CUDA GPU and KVGATE_VLLM_MODEL")
async def test_real_generation_on_gpu() -> None:
    model = _gpu_model()
    assert model is not None
    engine = VllmEngine(
        VllmEngineConfig(
            model=model,
            gpu_memory_utilization=float(os.environ.get("KVGATE_VLLM_GPU_UTIL", "0.5")),
            max_model_len=2048,
            max_num_seqs=8,
        )
    )
    await engine.start()
    try:
        assert engine.num_blocks > 0 and engine.block_size > 0 and engine.max_model_len == 2048
        # Long enough to fill several KV blocks, so the prefix cache has something to hit.
        context = " ".join(
            f"fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)
        )
        msgs = [ChatMessage("system", context), ChatMessage("user", "Say hello in five words.")]

        chunks = [c async for c in engine.generate(EngineRequest("gpu-1", msgs, max_tokens=16, seed=1))]
        assert chunks and chunks[-1].finished
        assert chunks[-1].finish_reason in ("stop", "length")
        assert 0 < sum(c.num_tokens for c in chunks) <= 16
        assert chunks[0].prompt_tokens > 4 * engine.block_size
        events = engine.take_kv_events()
        assert events.stored, "prefix caching on: the prompt's full blocks must be reported stored"

        again = [c async for c in engine.generate(EngineRequest("gpu-2", msgs, max_tokens=4, seed=1))]
        assert again[-1].cached_tokens >= engine.block_size, (
            "second identical prompt must hit the prefix cache"
        )

        # Continue an answer after an assistant prefix.
        cont = [
            c
            async for c in engine.generate(
                EngineRequest("gpu-4", msgs, max_tokens=8, assistant_prefix="Hello")
            )
        ]
        assert cont[-1].finished

        # The consumer going away aborts the request and frees it.
        stream = engine.generate(EngineRequest("gpu-5", msgs, max_tokens=1024))
        first = await anext(stream)
        assert not first.finished
        assert "gpu-5" in engine.stats().admitted_request_ids
        await cast(AsyncGenerator[Any, None], stream).aclose()
        assert "gpu-5" not in engine.stats().admitted_request_ids

        # abort() from outside ends the stream with "abort".
        stream = engine.generate(EngineRequest("gpu-6", msgs, max_tokens=1024))
        await anext(stream)
        assert await engine.abort("gpu-6")
        rest = [c async for c in stream]
        assert rest and rest[-1].finished and rest[-1].finish_reason == "abort"

        too_long = EngineRequest("gpu-7", [ChatMessage("user", "word " * 5000)], max_tokens=4)
        with pytest.raises(EngineError, match="max_model_len"):
            await anext(engine.generate(too_long))

        await asyncio.sleep(0.5)  # let the last step's stats arrive
        stats = engine.stats()
        assert stats.num_blocks_total == engine.num_blocks
        assert 0 <= stats.num_blocks_used <= stats.num_blocks_total
        assert stats.prefix_hit_rate > 0
        assert stats.admitted_request_ids == ()
    finally:
        await engine.close()
