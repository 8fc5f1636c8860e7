"""gRPC `Worker` service: streams an engine's output, aborts on cancel, drains on request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc

from gpu_worker.engine import ChatMessage, Engine, EngineChunk, EngineError, EngineRequest
from gpu_worker.metrics import GENERATE_REQUESTS, ITL_SECONDS, TTFT_SECONDS
from kvgate.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

VALID_ROLES = frozenset({"system", "user", "assistant"})


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, on_drain: Callable[[], None]) -> None:
        self._engine = engine
        self._on_drain = on_drain
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[worker_pb2.GenerateChunk]:
        if self.draining:
            GENERATE_REQUESTS.labels(outcome="draining").inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "worker is draining: place the request elsewhere"
            )
        engine_request = _engine_request(request)
        if isinstance(engine_request, str):
            GENERATE_REQUESTS.labels(outcome="invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, engine_request)
            return
        self._in_flight += 1
        self._idle.clear()
        outcome = "cancelled"
        try:
            # aclosing: a cancelled RPC must close the engine stream now, which aborts the request.
            ttft = TTFT_SECONDS.labels(self._engine.kind)
            itl = ITL_SECONDS.labels(self._engine.kind)
            last = time.monotonic()
            first = True
            async with contextlib.aclosing(_closable(self._engine.generate(engine_request))) as stream:
                async for chunk in stream:
                    if chunk.num_tokens:
                        now = time.monotonic()
                        if first:
                            ttft.observe(now - last)
                            first = False
                            # A first chunk that merged later steps (the stream was behind)
                            # delivered its other tokens together with the first one.
                            for _ in range(min(chunk.num_tokens - 1, 64)):
                                itl.observe(0.0)
                        else:
                            gap = (now - last) / chunk.num_tokens
                            for _ in range(min(chunk.num_tokens, 64)):
                                itl.observe(gap)
                        last = now
                    yield worker_pb2.GenerateChunk(
                        text=chunk.text,
                        num_tokens=chunk.num_tokens,
                        prompt_tokens=chunk.prompt_tokens,
                        cached_tokens=chunk.cached_tokens,
                        finished=chunk.finished,
                        finish_reason=chunk.finish_reason,
                    )
            outcome = "ok"
        except EngineError as exc:
            outcome = "invalid"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            GENERATE_REQUESTS.labels(outcome=outcome).inc()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        return worker_pb2.AbortResponse(aborted=await self._engine.abort(request.request_id))

    async def Drain(
        self, request: worker_pb2.DrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> worker_pb2.DrainResponse:
        self.start_drain()
        return worker_pb2.DrainResponse(in_flight=self._in_flight)

    def start_drain(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: no new requests; %d in flight", self._in_flight)
            self._on_drain()


def _engine_request(request: worker_pb2.GenerateRequest) -> EngineRequest | str:
    """The engine request, or a message naming the invalid field."""
    if not request.request_id:
        return "request_id is required"
    if not request.messages:
        return "messages must not be empty"
    for i, message in enumerate(request.messages):
        if message.role not in VALID_ROLES:
            return f"messages[{i}].role must be one of {sorted(VALID_ROLES)}, got {message.role!r}"
    if request.max_tokens < 1:
        return "max_tokens must be >= 1"
    return EngineRequest(
        request_id=request.request_id,
        messages=[ChatMessage(m.role, m.content) for m in request.messages],
        max_tokens=request.max_tokens,
        assistant_prefix=request.assistant_prefix,
        seed=request.seed,
    )


def _closable(stream: AsyncIterator[EngineChunk]) -> AsyncGenerator[EngineChunk, None]:
    """Engines implement generate() as async generators; say so to the type checker."""
    assert isinstance(stream, AsyncGenerator)
    return stream
