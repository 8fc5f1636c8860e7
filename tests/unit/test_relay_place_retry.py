"""The gateway retries a Place that a dead scheduler replica answered UNAVAILABLE, and only that."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

import grpc
import pytest

from gateway import relay
from gateway.relay import PlacementUnavailable, TurnJob, TurnProgress, TurnRunner, WorkerChannels
from kvgate.v1 import scheduler_pb2


def _error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="replica gone")


class _Scheduler:
    """Fails the first `failures` calls with `code`, then places on w1."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures = failures
        self.code = code
        self.requests: list[scheduler_pb2.PlaceRequest] = []

    async def Place(self, request: scheduler_pb2.PlaceRequest, timeout: float) -> scheduler_pb2.PlaceResponse:
        self.requests.append(request)
        if len(self.requests) <= self.failures:
            raise _error(self.code)
        return scheduler_pb2.PlaceResponse(placed=scheduler_pb2.Placed(worker_id="w1", address="w1:1"))


JOB = TurnJob(session_id="s", model="m", tier="free", messages=[], prompt_tokens_estimate=10, max_tokens=5)


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "PLACE_RETRY_DELAYS_S", (0.0, 0.0, 0.0))


async def _place(scheduler: _Scheduler) -> scheduler_pb2.Placed:
    runner = TurnRunner(cast(Any, scheduler), WorkerChannels())
    return await runner._place(JOB, "req-1", TurnProgress(), [], [])


async def test_unavailable_replicas_are_retried_with_the_same_request_id() -> None:
    scheduler = _Scheduler(failures=3)
    placed = await _place(scheduler)
    assert placed.worker_id == "w1"
    assert [r.request_id for r in scheduler.requests] == ["req-1"] * 4


async def test_it_gives_up_after_four_attempts() -> None:
    scheduler = _Scheduler(failures=4)
    with pytest.raises(PlacementUnavailable):
        await _place(scheduler)
    assert len(scheduler.requests) == 4


async def test_other_errors_are_not_retried() -> None:
    scheduler = _Scheduler(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(PlacementUnavailable):
        await _place(scheduler)
    assert len(scheduler.requests) == 1


async def test_a_place_cut_short_by_the_turns_own_deadline_is_deadline_exceeded() -> None:
    scheduler = _Scheduler(failures=1, code=grpc.StatusCode.DEADLINE_EXCEEDED)
    runner = TurnRunner(cast(Any, scheduler), WorkerChannels())
    past = dataclasses.replace(JOB, deadline=time.monotonic() - 0.1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await runner._place(past, "req-1", TurnProgress(), [], [])
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # A Place that timed out while the turn still had time is the scheduler's failure.
    with pytest.raises(PlacementUnavailable):
        await _place(_Scheduler(failures=1, code=grpc.StatusCode.DEADLINE_EXCEEDED))


async def test_the_place_request_names_the_sessions_last_worker() -> None:
    scheduler = _Scheduler(failures=0)
    runner = TurnRunner(cast(Any, scheduler), WorkerChannels())
    job = dataclasses.replace(JOB, last_worker="w7")
    await runner._place(job, "req-1", TurnProgress(), [], [])
    # A failover's Place still names it: the pin (and the lookup) are the scheduler's to check.
    await runner._place(job, "req-2", TurnProgress(), ["w7"], [])
    assert [r.last_worker for r in scheduler.requests] == ["w7", "w7"]
    assert [list(r.exclude_workers) for r in scheduler.requests] == [[], ["w7"]]
