"""The Redis client every service uses: brief retries with backoff, then fail fast.

Callers turn a RedisError into UNAVAILABLE with a retry hint; nothing crashes while
Redis is away, and the pool reconnects on its own when it returns.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Connections one process opens at most. A burst beyond it waits for a free connection (up
# to POOL_WAIT_S) instead of failing at once with "Too many connections" (redis-py's default
# pool refuses past 100) or opening thousands of sockets against Redis.
MAX_CONNECTIONS = 256
POOL_WAIT_S = 5.0


def connect_redis(url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    # from_pool: closing the client closes its pool too.
    return redis.Redis.from_pool(pool)


def as_str(value: bytes | str) -> str:
    """A Redis reply item as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value
