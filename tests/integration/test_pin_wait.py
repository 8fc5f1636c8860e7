"""Waiting inside Place for a session's full pinned worker (scheduler/servicer.py _commit), against
real Redis over gRPC: the wait ends when the worker frees room or in time to answer before the
caller's deadline, and a Place that ends without using a reservation gives it back at once."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis.asyncio as redis

from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc, telemetry_pb2
from scheduler import keys
from scheduler.server import SchedulerService
from tests.integration.fleet import Fleet

# "a" holds the session's KV but has 160 tokens free; at 1,000 tokens/s it frees the 2,940 more
# the turn needs in ~2.9 s. Recomputing the 3,000-token history on "b" (500 tokens/s of prefill)
# would take 6 s, so the policy waits for "a". Seconds apart, so that a loaded CI machine's
# scheduling delays cannot change what the tests see.
PROMPT, NEW = 3000, 100
DRAIN_TOKENS_PER_S, PREFILL_TOKENS_PER_S = 1000.0, 500.0


async def _report(scheduler: SchedulerService, worker_id: str, used_blocks: int, prefill: float) -> None:
    await scheduler.store.ingest_stats(
        telemetry_pb2.WorkerStats(
            worker_id=worker_id, region="us-east", address=f"{worker_id}:1", model="m", engine="sim",
            state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16, num_blocks_total=1000,
            num_blocks_used=used_blocks, tokens_per_s=DRAIN_TOKENS_PER_S, prefill_tokens_per_s=prefill,
            seq=time.time_ns() // 1000,
        )
    )  # fmt: skip


async def _pinned_to_full_worker(fleet: Fleet) -> SchedulerService:
    scheduler = await fleet.start_scheduler()
    await _report(scheduler, "a", used_blocks=990, prefill=PREFILL_TOKENS_PER_S)
    await _report(scheduler, "b", used_blocks=0, prefill=PREFILL_TOKENS_PER_S)
    # The session's last turn ran on "a" (placed by another replica: this one has no hint of it).
    await scheduler.store.record_placement("s1", "a", None, "new")
    return scheduler


def _request(request_id: str, first_turn: bool = False) -> scheduler_pb2.PlaceRequest:
    return scheduler_pb2.PlaceRequest(
        request_id=request_id, session_id="s1", model="m", tier="enterprise", prompt_tokens=PROMPT,
        max_new_tokens=NEW, first_turn=first_turn,
    )  # fmt: skip


async def _reserved(fleet: Fleet, worker_id: str) -> int:
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        return sum(int(v) for v in await client.hvals(keys.worker_reservations(worker_id)))
    finally:
        await client.aclose()


async def _eventually_reserved(fleet: Fleet, worker_id: str, tokens: int) -> None:
    for _ in range(100):
        if await _reserved(fleet, worker_id) == tokens:
            return
        await asyncio.sleep(0.02)
    assert await _reserved(fleet, worker_id) == tokens


async def test_a_place_waits_for_its_full_pinned_worker_and_lands_there_once_it_frees(fleet: Fleet) -> None:
    scheduler = await _pinned_to_full_worker(fleet)
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        call = asyncio.ensure_future(
            scheduler_pb2_grpc.SchedulerStub(channel).Place(_request("r1"), timeout=10)
        )
        await asyncio.sleep(0.5)
        assert not call.done(), "the Place should be waiting for the pinned worker"
        await _report(scheduler, "a", used_blocks=0, prefill=PREFILL_TOKENS_PER_S)  # its turns finished
        response = await call
    assert response.placed.worker_id == "a"
    assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT
    assert await _reserved(fleet, "a") == PROMPT + NEW and await _reserved(fleet, "b") == 0


async def test_the_wait_ends_in_time_to_answer_before_the_callers_deadline(fleet: Fleet) -> None:
    # The estimated wait (~2.9 s) is longer than the caller gives the Place: it must fall back to
    # "b" and answer, not run into DEADLINE_EXCEEDED.
    scheduler = await _pinned_to_full_worker(fleet)
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        response = await scheduler_pb2_grpc.SchedulerStub(channel).Place(_request("r1"), timeout=1.8)
    assert response.placed.worker_id == "b", response
    assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_MOVED
    assert await _reserved(fleet, "a") == 0 and await _reserved(fleet, "b") == PROMPT + NEW


async def test_a_place_cancelled_while_it_holds_a_reservation_gives_it_back(fleet: Fleet) -> None:
    # A first turn is reserved on the policy's guess ("b") with the lookup; the lookup finds the
    # pin to "a" after all, and the Place waits there still holding "b". The client goes away.
    scheduler = await _pinned_to_full_worker(fleet)
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        call = scheduler_pb2_grpc.SchedulerStub(channel).Place(_request("r1", first_turn=True))
        await _eventually_reserved(fleet, "b", PROMPT + NEW)  # the guess holds
        await asyncio.sleep(0.2)
        assert not call.done()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await _eventually_reserved(fleet, "b", 0)
    assert await _reserved(fleet, "a") == 0


async def test_a_redis_error_after_the_guess_was_reserved_gives_the_guess_back(fleet: Fleet) -> None:
    scheduler = await _pinned_to_full_worker(fleet)
    # A real Redis error on every reserve on "a" (WRONGTYPE), none on "b" or the lookup.
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        await client.set(keys.worker_reservations("a"), "not a hash")
    finally:
        await client.aclose()
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await scheduler_pb2_grpc.SchedulerStub(channel).Place(_request("r1", first_turn=True), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await _eventually_reserved(fleet, "b", 0)
