"""A worker's bookkeeping in real Redis: its reservations (scheduler/lua/), whose running total
always equals what the reservation hash holds whatever time passes without telemetry, and its
pin index, which stays bounded."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as redis

from kvgate.redis_conn import connect_redis
from scheduler import keys
from scheduler.store import FleetStore, ReserveStatus, StoreSettings
from tests.integration.fleet import report_worker

CAPACITY = 16_000  # report_worker: 1,000 blocks of 16 tokens
# A worker id of this module's own: these tests time reservations against their ttl, and one
# failed once in a full run as if something had ingested telemetry for the common id "w1".


async def _total_and_hash(client: redis.Redis, worker_id: str) -> tuple[int, int]:
    total = int(await client.hget(keys.worker_info(worker_id), "reserved") or 0)
    held = sum(int(v) for v in await client.hvals(keys.worker_reservations(worker_id)))
    return total, held


async def test_reservations_outlast_a_telemetry_gap_longer_than_their_ttl(clean_redis: str) -> None:
    # A broker outage: no telemetry, and a full worker gets no reserve calls either, so nothing
    # prunes its reservations while their ttl passes. They must still go when telemetry returns.
    client = connect_redis(clean_redis)
    store = FleetStore(client, StoreSettings(reservation_ttl_s=0.2))
    try:
        await report_worker(store, "resv-w1", used_blocks=0)
        assert (await store.reserve("resv-w1", "r1", 14_000)).status == ReserveStatus.RESERVED
        assert (await store.reserve("resv-w1", "r2", 4_000)).status == ReserveStatus.NO_ROOM
        await asyncio.sleep(0.6)  # three ttls: long past any expiry a Redis ttl would have had
        assert await _total_and_hash(client, "resv-w1") == (14_000, 14_000)

        await report_worker(store, "resv-w1", used_blocks=0, seq=2)  # telemetry is back
        assert await _total_and_hash(client, "resv-w1") == (0, 0)
        assert (await store.reserve("resv-w1", "r3", CAPACITY)).status == ReserveStatus.RESERVED
        assert await _total_and_hash(client, "resv-w1") == (CAPACITY, CAPACITY)
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_total_whose_reservations_vanished_heals_on_the_next_script(clean_redis: str) -> None:
    # Keys written by an older scheduler carried a ttl; when they expired the total stayed.
    client = connect_redis(clean_redis)
    store = FleetStore(client, StoreSettings())
    try:
        await report_worker(store, "resv-w1", used_blocks=0)
        assert (await store.reserve("resv-w1", "r1", 10_000)).status == ReserveStatus.RESERVED
        await client.delete(keys.worker_reservations("resv-w1"), keys.worker_reservation_expiry("resv-w1"))
        assert (await store.reserve("resv-w1", "r2", 12_000)).status == ReserveStatus.RESERVED
        assert await _total_and_hash(client, "resv-w1") == (12_000, 12_000)

        await client.delete(keys.worker_reservations("resv-w1"), keys.worker_reservation_expiry("resv-w1"))
        await report_worker(store, "resv-w1", used_blocks=0, seq=2)  # telemetry heals it too
        assert await _total_and_hash(client, "resv-w1") == (0, 0)
    finally:
        await store.aclose()
        await client.aclose()


async def test_recording_a_placement_trims_the_workers_expired_pins(
    store: FleetStore, clean_redis: str
) -> None:
    # Only `kvgate status` trimmed them before: a fleet nobody inspected grew the index forever.
    client = connect_redis(clean_redis)
    try:
        pins = keys.worker_pins("resv-w1")
        expired_ms = int(time.time() * 1000) - 1000
        await client.zadd(pins, {"gone-1": 1000, "gone-2": expired_ms, "live": expired_ms + 60_000})
        await store.record_placement("s-new", "resv-w1", None, "new")
        assert sorted(m.decode() for m in await client.zrange(pins, 0, -1)) == ["live", "s-new"]
    finally:
        await client.aclose()
