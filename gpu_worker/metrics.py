"""Prometheus metrics of a worker. Engine gauges are refreshed from Engine.stats() by telemetry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from gpu_worker.engine import EngineStats

GENERATE_REQUESTS = Counter("kvgate_worker_generate_requests_total", "Generate RPCs by outcome", ["outcome"])
KV_BLOCKS = Gauge("kvgate_worker_kv_blocks", "KV cache blocks by state", ["engine", "state"])
RUNNING = Gauge("kvgate_worker_running_requests", "Requests in the running batch", ["engine"])
WAITING = Gauge("kvgate_worker_waiting_requests", "Requests waiting for admission", ["engine"])
PREEMPTIONS = Gauge("kvgate_worker_preemptions", "Recompute preemptions since start", ["engine"])
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
    PREEMPTIONS.labels(engine).set(stats.preemptions_total)
    PREFIX_HIT_RATE.labels(engine).set(stats.prefix_hit_rate)
    TOKENS_PER_S.labels(engine).set(stats.tokens_per_s)
    STEP_MS.labels(engine).set(stats.step_ms)
    ARITHMETIC_INTENSITY.labels(engine).set(stats.arithmetic_intensity)
