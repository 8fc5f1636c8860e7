"""Prometheus metrics of the scheduler."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from scheduler.policy import FleetView

PLACEMENTS = Counter(
    "kvgate_scheduler_placements_total",
    "Placement decisions by outcome (new, pinned_hit, moved; shed: at capacity; no_worker: no live "
    "worker serves the model; too_large: no worker could ever hold it) and tier (unknown tiers count "
    "as free)",
    ["outcome", "tier"],
)


@functools.lru_cache(maxsize=256)
def placements(outcome: str, tier: str) -> Counter:
    """PLACEMENTS' child for these labels: looking labels up costs more than the increment, and
    every Place increments one."""
    return PLACEMENTS.labels(outcome=outcome, tier=tier)


PLACEMENT_SECONDS = Histogram(
    "kvgate_scheduler_placement_seconds",
    "Time inside the scheduler for one Place: policy plus atomic commit",
    # Fine below 5 ms: the placement goal is p50 <= 1 ms, p99 <= 3 ms.
    buckets=(
        0.0001,
        0.0002,
        0.0003,
        0.0004,
        0.0005,
        0.0006,
        0.0008,
        0.001,
        0.0012,
        0.0015,
        0.002,
        0.0025,
        0.003,
        0.004,
        0.005,
        0.0075,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        # Beyond any goal, but an overloaded scheduler's p99 must read as what it is, not 250 ms.
        0.5,
        1.0,
        2.5,
        5.0,
    ),
)
COMMIT_CONFLICTS = Counter(
    "kvgate_scheduler_commit_conflicts_total",
    "Candidates whose reservation failed at commit (raced or changed since the snapshot)",
)
TELEMETRY_MESSAGES = Counter(
    "kvgate_scheduler_telemetry_messages_total", "Telemetry messages ingested", ["kind", "outcome"]
)
FLEET_KV_TOKENS = Gauge(
    "kvgate_scheduler_fleet_kv_tokens",
    "KV tokens of the live workers by state (total, used, free)",
    ["state"],
)
STALE_WORKERS = Gauge("kvgate_scheduler_stale_workers", "Workers whose telemetry is stale")


def observe_fleet(fleet: FleetView) -> tuple[int, int, int]:
    """Set the fleet gauges from a snapshot: (total KV tokens, free KV tokens, stale workers) of
    the workers alive in it, and the gauge of used KV tokens (held by running or cached-but-
    referenced blocks; total - used - free is reserved for placements not yet admitted). Called
    on every snapshot refresh, so the gauges are as fresh as the placements' view of the fleet
    even when nobody asks for FleetStatus."""
    total = used = free = stale = 0
    for w in fleet.workers.values():
        if fleet.is_alive(w):
            total += w.capacity_tokens
            used += w.num_blocks_used * w.block_size
            free += max(0, w.free_tokens)
            stale += w.age_s > fleet.stale_after_s
    FLEET_KV_TOKENS.labels("total").set(total)
    FLEET_KV_TOKENS.labels("used").set(used)
    FLEET_KV_TOKENS.labels("free").set(free)
    STALE_WORKERS.set(stale)
    return total, free, stale
