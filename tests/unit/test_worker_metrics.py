"""Worker metrics from engine stats: preemptions are a counter fed by the engine's running total."""

from __future__ import annotations

from prometheus_client import REGISTRY

from gpu_worker import metrics
from gpu_worker.engine import EngineStats


def _stats(preemptions: int) -> EngineStats:
    return EngineStats(
        block_size=16, num_blocks_total=100, num_blocks_used=10, num_blocks_cached=5, running=2, waiting=1,
        preemptions_total=preemptions, step_ms=7.0, tokens_per_s=100.0, arithmetic_intensity=3.0,
        prefix_hit_rate=0.5,
    )  # fmt: skip


def test_preemptions_count_up_by_the_engines_running_total() -> None:
    def counted() -> float:
        return REGISTRY.get_sample_value("kvgate_worker_preemptions_total", {"engine": "metrics-test"}) or 0.0

    for total in (0, 3, 3, 7):
        metrics.observe("metrics-test", _stats(total))
    assert counted() == 7
    free = REGISTRY.get_sample_value("kvgate_worker_kv_blocks", {"engine": "metrics-test", "state": "free"})
    assert free == 85
