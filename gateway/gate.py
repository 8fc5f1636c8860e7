"""Admission of each Chat call: authenticate the caller, then charge the tenant's rate limits.

Either returns the Caller or ends the RPC with UNAUTHENTICATED, PERMISSION_DENIED,
RESOURCE_EXHAUSTED (with a retry pushback) or UNAVAILABLE when Redis is away.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import redis.exceptions

from gateway.aborts import abort, abort_with_pushback, redis_down
from gateway.auth import Authenticator, AuthFailed, Caller
from gateway.metrics import RATE_LIMITED
from gateway.ratelimit import REQUESTS, RateLimiter

log = logging.getLogger(__name__)

RATE_LIMITED_MESSAGE = "rate limit of the {tier} tier reached ({bucket}); retry after the pushback delay"


class Gate:
    def __init__(self, auth: Authenticator, limiter: RateLimiter | None) -> None:
        self._auth = auth
        self._limiter = limiter  # None: rate limiting off

    async def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        try:
            return await self._auth.caller(context.invocation_metadata())
        except AuthFailed as exc:
            await abort(context, exc.code, str(exc))
        except redis.exceptions.RedisError:
            await redis_down(context, "API key store")

    async def charge(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        caller: Caller,
        *,
        requests: int = 1,
        tokens: int = 0,
    ) -> None:
        """Charge the tenant's buckets: requests, and tokens (a turn's prompt estimate + max_tokens)."""
        if self._limiter is None:
            return
        try:
            decision = await self._limiter.admit(caller.tenant, caller.tier, requests=requests, tokens=tokens)
        except redis.exceptions.RedisError:
            await redis_down(context, "rate limiter")
        if not decision.allowed:
            RATE_LIMITED.labels(tier=caller.tier, bucket=decision.bucket).inc()
            what = "requests per second" if decision.bucket == REQUESTS else "tokens per minute"
            await abort_with_pushback(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                RATE_LIMITED_MESSAGE.format(tier=caller.tier, bucket=what),
                decision.retry_after_ms,
            )

    async def refund(self, caller: Caller, *, tokens: int) -> None:
        """Give back the tokens charged for a turn that was never served. Best effort: a refund
        lost to a Redis outage only means the tenant waits for the bucket to refill."""
        if self._limiter is None:
            return
        try:
            await self._limiter.refund(caller.tenant, caller.tier, tokens=tokens)
        except redis.exceptions.RedisError as exc:
            log.warning("could not refund %d tokens to tenant %s: %s", tokens, caller.tenant, exc)

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """Authenticate, and count the call against the tenant's requests per second."""
        caller = await self.caller(context)
        await self.charge(context, caller)
        return caller
