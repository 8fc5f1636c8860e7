"""A full fleet says so honestly: lower tiers shed first with a retry hint; Redis down is
UNAVAILABLE with a hint (placement and draining alike), and placement recovers by itself."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from kvgate.containers import RedisServer
from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc, telemetry_pb2
from scheduler.server import SchedulerService
from tests.integration.fleet import Fleet


async def _register(scheduler: SchedulerService, blocks: dict[str, int], used: int = 0) -> None:
    for worker_id, total in blocks.items():
        await scheduler.store.ingest_stats(
            telemetry_pb2.WorkerStats(
                worker_id=worker_id, region="us-east", address=f"{worker_id}:1", model="llama-3-8b",
                engine="sim", state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16,
                num_blocks_total=total, num_blocks_used=used, seq=int(time.time() * 1000),
                tokens_per_s=2000.0,
            )
        )  # fmt: skip


def _place(i: int, tier: str) -> scheduler_pb2.PlaceRequest:
    return scheduler_pb2.PlaceRequest(
        request_id=f"r{i}",
        session_id=f"s{i}",
        model="llama-3-8b",
        tier=tier,
        prompt_tokens=700,
        max_new_tokens=100,
    )


async def test_full_fleet_sheds_free_tier_first_and_keeps_serving_enterprise(fleet: Fleet) -> None:
    scheduler = await fleet.start_scheduler()
    # 1,000 blocks = 16,000 tokens, 92% used: 1,280 free. Free tier keeps 10% headroom
    # (1,600 tokens) and cannot place 800; enterprise keeps none and can.
    await _register(scheduler, {"w0": 1000}, used=920)
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        free = await stub.Place(_place(1, "free"))
        assert free.WhichOneof("result") == "shed"
        assert free.shed.reason == "at capacity" and 250 <= free.shed.retry_after_ms <= 30_000
        enterprise = await stub.Place(_place(2, "enterprise"))
        assert enterprise.WhichOneof("result") == "placed" and enterprise.placed.worker_id == "w0"
        status = await stub.FleetStatus(scheduler_pb2.FleetStatusRequest())
        assert status.shed_by_tier == {"free": 1}


def _placements(outcome: str, tier: str) -> float:
    return (
        REGISTRY.get_sample_value("kvgate_scheduler_placements_total", {"outcome": outcome, "tier": tier})
        or 0
    )


async def test_unknown_tiers_are_counted_as_the_free_tier_they_are_placed_as(fleet: Fleet) -> None:
    # The tier is client-controlled text to the scheduler: as a metric label it must not add series.
    scheduler = await fleet.start_scheduler()
    await _register(scheduler, {"w0": 1000}, used=920)  # free tier is shed here, enterprise is not
    new_before, shed_before = _placements("new", "free"), _placements("shed", "free")
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        assert (await stub.Place(_place(1, "enterprise"))).WhichOneof("result") == "placed"
        assert (await stub.Place(_place(2, "platinum"))).WhichOneof("result") == "shed"
        await _register(scheduler, {"w0": 1000}, used=0)
        sheds = 1
        # Shed until this replica's snapshot (refreshed in the background) shows the room.
        while (await stub.Place(_place(3, "Platinum!"))).WhichOneof("result") == "shed":
            sheds += 1
            assert sheds < 50
            await asyncio.sleep(0.05)
        status = await stub.FleetStatus(scheduler_pb2.FleetStatusRequest())
    assert status.shed_by_tier == {"free": sheds}
    assert _placements("shed", "free") == shed_before + sheds
    assert _placements("new", "free") == new_before + 1
    tiers = {
        s.labels["tier"]
        for m in REGISTRY.collect()
        if m.name == "kvgate_scheduler_placements"
        for s in m.samples
    }
    assert tiers <= {"free", "plus", "enterprise"}, tiers


async def test_redis_down_means_unavailable_with_a_hint_then_recovery(fleet: Fleet) -> None:
    own_redis = RedisServer().start()
    try:
        fleet.redis_url = own_redis.url
        scheduler = await fleet.start_scheduler()
        await _register(scheduler, {"w0": 10_000})
        async with grpc.aio.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            assert (await stub.Place(_place(1, "free"))).WhichOneof("result") == "placed"
            own_redis.container.get_wrapped_container().pause()
            try:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Place(_place(2, "free"), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Redis" in (info.value.details() or "")
                pushback = dict(info.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                assert pushback is not None and int(pushback) > 0
            finally:
                own_redis.container.get_wrapped_container().unpause()
            await _register(scheduler, {"w0": 10_000})  # telemetry resumes
            assert (await stub.Place(_place(3, "free"), timeout=30)).WhichOneof("result") == "placed"
    finally:
        own_redis.stop()


async def test_drain_worker_with_redis_down_is_unavailable_with_a_hint(fleet: Fleet) -> None:
    own_redis = RedisServer().start()
    fleet.redis_url = own_redis.url
    try:
        scheduler = await fleet.start_scheduler()
        await _register(scheduler, {"w0": 10_000})
    except BaseException:
        own_redis.stop()
        raise
    own_redis.stop()  # refuses connections from now on
    async with grpc.aio.insecure_channel(scheduler.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await scheduler_pb2_grpc.SchedulerStub(channel).DrainWorker(
                scheduler_pb2.DrainWorkerRequest(worker_id="w0"), timeout=30
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "Redis" in (info.value.details() or "")
    pushback = dict(info.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback is not None and int(pushback) > 0
