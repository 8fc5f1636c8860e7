"""Per-tenant rate limits in Redis: requests per second and tokens per minute, by tier.

Both buckets of a tenant live in one hash, `kvgate:t:{<tenant>}:rate`, updated by one Lua
script, so every gateway replica shares them and a request is charged to both or to neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis

from gateway.buckets import DEFAULT_LIMITS, Bucket, TierLimits

REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_ms: int = 0
    bucket: str = ""  # REQUESTS or TOKENS: the limit that said no (the longer wait)


def rate_key(tenant: str) -> str:
    return f"kvgate:t:{{{tenant}}}:rate"


class RateLimiter:
    def __init__(self, client: redis.Redis, limits: Mapping[str, TierLimits] | None = None) -> None:
        self._limits = {**DEFAULT_LIMITS, **(limits or {})}
        self._script = client.register_script(
            (resources.files("gateway") / "lua" / "rate_limit.lua").read_text()
        )

    async def admit(
        self, tenant: str, tier: str, *, requests: int = 1, tokens: int = 0, now_ms: int | None = None
    ) -> Decision:
        """Charge `requests` and `tokens` (a turn's prompt estimate + max_tokens) to the tenant:
        all of them, or nothing when any bucket is short.

        Raises redis.exceptions.RedisError when Redis is unreachable. `now_ms` is for tests;
        by default the Redis server's clock is used.
        """
        limits = self._limits.get(tier, self._limits["free"])
        charges: list[tuple[str, Bucket, float]] = [
            (name, bucket, cost)
            for name, bucket, cost in (
                (REQUESTS, limits.requests(), requests),
                (TOKENS, limits.tokens(), tokens),
            )
            if cost > 0
        ]
        if not charges:
            return Decision(True)
        allowed, retry_after_ms, limiting = await self._run(tenant, limits, charges, now_ms)
        if allowed:
            return Decision(True)
        return Decision(False, int(retry_after_ms), charges[int(limiting) - 1][0])

    async def refund(self, tenant: str, tier: str, *, tokens: int, now_ms: int | None = None) -> None:
        """Give back `tokens` charged by `admit` for a turn that was never served (shed, no worker,
        rejected): at most what a charge takes (the capacity), and never above a full bucket."""
        if tokens <= 0:
            return
        limits = self._limits.get(tier, self._limits["free"])
        bucket = limits.tokens()
        await self._run(tenant, limits, [(TOKENS, bucket, -min(float(tokens), bucket.capacity))], now_ms)

    async def _run(
        self, tenant: str, limits: TierLimits, charges: list[tuple[str, Bucket, float]], now_ms: int | None
    ) -> list[int]:
        args: list[str | int | float] = ["" if now_ms is None else now_ms]
        # Expire only once every bucket of the tier would be full again, including one this
        # call does not charge: a drained token bucket must not reset early.
        args.append(max(limits.requests().refill_ms, limits.tokens().refill_ms) + 1000)
        for name, bucket, cost in charges:
            args += [name, repr(bucket.capacity), repr(bucket.per_ms), repr(float(cost))]
        result: list[int] = await self._script(keys=[rate_key(tenant)], args=args)
        return result
