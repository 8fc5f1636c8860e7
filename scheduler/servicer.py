"""gRPC `Scheduler` service: policy decision, then an atomic commit in Redis."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis.exceptions

from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler import metrics
from scheduler.fleet_cache import FleetCache
from scheduler.policy import KvgatePolicy, Placed, PlacementRequest, Shed, WorkerState
from scheduler.store import FleetStore, ReserveStatus

log = logging.getLogger(__name__)

OUTCOME_TO_PROTO = {
    "new": scheduler_pb2.PLACE_OUTCOME_NEW,
    "pinned_hit": scheduler_pb2.PLACE_OUTCOME_PINNED_HIT,
    "moved": scheduler_pb2.PLACE_OUTCOME_MOVED,
}
# While Redis is away, tell clients to come back after this long.
REDIS_DOWN_RETRY_MS = 1000
MAX_TOKENS_PER_REQUEST = 10_000_000

WorkerDrainer = Callable[[str], Awaitable[None]]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, store: FleetStore, fleet: FleetCache, policy: KvgatePolicy, drain_worker: WorkerDrainer
    ) -> None:
        self._store = store
        self._fleet = fleet
        self._policy = policy
        self._drain_worker = drain_worker

    async def Place(
        self, request: scheduler_pb2.PlaceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.PlaceResponse:
        problem = _validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        started = time.perf_counter()
        try:
            response = await self._place(request)
        except redis.exceptions.RedisError as exc:
            log.warning("placement unavailable, Redis: %s", exc)
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(REDIS_DOWN_RETRY_MS)),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler state store (Redis) unavailable")
        metrics.PLACEMENT_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _place(self, request: scheduler_pb2.PlaceRequest) -> scheduler_pb2.PlaceResponse:
        tier = request.tier or "free"
        fleet = await self._fleet.get()
        pinned = await self._store.get_pin(request.session_id) if request.session_id else None
        placement = PlacementRequest(
            request_id=request.request_id,
            session_id=request.session_id,
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            max_new_tokens=request.max_new_tokens,
            tier=tier,
            block_hashes=tuple(request.block_hashes),
            exclude_workers=frozenset(request.exclude_workers),
            pinned_worker=pinned,
            client_region=request.client_region,
        )
        decision = self._policy.place(placement, fleet)
        if isinstance(decision, Placed):
            for worker_id in decision.candidates:
                # Count the tokens locally before awaiting the commit, so concurrent placements
                # in this replica already see them (a burst spreads instead of piling up).
                self._fleet.note_reserved(worker_id, placement.tokens_needed)
                result = await self._store.reserve(worker_id, request.request_id, placement.tokens_needed)
                if result.status != ReserveStatus.RESERVED:
                    self._fleet.note_reserved(worker_id, -placement.tokens_needed)
                    metrics.COMMIT_CONFLICTS.inc()
                    continue
                if request.session_id:
                    await self._store.set_pin(request.session_id, worker_id)
                worker = fleet.workers[worker_id]
                outcome = decision.outcome_for(worker_id)
                metrics.PLACEMENTS.labels(outcome=outcome.value, tier=tier).inc()
                return scheduler_pb2.PlaceResponse(
                    placed=scheduler_pb2.Placed(
                        worker_id=worker_id,
                        address=worker.address,
                        region=worker.region,
                        outcome=OUTCOME_TO_PROTO[outcome.value],
                        reserved_tokens=placement.tokens_needed,
                        engine=worker.engine,
                    )
                )
            # Every candidate filled up between snapshot and commit: the snapshot is out of date.
            self._fleet.invalidate()
            decision = Shed(retry_after_s=0.5, reason="at capacity")
        assert isinstance(decision, Shed)
        await self._store.count_shed(tier)
        metrics.PLACEMENTS.labels(outcome="shed", tier=tier).inc()
        return scheduler_pb2.PlaceResponse(
            shed=scheduler_pb2.Shed(
                retry_after_ms=math.ceil(decision.retry_after_s * 1000), reason=decision.reason
            )
        )

    async def Release(
        self, request: scheduler_pb2.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.ReleaseResponse:
        if not request.request_id or not request.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and worker_id are required")
        try:
            released = await self._store.release(request.worker_id, request.request_id)
        except redis.exceptions.RedisError:
            # The reservation expires by its ttl; nothing is lost by not releasing it now.
            released = False
        return scheduler_pb2.ReleaseResponse(released=released)

    async def FleetStatus(
        self, request: scheduler_pb2.FleetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.FleetStatusResponse:
        try:
            fleet = await self._store.read_fleet()
            shed = await self._store.shed_counts()
        except redis.exceptions.RedisError:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(REDIS_DOWN_RETRY_MS)),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler state store (Redis) unavailable")
        response = scheduler_pb2.FleetStatusResponse(shed_by_tier=shed)
        total = free = stale = 0
        for w in fleet.workers.values():
            alive = fleet.is_alive(w)
            is_stale = alive and w.age_s > fleet.stale_after_s
            stale += is_stale
            state = w.state.value if alive or w.state == WorkerState.OFFLINE else "offline"
            if is_stale:
                state = "stale"
            response.workers.append(
                scheduler_pb2.WorkerState(
                    worker_id=w.worker_id, region=w.region, address=w.address, model=w.model,
                    engine=w.engine, state=state, block_size=w.block_size,
                    num_blocks_total=w.num_blocks_total, num_blocks_used=w.num_blocks_used,
                    num_blocks_cached=w.num_blocks_cached, reserved_tokens=w.reserved_tokens,
                    running=w.running, waiting=w.waiting, step_ms=w.step_ms,
                    last_seen_age_s=w.age_s, free_tokens=max(0, w.free_tokens),
                )
            )  # fmt: skip
            if alive:
                total += w.capacity_tokens
                free += max(0, w.free_tokens)
        response.fleet_kv_tokens_total = total
        response.fleet_kv_tokens_free = free
        metrics.FLEET_KV_TOKENS.labels("total").set(total)
        metrics.FLEET_KV_TOKENS.labels("free").set(free)
        metrics.STALE_WORKERS.set(stale)
        return response

    async def DrainWorker(
        self, request: scheduler_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.DrainWorkerResponse:
        if not request.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id is required")
        found = await self._store.set_draining(request.worker_id)
        if found:
            self._fleet.invalidate()
            await self._drain_worker(request.worker_id)
        return scheduler_pb2.DrainWorkerResponse(found=found)


def _validate(request: scheduler_pb2.PlaceRequest) -> str:
    if not request.request_id:
        return "request_id is required"
    if not request.model:
        return "model is required"
    if request.max_new_tokens < 1:
        return "max_new_tokens must be >= 1"
    if request.prompt_tokens + request.max_new_tokens > MAX_TOKENS_PER_REQUEST:
        return f"prompt_tokens + max_new_tokens must be <= {MAX_TOKENS_PER_REQUEST}"
    return ""
