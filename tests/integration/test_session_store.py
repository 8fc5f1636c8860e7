"""The session store on real Redis: appends are applied once, a claim retried by the Redis client
is still the request's own, deleted sessions stay deleted, listings read only what they show,
and the tenant index does not grow without bound."""

from __future__ import annotations

from importlib import resources

import pytest
import redis.asyncio

from gateway.sessions import (
    INDEX_TRIM_SLACK_MS,
    Claim,
    SessionGone,
    SessionStore,
    new_turn_id,
    now_ms,
    tenant_sessions,
)
from kvgate.redis_conn import connect_redis
from kvgate.v1 import chat_pb2
from tests.integration.slow_redis import SlowReplyProxy


def _turn(user: str) -> chat_pb2.Turn:
    return chat_pb2.Turn(user=user, assistant="ok", finish_reason="stop", created_unix_ms=now_ms())


async def test_an_append_retried_after_a_slow_reply_is_stored_once(slow_proxy: SlowReplyProxy) -> None:
    # The service's own client: it retries a command whose reply times out (socket_timeout 2 s).
    client = connect_redis(slow_proxy.url)
    try:
        store = SessionStore(client, idle_ttl_s=3600)
        session = await store.create("t", "m", "", {})
        await store.append_turn("t", session.session_id, _turn("warm up the script cache"), new_turn_id())
        slow_proxy.hold(b"hello", 2.5)  # the append carries the turn's text
        index = await store.append_turn("t", session.session_id, _turn("hello"), new_turn_id())
        stored = await store.get("t", session.session_id)
    finally:
        await client.aclose()
    assert stored is not None
    assert [t.user for t in stored.turns] == ["warm up the script cache", "hello"]
    assert index == 1


async def test_appending_twice_with_one_turn_id_stores_the_turn_once(clean_redis: str) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        store = SessionStore(client, idle_ttl_s=3600)
        session = await store.create("t", "m", "", {})
        turn_id = new_turn_id()
        first = await store.append_turn("t", session.session_id, _turn("hi"), turn_id)
        again = await store.append_turn("t", session.session_id, _turn("hi"), turn_id)
        other = await store.append_turn("t", session.session_id, _turn("hi"), new_turn_id())
        stored = await store.get("t", session.session_id)
    finally:
        await client.aclose()
    assert (first, again, other) == (0, 0, 1)
    assert stored is not None and [t.user for t in stored.turns] == ["hi", "hi"]


async def test_a_claim_retried_after_a_slow_reply_is_still_this_requests(slow_proxy: SlowReplyProxy) -> None:
    # The Redis client sends the claim again when its reply times out; the first one was applied.
    client = connect_redis(slow_proxy.url)
    try:
        store = SessionStore(client, idle_ttl_s=3600)
        session = await store.create("t", "m", "", {})
        await store.claim_turn(session.session_id, "warm-up", 3.0)  # loads the script
        slow_proxy.hold(b"retried-key", 2.5)
        claim = await store.claim_turn(session.session_id, "retried-key", 3.0)
        assert claim.outcome is Claim.CLAIMED
        # Another request with the same key still finds the turn running.
        assert (await store.claim_turn(session.session_id, "retried-key", 3.0)).outcome is Claim.RUNNING
        # The retried claim's token is the lock's: the turn can store and release it.
        assert await store.keep_claim(session.session_id, "retried-key", claim.token, 3.0)
    finally:
        await client.aclose()


async def test_claiming_twice_with_one_token_claims_and_renews_the_lock(clean_redis: str) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        claim = client.register_script((resources.files("gateway") / "lua" / "claim_turn.lua").read_text())
        keys = ["kvgate:s:{s1}:idem", "kvgate:s:{s1}:idem-running:k"]
        assert await claim(keys=keys, args=["k", "token-1", 1000]) == [b"claimed", -1]
        assert await claim(keys=keys, args=["k", "token-1", 60_000]) == [b"claimed", -1]
        assert await client.pttl(keys[1]) > 30_000  # the retry renewed the lock's ttl
        assert await claim(keys=keys, args=["k", "token-2", 60_000]) == [b"running", -1]
        await client.hset(keys[0], "k", 3)
        assert await claim(keys=keys, args=["k", "token-1", 60_000]) == [b"stored", 3]
    finally:
        await client.aclose()


async def test_a_turn_ending_after_its_session_was_deleted_does_not_bring_it_back(clean_redis: str) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        store = SessionStore(client, idle_ttl_s=3600)
        session = await store.create("t", "m", "", {})
        await store.append_turn("t", session.session_id, _turn("first"), new_turn_id())
        assert await store.delete("t", session.session_id)
        with pytest.raises(SessionGone):
            await store.append_turn("t", session.session_id, _turn("in flight"), new_turn_id())
        assert await store.get("t", session.session_id) is None
        assert await client.keys(f"*{session.session_id}*") == []
        assert await client.zscore(tenant_sessions("t"), session.session_id) is None
        assert await store.list_recent("t", 10) == []
    finally:
        await client.aclose()


async def _command_calls(client: redis.asyncio.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_listing_reads_the_meta_hashes_only(clean_redis: str) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        store = SessionStore(client, idle_ttl_s=3600)
        ids = []
        for i in range(5):
            session = await store.create("t", "m", f"system {i}", {"n": str(i)})
            for j in range(3):
                await store.append_turn("t", session.session_id, _turn(f"turn {j}"), new_turn_id())
            ids.append(session.session_id)
        await store.delete("t", ids[1])
        await client.delete(f"kvgate:s:{{{ids[2]}}}:meta")  # as its idle TTL would
        await client.config_resetstat()
        listed = await store.list_recent("t", 10)
        calls = await _command_calls(client)
        assert [s.session_id for s in listed] == [ids[4], ids[3], ids[0]]
        assert [s.system_prompt for s in listed] == ["system 4", "system 3", "system 0"]
        assert all(not s.turns and s.model == "m" for s in listed)
        # The index, each listed session's meta hash, and the expired entry's removal: no history.
        assert "lrange" not in calls
        assert (calls["zrevrange"], calls["hgetall"], calls["zrem"]) == (1, 4, 1)
        assert await client.zcard(tenant_sessions("t")) == 3
    finally:
        await client.aclose()


async def test_writes_trim_index_entries_of_sessions_idle_past_the_ttl(clean_redis: str) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis)
    ttl_ms = 3_600_000
    try:
        store = SessionStore(client, idle_ttl_s=ttl_ms / 1000)
        index = tenant_sessions("t")
        # Entries of sessions that expired long ago (never listed, so never dropped by a listing),
        # and one just inside the ttl's slack, whose session may still be alive on Redis's clock.
        old = now_ms() - ttl_ms - INDEX_TRIM_SLACK_MS
        await client.zadd(index, {"gone-1": old - 3_600_000, "gone-2": old - 1000, "maybe": old + 30_000})
        session = await store.create("t", "m", "", {})
        assert set(await client.zrange(index, 0, -1)) == {b"maybe", session.session_id.encode()}
        await client.zadd(index, {"gone-3": old - 1000})
        await store.append_turn("t", session.session_id, _turn("hi"), new_turn_id())
        assert set(await client.zrange(index, 0, -1)) == {b"maybe", session.session_id.encode()}
    finally:
        await client.aclose()
