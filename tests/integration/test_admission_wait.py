"""Bounded admission wait: a turn the full fleet cannot take waits for room instead of being
shed at once, but only for as long, and as many turns, as configured."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway.admission import AdmissionPolicy
from tests.integration.fleet import Fleet

# 40 blocks x 16 = 640 KV tokens. A turn with a ~350-token prompt fits; while it runs, a second
# one does not (the free tier also keeps 10% of the fleet free).
BLOCKS = 40
MAX_TOKENS = 60
LONG_MESSAGE = " ".join(f"w{i}" for i in range(300))


async def _fill_and_try_another(fleet: Fleet) -> tuple[asyncio.Task[object], grpc.aio.AioRpcError | None]:
    """Start one long turn that takes the fleet, then send a second; (first turn, second's error)."""
    async with fleet.client() as client:
        first = asyncio.create_task(
            client.reply((await client.create_session()).session_id, LONG_MESSAGE, MAX_TOKENS)
        )
        await asyncio.sleep(0.5)  # placed and streaming
        second = (await client.create_session()).session_id
        try:
            _, done, _ = await client.reply(second, LONG_MESSAGE + " again", MAX_TOKENS)
            assert done.usage.completion_tokens == MAX_TOKENS
            error = None
        except grpc.aio.AioRpcError as exc:
            error = exc
        await first
        return first, error


def _admission_waits(outcome: str) -> float:
    return REGISTRY.get_sample_value("kvgate_gateway_admission_waits_total", {"outcome": outcome}) or 0.0


async def test_without_a_wait_a_full_fleet_sheds_at_once(fleet: Fleet) -> None:
    await fleet.start({"adm-a": ("us-east", BLOCKS)}, time_scale=3.0)
    _, error = await _fill_and_try_another(fleet)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in (error.details() or "")
    assert "at capacity" in (error.details() or "")


async def test_a_turn_waits_for_capacity_and_is_placed_when_it_frees(fleet: Fleet) -> None:
    await fleet.start(
        {"adm-b": ("us-east", BLOCKS)},
        time_scale=3.0,
        gateway_overrides={"admission": AdmissionPolicy(wait_s=30.0)},
    )
    placed_after_waiting = _admission_waits("placed")
    _, error = await _fill_and_try_another(fleet)
    assert error is None  # it waited for the first turn to finish, then ran
    assert _admission_waits("placed") == placed_after_waiting + 1


@pytest.mark.parametrize(
    ("worker_id", "policy"),
    [("adm-c", AdmissionPolicy(wait_s=0.3)), ("adm-d", AdmissionPolicy(wait_s=30.0, max_waiting=0))],
)
async def test_the_wait_is_bounded_in_time_and_in_waiting_turns(
    fleet: Fleet, worker_id: str, policy: AdmissionPolicy
) -> None:
    await fleet.start(
        {worker_id: ("us-east", BLOCKS)}, time_scale=3.0, gateway_overrides={"admission": policy}
    )
    _, error = await _fill_and_try_another(fleet)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in (error.details() or "")
