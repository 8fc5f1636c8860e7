"""VllmEngine without vLLM: the missing-vLLM / missing-GPU errors and the pure mapping helpers.

The fakes below (SimpleNamespace "RequestOutput"s, "SchedulerStats", KV events and a fake
AsyncLLM) are shaped like vLLM 0.33's objects.  They test OUR mapping and request bookkeeping,
not vLLM: tests/integration/test_vllm_contract.py checks the same helpers against vLLM's real
classes on a host that has vLLM (`make test-vllm`).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import types
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gpu_worker.engine import ChatMessage, EngineError, EngineRequest
from gpu_worker.vllm_engine import (
    NO_GPU,
    VLLM_MISSING,
    KvEventAccumulator,
    StatsSink,
    VllmApi,
    VllmEngine,
    VllmEngineConfig,
    block_hash_to_int,
    blocks_from_usage,
    engine_args_kwargs,
    kv_events_config_kwargs,
    load_vllm_api,
    map_request_output,
    normalize_token_ids,
    render_prompt_ids,
)

# ---------------------------------------------------------------- import / start errors


def test_importing_module_does_not_import_vllm() -> None:
    # A fresh interpreter: in this one other tests may have planted fake modules.
    code = (
        "import sys, gpu_worker.vllm_engine; "
        "bad = [m for m in ('vllm', 'torch', 'zmq', 'msgspec') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


async def test_start_without_vllm_raises_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import vllm` fail exactly like an absent package, even on a
    # host where vLLM is installed.
    monkeypatch.setitem(sys.modules, "vllm", None)
    engine = VllmEngine(VllmEngineConfig(model="facebook/opt-125m"))
    with pytest.raises(EngineError) as info:
        await engine.start()
    assert str(info.value) == VLLM_MISSING
    assert "\n" not in str(info.value)
    await engine.close()


def test_load_vllm_api_without_gpu_raises_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(EngineError) as info:
        load_vllm_api(require_gpu=True)
    assert str(info.value) == NO_GPU


def test_load_vllm_api_broken_install_names_the_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # A vLLM package whose engine modules are missing: one line naming what is lacking.
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    with pytest.raises(EngineError) as info:
        load_vllm_api(require_gpu=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "lacks an API" in msg


async def test_generate_before_start_is_an_engine_error() -> None:
    engine = VllmEngine(VllmEngineConfig(model="m"))
    with pytest.raises(EngineError):
        async for _ in engine.generate(_request("r1")):
            pass


# ---------------------------------------------------------------- RequestOutput mapping


def _out(
    text: str,
    token_ids: list[int],
    finished: bool = False,
    finish_reason: str | None = None,
    num_cached_tokens: int | None = None,
) -> SimpleNamespace:
    completion = SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish_reason)
    return SimpleNamespace(outputs=[completion], finished=finished, num_cached_tokens=num_cached_tokens)


def test_map_request_output_delta() -> None:
    chunk = map_request_output(_out("Hel", [10, 11], num_cached_tokens=32), prompt_len=40)
    assert chunk.text == "Hel"
    assert chunk.num_tokens == 2
    assert chunk.prompt_tokens == 40
    assert chunk.cached_tokens == 32
    assert not chunk.finished
    assert chunk.finish_reason == ""


def test_map_request_output_final_and_none_cached() -> None:
    chunk = map_request_output(_out("!", [12], finished=True, finish_reason="length"), prompt_len=5)
    assert chunk.finished
    assert chunk.finish_reason == "length"
    assert chunk.cached_tokens == 0  # vLLM leaves it None before the prefill is scheduled


def test_map_request_output_without_completion() -> None:
    out = SimpleNamespace(outputs=[], finished=True, num_cached_tokens=None)
    chunk = map_request_output(out, prompt_len=7)
    assert (chunk.text, chunk.num_tokens, chunk.finished, chunk.finish_reason) == ("", 0, True, "")


# ---------------------------------------------------------------- prompt rendering


class FakeTokenizer:
    """Chat template = "<s>" + "[role]content" per message + "[assistant]"; one id per char."""

    def __init__(self, result: str = "list") -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        text = "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in conversation)
        if kwargs.get("add_generation_prompt"):
            text += "[assistant]"
        ids = [ord(c) for c in text]
        if self.result == "mapping":
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_render_prompt_ids_appends_assistant_prefix_without_special_tokens() -> None:
    tok = FakeTokenizer()
    msgs = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
    ids = render_prompt_ids(tok, msgs, assistant_prefix="Hel")
    assert "".join(map(chr, ids)) == "<s>[system]be brief[user]hi[assistant]Hel"
    assert tok.calls == [{"add_generation_prompt": True, "tokenize": True}]


def test_render_prompt_ids_accepts_batch_encoding_shape() -> None:
    ids = render_prompt_ids(FakeTokenizer(result="mapping"), [ChatMessage("user", "x")], "")
    assert "".join(map(chr, ids)) == "<s>[user]x[assistant]"


def test_normalize_token_ids_shapes() -> None:
    assert normalize_token_ids([1, 2, 3]) == [1, 2, 3]
    assert normalize_token_ids({"input_ids": [4, 5]}) == [4, 5]
    assert normalize_token_ids([[6, 7]]) == [6, 7]
    with pytest.raises(EngineError):
        normalize_token_ids([[1], [2]])


# ---------------------------------------------------------------- KV events


def test_block_hash_to_int_matches_vllm_int_conversion() -> None:
    digest = bytes(range(32))  # a sha256-sized hash
    # vLLM's maybe_convert_block_hash: int.from_bytes(h, "big") & (2**64 - 1)
    assert block_hash_to_int(digest) == int.from_bytes(digest, "big") & (2**64 - 1)
    assert block_hash_to_int(digest) == int.from_bytes(digest[-8:], "big")
    assert block_hash_to_int(-1) == 2**64 - 1
    assert block_hash_to_int(2**70 + 5) == 5
    assert 0 <= block_hash_to_int(digest) < 2**64


@dataclass
class BlockStored:
    block_hashes: list[Any]
    medium: str | None = "GPU"


@dataclass
class BlockRemoved:
    block_hashes: list[Any]
    medium: str | None = "GPU"


@dataclass
class AllBlocksCleared:
    pass


def test_kv_accumulator_net_effect() -> None:
    acc = KvEventAccumulator()
    acc.apply([BlockStored([1, 2, 3]), BlockRemoved([2]), BlockStored([b"\x00" * 31 + b"\x09"])])
    batch = acc.take()
    assert batch.stored == [1, 3, 9]
    assert batch.removed == [2]
    assert not batch.all_cleared
    assert acc.live == {1, 3, 9}
    assert not acc.take()  # drained

    acc.apply([BlockRemoved([3]), BlockStored([3])])  # evicted then re-cached: net stored
    assert acc.take().stored == [3]


def test_kv_accumulator_ignores_non_gpu_tiers_and_clears() -> None:
    acc = KvEventAccumulator()
    acc.apply([BlockStored([1], medium="CPU"), BlockStored([2], medium=None), BlockStored([4])])
    acc.apply([AllBlocksCleared(), BlockStored([5])])
    batch = acc.take()
    assert batch.all_cleared
    assert batch.stored == [5]
    assert acc.live == {5}


def test_kv_accumulator_seq_gap_forces_clear() -> None:
    acc = KvEventAccumulator()
    assert not acc.note_seq(0)
    acc.apply([BlockStored([1])])
    assert not acc.note_seq(1)
    assert acc.note_seq(3)  # batch 2 was dropped
    batch = acc.take()
    assert batch.all_cleared and batch.stored == []
    late = KvEventAccumulator()
    assert late.note_seq(5)  # subscribed after batches were published


def test_kv_events_config_uses_private_ipc_endpoint() -> None:
    kw = kv_events_config_kwargs("ipc:///tmp/x")
    assert kw == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///tmp/x", "topic": ""}


# ---------------------------------------------------------------- stats


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _sched(
    running: int, waiting: int, usage: float, queries: int = 0, hits: int = 0, reset: bool = False
) -> SimpleNamespace:
    return SimpleNamespace(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        kv_cache_usage=usage,
        iteration_details=None,
        prefix_cache_stats=SimpleNamespace(reset=reset, requests=1, queries=queries, hits=hits),
    )


def _iter(gen: int, prompt_computed: int = 0, preempted: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        num_generation_tokens=gen,
        prompt_token_stats=SimpleNamespace(computed=prompt_computed),
        num_preempted_reqs=preempted,
    )


def test_stats_sink_maps_scheduler_and_iteration_stats() -> None:
    clock = Clock()
    sink = StatsSink(now=clock)
    sink.observe(_sched(2, 1, 0.25, queries=100, hits=40), _iter(0, prompt_computed=100))
    clock.t += 0.02
    sink.observe(_sched(2, 0, 0.30, queries=100, hits=60), _iter(2, preempted=1))
    clock.t += 0.02
    sink.observe(_sched(2, 0, 0.30), _iter(2))
    assert (sink.running, sink.waiting) == (2, 0)
    assert sink.kv_cache_usage == pytest.approx(0.30)
    assert sink.preemptions_total == 1
    assert sink.prefix_hit_rate() == pytest.approx(0.5)
    assert sink.tokens_per_s() == pytest.approx(4 / 10.0)
    assert sink.step_ms == pytest.approx(20.0)
    clock.t += 120  # windows expire
    assert sink.tokens_per_s() == 0.0
    assert sink.prefix_hit_rate() == 0.0


def test_stats_sink_prefix_reset_and_none_stats() -> None:
    sink = StatsSink(now=Clock())
    sink.observe(_sched(1, 0, 0.1, queries=10, hits=10), None)
    sink.observe(_sched(1, 0, 0.1, queries=10, hits=0, reset=True), None)
    assert sink.prefix_hit_rate() == 0.0
    sink.observe(None, None)  # vLLM may record without scheduler stats
    assert sink.running == 1


def test_stats_sink_prefers_exact_iteration_details() -> None:
    clock = Clock()
    sink = StatsSink(now=clock)
    details = SimpleNamespace(is_dummy=False, elapsed_ms=7.5, num_ctx_tokens=30, num_generation_tokens=2)
    busy = _sched(2, 0, 0.1)
    busy.iteration_details = details
    sink.observe(busy, _iter(2, prompt_computed=30))
    clock.t += 0.5  # a long gap: ignored because vLLM measured the step itself
    sink.observe(busy, _iter(2))
    assert sink.step_ms == pytest.approx(7.5)
    assert sink.tokens_per_step == pytest.approx(32.0)
    dummy = _sched(2, 0, 0.1)
    dummy.iteration_details = SimpleNamespace(is_dummy=True, elapsed_ms=0.0)
    sink.observe(dummy, None)
    assert sink.step_ms > 0


def test_blocks_from_usage_rounds_and_clamps() -> None:
    assert blocks_from_usage(0.5, 1000) == 500
    assert blocks_from_usage(0.0004, 1000) == 0
    assert blocks_from_usage(1.2, 10) == 10


def test_engine_args_kwargs() -> None:
    cfg = VllmEngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct", max_model_len=4096, block_size=16, seed=7)
    kw = engine_args_kwargs(cfg)
    assert kw["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert kw["enable_prefix_caching"] is True
    assert kw["max_model_len"] == 4096
    assert kw["block_size"] == 16
    assert kw["seed"] == 7
    assert kw["disable_log_stats"] is False


# ---------------------------------------------------------------- request bookkeeping (fake AsyncLLM)


@dataclass
class FakeSamplingParams:
    max_tokens: int
    output_kind: Any
    seed: int


FAKE_API = VllmApi(
    AsyncLLM=None,
    AsyncEngineArgs=None,
    SamplingParams=FakeSamplingParams,
    RequestOutputKind=SimpleNamespace(DELTA="DELTA"),
    TokensPrompt=dict,
    StatLoggerBase=object,
    KVEventsConfig=None,
    KVEventBatch=None,
    version="fake",
)


@dataclass
class FakeAsyncLLM:
    """Streams one token per step until max_tokens, like AsyncLLM.generate in DELTA mode."""

    aborted: list[str] = field(default_factory=list)
    submitted: list[tuple[Any, Any, str]] = field(default_factory=list)
    closed_generators: int = 0
    # When set, requests stay queued (no output) until it is: vLLM's waiting queue.
    queue_gate: asyncio.Event | None = None

    def __post_init__(self) -> None:
        cache = SimpleNamespace(num_gpu_blocks=1001, block_size=16)
        self.vllm_config = SimpleNamespace(cache_config=cache, model_config=SimpleNamespace(max_model_len=64))

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.submitted.append((prompt, params, request_id))
        try:
            if self.queue_gate is not None:
                await self.queue_gate.wait()
            for i in range(params.max_tokens):
                await asyncio.sleep(0)
                if request_id in self.aborted:
                    yield _out("", [], finished=True, finish_reason="abort")
                    return
                last = i == params.max_tokens - 1
                yield _out("x", [120], finished=last, finish_reason="length" if last else None)
        finally:
            self.closed_generators += 1

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


async def _attached(llm: FakeAsyncLLM) -> VllmEngine:
    engine = VllmEngine(VllmEngineConfig(model="m"))
    engine._api = FAKE_API  # test hook: what start() sets after load_vllm_api()
    await engine._attach(llm)
    return engine


def _request(rid: str, max_tokens: int = 3, prefix: str = "") -> EngineRequest:
    return EngineRequest(
        request_id=rid, messages=[ChatMessage("user", "hi")], max_tokens=max_tokens, assistant_prefix=prefix
    )


async def test_attach_reads_capacity_from_vllm_config() -> None:
    engine = await _attached(FakeAsyncLLM())
    assert (engine.num_blocks, engine.block_size, engine.max_model_len) == (1000, 16, 64)
    stats = engine.stats()
    assert stats.num_blocks_total == 1000 and stats.num_blocks_used == 0 and stats.num_blocks_cached == 0
    assert not engine.take_kv_events()  # KV events off: always an empty batch
    await engine.close()


async def test_generate_streams_chunks_and_submits_token_prompt() -> None:
    llm = FakeAsyncLLM()
    engine = await _attached(llm)
    chunks = [c async for c in engine.generate(_request("r1", max_tokens=3, prefix="ab"))]
    assert [c.text for c in chunks] == ["x", "x", "x"]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    prompt, params, rid = llm.submitted[0]
    assert rid == "r1"
    assert "".join(map(chr, prompt["prompt_token_ids"])).endswith("[assistant]ab")
    assert chunks[0].prompt_tokens == len(prompt["prompt_token_ids"])
    assert params == FakeSamplingParams(max_tokens=3, output_kind="DELTA", seed=0)
    assert llm.aborted == []  # finished normally: nothing to abort
    assert engine.stats().admitted_request_ids == ()


async def test_closing_the_stream_early_aborts() -> None:
    llm = FakeAsyncLLM()
    engine = await _attached(llm)
    stream = engine.generate(_request("r2", max_tokens=10))
    first = await anext(stream)
    assert not first.finished
    assert engine.stats().admitted_request_ids == ("r2",)
    await cast(AsyncGenerator[Any, None], stream).aclose()
    assert llm.aborted == ["r2"]
    assert llm.closed_generators == 1
    assert engine.stats().admitted_request_ids == ()


async def test_a_queued_request_is_not_listed_until_its_first_output() -> None:
    """Telemetry lists a request (the scheduler then drops its KV reservation) once vLLM streams
    its first output, i.e. its prefill is done and its prompt KV is in the reported usage."""
    llm = FakeAsyncLLM(queue_gate=asyncio.Event())
    engine = await _attached(llm)
    stream = engine.generate(_request("r4", max_tokens=10))
    first = asyncio.ensure_future(anext(stream))
    for _ in range(10):  # let generate() tokenize and submit
        await asyncio.sleep(0)
    assert llm.submitted
    assert engine.stats().admitted_request_ids == ()  # submitted, still queued
    llm.queue_gate.set()  # type: ignore[union-attr]
    await first
    assert engine.stats().admitted_request_ids == ("r4",)
    await cast(AsyncGenerator[Any, None], stream).aclose()
    assert engine.stats().admitted_request_ids == ()


async def test_abort_ends_stream_with_abort_reason() -> None:
    llm = FakeAsyncLLM()
    engine = await _attached(llm)
    stream = engine.generate(_request("r3", max_tokens=10))
    await anext(stream)
    assert await engine.abort("r3")
    rest = [c async for c in stream]
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert not await engine.abort("r3")


async def test_duplicate_and_too_long_requests_are_engine_errors() -> None:
    engine = await _attached(FakeAsyncLLM())
    stream = engine.generate(_request("dup", max_tokens=10))
    await anext(stream)
    with pytest.raises(EngineError, match="duplicate"):
        await anext(engine.generate(_request("dup")))
    await cast(AsyncGenerator[Any, None], stream).aclose()
    long_req = EngineRequest(request_id="long", messages=[ChatMessage("user", "y" * 100)], max_tokens=1)
    with pytest.raises(EngineError, match="max_model_len"):
        await anext(engine.generate(long_req))


async def test_max_tokens_clamped_to_context() -> None:
    llm = FakeAsyncLLM()
    engine = await _attached(llm)
    chunks = [c async for c in engine.generate(_request("r4", max_tokens=1000))]
    prompt, params, _ = llm.submitted[0]
    assert params.max_tokens == 64 - len(prompt["prompt_token_ids"])
    assert sum(c.num_tokens for c in chunks) == params.max_tokens
