"""A broker outage is not a fleet outage: while no scheduler's ingest is connected to the broker,
worker ages stop at the last broker contact, so placements go on with the last telemetry and the
reservations made since (real Redis; the compose e2e test stops the real broker)."""

from __future__ import annotations

import redis.asyncio as redis

from kvgate.redis_conn import connect_redis
from kvgate.v1 import telemetry_pb2
from scheduler import keys
from scheduler.store import TELEMETRY_CLOCK_SLACK_MS, FleetStore, ReserveStatus, StoreSettings


async def _worker_seen_ago(client: redis.Redis, store: FleetStore, seconds: float) -> None:
    await store.ingest_stats(
        telemetry_pb2.WorkerStats(
            worker_id="w1", region="us-east", address="w1:1", model="llama-3-8b", engine="sim",
            state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16, num_blocks_total=100,
            num_blocks_used=0, seq=1,
        )
    )  # fmt: skip
    await client.hset(keys.worker_info("w1"), "seen_ms", await _redis_ms(client) - int(seconds * 1000))


async def test_worker_ages_freeze_at_the_last_broker_contact(clean_redis: str) -> None:
    client = connect_redis(clean_redis)
    store = FleetStore(client, StoreSettings(dead_after_s=10, stale_after_s=2))
    try:
        # Telemetry flowing (the first tick counts as a resume; let it be long past): the clock
        # is current and ages are real.
        await _worker_seen_ago(client, store, 0.1)
        await store.tick_telemetry_clock()
        await client.set(keys.TELEMETRY_RESUMED, await _redis_ms(client) - 60_000)
        fleet = await store.read_fleet()
        assert fleet.workers["w1"].age_s < 1 and store.frozen_clock_ms == 0

        # The broker went away 30 s ago: the last tick and the worker's last stats are that old.
        await _worker_seen_ago(client, store, 30)
        await client.set(keys.TELEMETRY_CLOCK, await _redis_ms(client) - 30_000)
        fleet = await store.read_fleet()
        age = fleet.workers["w1"].age_s
        assert age <= TELEMETRY_CLOCK_SLACK_MS / 1000 + 1, age
        assert fleet.is_alive(fleet.workers["w1"])
        assert (await store.reserve("w1", "r1", 64)).status == ReserveStatus.RESERVED

        # The broker is back: the worker gets --dead-after from now to reconnect.
        await store.tick_telemetry_clock()
        fleet = await store.read_fleet()
        assert fleet.is_alive(fleet.workers["w1"]) and store.frozen_clock_ms == 0
        assert fleet.workers["w1"].age_s < 1

        # Still silent 20 s after the broker came back: dead, as any silent worker.
        await client.set(keys.TELEMETRY_RESUMED, await _redis_ms(client) - 20_000)
        fleet = await store.read_fleet()
        assert not fleet.is_alive(fleet.workers["w1"])
        assert (await store.reserve("w1", "r2", 64)).status == ReserveStatus.NOT_ACCEPTING
    finally:
        await client.aclose()


async def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000
