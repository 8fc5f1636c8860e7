"""Prometheus metrics of a worker. Engine gauges are refreshed from Engine.stats() by telemetry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gpu_worker.engine import EngineStats

GENERATE_REQUESTS = Counter("kvgate_worker_generate_requests_total", "Generate RPCs by outcome", ["outcome"])
TTFT_SECONDS = Histogram(
    "kvgate_worker_ttft_seconds",
    "Time from a Generate call to its first output token (queueing + prefill)",
    ["engine"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
# Per token, at the source: the gateway coalesces tokens into larger deltas, so gaps seen by
# clients are not token gaps.
ITL_SECONDS = Histogram(
    "kvgate_worker_itl_seconds",
    "Inter-token latency: time between output chunks divided by the tokens they carry",
    ["engine"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1),
)
KV_BLOCKS = Gauge("kvgate_worker_kv_blocks", "KV cache blocks by state", ["engine", "state"])
RUNNING = Gauge("kvgate_worker_running_requests", "Requests in the running batch", ["engine"])
WAITING = Gauge("kvgate_worker_waiting_requests", "Requests waiting for admission", ["engine"])
# A counter (rate() works across restarts); the engine reports a running total, added by its delta.
PREEMPTIONS = Counter("kvgate_worker_preemptions", "Recompute preemptions", ["engine"])
_preemptions_seen: dict[str, int] = {}
PREFIX_HIT_RATE = Gauge("kvgate_worker_prefix_hit_rate", "Prompt tokens served from cache", ["engine"])
TOKENS_PER_S = Gauge("kvgate_worker_tokens_per_second", "Generated tokens per second", ["engine"])
STEP_MS = Gauge("kvgate_worker_step_ms", "Engine step time", ["engine"])
ARITHMETIC_INTENSITY = Gauge(
    "kvgate_worker_arithmetic_intensity", "FLOPs per byte of the last step", ["engine"]
)


def observe(engine: str, stats: EngineStats) -> None:
    free = stats.num_blocks_total - stats.num_blocks_used - stats.num_blocks_cached
    KV_BLOCKS.labels(engine, "used").set(stats.num_blocks_used)
    KV_BLOCKS.labels(engine, "cached").set(stats.num_blocks_cached)
    KV_BLOCKS.labels(engine, "free").set(free)
    RUNNING.labels(engine).set(stats.running)
    WAITING.labels(engine).set(stats.waiting)
    seen = _preemptions_seen.get(engine, 0)
    if stats.preemptions_total > seen:
        PREEMPTIONS.labels(engine).inc(stats.preemptions_total - seen)
    _preemptions_seen[engine] = stats.preemptions_total
    PREFIX_HIT_RATE.labels(engine).set(stats.prefix_hit_rate)
    TOKENS_PER_S.labels(engine).set(stats.tokens_per_s)
    STEP_MS.labels(engine).set(stats.step_ms)
    ARITHMETIC_INTENSITY.labels(engine).set(stats.arithmetic_intensity)
