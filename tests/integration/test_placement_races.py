"""Concurrent placement against real Redis: the Lua commit never over-commits a worker,
and a burst spreads over the fleet because reservations, not stale telemetry, decide."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import grpc
import redis.asyncio as redis

from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc, telemetry_pb2
from scheduler import keys
from scheduler.server import SchedulerService
from tests.integration.fleet import Fleet

BLOCK = 16


async def _register_workers(scheduler: SchedulerService, blocks: dict[str, int]) -> None:
    """Workers as the ingest would record them from telemetry: idle, ready."""
    for worker_id, total in blocks.items():
        await scheduler.store.ingest_stats(
            telemetry_pb2.WorkerStats(
                worker_id=worker_id, region="us-east", address=f"{worker_id}:1", model="llama-3-8b",
                engine="sim", state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=BLOCK,
                num_blocks_total=total, num_blocks_used=0, seq=1,
            )
        )  # fmt: skip


async def _place_all(
    addresses: list[str], count: int, prompt: int, new: int
) -> list[scheduler_pb2.PlaceResponse]:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = itertools.cycle([scheduler_pb2_grpc.SchedulerStub(c) for c in channels])
    try:
        calls = [
            next(stubs).Place(
                scheduler_pb2.PlaceRequest(
                    request_id=f"req-{i}", session_id=f"s-{i}", model="llama-3-8b", tier="free",
                    prompt_tokens=prompt, max_new_tokens=new,
                ),
                timeout=60,
            )
            for i in range(count)
        ]  # fmt: skip
        return list(await asyncio.gather(*calls))
    finally:
        for channel in channels:
            await channel.close()


async def _reserved_tokens(redis_url: str, worker_ids: list[str]) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    try:
        out = {}
        for wid in worker_ids:
            values = await client.hvals(keys.worker_reservations(wid))
            out[wid] = sum(int(v) for v in values)
        return out
    finally:
        await client.aclose()


async def test_two_replicas_never_overcommit_under_2000_concurrent_placements(fleet: Fleet) -> None:
    one = await fleet.start_scheduler(reservation_ttl_s=120)
    two = await fleet.start_scheduler(reservation_ttl_s=120)
    # 1,200 blocks = 19,200 tokens in all; at 512 tokens a request only ~37 of 2,000 fit.
    capacity_blocks = {f"w{i}": 100 + 40 * i for i in range(6)}
    await _register_workers(one, capacity_blocks)
    responses = await _place_all([one.address, two.address], 2000, prompt=384, new=128)

    placed = Counter(r.placed.worker_id for r in responses if r.WhichOneof("result") == "placed")
    shed = sum(r.WhichOneof("result") == "shed" for r in responses)
    assert sum(placed.values()) + shed == 2000, "every request is placed or shed"
    assert shed > 0 and sum(placed.values()) > 0
    reserved = await _reserved_tokens(fleet.redis_url, list(capacity_blocks))
    for wid, blocks in capacity_blocks.items():
        assert reserved[wid] == placed[wid] * 512, wid
        assert reserved[wid] <= blocks * BLOCK, f"{wid} over-committed: {reserved[wid]} > {blocks * BLOCK}"
    # Nearly all capacity gets used: at most one request's worth is left on any worker.
    for wid, blocks in capacity_blocks.items():
        assert blocks * BLOCK - reserved[wid] < 512, wid


async def test_a_burst_on_idle_workers_spreads_by_reservations(fleet: Fleet) -> None:
    scheduler = await fleet.start_scheduler()
    blocks = {f"w{i}": 10_000 for i in range(8)}
    await _register_workers(scheduler, blocks)
    responses = await _place_all([scheduler.address], 200, prompt=900, new=124)
    assert all(r.WhichOneof("result") == "placed" for r in responses)
    reserved = await _reserved_tokens(fleet.redis_url, list(blocks))
    fair = sum(reserved.values()) / len(blocks)
    assert max(reserved.values()) <= 1.5 * fair, reserved
