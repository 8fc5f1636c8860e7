"""Ending an RPC with a status: the few ways every gateway servicer answers "no"."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

REDIS_DOWN_RETRY_MS = 1000


async def abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


async def abort_with_pushback(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str, retry_after_ms: int
) -> NoReturn:
    # The standard gRPC retry hint: clients (and `kvgate chat --wait`) sleep this long.
    context.set_trailing_metadata((("grpc-retry-pushback-ms", str(retry_after_ms)),))
    await abort(context, code, message)


async def redis_down(context: grpc.aio.ServicerContext[Any, Any], what: str = "session store") -> NoReturn:
    await abort_with_pushback(
        context,
        grpc.StatusCode.UNAVAILABLE,
        f"{what} (Redis) unavailable; retry shortly",
        REDIS_DOWN_RETRY_MS,
    )
