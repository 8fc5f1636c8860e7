"""A turn the fleet never served gives back the tokens it was charged.

The servicer charges a turn's prompt estimate plus max_tokens to the tenant's tokens-per-minute
bucket before it is placed. A turn shed for lack of capacity, refused by every scheduler or
worker, rejected after placement, or failed by a worker before its first token never produced a
token through no doing of the client's; keeping the charge would let a client that retries after
a shed drain its own bucket and be rate limited without ever being served.

A turn the client ended keeps its charge: one it cancelled, and one whose deadline passed (the
worker's DEADLINE_EXCEEDED, or any failure once the deadline is gone). Its prompt may already
have been prefilled on a GPU, and whether the worker's deadline error or the server's cancelling
of the handler comes first is a race that must not decide the bill.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

import grpc

from gateway.auth import Caller
from gateway.gate import Gate
from gateway.relay import AtCapacity, PlacementUnavailable, Runner, TurnJob, TurnProgress, TurnRejected
from kvgate.v1 import chat_pb2

# The fleet refused the turn: shed, no scheduler or worker could take it, or a worker rejected it.
REFUSALS = (AtCapacity, PlacementUnavailable, TurnRejected)
# Worker statuses that the client's own call caused (its deadline ran out, it went away).
CLIENT_ENDED_CODES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def owed_a_refund(exc: Exception, job: TurnJob) -> bool:
    """Whether a turn that ended with `exc` before its first token is owed its tokens back."""
    if job.deadline is not None and time.monotonic() >= job.deadline:
        return False  # the client's deadline ended it, whatever failed first
    if isinstance(exc, REFUSALS):
        return True
    # A worker status the relay does not fail over on (see gateway/worker_errors.py).
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in CLIENT_ENDED_CODES


class RefundUnlessServed:
    """`runner`'s stream; when the fleet fails it before any token, `tokens` are refunded."""

    def __init__(self, runner: Runner, gate: Gate, caller: Caller, tokens: int) -> None:
        self._runner = runner
        self._gate = gate
        self._caller = caller
        self._tokens = tokens

    async def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        try:
            # aclosing: a client going away closes this stream, which must end the worker's
            # call now, not whenever the garbage collector finalizes the inner generator.
            async with contextlib.aclosing(self._runner.stream(job, progress)) as events:
                async for event in events:
                    yield event
        except Exception as exc:
            # CancelledError and GeneratorExit (the client went away) are not Exceptions.
            if progress.completion_tokens == 0 and owed_a_refund(exc, job):
                await self._gate.refund(self._caller, tokens=self._tokens)
            raise
