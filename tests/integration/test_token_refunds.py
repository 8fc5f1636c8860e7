"""A turn charged to the tenant's tokens per minute but never served gives the tokens back, so a
client retrying after a shed is not rate limited for turns it never got; a turn the client ended
(cancelled, or its deadline passed) keeps its charge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import grpc
import pytest
import redis.asyncio as redis

from gateway.auth import ANONYMOUS, Authenticator, AuthMode
from gateway.buckets import TierLimits
from gateway.gate import Gate
from gateway.keystore import KeyStore
from gateway.ratelimit import RateLimiter, rate_key
from gateway.refunds import RefundUnlessServed
from gateway.relay import AtCapacity, PlacementUnavailable, TurnJob, TurnProgress, TurnRejected
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


def _worker_status(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """What the relay raises for a worker status it does not fail over on."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="from the worker")


class _EndsWith:
    """The fleet side of a turn, scripted: `tokens` deltas, then `ending` raised."""

    def __init__(self, ending: BaseException, tokens: int = 0) -> None:
        self._ending = ending
        self._tokens = tokens

    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        yield chat_pb2.SendEvent(placement=chat_pb2.Placement(worker_id="w1"))
        for _ in range(self._tokens):
            progress.completion_tokens += 1
            yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text="word"))
        raise self._ending


CHARGED = 400
REFUNDED, KEPT = True, False


@pytest.mark.parametrize(
    ("ending", "deadline_in_s", "tokens", "refunded"),
    [
        (AtCapacity(500, "full"), None, 0, REFUNDED),
        (PlacementUnavailable("no scheduler"), None, 0, REFUNDED),
        (TurnRejected("prompt too long"), None, 0, REFUNDED),
        (_worker_status(grpc.StatusCode.UNIMPLEMENTED), 30.0, 0, REFUNDED),
        # The client's deadline passed before the first token: its prompt ran on a GPU.
        (_worker_status(grpc.StatusCode.DEADLINE_EXCEEDED), None, 0, KEPT),
        # Whatever failed first, once the deadline is gone the client's deadline ended the turn.
        (PlacementUnavailable("scheduler unavailable (DEADLINE_EXCEEDED)"), -0.1, 0, KEPT),
        (_worker_status(grpc.StatusCode.UNIMPLEMENTED), -0.1, 0, KEPT),
        (asyncio.CancelledError(), None, 0, KEPT),  # the client went away
        (_worker_status(grpc.StatusCode.UNIMPLEMENTED), None, 2, KEPT),  # served in part
    ],
    ids=[
        "shed", "no-scheduler", "rejected", "worker-fault", "worker-deadline", "fleet-fault-past-deadline",
        "worker-fault-past-deadline", "cancelled", "after-tokens",
    ],
)  # fmt: skip
async def test_only_turns_the_fleet_failed_before_a_token_are_refunded(
    clean_redis: str, ending: BaseException, deadline_in_s: float | None, tokens: int, refunded: bool
) -> None:
    client = redis.Redis.from_url(clean_redis)
    try:
        limiter = RateLimiter(client, {"free": TIGHT})
        gate = Gate(Authenticator(KeyStore(client), AuthMode.OFF), limiter)
        assert (await limiter.admit(ANONYMOUS.tenant, ANONYMOUS.tier, requests=0, tokens=CHARGED)).allowed
        job = TurnJob(
            session_id="s", model="m", tier="free", messages=[], prompt_tokens_estimate=100,
            max_tokens=CHARGED - 100,
            deadline=None if deadline_in_s is None else time.monotonic() + deadline_in_s,
        )  # fmt: skip
        turn = RefundUnlessServed(_EndsWith(ending, tokens), gate, ANONYMOUS, CHARGED)
        with pytest.raises(type(ending)):
            async for _ in turn.stream(job, TurnProgress()):
                pass
    finally:
        await client.aclose()
    left = await _tokens_left(clean_redis)
    if refunded:
        assert left == pytest.approx(TIGHT.tokens_per_min)
    else:  # the charge stands (less what the bucket refilled meanwhile: ~17 tokens a second)
        assert left < TIGHT.tokens_per_min - CHARGED / 2
