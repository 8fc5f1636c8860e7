"""Workers' KV block events build the scheduler's prefix index in Redis."""

from __future__ import annotations

import asyncio

from gateway.prompt import prompt_block_hashes
from kvgate.redis_conn import connect_redis
from kvgate.v1 import common_pb2, scheduler_pb2, telemetry_pb2
from scheduler import keys
from scheduler.fleet_cache import FleetCache
from scheduler.policy import make_policy
from scheduler.servicer import SchedulerServicer
from scheduler.store import FleetStore, StoreSettings
from tests.integration.fleet import Fleet, report_worker


async def test_kv_events_index_the_blocks_a_worker_caches(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 4000), "eu-1": ("eu-west", 2000)})
    system = "You are a helpful assistant. " * 20  # several full KV blocks
    async with fleet.client() as client:
        session = await client.create_session(system_prompt=system)
        _, _, placement = await client.reply(session.session_id, "hello there", max_tokens=8)
    assert placement.worker_id == "us-1"

    # A new conversation with the same system prompt shares its leading blocks.
    messages = [
        common_pb2.Message(role="system", content=system),
        common_pb2.Message(role="user", content="a different question"),
    ]
    hashes = prompt_block_hashes(messages)
    assert len(hashes) >= 8
    hits: dict[str, int] = {}
    for _ in range(50):  # KV events arrive with the next telemetry tick
        _, hits = await fleet.scheduler.store.lookup("", ["us-1", "eu-1"], hashes)
        if hits:
            break
        await asyncio.sleep(0.1)
    assert set(hits) == {"us-1"}
    # The shared system prompt is cached; the differing user turn is not.
    assert 8 <= hits["us-1"] < len(hashes)


async def test_new_session_sharing_a_prefix_goes_where_that_prefix_is_cached(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 4000), "eu-1": ("eu-west", 4000)})
    system = "You are kvgate's support assistant. Answer briefly. " * 12
    async with fleet.client() as client:
        first = await client.create_session(system_prompt=system)
        _, _, placed_first = await client.reply(first.session_id, "What is a KV cache?", max_tokens=8)
        holder = placed_first.worker_id
        hashes = prompt_block_hashes([common_pb2.Message(role="system", content=system)])
        for _ in range(50):  # wait for the holder's KV events to reach the index
            _, hits = await fleet.scheduler.store.lookup("", [holder], hashes)
            if hits:
                break
            await asyncio.sleep(0.1)
        # The holder now has less free KV than the other worker, yet the shared prefix wins.
        second = await client.create_session(system_prompt=system)
        _, done, placed_second = await client.reply(second.session_id, "And a block?", max_tokens=8)
        assert placed_second.worker_id == holder
        assert done.usage.cached_tokens >= 8 * 16  # the shared system prompt, ~9 blocks


async def test_the_block_index_follows_stores_removals_clears_duplicates_and_offline(
    clean_redis: str,
) -> None:
    client = connect_redis(clean_redis)
    store = FleetStore(client, StoreSettings())

    def events(wid: str, seq: int, stored: list[int], removed: list[int] = [], cleared: bool = False):  # noqa: B006
        return telemetry_pb2.KvEvents(
            worker_id=wid, seq=seq, stored_block_hashes=stored, removed_block_hashes=removed,
            all_cleared=cleared,
        )  # fmt: skip

    try:
        await store.ingest_kv(events("a", 1, [11, 12, 13]))
        await store.ingest_kv(events("b", 1, [11]))
        assert (await store.lookup("", ["a", "b"], [11, 12, 13, 14]))[1] == {"a": 3, "b": 1}
        # Only the workers asked about count (e.g. the ones serving the model).
        assert (await store.lookup("", ["b"], [11, 12]))[1] == {"b": 1}
        await store.ingest_kv(events("a", 2, [], removed=[12]))
        await store.ingest_kv(events("a", 2, [12]))  # a late duplicate of seq 2: ignored
        assert (await store.lookup("", ["a", "b"], [11, 12, 13]))[1] == {"a": 1, "b": 1}
        await store.ingest_kv(events("b", 2, [], cleared=True))
        assert (await store.lookup("", ["a", "b"], [11]))[1] == {"a": 1}
        await store.ingest_status(
            telemetry_pb2.WorkerStatus(worker_id="a", state=telemetry_pb2.WORKER_LIFECYCLE_OFFLINE)
        )
        assert (await store.lookup("", ["a", "b"], [11, 13]))[1] == {}
        assert await client.exists(keys.block_workers(11), keys.block_workers(13)) == 0
    finally:
        await client.aclose()


async def test_a_single_run_of_holders_is_looked_up_in_one_round_trip(
    store: FleetStore, writes: list[int]
) -> None:
    stored = telemetry_pb2.KvEvents(worker_id="a", seq=1, stored_block_hashes=[21, 22, 23])
    await store.ingest_kv(stored)
    await store.ingest_kv(telemetry_pb2.KvEvents(worker_id="b", seq=1, stored_block_hashes=[21, 22, 23]))
    await store.ingest_kv(telemetry_pb2.KvEvents(worker_id="c", seq=1, stored_block_hashes=[21]))
    await store.lookup("warm-up", [], [])  # the connection's first write also carries its setup
    # A shared prefix followed by new tokens: one run of equal counts, one round trip.
    writes[0] = 0
    assert (await store.lookup("s1", ["a", "b", "c"], [21, 22, 23, 24]))[1] == {"a": 3, "b": 3, "c": 1}
    assert writes[0] == 2  # (counts [3, 2, 2, 0]: two runs, two round trips)
    writes[0] = 0
    assert (await store.lookup("s1", ["a", "b"], [21, 22, 23, 24]))[1] == {"a": 3, "b": 3}
    assert writes[0] == 2  # (c is not asked about but still counts in SCARD)
    writes[0] = 0
    assert (await store.lookup("s1", ["a", "b", "c"], [22, 23, 99]))[1] == {"a": 2, "b": 2}
    assert writes[0] == 1
    writes[0] = 0
    assert (await store.lookup("s1", ["a", "b", "c"], [99]))[1] == {}
    assert writes[0] == 1
    # A stateless prompt shorter than a block: nothing to ask Redis.
    writes[0] = 0
    assert await store.lookup("", ["a", "b", "c"], []) == (None, {})
    assert writes[0] == 0


async def test_a_prefix_placements_keep_finding_stays_in_the_index(clean_redis: str) -> None:
    """Workers report a block when they store it, never when they hit it: the placements that
    find a prefix cached keep its index entries alive, so the hottest prefix (a system prompt
    every conversation shares) does not drop out of the index a ttl after it was first cached."""
    client = connect_redis(clean_redis)
    store = FleetStore(client, StoreSettings(prefix_index_ttl_s=2.0))
    try:
        await report_worker(store, "a", used_blocks=0)
        await store.ingest_kv(telemetry_pb2.KvEvents(worker_id="a", seq=1, stored_block_hashes=[41, 42, 43]))
        servicer = SchedulerServicer(store, FleetCache(store, max_age_s=0), make_policy("kvgate"), _no_drain)
        for i in range(8):  # 4 s: twice the ttl, the blocks stored only once
            await report_worker(store, "a", used_blocks=0, seq=2 + i)  # a live worker's telemetry
            placed = await servicer._place(
                scheduler_pb2.PlaceRequest(
                    request_id=f"r{i}", model="m", tier="free", prompt_tokens=80, max_new_tokens=8,
                    block_hashes=[41, 42, 99],
                )
            )  # fmt: skip
            assert placed.placed.worker_id == "a"
            await asyncio.sleep(0.5)
        assert (await store.lookup("", ["a"], [41, 42, 43]))[1] == {"a": 2}
        # Never found by a placement: it expired, as an entry whose removal event was lost must.
        assert await client.exists(keys.block_workers(43)) == 0
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_refresh_first_drops_holders_whose_own_block_set_lost_the_blocks(store: FleetStore) -> None:
    """The ttl ends index entries whose removal was lost (two replicas' mirrors interleaving);
    a refresh must not keep those alive: it checks each holder against its own block set, which
    its KV events update atomically."""
    for wid in ("a", "b"):
        await report_worker(store, wid, used_blocks=0)
        await store.ingest_kv(telemetry_pb2.KvEvents(worker_id=wid, seq=1, stored_block_hashes=[51, 52]))
    # b evicted 52; its own set says so, but the index missed the removal.
    await store._redis.srem(keys.worker_blocks("b"), 52)
    _, hits = await store.lookup("", ["a", "b"], [51, 52])
    assert hits == {"a": 2, "b": 2}
    await store.refresh_prefix([51, 52], hits)
    assert (await store.lookup("", ["a", "b"], [51, 52]))[1] == {"a": 2, "b": 1}


async def _no_drain(worker_id: str) -> None:
    pass
