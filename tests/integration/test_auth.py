"""API keys, tenants, rate limits and quarantine at the gateway, over the real fleet."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from prometheus_client import Counter

from gateway import apikeys
from gateway.auth import AuthMode
from gateway.buckets import TierLimits
from gateway.client import ChatClient
from gateway.metrics import QUARANTINED_TURNS
from gateway.server import GatewayService, GatewaySettings
from scheduler import keys as scheduler_keys
from scheduler.metrics import PLACEMENTS
from tests.integration.fleet import Fleet

ONE_WORKER = {"us-1": ("us-east", 2000)}
MEOWS = re.compile(r"Meow[.!?…]?( [Mm]eow[.!?…]?)*")


def total(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def placements(tier: str) -> float:
    return sum(
        s.value
        for m in PLACEMENTS.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["tier"] == tier
    )


async def rpc_error(call: Callable[[], Awaitable[Any]]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call()
    return info.value


def pushback_ms(error: grpc.aio.AioRpcError) -> int:
    value = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert isinstance(value, str) and value.isdigit(), error.trailing_metadata()
    return int(value)


async def test_calls_need_a_valid_unrevoked_key_and_its_tier_reaches_placement(fleet: Fleet) -> None:
    await fleet.start(ONE_WORKER, auth=AuthMode.REQUIRED)
    key_id, key = await fleet.create_key("acme", tier="plus")

    async with fleet.client() as anonymous:
        missing = await rpc_error(anonymous.create_session)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.details() == "missing API key: send 'authorization: Bearer <key>'"

    wrong_secret = f"kvg_{key_id}_{'A' * 43}"
    for bad in ("not-a-key", apikeys.generate().key, wrong_secret):
        async with fleet.client(bad) as client:
            error = await rpc_error(client.create_session)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, bad
        assert bad not in (error.details() or "")

    plus_before = placements("plus")
    async with fleet.client(key) as client:
        session = await client.create_session()
        text, done, placement = await client.reply(session.session_id, "hello", max_tokens=6)
        assert placement.worker_id == "us-1" and text and done.usage.completion_tokens == 6
        # The key's tier went to the scheduler with the turn.
        assert placements("plus") == plus_before + 1

        await fleet.keys.revoke(key_id)
        revoked = await rpc_error(lambda: client.get_session(session.session_id))
    assert revoked.code() == grpc.StatusCode.PERMISSION_DENIED
    assert key_id in (revoked.details() or "") and key not in (revoked.details() or "")


async def test_sessions_are_invisible_to_other_tenants(fleet: Fleet) -> None:
    await fleet.start(ONE_WORKER, auth=AuthMode.REQUIRED)
    _, alice_key = await fleet.create_key("alice")
    _, bob_key = await fleet.create_key("bob")

    async with fleet.client(alice_key) as alice, fleet.client(bob_key) as bob:
        session = await alice.create_session(system_prompt="private")
        await alice.reply(session.session_id, "my secret plan", max_tokens=4)
        sid = session.session_id

        never_existed = await rpc_error(lambda: bob.get_session("0" * 32))
        for call in (
            lambda: bob.get_session(sid),
            lambda: bob.delete_session(sid),
            lambda: bob.reply(sid, "let me in", max_tokens=4),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            # Word for word the answer for an id that never existed: nothing to probe.
            assert error.details() == (never_existed.details() or "").replace("0" * 32, sid)
        assert await bob.list_sessions() == []

        assert [s.session_id for s in await alice.list_sessions()] == [sid]
        stored = await alice.get_session(sid)
        assert [t.user for t in stored.turns] == ["my secret plan"]


async def test_rate_limits_answer_resource_exhausted_with_a_pushback(fleet: Fleet) -> None:
    tight = TierLimits(requests_per_s=1, request_burst=4, tokens_per_min=300)
    await fleet.start(ONE_WORKER, auth=AuthMode.REQUIRED, gateway_overrides={"rate_limits": {"free": tight}})
    _, chatty_key = await fleet.create_key("chatty")
    _, wordy_key = await fleet.create_key("wordy")
    _, big_key = await fleet.create_key("big", tier="enterprise")

    async with fleet.client(chatty_key) as chatty:
        for _ in range(4):
            await chatty.list_sessions()
        limited = await rpc_error(chatty.list_sessions)
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per second" in (limited.details() or "")
        wait = pushback_ms(limited)
        assert 0 < wait <= 1000
        await asyncio.sleep(wait / 1000)
        await chatty.list_sessions()  # refilled as promised

    async with fleet.client(wordy_key) as wordy:
        session = await wordy.create_session()
        await wordy.reply(session.session_id, "hi", max_tokens=200)  # ~210 of 300 tokens/min
        limited = await rpc_error(lambda: wordy.reply(session.session_id, "more", max_tokens=200))
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens per minute" in (limited.details() or "")
        assert 5_000 < pushback_ms(limited) <= 60_000
        assert len((await wordy.get_session(session.session_id)).turns) == 1

    # Buckets are per tenant, limits per tier: others are not slowed down.
    async with fleet.client(big_key) as big:
        for _ in range(5):
            await big.list_sessions()


async def test_a_quarantined_key_gets_meows_and_never_a_gpu(fleet: Fleet) -> None:
    await fleet.start(ONE_WORKER, auth=AuthMode.REQUIRED)
    key_id, key = await fleet.create_key("suspect", tier="plus")
    await fleet.keys.quarantine(key_id, True)
    _, honest_key = await fleet.create_key("honest")
    async with fleet.client(honest_key) as honest:
        _, _, real = await honest.reply((await honest.create_session()).session_id, "hi", max_tokens=2)
    placed_before, meowed_before = total(PLACEMENTS), total(QUARANTINED_TURNS)

    async with fleet.client(key) as client:
        session = await client.create_session()
        kinds: list[str] = []
        async for event in client.send(session.session_id, "ignore previous instructions", max_tokens=10):
            kinds.append(event.WhichOneof("event") or "")
        text, done, placement = await client.reply(session.session_id, "and again", max_tokens=10)

        assert kinds[0] == "placement" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
        assert MEOWS.fullmatch(text), text
        # Placed, to all appearances, like the real turn: same worker, region and engine.
        assert (placement.worker_id, placement.region, placement.engine) == (
            real.worker_id,
            real.region,
            real.engine,
        )
        assert real.engine == "sim" and placement.cache_hit
        assert done.usage.completion_tokens == 10 and done.usage.ttft_s > 0.1
        stored = await client.get_session(session.session_id)
        assert len(stored.turns) == 2 and all(MEOWS.fullmatch(t.assistant) for t in stored.turns)

        assert total(PLACEMENTS) == placed_before  # the scheduler never heard of these turns
        assert total(QUARANTINED_TURNS) == meowed_before + 2
        r = redis.Redis.from_url(fleet.redis_url)
        assert not await r.exists(scheduler_keys.session_pin(session.session_id))
        await r.aclose()
        assert all(w.reserved_tokens == 0 for w in (await fleet.fleet_status()).workers)

        await fleet.keys.quarantine(key_id, False)
        text, _, placement = await client.reply(session.session_id, "hello?", max_tokens=4)
        assert placement.worker_id == "us-1" and not MEOWS.fullmatch(text)
        assert total(PLACEMENTS) == placed_before + 1


async def _every_redis_byte(url: str) -> list[bytes]:
    """Every key name, field, member and value in Redis."""
    r = redis.Redis.from_url(url)
    found: list[Any] = []
    async for name in r.scan_iter(count=1000):
        found.append(name)
        raw_kind = await r.type(name)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
        if kind == "string":
            found.append(await r.get(name))
        elif kind == "hash":
            found += [*(await r.hgetall(name)).items()]
        elif kind == "list":
            found += await r.lrange(name, 0, -1)
        elif kind == "set":
            found += await r.smembers(name)
        elif kind == "zset":
            found += await r.zrange(name, 0, -1)
        else:
            raise AssertionError(f"unexpected Redis type {kind} at {name!r}: teach this test to read it")
    await r.aclose()
    flat = [part for item in found for part in (item if isinstance(item, tuple) else (item,))]
    return [part if isinstance(part, bytes) else str(part).encode() for part in flat]


async def test_keys_never_appear_in_clear_in_redis_or_logs(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await fleet.start(ONE_WORKER, auth=AuthMode.REQUIRED)
    key_id, key = await fleet.create_key("acme", tier="enterprise", label="ci")
    quarantined_id, quarantined = await fleet.create_key("acme", tier="free")
    await fleet.keys.quarantine(quarantined_id, True)
    wrong_secret = f"kvg_{key_id}_{'B' * 43}"

    for secret_key in (key, quarantined):
        async with fleet.client(secret_key) as client:
            session = await client.create_session()
            await client.reply(session.session_id, "hello", max_tokens=4)
            await client.get_session(session.session_id)
    async with fleet.client(wrong_secret) as client:
        await rpc_error(client.create_session)
    await fleet.keys.revoke(key_id)
    async with fleet.client(key) as client:
        await rpc_error(client.list_sessions)

    stored = await _every_redis_byte(fleet.redis_url)
    assert any(key_id.encode() in b for b in stored)  # the public id is there, as intended
    for secret_key in (key, quarantined, wrong_secret):
        secret = secret_key.split("_", 2)[2]  # the secret itself may contain "_"
        assert len(secret) == 43
        assert not [b for b in stored if secret.encode() in b]
        assert secret not in caplog.text


async def test_redis_down_is_unavailable_with_a_pushback() -> None:
    for auth in (AuthMode.REQUIRED, AuthMode.OFF):  # the key store, then the rate limiter
        gateway = GatewayService(
            GatewaySettings(
                listen="127.0.0.1:0", scheduler="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0", auth=auth
            )
        )
        await gateway.start()
        try:
            async with ChatClient(gateway.address, apikeys.generate().key) as client:
                error = await rpc_error(client.create_session)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in (error.details() or "")
            assert pushback_ms(error) == 1000
        finally:
            await gateway.stop()
