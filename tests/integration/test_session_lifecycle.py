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


async def test_a_session_idle_past_its_ttl_is_gone_and_each_turn_renews_it(fleet: Fleet) -> None:
    await fleet.start({"ttl-1": ("us-east", 2000)}, gateway_overrides={"session_idle_ttl_s": 2.0})
    async with fleet.client() as client:
        session = await client.create_session()
        await client.reply(session.session_id, "first", max_tokens=2)
        await asyncio.sleep(1.2)
        await client.reply(session.session_id, "second", max_tokens=2)
        await asyncio.sleep(1.0)  # past the ttl since it was created, not since its last turn
        assert len((await client.get_session(session.session_id)).turns) == 2
        await asyncio.sleep(2.5)
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
