"""kvgate's placement policy: keep sessions on the worker holding their KV cache, else balance
the fleet by free KV tokens, and shed honestly (lowest tiers first) when nothing fits."""

from __future__ import annotations

import math

from scheduler.policy.config import KvgateConfig
from scheduler.policy.framework import Filter, Pipeline, WeightedScorer
from scheduler.policy.model import (
    Decision,
    FleetView,
    Placed,
    PlacementRequest,
    Shed,
    ShedCode,
    WorkerState,
    WorkerView,
)
from scheduler.policy.signals import (
    AcceptsNewSessions,
    Alive,
    BatchSweetSpot,
    Fits,
    FreeTokensAfterPlacement,
    PrefixAffinity,
    SameRegion,
    ServesModel,
    spare_tokens,
)

# When the fleet reports no throughput yet (idle or just started), assume one typical
# decode stream frees this many tokens per second per worker.
_IDLE_DRAIN_TOKENS_PER_S = 1000.0
# Stands in for a zero rate in divisions: a worker that reports no throughput frees nothing, so
# waiting on it costs (practically) forever.
_MIN_RATE = 1e-6
MIN_RETRY_AFTER_S = 0.25
MAX_RETRY_AFTER_S = 30.0
# Retry hint when no live worker could ever take the request (model not served, all draining):
# long enough not to hammer the scheduler, short enough to catch a worker coming up.
_NO_WORKER_RETRY_S = MAX_RETRY_AFTER_S / 6


def default_filters(config: KvgateConfig) -> tuple[Filter, ...]:
    """The feasibility filters every policy shares (kvgate and the baselines), cheapest and most
    selective first: each one only sees the workers the previous ones kept."""
    return (ServesModel(), Alive(), AcceptsNewSessions(), Fits(tier_headroom=config.tier_headroom))


def default_pipeline(config: KvgateConfig) -> Pipeline:
    return Pipeline(
        filters=default_filters(config),
        scorers=(
            WeightedScorer(FreeTokensAfterPlacement(), config.free_tokens_weight),
            WeightedScorer(PrefixAffinity(), config.prefix_weight),
            WeightedScorer(BatchSweetSpot(config.batch_knee, config.waiting_penalty), config.batch_weight),
            WeightedScorer(SameRegion(), config.region_weight),
        ),
    )


class KvgatePolicy:
    reads_pins_and_prefixes = True

    def __init__(
        self, name: str = "kvgate", pipeline: Pipeline | None = None, config: KvgateConfig | None = None
    ) -> None:
        self.name = name
        self.config = config if config is not None else KvgateConfig()
        self.pipeline = pipeline if pipeline is not None else default_pipeline(self.config)

    def place(self, request: PlacementRequest, fleet: FleetView) -> Decision:
        k = max(1, self.config.max_candidates)
        pinned_id = request.pinned_worker
        pinned = fleet.workers.get(pinned_id) if pinned_id is not None else None
        if pinned_id is None or pinned is None:
            ranked = self.pipeline.top(request, fleet, k)
            if not ranked:
                return estimate_shed(request, fleet, self.config)
            return Placed(candidates=[w.worker_id for w in ranked], pinned_worker=pinned_id)

        # One spare slot: the pinned worker may be among the top k and is listed separately.
        others = [w for w in self.pipeline.top(request, fleet, k + 1) if w.worker_id != pinned_id]
        if self.pipeline.keeps(request, pinned, fleet):
            if others and self._queue_outweighs_cache(request, pinned, others[0]):
                # Room for the KV, but a prefill backlog: recomputing elsewhere is faster.
                return Placed(candidates=[w.worker_id for w in others[:k]], pinned_worker=pinned_id)
            # The pinned worker holds the session's KV: a hit beats any balance gain. The others
            # stay as fallbacks in case the reservation there conflicts.
            return Placed(
                candidates=[pinned_id, *(w.worker_id for w in others[: k - 1])], pinned_worker=pinned_id
            )

        wait_s = self._pinned_wait_s(request, fleet)
        if wait_s is not None:
            recompute_s = _move_cost_s(request, others[0]) if others else float("inf")
            if wait_s < recompute_s:
                return Placed(
                    candidates=[pinned_id, *(w.worker_id for w in others[: k - 1])],
                    pinned_worker=pinned_id,
                    wait_for_pinned=True,
                    expected_wait_s=wait_s,
                )
        if not others:
            return estimate_shed(request, fleet, self.config)
        return Placed(candidates=[w.worker_id for w in others[:k]], pinned_worker=pinned_id)

    def _queue_outweighs_cache(self, request: PlacementRequest, pinned: WorkerView, best: WorkerView) -> bool:
        """A pinned worker with a queue (e.g. busy prefilling long prompts) can make a cache hit
        slower than recomputing the history on an idle worker; the fleet simulator showed pinned
        turns forming the whole TTFT tail on the Mooncake trace when pins held regardless."""
        if pinned.waiting == 0:
            return False
        cached = request.prefix_hit_blocks.get(pinned.worker_id, 0) * pinned.block_size
        new_tokens = max(0, request.recompute_tokens - cached)
        stay_s = _queue_s(pinned) + new_tokens / max(pinned.prefill_tokens_per_s, _MIN_RATE)
        return _move_cost_s(request, best) < stay_s

    def _pinned_wait_s(self, request: PlacementRequest, fleet: FleetView) -> float | None:
        """Seconds until the full pinned worker frees room for the request, or None if waiting
        there is not an option (dead, excluded, draining, other model, too small, too long)."""
        pinned_id = request.pinned_worker
        assert pinned_id is not None
        pinned = fleet.workers[pinned_id]
        if (
            pinned.model != request.model
            or not fleet.is_alive(pinned)
            or pinned_id in request.exclude_workers
            # Draining: in-flight turns finish there, but the session's next turn moves (DESIGN).
            or pinned.state != WorkerState.READY
        ):
            return None
        headroom = self.config.headroom_fraction(request.tier)
        need = request.tokens_needed
        if pinned.capacity_tokens * (1.0 - headroom) < need:
            return None  # it would never fit there, however long we wait
        deficit = need - spare_tokens(fleet, pinned, headroom)
        # Steady state: a worker frees KV about as fast as it produces tokens (finished
        # sequences release what they used), so its throughput is its drain rate.
        wait_s = max(0.0, deficit) / max(pinned.tokens_per_s, _MIN_RATE)
        return wait_s if wait_s <= self.config.max_pin_wait_s else None


def estimate_shed(request: PlacementRequest, fleet: FleetView, config: KvgateConfig) -> Shed:
    """Why nothing takes the request, and when to retry. TOO_LARGE: it needs more than any
    worker serving the model could ever hold for its tier (capacity less the tier's headroom),
    dead ones included, so no retry helps and there is no hint. NO_WORKER: no live worker serving
    the model that could hold it accepts requests (none runs, the big ones are down or drain, or
    failed this request). Else AT_CAPACITY, with the time the drain rate of the workers that
    could take it needs to free the deficit on the one closest to fitting it (with its tier's
    headroom)."""
    tier = config.effective_tier(request.tier)
    headroom = config.headroom_fraction(request.tier)
    need = request.tokens_needed
    model = request.model
    excluded = request.exclude_workers
    serving = 0
    # The tier's room on the largest worker registered for the model, as the Fits filter
    # computes it for an empty worker. Dead, draining and excluded workers count: their size
    # says what the model's workers can hold, and a pool of big GPUs that is restarting must not
    # turn long requests into permanent errors.
    largest = 0.0
    best_spare: float | None = None
    drain = 0.0
    for w in fleet.workers.values():
        if w.model != model:
            continue
        room = w.capacity_tokens - headroom * w.capacity_tokens
        largest = max(largest, room)
        if not fleet.is_alive(w):
            continue
        serving += 1
        if w.state != WorkerState.READY or w.worker_id in excluded or room < need:
            continue
        # Only workers that could take the request later count: room that a draining or excluded
        # worker frees, or one too small for it, does not help this request.
        drain += w.tokens_per_s
        spare = spare_tokens(fleet, w, headroom)
        if best_spare is None or spare > best_spare:
            best_spare = spare
    if need > largest and largest > 0:
        limit = math.floor(largest)
        return Shed(
            retry_after_s=0.0,
            reason=f"needs {need} KV tokens; a worker serving {model} holds at most {limit} "
            f"for the {tier} tier",
            tier=tier,
            code=ShedCode.TOO_LARGE,
            limit_tokens=limit,
        )
    if serving == 0:
        return Shed(
            retry_after_s=_NO_WORKER_RETRY_S,
            reason=f"no live worker serves {model}",
            tier=tier,
            code=ShedCode.NO_WORKER,
        )
    if best_spare is None:
        return Shed(
            retry_after_s=_NO_WORKER_RETRY_S,
            reason=f"no live worker serving {model} that could hold it accepts requests",
            tier=tier,
            code=ShedCode.NO_WORKER,
        )
    deficit = max(1.0, need - best_spare)
    # The whole fleet's drain rate against one worker's deficit is optimistic (that worker frees
    # only its share), on purpose: a retry that is shed again costs one cheap placement, not GPU.
    rate = drain if drain > 0 else _IDLE_DRAIN_TOKENS_PER_S * serving
    retry = min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, deficit / rate))
    return Shed(
        retry_after_s=retry,
        reason="at capacity",
        details={"deficit_tokens": deficit, "drain_tokens_per_s": rate, "headroom_fraction": headroom},
        tier=tier,
    )


def _queue_s(worker: WorkerView) -> float:
    """Rough wait before a new request starts prefilling: about one engine step per queued
    request, since chunked prefill admits roughly one waiting request per step. A rough estimate
    on purpose; both sides are orders of magnitude apart when it matters."""
    return worker.waiting * worker.step_ms / 1000.0


def _move_cost_s(request: PlacementRequest, worker: WorkerView) -> float:
    """Prefilling the history again on `worker` (minus any prefix it already caches), after its queue."""
    cached = request.prefix_hit_blocks.get(worker.worker_id, 0) * worker.block_size
    return max(0, request.recompute_tokens - cached) / max(worker.prefill_tokens_per_s, _MIN_RATE) + _queue_s(
        worker
    )
