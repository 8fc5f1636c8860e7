"""Why the fleet cannot take a turn decides what the client is told (the scheduler's Shed.code,
mapped by the gateway): at capacity is RESOURCE_EXHAUSTED / 429 with a retry hint
(test_shedding.py, test_admission_wait.py, test_openai_http.py); no live worker serving the model
is UNAVAILABLE / 503 with a retry hint; a turn no worker serving the model could ever hold is
INVALID_ARGUMENT / 400 naming both numbers, at once and without counting as a shed. Real gateway,
scheduler, sim worker, Redis and Mosquitto."""

from __future__ import annotations

import re

import grpc
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client import REGISTRY

from gateway.admission import AdmissionPolicy
from tests.integration.fleet import Fleet

# 8 blocks of 16 tokens: 128 KV tokens, of which the free tier may use 90%: 115.
TINY_BLOCKS = 8
FREE_LIMIT = 115
MODELS = ("llama-3-8b", "llama-3-70b")  # the gateway offers both; the only worker runs the 8B


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _admission_waits() -> float:
    return sum(
        _sample("kvgate_gateway_admission_waits_total", outcome=o) for o in ("placed", "shed", "cancelled")
    )


async def _start(fleet: Fleet, **overrides: object) -> None:
    await fleet.start(
        {"tiny": ("us-east", TINY_BLOCKS)},
        http=True,
        # A turn that could wait for capacity would wait up to 30 s: these must not wait at all.
        gateway_overrides={"models": MODELS, "admission": AdmissionPolicy(wait_s=30.0), **overrides},
    )


async def test_a_turn_no_worker_could_hold_is_invalid_argument_at_once_and_not_a_shed(fleet: Fleet) -> None:
    await _start(fleet)
    waits, sheds = _admission_waits(), _sample("kvgate_gateway_turns_total", outcome="shed")
    invalid = _sample("kvgate_gateway_turns_total", outcome="invalid")
    async with fleet.client() as client:
        session = await client.create_session()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "Tell me everything.", max_tokens=500)
        assert not (await client.get_session(session.session_id)).turns  # nothing stored
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    needed = re.search(r"need (\d+) KV tokens, more than the (\d+) a worker serving llama-3-8b", details)
    assert details.startswith("max_tokens") and needed, details
    assert int(needed.group(1)) > 500 and int(needed.group(2)) == FREE_LIMIT
    assert "free tier" in details
    assert _admission_waits() == waits  # it did not wait for capacity that can never come
    assert _sample("kvgate_gateway_turns_total", outcome="shed") == sheds
    assert _sample("kvgate_gateway_turns_total", outcome="invalid") == invalid + 1
    assert (await fleet.fleet_status()).shed_by_tier == {}
    assert _sample("kvgate_scheduler_placements_total", outcome="too_large", tier="free") >= 1


async def test_a_model_no_live_worker_serves_is_unavailable_with_a_retry_hint(fleet: Fleet) -> None:
    await _start(fleet, admission=AdmissionPolicy())
    async with fleet.client() as client:
        session = await client.create_session(model="llama-3-70b")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "Hello!", max_tokens=16)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no live worker serves llama-3-70b" in (info.value.details() or "")
    pushback = dict(info.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback == "5000"
    assert (await fleet.fleet_status()).shed_by_tier == {}


async def test_over_http_too_large_is_a_400_and_no_worker_a_503_with_retry_after(fleet: Fleet) -> None:
    await _start(fleet, admission=AdmissionPolicy())
    oai = AsyncOpenAI(base_url=fleet.http_base_url, api_key="unused", max_retries=0, timeout=30)
    async with oai:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as too_large:
                await oai.chat.completions.create(
                    model="llama-3-8b", messages=[{"role": "user", "content": "Hi"}], max_tokens=500,
                    stream=stream,
                )  # fmt: skip
            assert too_large.value.status_code == 400 and too_large.value.param == "max_tokens"
            assert f"more than the {FREE_LIMIT} a worker serving llama-3-8b" in str(too_large.value)
            assert "retry-after" not in too_large.value.response.headers

            with pytest.raises(openai.InternalServerError) as no_worker:
                await oai.chat.completions.create(
                    model="llama-3-70b", messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                    stream=stream,
                )  # fmt: skip
            assert no_worker.value.status_code == 503
            assert "no live worker serves llama-3-70b" in str(no_worker.value)
            assert no_worker.value.response.headers["retry-after"] == "5"
