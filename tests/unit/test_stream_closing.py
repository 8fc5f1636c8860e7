"""Closing a turn's stream ends everything under it before aclose() returns: each generator that
wraps another closes it (contextlib.aclosing), so the worker's call is cancelled at once rather
than whenever the inner generator happens to be finalized."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import pytest

from gateway import decode_errors, openai_http
from gateway.auth import ANONYMOUS, Caller
from gateway.client import ChatClient
from gateway.quarantine import FleetLook, Meower
from gateway.refunds import RefundUnlessServed
from gateway.relay import Runner, TurnJob, TurnProgress, TurnRunner
from gateway.servicer import ChatServicer
from gateway.validation import Limits
from kvgate.v1 import chat_pb2, common_pb2, scheduler_pb2, worker_pb2

JOB = TurnJob(session_id="s", model="m", tier="free", messages=[], prompt_tokens_estimate=10, max_tokens=5)


class _Inner:
    """A runner whose streams log when they are closed, and stay referenced after they are (as a
    traceback, a debugger or a metrics hook may keep them): only an explicit aclose() ends them."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.streams: list[AsyncGenerator[chat_pb2.SendEvent, None]] = []

    def stream(self, job: TurnJob, progress: TurnProgress) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        events = self._events()
        self.streams.append(events)
        return events

    async def _events(self) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        try:
            yield chat_pb2.SendEvent(placement=chat_pb2.Placement(worker_id="w1"))
            yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text="hi"))
            await asyncio.Event().wait()  # a worker still generating
        finally:
            self.log.append("inner closed")


async def _read_then_close(
    events: AsyncGenerator[chat_pb2.SendEvent, None], log: list[str], count: int = 1
) -> None:
    for _ in range(count):
        await anext(events)
    await events.aclose()
    log.append("outer closed")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda inner: RefundUnlessServed(inner, cast(Any, None), ANONYMOUS, 100),
        lambda inner: FleetLook().watch(inner),
    ],
    ids=["refunds", "fleet-look"],
)
async def test_closing_a_wrapped_runner_closes_the_runner_first(wrap: Callable[[Runner], Runner]) -> None:
    log: list[str] = []
    inner = _Inner(log)
    await _read_then_close(wrap(inner).stream(JOB, TurnProgress()), log)
    assert log == ["inner closed", "outer closed"]


async def test_closing_a_chained_http_stream_closes_the_events_under_it() -> None:
    log: list[str] = []
    inner = _Inner(log)
    first = [chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text="a"))]
    await _read_then_close(openai_http._chain(first, inner.stream(JOB, TurnProgress())), log, count=2)
    assert log == ["inner closed", "outer closed"]


# The whole chain a gRPC Send runs through, down to a worker's Generate call.


class _WorkerCall:
    """A Generate call that streams one chunk and then keeps the worker busy until cancelled."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __aiter__(self) -> AsyncIterator[worker_pb2.GenerateChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[worker_pb2.GenerateChunk]:
        yield worker_pb2.GenerateChunk(text="Hello", num_tokens=1, prompt_tokens=10)
        await asyncio.Event().wait()

    def cancel(self) -> bool:
        self.log.append("worker call cancelled")
        return True


class _Workers:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.calls: list[_WorkerCall] = []

    def stub(self, address: str) -> _Workers:
        return self

    def Generate(self, request: worker_pb2.GenerateRequest, timeout: float | None) -> _WorkerCall:
        call = _WorkerCall(self.log)
        self.calls.append(call)
        return call

    def done(self, address: str) -> None:
        self.log.append("worker channel released")


class _Scheduler:
    async def Place(self, request: scheduler_pb2.PlaceRequest, timeout: float) -> scheduler_pb2.PlaceResponse:
        return scheduler_pb2.PlaceResponse(placed=scheduler_pb2.Placed(worker_id="w1", address="w1:1"))

    async def Release(self, request: scheduler_pb2.ReleaseRequest, timeout: float) -> None:
        return None


class _Gate:
    async def admit(self, context: object) -> Caller:
        return ANONYMOUS

    async def charge(self, context: object, caller: Caller, *, requests: int = 1, tokens: int = 0) -> None:
        return None

    async def refund(self, caller: Caller, *, tokens: int) -> None:
        return None


class _Context:
    def time_remaining(self) -> float | None:
        return None


@pytest.mark.parametrize("registered", [False, True], ids=["servicer", "as-registered"])
async def test_closing_a_send_stream_cancels_the_worker_call_before_aclose_returns(registered: bool) -> None:
    log: list[str] = []
    workers = _Workers(log)
    runner = TurnRunner(cast(Any, _Scheduler()), cast(Any, workers), coalesce_ms=15)
    look = FleetLook()
    servicer = ChatServicer(
        cast(Any, None), look.watch(runner), ["m"], Limits(), cast(Any, _Gate()), Meower(look=look)
    )
    send = decode_errors._streaming(servicer.Send) if registered else servicer.Send
    request = chat_pb2.SendRequest(model="m", messages=[common_pb2.Message(role="user", content="hi")])
    events = send(request, _Context())
    kinds = [(await anext(events)).WhichOneof("event") for _ in range(2)]
    assert kinds == ["placement", "delta"]
    await events.aclose()
    log.append("stream closed")
    assert log == ["worker call cancelled", "worker channel released", "stream closed"]


class _ClientCall:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __aiter__(self) -> AsyncIterator[chat_pb2.SendEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[chat_pb2.SendEvent]:
        yield chat_pb2.SendEvent(delta=chat_pb2.TextDelta(text="hi"))
        await asyncio.Event().wait()

    def cancel(self) -> bool:
        self.log.append("call cancelled")
        return True


class _ChatStub:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def Send(self, request: chat_pb2.SendRequest, metadata: object, timeout: float | None) -> _ClientCall:
        return _ClientCall(self.log)


@pytest.mark.parametrize("stateless", [False, True], ids=["send", "send_messages"])
async def test_a_client_that_stops_reading_cancels_its_call_at_once(stateless: bool) -> None:
    log: list[str] = []
    async with ChatClient("127.0.0.1:1") as client:
        client._stub = cast(Any, _ChatStub(log))
        events = client.send_messages([("user", "hi")]) if stateless else client.send("s", "hi")
        await _read_then_close(events, log)
    assert log == ["call cancelled", "outer closed"]
