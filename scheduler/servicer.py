"""gRPC `Scheduler` service: policy decision, then an atomic commit in Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

import grpc
import redis.exceptions

from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler import metrics
from scheduler.fleet_cache import FleetCache
from scheduler.pin_hints import PinHints
from scheduler.policy import Placed, PlacementRequest, Policy, Shed, ShedCode
from scheduler.store import FleetStore, ReserveStatus

log = logging.getLogger(__name__)

OUTCOME_TO_PROTO = {
    "new": scheduler_pb2.PLACE_OUTCOME_NEW,
    "pinned_hit": scheduler_pb2.PLACE_OUTCOME_PINNED_HIT,
    "moved": scheduler_pb2.PLACE_OUTCOME_MOVED,
}
SHED_CODE_TO_PROTO = {
    ShedCode.AT_CAPACITY: scheduler_pb2.SHED_CODE_AT_CAPACITY,
    ShedCode.NO_WORKER: scheduler_pb2.SHED_CODE_NO_WORKER,
    ShedCode.TOO_LARGE: scheduler_pb2.SHED_CODE_TOO_LARGE,
}
# The placements counter's outcome label of each kind of refusal.
SHED_OUTCOME = {
    ShedCode.AT_CAPACITY: "shed",
    ShedCode.NO_WORKER: "no_worker",
    ShedCode.TOO_LARGE: "too_large",
}
# Bounds on waiting for a full pinned worker inside one Place (the policy estimates the wait).
MAX_PIN_WAIT_S = 5.0
PIN_WAIT_POLL_S = 0.05
# The wait also ends this long before the caller's deadline (the gateway's Place deadline is
# 5 s too): the fallback candidates' commits and the answer must still reach it in time.
PIN_WAIT_DEADLINE_MARGIN_S = 0.5
# While Redis is away, tell clients to come back after this long.
REDIS_DOWN_RETRY_MS = 1000
MAX_TOKENS_PER_REQUEST = 10_000_000

WorkerDrainer = Callable[[str], Awaitable[None]]
# The reservations one Place has made and not handed to its client, by worker: (tokens, whether
# the fleet snapshot counts them). A reserve whose reply never came (Redis failed, the Place was
# cancelled) may hold in Redis or not; the snapshot has taken it back, and it is released too.
Holds = dict[str, tuple[int, bool]]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, store: FleetStore, fleet: FleetCache, policy: Policy, drain_worker: WorkerDrainer
    ) -> None:
        self._store = store
        self._fleet = fleet
        self._policy = policy
        self._drain_worker = drain_worker
        self._background: set[asyncio.Task[None]] = set()
        self._pin_hints = PinHints()

    async def Place(
        self, request: scheduler_pb2.PlaceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.PlaceResponse:
        problem = _validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        started = time.perf_counter()
        holds: Holds = {}
        try:
            response = await self._place(request, holds, context.time_remaining())
        except BaseException as exc:
            # Redis failed, or the Place was cancelled (the client went away, its deadline
            # passed): what it reserved would otherwise stay booked for the reservation ttl.
            self._give_back(request.request_id, holds)
            if not isinstance(exc, redis.exceptions.RedisError):
                raise
            log.warning("placement unavailable, Redis: %s", exc)
            await _redis_unavailable(context)
        left = context.time_remaining()
        if left is not None and left <= 0:
            # Answered after the caller's deadline: it will not use the reservation.
            self._give_back(request.request_id, holds)
        metrics.PLACEMENT_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _place(
        self,
        request: scheduler_pb2.PlaceRequest,
        holds: Holds | None = None,
        time_left_s: float | None = None,
    ) -> scheduler_pb2.PlaceResponse:
        """Decide with the pin and the prefix index, commit atomically; usually one Redis round trip.

        The lookup (pin, prefix holders) and the commit would be two round trips in a row. So for
        a stateless turn, a session's first turn, or a session whose pin this replica has seen,
        the policy first decides with what is known without asking (that pin, no prefix hits)
        and the guess is reserved in the same write as the lookup. The policy then decides again
        with the lookup's answer; when it picks the guessed worker the reservation already
        holds. When it picks another (a cached prefix elsewhere, a pin moved by another replica),
        that one is committed as before and the guess is given back.

        `holds` records what this placement reserves; it returns holding only the reservation its
        answer hands to the caller (none for a shed). A wait on a full pinned worker ends in time
        to answer within `time_left_s` (the caller's deadline).
        """
        if holds is None:
            holds = {}
        answer_by = (
            None if time_left_s is None else time.monotonic() + time_left_s - PIN_WAIT_DEADLINE_MARGIN_S
        )
        # Unknown tiers get the fallback tier's headroom (KvgateConfig): named so in metrics and
        # shed counts too, whose labels must stay the few configured tiers, not client text.
        tier = self._policy.config.effective_tier(request.tier)
        block_hashes = list(request.block_hashes)
        fleet = await self._fleet.get()
        # Only prefix hits need to know who serves the model.
        serving = (
            [w.worker_id for w in fleet.workers.values() if w.model == request.model] if block_hashes else []
        )
        placement = PlacementRequest(
            request_id=request.request_id,
            session_id=request.session_id,
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            max_new_tokens=request.max_new_tokens,
            tier=tier,
            block_hashes=tuple(block_hashes),
            exclude_workers=frozenset(request.exclude_workers),
            pinned_worker=self._pin_hint(request),
            client_region=request.client_region,
        )
        tokens = placement.tokens_needed
        # The commit keeps the tier's headroom too: the policy's check alone is on a snapshot, and
        # replicas placing at once would let a lower tier eat it.
        headroom = self._policy.config.headroom_fraction(tier)
        # Guess only where the lookup rarely changes the answer: a session of unknown pin (no
        # last_worker from the caller, not placed by this replica) might be pinned elsewhere,
        # and a wrong guess costs a reservation given back.
        reads_lookup = self._policy.reads_pins_and_prefixes
        guessable = (
            not reads_lookup
            or not request.session_id
            or request.first_turn
            or placement.pinned_worker is not None
        )
        guess = self._policy.place(placement, fleet) if guessable else None
        early = ""  # the guessed worker, once its reservation holds
        if isinstance(guess, Placed) and guess.candidates and not guess.wait_for_pinned:
            pinned, prefix_hits, early = await self._lookup_and_reserve(
                request, serving, block_hashes, guess.candidates[0], tokens, headroom, holds
            )
        else:
            pinned, prefix_hits = await self._store.lookup(request.session_id, serving, block_hashes)
        self._pin_hints.remember(request.session_id, pinned)
        # The lookup told the guess nothing new (the pin it assumed, no cached prefix anywhere):
        # deciding again would repeat it on the same inputs.
        unchanged = pinned == placement.pinned_worker and not prefix_hits
        placement = dataclasses.replace(placement, pinned_worker=pinned, prefix_hit_blocks=prefix_hits)
        # Re-read the snapshot after the lookup's await: reservations that concurrent placements
        # began meanwhile must count, or a burst piles onto one worker. The guess's own
        # reservation must not: decide as if it were not there yet (no await until it is back).
        fleet = await self._fleet.get()
        if guess is not None and (not reads_lookup or (early and unchanged)):
            # The lookup cannot change this choice; the pin only names the outcome.
            decision = (
                dataclasses.replace(guess, pinned_worker=pinned) if isinstance(guess, Placed) else guess
            )
        else:
            if early:
                self._fleet.adjust(early, -tokens)
            try:
                decision = self._policy.place(placement, fleet)
            finally:
                if early:
                    self._fleet.adjust(early, tokens)
        if isinstance(decision, Placed):
            for i, worker_id in enumerate(decision.candidates):
                if worker_id != early:
                    wait_s = decision.expected_wait_s if i == 0 and decision.wait_for_pinned else 0.0
                    if not await self._commit(
                        holds, worker_id, request.request_id, tokens, headroom, wait_s, answer_by
                    ):
                        metrics.COMMIT_CONFLICTS.inc()
                        continue
                self._give_back(request.request_id, holds, keep=worker_id)
                worker = fleet.workers[worker_id]
                outcome = decision.outcome_for(worker_id)
                self._pin_hints.remember(request.session_id, worker_id)
                # The pin is affinity, not correctness: write it after answering, off the hot path.
                self._spawn(
                    self._store.record_placement(request.session_id, worker_id, pinned, outcome.value)
                )
                if prefix_hits:
                    self._spawn(
                        self._store.refresh_prefix(block_hashes[: max(prefix_hits.values())], prefix_hits)
                    )
                metrics.placements(outcome.value, tier).inc()
                return scheduler_pb2.PlaceResponse(
                    placed=scheduler_pb2.Placed(
                        worker_id=worker_id,
                        address=worker.address,
                        region=worker.region,
                        outcome=OUTCOME_TO_PROTO[outcome.value],
                        reserved_tokens=tokens,
                        engine=worker.engine,
                    )
                )
            # Every candidate filled up between snapshot and commit: the snapshot is out of date.
            self._fleet.invalidate()
            decision = Shed(retry_after_s=0.5, reason="at capacity", tier=tier)
        self._give_back(request.request_id, holds)
        assert isinstance(decision, Shed)
        shed_tier = decision.tier or tier
        if decision.code is ShedCode.AT_CAPACITY:
            # Only a full fleet counts as shedding: a missing model or an oversized request is not
            # something capacity (or the tier) decided.
            await self._store.count_shed(shed_tier)
        metrics.placements(SHED_OUTCOME[decision.code], shed_tier).inc()
        return scheduler_pb2.PlaceResponse(
            shed=scheduler_pb2.Shed(
                retry_after_ms=math.ceil(decision.retry_after_s * 1000),
                reason=decision.reason,
                code=SHED_CODE_TO_PROTO[decision.code],
                tokens_needed=tokens,
                tokens_limit=decision.limit_tokens,
            )
        )

    def _pin_hint(self, request: scheduler_pb2.PlaceRequest) -> str | None:
        """Where the session is probably pinned, before the lookup says: the worker of its last
        turn as the caller knows it (whichever replica placed that turn), else what this replica
        last saw; None for a stateless turn or a session neither knows."""
        if not request.session_id:
            return None
        return request.last_worker or self._pin_hints.get(request.session_id)

    async def _lookup_and_reserve(
        self,
        request: scheduler_pb2.PlaceRequest,
        serving: list[str],
        block_hashes: list[int],
        worker_id: str,
        tokens: int,
        headroom: float,
        holds: Holds,
    ) -> tuple[str | None, dict[str, int], str]:
        """The lookup and a reservation on the guessed worker, in one round trip (both are issued
        in this tick, so the connection sends them in one write): (pin, prefix hits, the guessed
        worker if its reservation holds, else ""). On an error the caller gives back `holds`."""
        looked, reserved = await asyncio.gather(
            self._store.lookup(request.session_id, serving, block_hashes),
            self._reserve(holds, worker_id, request.request_id, tokens, headroom),
            return_exceptions=True,
        )
        if isinstance(looked, BaseException):
            raise looked
        if isinstance(reserved, BaseException):
            raise reserved
        committed = reserved == ReserveStatus.RESERVED
        if not committed:
            metrics.COMMIT_CONFLICTS.inc()
        pinned, prefix_hits = looked
        return pinned, prefix_hits, worker_id if committed else ""

    async def _reserve(
        self, holds: Holds, worker_id: str, request_id: str, tokens: int, headroom: float
    ) -> ReserveStatus:
        """One reserve: counted in the fleet snapshot while in flight, so that concurrent placements
        here see it, and in `holds` until its reply says it did not take."""
        self._fleet.begin_reservation(worker_id, tokens)
        holds[worker_id] = (tokens, False)
        committed = False
        try:
            result = await self._store.reserve(worker_id, request_id, tokens, headroom_fraction=headroom)
            committed = result.status == ReserveStatus.RESERVED
        finally:
            self._fleet.end_reservation(worker_id, tokens, committed)
        if committed:
            holds[worker_id] = (tokens, True)
        else:
            # reserve.lua drops a request's earlier reservation on the worker before checking.
            del holds[worker_id]
        return result.status

    def _give_back(self, request_id: str, holds: Holds, keep: str = "") -> None:
        """Release what this placement reserved (or may have) and does not use, but `keep`."""
        for worker_id in [w for w in holds if w != keep]:
            tokens, counted = holds.pop(worker_id)
            if counted:
                self._fleet.adjust(worker_id, -tokens)
            # Sent on the placement connection, after any reserve still in flight there.
            self._spawn(self._store.release(worker_id, request_id))

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(_suppress_redis_errors(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit(
        self,
        holds: Holds,
        worker_id: str,
        request_id: str,
        tokens: int,
        headroom: float,
        wait_s: float,
        answer_by: float | None,
    ) -> bool:
        """Reserve on one worker; for a pinned worker worth waiting for, retry until it has room
        (its running requests finish and its telemetry shows the freed blocks), wait_s passes or
        the answer is due (`answer_by`, monotonic time)."""
        until = time.monotonic() + min(wait_s, MAX_PIN_WAIT_S)
        if answer_by is not None:
            until = min(until, answer_by)
        while True:
            status = await self._reserve(holds, worker_id, request_id, tokens, headroom)
            if status == ReserveStatus.RESERVED:
                return True
            if status != ReserveStatus.NO_ROOM or time.monotonic() + PIN_WAIT_POLL_S > until:
                return False
            await asyncio.sleep(PIN_WAIT_POLL_S)

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
            ids = sorted(fleet.workers)
            extras = await self._store.status_extras(ids)
            shed = await self._store.shed_counts()
            placed = await self._store.placement_counts()
        except redis.exceptions.RedisError:
            await _redis_unavailable(context)
        response = scheduler_pb2.FleetStatusResponse(shed_by_tier=shed, placements_by_outcome=placed)
        for wid in ids:
            w = fleet.workers[wid]
            alive = fleet.is_alive(w)
            state = (
                "stale"
                if alive and w.age_s > fleet.stale_after_s
                else (w.state.value if alive else "offline")
            )
            pins, indexed = extras[wid]
            response.workers.append(
                scheduler_pb2.WorkerState(
                    worker_id=w.worker_id, region=w.region, address=w.address, model=w.model,
                    engine=w.engine, state=state, block_size=w.block_size,
                    num_blocks_total=w.num_blocks_total, num_blocks_used=w.num_blocks_used,
                    num_blocks_cached=w.num_blocks_cached, reserved_tokens=w.reserved_tokens,
                    running=w.running, waiting=w.waiting, step_ms=w.step_ms,
                    last_seen_age_s=w.age_s, free_tokens=max(0, w.free_tokens),
                    pinned_sessions=pins, blocks_indexed=indexed, tokens_per_s=w.tokens_per_s,
                    arithmetic_intensity=w.arithmetic_intensity,
                )
            )  # fmt: skip
        response.fleet_kv_tokens_total, response.fleet_kv_tokens_free, _ = metrics.observe_fleet(fleet)
        return response

    async def DrainWorker(
        self, request: scheduler_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.DrainWorkerResponse:
        if not request.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id is required")
        try:
            found = await self._store.set_draining(request.worker_id)
            if found:
                self._fleet.invalidate()
                await self._drain_worker(request.worker_id)
        except redis.exceptions.RedisError as exc:
            # Safe to retry: marking a worker draining again changes nothing.
            log.warning("drain of %s unavailable, Redis: %s", request.worker_id, exc)
            await _redis_unavailable(context)
        return scheduler_pb2.DrainWorkerResponse(found=found)


async def _redis_unavailable(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    context.set_trailing_metadata((("grpc-retry-pushback-ms", str(REDIS_DOWN_RETRY_MS)),))
    await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler state store (Redis) unavailable")
    raise AssertionError("unreachable: context.abort raises")


async def _suppress_redis_errors(coro: Coroutine[Any, Any, object]) -> None:
    try:
        await coro
    except redis.exceptions.RedisError as exc:
        # A pin write, a give-back or a prefix refresh: the session's next turn is looked up
        # afresh, a reservation not released expires with its ttl, a prefix is refreshed later.
        log.warning("background Redis write failed (%s); nothing depends on it", exc)


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
