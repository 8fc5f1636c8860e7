"""VllmEngine: the `Engine` protocol on a real vLLM `AsyncLLM` (one GPU or one tensor-parallel group).

Written against vLLM 0.33.0 (commit 4ba787ec9); see docs/vllm.md for the API map.

vLLM is imported lazily (in `load_vllm_api`) so that the worker, its tests and `--engine sim`
run on machines without vLLM or a GPU.  Everything vLLM-shaped crosses the boundary as `Any`:
vLLM's own docs call `SchedulerStats`/`IterationStats`/`StatLoggerBase` unstable, so the pure
helpers below read them with `getattr` defaults and are unit-tested with fakes of the same
shape, while tests/integration/test_vllm_contract.py checks them against the real classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gpu_worker.engine import (
    ChatMessage,
    EngineChunk,
    EngineError,
    EngineRequest,
    EngineStats,
    KvEventBatch,
)

log = logging.getLogger(__name__)

VLLM_MISSING = "vLLM is not installed: pip install 'kvgate[vllm]'"
NO_GPU = "no CUDA GPU visible: --engine vllm needs one; use --engine sim"

_U64 = (1 << 64) - 1
# Windows for the rate-like stats: long enough to smooth over single steps, short enough that the
# scheduler sees a load change within a few telemetry periods.
_TOKENS_WINDOW_S = 10.0
_HIT_RATE_WINDOW_S = 60.0
_EMA_ALPHA = 0.2
# A gap between stat records longer than this is idle time, not a step.
_MAX_STEP_GAP_S = 5.0


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


# --------------------------------------------------------------------------------------------
# The vLLM boundary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmApi:
    """The few vLLM names the adapter uses, resolved once by `load_vllm_api`."""

    AsyncLLM: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    RequestOutputKind: Any
    TokensPrompt: Any
    StatLoggerBase: Any
    KVEventsConfig: Any
    KVEventBatch: Any
    version: str


def load_vllm_api(require_gpu: bool = True) -> VllmApi:
    """Import vLLM, or raise EngineError with one line saying what is missing."""
    try:
        import vllm
    except ModuleNotFoundError as e:
        # Only a missing `vllm` itself means "not installed"; a missing dependency of it is a
        # broken install and its name is the useful part of the message.
        if e.name is None or e.name == "vllm":
            raise EngineError(VLLM_MISSING) from None
        raise EngineError(f"vLLM failed to import (missing module {e.name!r}); reinstall kvgate[vllm]") from e
    except Exception as e:
        raise EngineError(f"vLLM failed to import: {type(e).__name__}: {_one_line(e)}") from e

    if require_gpu:
        # Checked before touching vLLM's engine modules: without a GPU vLLM fails much later
        # and with a multi-page platform-detection traceback.
        try:
            # import_module keeps torch (untyped here, typed where installed) an Any for mypy.
            torch: Any = importlib.import_module("torch")
            has_gpu = bool(torch.cuda.is_available())
        except Exception:
            has_gpu = False
        if not has_gpu:
            raise EngineError(NO_GPU)

    try:
        from vllm.config import KVEventsConfig
        from vllm.distributed.kv_events import KVEventBatch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
    except Exception as e:
        version = getattr(vllm, "__version__", "?")
        raise EngineError(
            f"vLLM {version} lacks an API kvgate uses ({type(e).__name__}: {_one_line(e)}); "
            "kvgate targets vLLM 0.33"
        ) from e
    return VllmApi(
        AsyncLLM=AsyncLLM,
        AsyncEngineArgs=AsyncEngineArgs,
        SamplingParams=SamplingParams,
        RequestOutputKind=RequestOutputKind,
        TokensPrompt=TokensPrompt,
        StatLoggerBase=StatLoggerBase,
        KVEventsConfig=KVEventsConfig,
        KVEventBatch=KVEventBatch,
        version=str(getattr(vllm, "__version__", "?")),
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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


def kv_events_config_kwargs(endpoint: str) -> dict[str, Any]:
    """Keyword arguments for vLLM's `KVEventsConfig`: ZMQ PUB bound by the engine-core process.

    An ipc:// endpoint binds (ZmqEventPublisher._is_bind_endpoint) on a private socket file, so
    nothing listens on the network, unlike vLLM's default tcp://*:5557.
    """
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": ""}


def make_sampling_params(api: VllmApi, max_tokens: int, seed: int) -> Any:
    # DELTA: each RequestOutput carries only the new text/tokens, which is exactly an EngineChunk;
    # when the consumer lags, vLLM merges pending deltas (RequestOutput.add), so a chunk may hold
    # several tokens.
    return api.SamplingParams(max_tokens=max_tokens, output_kind=api.RequestOutputKind.DELTA, seed=seed)


def make_tokens_prompt(api: VllmApi, prompt_token_ids: list[int]) -> Any:
    # Token ids, not text: we render the chat ourselves so that the assistant prefix can be
    # appended after the generation prompt and so prompt_tokens is known before submission.
    return api.TokensPrompt(prompt_token_ids=prompt_token_ids)


# --------------------------------------------------------------------------------------------
# Pure mapping helpers (unit-tested with fakes shaped like vLLM's objects)
# --------------------------------------------------------------------------------------------


def map_request_output(out: Any, prompt_len: int) -> EngineChunk:
    """One DELTA-mode `vllm.outputs.RequestOutput` -> one EngineChunk.

    prompt_tokens is ours (the ids we submitted), so it is right on every chunk; vLLM's
    num_cached_tokens is None until the prefill has been scheduled.
    """
    outputs = getattr(out, "outputs", None) or []
    completion = outputs[0] if outputs else None
    text = str(getattr(completion, "text", "") or "") if completion is not None else ""
    token_ids = getattr(completion, "token_ids", None) if completion is not None else None
    finished = bool(getattr(out, "finished", False))
    reason = getattr(completion, "finish_reason", None) if completion is not None else None
    return EngineChunk(
        text=text,
        num_tokens=len(token_ids) if token_ids is not None else 0,
        prompt_tokens=prompt_len,
        cached_tokens=int(getattr(out, "num_cached_tokens", None) or 0),
        finished=finished,
        # vLLM's strings: "stop", "length", "abort", "error" (v1/engine/__init__.py).
        finish_reason=str(reason) if finished and reason is not None else "",
    )


def normalize_token_ids(rendered: Any) -> list[int]:
    """`apply_chat_template(..., tokenize=True)` output -> list[int].

    transformers < 5 returns list[int]; transformers 5 returns a BatchEncoding (a Mapping with
    "input_ids") by default; some tokenizers return a batch of one.
    """
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    ids = list(rendered)
    if ids and isinstance(ids[0], list | tuple):
        if len(ids) != 1:
            raise EngineError(f"chat template rendered a batch of {len(ids)} prompts, expected 1")
        ids = list(ids[0])
    return [int(t) for t in ids]


def render_prompt_ids(tokenizer: Any, messages: Sequence[ChatMessage], assistant_prefix: str) -> list[int]:
    """Chat -> prompt token ids: the model's chat template plus the assistant's partial answer.

    The prefix is tokenized on its own and appended after the generation prompt, so the model
    continues the answer rather than starting a new turn.  Its tokenization can differ from what
    the model would have produced at the seam (a merge across the boundary); that costs at most
    a slightly different continuation, never a wrong prompt.
    """
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    ids = normalize_token_ids(
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    )
    if assistant_prefix:
        # No special tokens: the template already emitted BOS and the assistant header.
        ids.extend(int(t) for t in tokenizer.encode(assistant_prefix, add_special_tokens=False))
    return ids


def block_hash_to_int(block_hash: int | bytes) -> int:
    """A vLLM block hash (bytes, sha256 by default, or int) -> a stable unsigned 64-bit int.

    Bytes keep their low 64 bits read big-endian, which is exactly vLLM's own conversion when
    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES is set (v1/core/kv_cache_utils.py maybe_convert_block_hash),
    so both settings of that flag give the same ints.  Ints are masked to 64 bits so negative
    (builtin-hash) values still fit the proto's uint64.
    """
    if isinstance(block_hash, bytes | bytearray | memoryview):
        return int.from_bytes(bytes(block_hash), "big") & _U64
    return int(block_hash) & _U64


class KvEventAccumulator:
    """Folds vLLM KV events into the net change since the last `take()`.

    A KvEventBatch has no order between its lists, so each hash appears at most once, in `stored`
    if it ended up cached or in `removed` if it ended up evicted; `all_cleared` means "forget
    everything you had before this batch's lists".  `live` tracks the currently cached hashes
    for the num_blocks_cached estimate.
    """

    def __init__(self) -> None:
        self._net: dict[int, bool] = {}  # hash -> True stored / False removed, insertion-ordered
        self._all_cleared = False
        self._last_seq: int | None = None
        self.live: set[int] = set()

    def apply(self, events: Iterable[Any]) -> None:
        # Dispatch on the class name so fakes in the unit tests and vLLM's msgspec structs
        # (vllm/distributed/kv_events.py BlockStored / BlockRemoved / AllBlocksCleared) both fit.
        for event in events:
            kind = type(event).__name__
            if kind == "AllBlocksCleared":
                self.clear()
                continue
            if kind not in ("BlockStored", "BlockRemoved"):
                continue
            # With CPU offloading vLLM also reports blocks in CPU/storage tiers; only the GPU
            # cache (medium None on older vLLM) is capacity this worker can serve from.
            medium = getattr(event, "medium", None)
            if medium not in (None, "GPU"):
                continue
            present = kind == "BlockStored"
            for raw in getattr(event, "block_hashes", ()):
                h = block_hash_to_int(raw)
                self._net.pop(h, None)  # re-insert so the newest state wins and stays last
                self._net[h] = present
                if present:
                    self.live.add(h)
                else:
                    self.live.discard(h)

    def clear(self) -> None:
        self._net.clear()
        self.live.clear()
        self._all_cleared = True

    def note_seq(self, seq: int) -> bool:
        """Record a publisher sequence number; a gap (dropped batches) forces a clear.

        Clearing is the safe recovery: the scheduler forgets this worker's prefixes and relearns
        them from new events instead of routing to blocks that may be long gone.
        """
        gap = (self._last_seq is None and seq != 0) or (
            self._last_seq is not None and seq != self._last_seq + 1
        )
        self._last_seq = seq
        if gap:
            self.clear()
        return gap

    def take(self) -> KvEventBatch:
        batch = KvEventBatch(
            stored=[h for h, present in self._net.items() if present],
            removed=[h for h, present in self._net.items() if not present],
            all_cleared=self._all_cleared,
        )
        self._net = {}
        self._all_cleared = False
        return batch


class StatsSink:
    """What kvgate keeps from vLLM's per-step stats (fed by the stat logger vLLM calls)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.records = 0
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.preemptions_total = 0
        self.step_ms = 0.0
        self.tokens_per_step = 0.0
        self._last_record: float | None = None
        self._busy = False
        self._gen_tokens: deque[tuple[float, int]] = deque()
        self._prefix: deque[tuple[float, int, int]] = deque()  # (t, queries, hits)

    def observe(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Called by vLLM once per batch of engine-core outputs (AsyncLLM output_handler)."""
        now = self._now()
        self.records += 1
        gap = now - self._last_record if self._last_record is not None else None
        self._last_record = now

        have_details = False
        if scheduler_stats is not None:
            self.running = int(getattr(scheduler_stats, "num_running_reqs", 0))
            self.waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
            usage: Any = getattr(scheduler_stats, "kv_cache_usage", None)
            if usage is None:  # vLLM < 0.10 called it gpu_cache_usage
                usage = getattr(scheduler_stats, "gpu_cache_usage", None)
            self.kv_cache_usage = min(1.0, max(0.0, float(usage or 0.0)))
            # Exact per-step numbers exist only with vLLM's observability option
            # enable_logging_iteration_details (off by default); otherwise the gap between records
            # and the iteration token counts stand in.  Dummy (DP padding) steps
            # report elapsed_ms 0 and are skipped.
            details = getattr(scheduler_stats, "iteration_details", None)
            if details is not None and not getattr(details, "is_dummy", False):
                elapsed = float(getattr(details, "elapsed_ms", 0.0) or 0.0)
                if elapsed > 0.0:
                    self.step_ms = _ema(self.step_ms, elapsed)
                    step_tokens = int(getattr(details, "num_ctx_tokens", 0)) + int(
                        getattr(details, "num_generation_tokens", 0)
                    )
                    self.tokens_per_step = _ema(self.tokens_per_step, float(step_tokens))
                    have_details = True
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                if getattr(prefix, "reset", False):
                    self._prefix.clear()
                queries = int(getattr(prefix, "queries", 0))
                if queries:
                    self._prefix.append((now, queries, int(getattr(prefix, "hits", 0))))
            if not have_details and self._busy and gap is not None and 0.0 < gap < _MAX_STEP_GAP_S:
                # One record per engine step while requests run: the gap is the step time.
                self.step_ms = _ema(self.step_ms, gap * 1000.0)
            self._busy = self.running > 0

        if iteration_stats is not None:
            gen = int(getattr(iteration_stats, "num_generation_tokens", 0))
            prompt_stats = getattr(iteration_stats, "prompt_token_stats", None)
            if prompt_stats is not None:
                prompt = int(getattr(prompt_stats, "computed", 0))
            else:
                prompt = int(getattr(iteration_stats, "num_prompt_tokens", 0))
            self.preemptions_total += int(getattr(iteration_stats, "num_preempted_reqs", 0))
            if gen:
                self._gen_tokens.append((now, gen))
            if (gen or prompt) and not have_details:
                self.tokens_per_step = _ema(self.tokens_per_step, float(gen + prompt))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._gen_tokens and now - self._gen_tokens[0][0] > _TOKENS_WINDOW_S:
            self._gen_tokens.popleft()
        while self._prefix and now - self._prefix[0][0] > _HIT_RATE_WINDOW_S:
            self._prefix.popleft()

    def tokens_per_s(self) -> float:
        self._trim(self._now())
        return sum(n for _, n in self._gen_tokens) / _TOKENS_WINDOW_S

    def prefix_hit_rate(self) -> float:
        self._trim(self._now())
        queries = sum(q for _, q, _ in self._prefix)
        return sum(h for _, _, h in self._prefix) / queries if queries else 0.0


def _ema(prev: float, value: float) -> float:
    return value if prev == 0.0 else (1.0 - _EMA_ALPHA) * prev + _EMA_ALPHA * value


def blocks_from_usage(kv_cache_usage: float, num_blocks: int) -> int:
    """vLLM's kv_cache_usage = 1 - free/usable (v1/core/block_pool.py get_usage), where cached but
    unreferenced blocks count as free: so usage x usable blocks = blocks held by requests."""
    return max(0, min(num_blocks, round(kv_cache_usage * num_blocks)))


_stat_logger_classes: dict[int, Any] = {}


def stat_logger_class(api: VllmApi) -> Any:
    """Our subclass of vLLM's StatLoggerBase (built lazily: the base class lives in vLLM)."""
    base: Any = api.StatLoggerBase
    cls = _stat_logger_classes.get(id(base))
    if cls is not None:
        return cls

    class KvgateStatLogger(base):  # type: ignore[misc]  # base is vLLM's, typed Any here
        """Forwards every record() to a StatsSink; vLLM builds one per engine via our factory."""

        def __init__(self, vllm_config: Any, engine_index: int = 0, *, sink: StatsSink | None = None) -> None:
            self.vllm_config = vllm_config
            self.engine_index = engine_index
            self.sink = sink if sink is not None else StatsSink()

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
            **_: Any,  # later vLLM versions add keyword arguments here
        ) -> None:
            self.sink.observe(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    _stat_logger_classes[id(base)] = KvgateStatLogger
    return KvgateStatLogger


def make_stat_logger_factory(api: VllmApi, sink: StatsSink) -> Callable[[Any, int], Any]:
    """A PerEngineStatLoggerFactory: vLLM calls factory(vllm_config, engine_index)."""
    cls = stat_logger_class(api)

    def factory(vllm_config: Any, engine_index: int = 0) -> Any:
        return cls(vllm_config, engine_index, sink=sink)

    return factory


# --------------------------------------------------------------------------------------------
# KV events over ZMQ
# --------------------------------------------------------------------------------------------


class _KvEventSubscriber:
    """SUB side of vLLM's ZmqEventPublisher: frames are (topic, seq: 8-byte big-endian, msgpack
    KVEventBatch).  Drained without blocking whenever the worker asks for events or stats."""

    def __init__(self, endpoint: str, event_batch_type: Any) -> None:
        # vLLM's own dependencies, so present whenever vLLM is; Any because kvgate has no stubs.
        msgpack: Any = importlib.import_module("msgspec.msgpack")
        zmq: Any = importlib.import_module("zmq")

        self._zmq = zmq
        self._decoder: Any = msgpack.Decoder(type=event_batch_type)
        self._ctx: Any = zmq.Context()
        self._sock: Any = self._ctx.socket(zmq.SUB)
        # vLLM publishes one message per engine step; keep ~minutes of steps between drains
        # rather than ZMQ's default 1000, beyond which messages are dropped (a seq gap).
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        # Connecting before the engine-core process binds is fine (ZMQ reconnects), and avoids
        # missing the first batches.
        self._sock.connect(endpoint)

    def drain(self, acc: KvEventAccumulator) -> None:
        zmq = self._zmq
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            _topic, seq_bytes, payload = frames
            acc.note_seq(int.from_bytes(seq_bytes, "big", signed=True))
            try:
                batch = self._decoder.decode(payload)
            except Exception as e:  # a format change in vLLM: lose the batch, not the worker
                log.warning("undecodable vLLM KV event batch: %s", _one_line(e))
                acc.clear()
                continue
            acc.apply(getattr(batch, "events", ()))

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


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
        self._kv_sub: _KvEventSubscriber | None = None
        self._kv_ipc_path: str | None = None
        # Request ids between generate() entry and exit, and the subset submitted to vLLM.
        self._in_flight: set[str] = set()
        self._admitted: dict[str, None] = {}
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
            raise EngineError(f"vLLM failed to start {self.config.model}: {_one_line(e)}") from e
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
            self._kv_sub = _KvEventSubscriber(endpoint, api.KVEventBatch)
        except Exception as e:
            log.warning("KV events disabled: cannot subscribe to %s: %s", endpoint, _one_line(e))
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
            self._admitted[rid] = None
            try:
                # aclosing: if our consumer stops early, vLLM's generator sees GeneratorExit
                # and aborts the request itself (AsyncLLM.generate's except clause).
                async with contextlib.aclosing(llm.generate(prompt, params, rid)) as outputs:
                    async for out in outputs:
                        chunk = map_request_output(out, prompt_len)
                        finished = chunk.finished
                        yield chunk
                        if finished:
                            break
            except EngineError:
                raise
            except Exception as e:
                finished = True  # vLLM already aborted/cleaned up on its own error path
                raise EngineError(f"vLLM generation failed: {type(e).__name__}: {_one_line(e)}") from e
        finally:
            self._in_flight.discard(rid)
            submitted = rid in self._admitted
            self._admitted.pop(rid, None)
            if submitted and not finished:
                # Consumer went away (GeneratorExit / cancellation): free the KV blocks now.
                # Redundant with vLLM's own abort on aclose, and harmless: aborting an unknown
                # external id is a no-op (OutputProcessor.abort_requests).
                with contextlib.suppress(Exception):
                    await llm.abort(rid)

    async def abort(self, request_id: str) -> bool:
        if self._llm is None or request_id not in self._admitted:
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
            admitted_request_ids=tuple(self._admitted),
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
