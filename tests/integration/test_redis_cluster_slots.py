"""Every Redis command and Lua script kvgate issues touches one Cluster slot.

Against a one-node Redis Cluster owning every slot: kvgate's plain client gets no redirects
there, but Redis refuses any command, and any script, whose declared keys hash to two slots
(CROSSSLOT). kvgate's scripts touch only their declared KEYS (Redis 7.0 does not check a
script's undeclared keys on a node that owns every slot), so every path below runs as it would
on a real Cluster as far as key layout goes. kvgate's client itself is not Cluster-aware: it
does not follow MOVED redirects (README, deploy/k8s/README.md).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.auth import AuthMode
from kvgate.containers import MosquittoServer, RedisServer
from kvgate.redis_conn import connect_redis
from kvgate.v1 import telemetry_pb2
from scheduler.store import FleetStore, StoreSettings
from tests.integration.fleet import Fleet


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[RedisServer]:
    server = RedisServer(cluster=True).start()
    yield server
    server.stop()


@pytest.fixture
async def cluster_fleet(
    cluster_redis: RedisServer, mosquitto_server: MosquittoServer
) -> AsyncIterator[Fleet]:
    client = connect_redis(cluster_redis.url)
    await client.flushall()
    await client.aclose()
    fleet = Fleet(redis_url=cluster_redis.url, mqtt_url=mosquitto_server.url)
    try:
        yield fleet
    finally:
        await fleet.stop()


async def test_a_conversation_and_its_bookkeeping_stay_within_slots(cluster_fleet: Fleet) -> None:
    fleet = cluster_fleet
    await fleet.start({"w1": ("us-east", 2000), "w2": ("eu-west", 2000)}, auth=AuthMode.REQUIRED)
    key_id, key = await fleet.create_key("acme", tier="plus")  # key record + tenant index
    system = "You are a careful assistant. " * 12  # several KV blocks: the prefix index is used
    async with fleet.client(api_key=key) as client:  # auth + rate limits (token buckets)
        session = await client.create_session(system_prompt=system)
        _, first, placed = await client.reply(session.session_id, "hello", max_tokens=4, idempotency_key="t1")
        # The second turn: a pinned hit through the lookup (pin + prefix index) and the commit.
        _, second, again = await client.reply(session.session_id, "again", max_tokens=4, idempotency_key="t2")
        assert again.worker_id == placed.worker_id
        # A retried turn is replayed from the idempotency record.
        _, replayed, _ = await client.reply(session.session_id, "again", max_tokens=4, idempotency_key="t2")
        assert replayed.replayed and replayed.turn_index == second.turn_index == first.turn_index + 1
        _, stateless, _ = await client.complete(
            [("user", "a stateless question")], max_tokens=4, affinity_key="conversation-7"
        )
        assert stateless.usage.completion_tokens == 4
        assert [s.session_id for s in await client.list_sessions()] == [session.session_id]
        assert len((await client.get_session(session.session_id)).turns) == 2
        assert await client.delete_session(session.session_id)
    await fleet.keys.quarantine(key_id, True)
    await fleet.keys.revoke(key_id)
    assert [k.key_id for k in await fleet.keys.list("acme")] == [key_id]
    status = await fleet.fleet_status()  # registry, pins and prefix counts per worker
    assert {w.worker_id for w in status.workers} == {"w1", "w2"}


async def test_the_schedulers_telemetry_and_reservation_scripts_stay_within_slots(
    cluster_redis: RedisServer,
) -> None:
    client = connect_redis(cluster_redis.url)
    await client.flushall()
    store = FleetStore(client, StoreSettings())
    try:

        def stats(seq: int, incarnation: int, admitted: list[str]) -> telemetry_pb2.WorkerStats:
            return telemetry_pb2.WorkerStats(
                worker_id="a", model="m", state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16,
                num_blocks_total=1000, seq=seq, incarnation=incarnation, admitted_request_ids=admitted,
            )  # fmt: skip

        await store.ingest_stats(stats(1, 1, []))
        await store.ingest_kv(
            telemetry_pb2.KvEvents(worker_id="a", seq=1, incarnation=1, stored_block_hashes=[1, 2, 3])
        )
        assert (await store.lookup("s1", ["a"], [1, 2, 3]))[1] == {"a": 3}
        assert (await store.reserve("a", "r1", 100)).free_after == 16_000 - 100
        assert (await store.reserve("a", "r2", 100)).free_after == 16_000 - 200
        await store.record_placement("s1", "a", None, "new")
        await store.refresh_prefix([1, 2, 3], {"a": 3})
        assert await store.release("a", "r2")
        await store.ingest_stats(stats(2, 1, ["r1"]))  # telemetry accounts for r1
        assert await store.reserved_tokens("a") == 0
        await store.tick_telemetry_clock()
        assert await store.set_draining("a")
        await store.count_shed("free")
        # A restart, then the old process's late last-will, then the new one going offline.
        await store.ingest_status(
            telemetry_pb2.WorkerStatus(
                worker_id="a", state=telemetry_pb2.WORKER_LIFECYCLE_READY, incarnation=2
            )
        )
        await store.ingest_status(
            telemetry_pb2.WorkerStatus(
                worker_id="a", state=telemetry_pb2.WORKER_LIFECYCLE_OFFLINE, incarnation=1
            )
        )
        offline = await store.ingest_status(
            telemetry_pb2.WorkerStatus(
                worker_id="a", state=telemetry_pb2.WORKER_LIFECYCLE_OFFLINE, incarnation=2
            )
        )
        assert offline.pins_invalid
        await store.invalidate_pins("a", before_ms=int(time.time() * 1000))
        assert (await store.read_fleet()).workers["a"].state.value == "offline"
        assert await store.status_extras(["a"]) == {"a": (0, 0)}
        assert await store.shed_counts() == {"free": 1}
    finally:
        await store.aclose()
        await client.aclose()
