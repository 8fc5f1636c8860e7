"""A session's life at the gateway: its idle TTL, and a delete racing a turn in flight."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as redis

from gateway.sessions import tenant_sessions
from scheduler import keys as scheduler_keys
from tests.integration.fleet import Fleet


async def _session_keys(redis_url: str, session_id: str) -> list[bytes]:
    """The gateway's keys of the session (the scheduler's pin lapses by its own ttl)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = await client.keys(f"*{session_id}*")
        return sorted(k for k in keys if k != scheduler_keys.session_pin(session_id).encode())
    finally:
        await client.aclose()


async def _ttls_ms(redis_url: str, session_id: str) -> dict[bytes, int]:
    """Each of the gateway's keys of the session, with its ttl left in ms (-1: none)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {key: await client.pttl(key) for key in await _session_keys(redis_url, session_id)}
    finally:
        await client.aclose()


async def _age(redis_url: str, session_id: str, ttl_left_ms: int) -> None:
    """Make the session look idle until only `ttl_left_ms` of its ttl is left: what waiting would
    do, without a test whose outcome hangs on how fast a loaded machine runs a turn."""
    client = redis.Redis.from_url(redis_url)
    try:
        for key in await _session_keys(redis_url, session_id):
            await client.pexpire(key, ttl_left_ms)
    finally:
        await client.aclose()


TTL_S = 60.0


async def test_a_session_idle_past_its_ttl_is_gone_and_each_turn_renews_it(fleet: Fleet) -> None:
    await fleet.start({"ttl-1": ("us-east", 2000)}, gateway_overrides={"session_idle_ttl_s": TTL_S})
    ttl_ms = int(TTL_S * 1000)
    async with fleet.client() as client:
        session = await client.create_session()
        await client.reply(session.session_id, "first", max_tokens=2)
        # Every key of the session expires with the idle ttl: none is left behind when it lapses.
        ttls = await _ttls_ms(fleet.redis_url, session.session_id)
        assert len(ttls) == 3 and all(ttl_ms / 2 < ttl <= ttl_ms for ttl in ttls.values()), ttls
        # Idle for two thirds of its ttl, then a turn: every key gets the whole ttl again.
        await _age(fleet.redis_url, session.session_id, ttl_ms // 3)
        await client.reply(session.session_id, "second", max_tokens=2)
        ttls = await _ttls_ms(fleet.redis_url, session.session_id)
        assert len(ttls) == 3 and all(ttl > ttl_ms * 2 // 3 for ttl in ttls.values()), ttls
        assert len((await client.get_session(session.session_id)).turns) == 2
        # Idle past its ttl: gone, for reading, for new turns and from the listing.
        await _age(fleet.redis_url, session.session_id, 100)
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.get_session(session.session_id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "third", max_tokens=2)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert session.session_id in (info.value.details() or "")
        assert all(s.session_id != session.session_id for s in await client.list_sessions())
    assert await _session_keys(fleet.redis_url, session.session_id) == []


async def test_a_session_deleted_while_its_turn_runs_stays_deleted(fleet: Fleet) -> None:
    await fleet.start({"del-1": ("us-east", 2000)}, time_scale=5.0)
    async with fleet.client() as client:
        session = await client.create_session()
        await client.reply(session.session_id, "first", max_tokens=2)
        events = client.send(session.session_id, "a long answer, please", max_tokens=60)
        async for event in events:
            if event.WhichOneof("event") == "delta":
                break
        assert await client.delete_session(session.session_id)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in events:
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"session_id '{session.session_id}' was deleted while the turn ran" in (
            info.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.get_session(session.session_id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert all(s.session_id != session.session_id for s in await client.list_sessions())
    assert await _session_keys(fleet.redis_url, session.session_id) == []
    client_redis = redis.Redis.from_url(fleet.redis_url)
    assert await client_redis.zscore(tenant_sessions("anonymous"), session.session_id) is None
    await client_redis.aclose()
