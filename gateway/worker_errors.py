"""What a client is told when a worker ends a turn with a status the relay does not fail over on.

The relay places a turn again on UNAVAILABLE, ABORTED, INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED and
CANCELLED, and turns INVALID_ARGUMENT into the client's own INVALID_ARGUMENT. What is left is
either the request's deadline running out, or a worker that answers in a way no healthy worker
does (UNIMPLEMENTED from a pod whose address another service now has, PERMISSION_DENIED from a
misconfigured one, ...). Those are the fleet's faults, not the client's: passing the worker's
status through verbatim would tell a client its own request was NOT_FOUND or UNAUTHENTICATED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

WORKER_FAILED_RETRY_MS = 1000


@dataclass(frozen=True)
class WorkerFailure:
    code: grpc.StatusCode
    message: str
    outcome: str  # the kvgate_gateway_turns_total label
    retry_after_ms: int | None = None


def worker_failure(exc: grpc.aio.AioRpcError) -> WorkerFailure:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkerFailure(
            code, "the turn did not finish within the request's deadline; nothing was stored", "deadline"
        )
    # The worker's own words stay in the log: they describe the fleet, not the request.
    log.warning("worker failed a turn with %s: %s", code.name, exc.details())
    return WorkerFailure(
        grpc.StatusCode.UNAVAILABLE,
        f"the worker serving the turn failed ({code.name.lower()}); retry shortly",
        "worker_error",
        WORKER_FAILED_RETRY_MS,
    )
