"""vLLM's per-step stats -> EngineStats numbers: a StatLoggerBase subclass feeding a StatsSink.

vLLM pushes SchedulerStats/IterationStats to its stat loggers once per batch of engine-core
outputs; ours forwards them to a `StatsSink`, which keeps the latest gauges, trailing windows
(tokens/s, prefix hit rate) and EMAs (step time, tokens per step) for `VllmEngine.stats()`.
vLLM calls these stats classes unstable, so they are read with `getattr` defaults.  The logger
class is built lazily because its base class lives in vLLM.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gpu_worker.vllm_api import VllmApi

# Windows for the rate-like stats: long enough to smooth over single steps, short enough that the
# scheduler sees a load change within a few telemetry periods.
_TOKENS_WINDOW_S = 10.0
_HIT_RATE_WINDOW_S = 60.0
_EMA_ALPHA = 0.2
# A gap between stat records longer than this is idle time, not a step.
_MAX_STEP_GAP_S = 5.0


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
