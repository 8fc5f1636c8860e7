"""The rate-limit Lua script in real Redis agrees with the bucket model in gateway/buckets.py."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as redis

from gateway.buckets import Level, TierLimits, take
from gateway.ratelimit import RateLimiter, rate_key

LIMITS = TierLimits(requests_per_s=3, request_burst=5, tokens_per_min=1200)


async def test_the_script_follows_the_model_call_for_call(clean_redis: str) -> None:
    client = redis.Redis.from_url(clean_redis)
    limiter = RateLimiter(client, {"free": LIMITS})
    rng = random.Random(42)
    levels: list[Level | None] = [None, None]
    now = 1_000_000
    allowed = refused = 0
    refunds = 0
    for _ in range(400):
        now += rng.choice([0, 0, 5, 50, 200, 900])
        if rng.random() < 0.2:
            # A turn that was never served gives its tokens back (2000: more than a charge takes).
            refund = rng.choice([40, 300, 2000])
            _, (levels[1],) = take([(LIMITS.tokens(), levels[1], -float(refund))], now)
            await limiter.refund("t1", "free", tokens=refund, now_ms=now)
            saved = await client.hget(rate_key("t1"), "tokens:tokens")
            assert levels[1] is not None and float(saved or 0) == pytest.approx(levels[1].tokens)
            refunds += 1
            continue
        tokens = rng.choice([0, 40, 300, 2000])  # 2000 > capacity: charged as a full bucket
        buckets = [(LIMITS.requests(), levels[0], 1.0)]
        if tokens:
            buckets.append((LIMITS.tokens(), levels[1], float(tokens)))
        expected, new_levels = take(buckets, now)
        got = await limiter.admit("t1", "free", tokens=tokens, now_ms=now)
        bucket = "" if expected.allowed else ["requests", "tokens"][expected.limited_by]
        assert (got.allowed, got.retry_after_ms, got.bucket) == (
            expected.allowed,
            expected.retry_after_ms,
            bucket,
        )
        levels[: len(new_levels)] = new_levels
        allowed, refused = allowed + got.allowed, refused + (not got.allowed)
    assert allowed > 50 and refused > 50 and refunds > 50  # the walk exercised every path
    # An idle tenant's state expires once it would be full anyway.
    ttl = await client.pttl(rate_key("t1"))
    assert 0 < ttl <= LIMITS.tokens().refill_ms + 1000
    await client.aclose()
