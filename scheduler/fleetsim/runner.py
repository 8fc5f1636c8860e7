"""One simulation per policy on the same trace and fleet, plus the trace's hit-ratio bounds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpu_worker.sim.profiles import get_gpu, get_model
from gpu_worker.sim.roofline import kv_capacity_blocks
from scheduler.fleetsim.bounds import Bounds, InfiniteCache, PooledLru
from scheduler.fleetsim.metrics import PolicyReport, RunData, summarise
from scheduler.fleetsim.simulator import FleetSim, SimConfig, WorkerSpec
from scheduler.fleetsim.trace import PrefixHasher, Trace, scaled_requests
from scheduler.policy import POLICIES, KvgateConfig, make_policy


@dataclass(frozen=True)
class Scenario:
    trace: Trace
    workers: Sequence[WorkerSpec]
    rate_scale: float = 1.0
    seed: int = 0
    duration_s: float | None = None
    config: SimConfig = field(default_factory=SimConfig)
    ttft_slo_s: float = 2.0
    kvgate_config: KvgateConfig | None = None


def fleet_capacity_blocks(workers: Sequence[WorkerSpec], config: SimConfig, block_size: int = 16) -> int:
    """Total KV blocks of the fleet, as the engines will size their pools."""
    if config.num_gpu_blocks is not None:
        return config.num_gpu_blocks * len(workers)
    model = get_model(config.model)
    return sum(kv_capacity_blocks(get_gpu(w.gpu), model, 1, 0.9, block_size) for w in workers)


def policy_names(spec: str) -> list[str]:
    """`all`, one name, or a comma-separated list, each one of POLICIES."""
    if spec == "all":
        return list(POLICIES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in POLICIES:
            raise ValueError(f"unknown placement policy {n!r}; known: {', '.join(POLICIES)} or all")
    if not names:
        raise ValueError("no policy given")
    return names


def compute_bounds(scenario: Scenario, capacity_blocks: int, block_size: int = 16) -> Bounds:
    """Infinite-cache and pooled-LRU hit ratios of the scenario's request stream, on their own
    (run_policies gets them from its first simulation instead, without hashing twice)."""
    trace = scenario.trace
    stream = scaled_requests(trace, scenario.rate_scale, scenario.seed, scenario.duration_s)
    if not trace.shares_prefixes:
        # Unique token ids per request: no block is ever seen twice, both bounds are exactly 0.
        return Bounds(0.0, 0.0, capacity_blocks, sum(1 for _ in stream))
    hasher = PrefixHasher(block_size)
    oracle = InfiniteCache(block_size)
    pooled = PooledLru(capacity_blocks, block_size)
    n = 0
    for r in stream:
        lookup = hasher.request_hashes(r)
        insert = hasher.cached_after(r, True) if trace.answers_reused else lookup
        oracle.add(r.prompt_tokens, lookup, insert)
        pooled.add(r.prompt_tokens, lookup, insert)
        n += 1
    return Bounds(oracle.counter.ratio, pooled.counter.ratio, capacity_blocks, n)


ProgressFn = Callable[[str, float, int], None]


@dataclass
class PolicyRun:
    report: PolicyReport
    data: RunData


def run_policies(
    scenario: Scenario, names: Sequence[str], progress: ProgressFn | None = None
) -> list[PolicyRun]:
    """Each policy on a fresh fleet and the same request stream; the bounds come from the
    first run (they depend on the stream and the fleet's capacity only)."""
    capacity = fleet_capacity_blocks(scenario.workers, scenario.config)
    block_size = 16
    oracle = InfiniteCache(block_size)
    pooled = PooledLru(capacity, block_size)
    runs: list[tuple[str, RunData]] = []
    for i, name in enumerate(names):
        policy = make_policy(name, seed=scenario.seed, config=scenario.kvgate_config)

        def tick(t: float, n: int, name: str = name) -> None:
            if progress is not None:
                progress(name, t, n)

        sim = FleetSim(
            scenario.workers,
            policy,
            scenario.trace,
            scaled_requests(scenario.trace, scenario.rate_scale, scenario.seed, scenario.duration_s),
            scenario.config,
            progress=tick,
            bounds=(oracle, pooled) if i == 0 else None,
        )
        runs.append((name, sim.run()))
    shares = scenario.trace.shares_prefixes
    bounds = Bounds(
        oracle.counter.ratio if shares else 0.0,
        pooled.counter.ratio if shares else 0.0,
        capacity,
        runs[0][1].requests if runs else 0,
    )
    return [PolicyRun(report(scenario, data, bounds), data) for _, data in runs]


def report(scenario: Scenario, data: RunData, bounds: Bounds) -> PolicyReport:
    return summarise(
        data, scenario.trace.name, bounds.oracle_hit_ratio, bounds.pooled_lru_hit_ratio, scenario.ttft_slo_s
    )
