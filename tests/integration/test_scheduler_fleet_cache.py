"""The scheduler's fleet snapshot against real Redis: placements never wait for a refresh once a
snapshot exists, an invalidation forces a fresh read, and this replica's reservations in flight
stay counted across refreshes."""

from __future__ import annotations

import asyncio

from scheduler.fleet_cache import FleetCache
from scheduler.policy import FleetView
from scheduler.store import FleetStore
from tests.integration.fleet import report_worker


async def _next_view(cache: FleetCache, old: FleetView) -> FleetView:
    """The first snapshot after `old` (refreshes run in the background)."""
    for _ in range(500):
        await asyncio.sleep(0.01)
        view = await cache.get()
        if view is not old:
            return view
    raise AssertionError("the snapshot was never refreshed")


async def test_a_stale_snapshot_is_served_while_it_refreshes(store: FleetStore) -> None:
    await report_worker(store, "w1", used_blocks=100, seq=1)
    cache = FleetCache(store, max_age_s=0.0)
    first = await cache.get()
    assert first.workers["w1"].num_blocks_used == 100
    await report_worker(store, "w1", used_blocks=300, seq=2)
    # Past its age, but no placement waits: the same snapshot, a refresh under way.
    assert await cache.get() is first
    fresh = await _next_view(cache, first)
    assert fresh.workers["w1"].num_blocks_used == 300
    cache.close()


async def test_after_invalidate_the_next_get_reads_redis(store: FleetStore) -> None:
    await report_worker(store, "w1", used_blocks=100, seq=1)
    cache = FleetCache(store, max_age_s=3600)
    assert (await cache.get()).workers["w1"].num_blocks_used == 100
    await store.set_draining("w1")
    assert (await cache.get()).workers["w1"].state.value == "ready"  # cached
    cache.invalidate()
    assert (await cache.get()).workers["w1"].state.value == "draining"


async def test_reservations_in_flight_stay_counted_across_refreshes(store: FleetStore) -> None:
    await report_worker(store, "w1", used_blocks=0, seq=1)
    cache = FleetCache(store, max_age_s=0.0)
    first = await cache.get()
    cache.begin_reservation("w1", 500)
    assert first.workers["w1"].reserved_tokens == 500  # seen by placements deciding meanwhile
    # Redis has not got it yet: a refresh must add it back on top of what it reads.
    fresh = await _next_view(cache, first)
    assert fresh.workers["w1"].reserved_tokens == 500
    cache.end_reservation("w1", 500, committed=False)
    assert (await cache.get()).workers["w1"].reserved_tokens == 0
    cache.close()


async def test_every_snapshot_read_sets_the_fleet_gauges(store: FleetStore) -> None:
    from prometheus_client import REGISTRY

    def gauge(state: str) -> float | None:
        return REGISTRY.get_sample_value("kvgate_scheduler_fleet_kv_tokens", {"state": state})

    await report_worker(store, "w1", used_blocks=250, seq=1)
    cache = FleetCache(store, max_age_s=3600)
    await cache.get()  # no FleetStatus call: the placements' own snapshot read sets them
    assert gauge("total") == 1000 * 16
    assert gauge("used") == 250 * 16
    assert gauge("free") == 750 * 16
    assert REGISTRY.get_sample_value("kvgate_scheduler_stale_workers") == 0
    cache.close()
