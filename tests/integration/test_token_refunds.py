"""A turn charged to the tenant's tokens per minute but never served gives the tokens back, so a
client retrying after a shed is not rate limited for turns it never got."""

from __future__ import annotations

import time

import grpc
import pytest
import redis.asyncio as redis

from gateway.buckets import TierLimits
from gateway.ratelimit import rate_key
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2, telemetry_pb2
from tests.integration.fleet import Fleet

# Room for two turns of ~400 tokens a minute; requests are plenty.
TIGHT = TierLimits(requests_per_s=50, request_burst=50, tokens_per_min=1000)


async def _tokens_left(redis_url: str, tenant: str = "anonymous") -> float:
    client = redis.Redis.from_url(redis_url)
    try:
        return float(await client.hget(rate_key(tenant), "tokens:tokens") or "nan")
    finally:
        await client.aclose()


async def _send_error(stub: chat_pb2_grpc.ChatStub, request: chat_pb2.SendRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Send(request, timeout=30):
            pass
    return info.value


def _stateless(content: str, max_tokens: int) -> chat_pb2.SendRequest:
    return chat_pb2.SendRequest(
        model="llama-3-8b", messages=[common_pb2.Message(role="user", content=content)], max_tokens=max_tokens
    )


async def test_shed_turns_give_their_tokens_back(fleet: Fleet) -> None:
    await fleet.start_control_plane(gateway_overrides={"rate_limits": {"free": TIGHT}})
    # One worker, 95% full: the free tier's 10% headroom leaves it no room.
    await fleet.scheduler.store.ingest_stats(
        telemetry_pb2.WorkerStats(
            worker_id="full-1", region="us-east", address="full-1:1", model="llama-3-8b", engine="sim",
            state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16, num_blocks_total=1000,
            num_blocks_used=950, seq=int(time.time() * 1000), tokens_per_s=2000.0,
        )
    )  # fmt: skip
    await fleet.wait_for_workers({"full-1": "ready"})
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        for _ in range(5):  # each charged ~405 of 1,000 tokens: the third would be rate limited
            error = await _send_error(stub, _stateless("hello", 400))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" not in (error.details() or "")
    assert await _tokens_left(fleet.redis_url) == pytest.approx(TIGHT.tokens_per_min)


async def test_a_turn_the_worker_rejects_gives_its_tokens_back(fleet: Fleet) -> None:
    await fleet.start({"refund-1": ("us-east", 4000)})
    assert fleet.gateway is not None
    # ~12k tokens: within the gateway's limits, beyond the model's 8,192-token context.
    long = [common_pb2.Message(role="user", content="word " * 6000)] * 2
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        error = await _send_error(
            stub, chat_pb2.SendRequest(model="llama-3-8b", messages=long, max_tokens=100)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds max_model_len" in (error.details() or "")
        free_tier_tpm = 40_000
        assert await _tokens_left(fleet.redis_url) == pytest.approx(free_tier_tpm, abs=50)
        # A served turn keeps its charge.
        async for _ in stub.Send(_stateless("hello", 100), timeout=30):
            pass
        assert await _tokens_left(fleet.redis_url) < free_tier_tpm - 100
