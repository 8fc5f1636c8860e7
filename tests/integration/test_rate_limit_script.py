"""The rate-limit Lua script in real Redis agrees with the bucket model in gateway/buckets.py."""

from __future__ import annotations

import random

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
    for _ in range(400):
        now += rng.choice([0, 0, 5, 50, 200, 900])
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
    assert allowed > 50 and refused > 50  # the walk exercised both answers
    # An idle tenant's state expires once it would be full anyway.
    ttl = await client.pttl(rate_key("t1"))
    assert 0 < ttl <= LIMITS.tokens().refill_ms + 1000
    await client.aclose()
