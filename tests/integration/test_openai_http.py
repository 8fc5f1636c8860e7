"""The OpenAI-compatible HTTP API, called with the official `openai` client over the real fleet."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from gateway.auth import AuthMode
from tests.integration.fleet import Fleet

MEOWS = re.compile(r"Meow[.!?…]?( [Mm]eow[.!?…]?)*")
MODEL = "llama-3-8b"


def client(fleet: Fleet, api_key: str = "unused-with-auth-off") -> AsyncOpenAI:
    # No retries: the tests check the first answer, and a shed must not be retried behind our back.
    return AsyncOpenAI(base_url=fleet.http_base_url, api_key=api_key, max_retries=0, timeout=30)


async def test_models_and_completions_streaming_and_not(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 2000)}, http=True)
    async with client(fleet) as oai:
        models = await oai.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await oai.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("gpt-17")

        completion = await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
            max_tokens=12,
        )
        assert completion.object == "chat.completion"
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens > 0
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12

        raw = await oai.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_completion_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers["x-kvgate-worker"] == "us-1"
        assert raw.headers["content-type"].startswith("text/event-stream")
        parts: list[str] = []
        reasons: list[str] = []
        usage = None
        async for chunk in raw.parse():
            assert chunk.object == "chat.completion.chunk"
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                if c.finish_reason:
                    reasons.append(c.finish_reason)
            if chunk.usage is not None:
                assert not chunk.choices  # usage comes in its own final chunk
                usage = chunk.usage
        assert reasons == ["length"]
        assert usage is not None and usage.completion_tokens == 20
        text = "".join(parts)
        assert text.strip()

        # Without include_usage there is no usage chunk.
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
        assert all([chunk.usage is None async for chunk in stream])


async def _turn(
    oai: AsyncOpenAI, messages: list[ChatCompletionMessageParam], **headers: str
) -> tuple[str, str, str]:
    """(reply, worker, cache hit) of one non-streaming turn."""
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, extra_headers=headers or None
    )
    reply = raw.parse().choices[0].message.content or ""
    return reply, raw.headers["x-kvgate-worker"], raw.headers["x-kvgate-cache-hit"]


async def test_follow_up_turns_land_on_the_worker_holding_their_cache(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 2000), "eu-1": ("eu-west", 2000)}, http=True)
    async with client(fleet) as oai:
        for headers in ({"x-session-id": "chat-42"}, {}):  # explicit key, then derived from the prefix
            history: list[ChatCompletionMessageParam] = [
                {"role": "system", "content": f"You are assistant {len(headers)}."},
                {"role": "user", "content": "Hello there, who are you?"},
            ]
            reply, first_worker, first_hit = await _turn(oai, history, **headers)
            assert first_hit == "false"
            for follow_up in ("Tell me more.", "And then?"):
                history += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
                reply, worker, hit = await _turn(oai, history, **headers)
                assert (worker, hit) == (first_worker, "true"), headers

        # Another conversation is not glued to those pins.
        _, _, hit = await _turn(oai, [{"role": "user", "content": "A brand new topic"}])
        assert hit == "false"
    status = await fleet.fleet_status()
    assert status.placements_by_outcome["pinned_hit"] >= 4


async def test_keys_validation_and_quarantine(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 2000)}, auth=AuthMode.REQUIRED, http=True)
    _, key = await fleet.create_key("acme", tier="plus")
    suspect_id, suspect = await fleet.create_key("suspect")
    await fleet.keys.quarantine(suspect_id, True)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]

    for bad in ("not-a-key", f"kvg_{suspect_id}_{'A' * 43}"):
        async with client(fleet, bad) as oai:
            with pytest.raises(openai.AuthenticationError) as auth_error:
                await oai.chat.completions.create(model=MODEL, messages=hello, max_tokens=4)
            assert bad not in str(auth_error.value)
            with pytest.raises(openai.AuthenticationError):
                await oai.models.list()

    async with client(fleet, key) as oai:
        with pytest.raises(openai.BadRequestError) as empty:
            await oai.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
        assert empty.value.param == "messages" and empty.value.status_code == 400
        for messages, param in (
            ([{"role": "user", "content": "  "}], "messages[0].content"),
            ([{"role": "robot", "content": "hi"}], "messages[0].role"),
            ([{"role": "user", "content": "bad \x00 byte"}], "messages[0].content"),
        ):
            with pytest.raises(openai.BadRequestError) as bad_input:
                await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
            assert bad_input.value.param == param, bad_input.value
        with pytest.raises(openai.BadRequestError) as big:
            await oai.chat.completions.create(model=MODEL, messages=hello, max_tokens=100_000, stream=True)
        assert big.value.param == "max_tokens" and "limit" in str(big.value)
        with pytest.raises(openai.BadRequestError) as unknown:
            await oai.chat.completions.create(model="gpt-17", messages=hello)
        assert unknown.value.param == "model" and unknown.value.code == "model_not_found"
        assert (await oai.chat.completions.create(model=MODEL, messages=hello, max_tokens=4)).choices

    async with client(fleet, suspect) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=hello, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        text = "".join([c.delta.content or "" async for chunk in stream for c in chunk.choices])
        assert MEOWS.fullmatch(text), text

    await fleet.keys.revoke(suspect_id)
    async with client(fleet, suspect) as oai:
        with pytest.raises(openai.PermissionDeniedError):
            await oai.chat.completions.create(model=MODEL, messages=hello, max_tokens=4)


async def test_a_prompt_the_worker_rejects_is_a_400_even_when_streaming(fleet: Fleet) -> None:
    # The gateway cannot count a prompt's tokens exactly; the worker can, after the turn is placed
    # (and the placement event sent). The stream's headers wait for the first token, so this is
    # still a proper 400 naming both numbers, not an error in the middle of a 200 stream.
    await fleet.start({"us-1": ("us-east", 4000)}, http=True)
    long_turn = "word " * 6000
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": long_turn},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": long_turn},
    ]
    async with client(fleet) as oai:
        for stream in (True, False):
            with pytest.raises(openai.BadRequestError) as rejected:
                await oai.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=16, stream=stream
                )
            assert rejected.value.status_code == 400
            assert re.search(r"= \d+ exceeds max_model_len 8192", str(rejected.value)), rejected.value


async def test_a_full_fleet_is_a_rate_limit_error_with_retry_after(fleet: Fleet) -> None:
    # 40 blocks of 16 tokens: one ~350-token turn fits; while it runs a second does not (the free
    # tier also keeps 10% free), so the scheduler sheds it. (A turn no worker could hold at all
    # is a 400 instead: test_shed_codes.py.)
    await fleet.start({"us-1": ("us-east", 40)}, http=True, time_scale=3.0)
    prompt = " ".join(f"w{i}" for i in range(300))
    async with client(fleet) as oai:
        first = asyncio.create_task(
            oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=150
            )
        )
        await asyncio.sleep(0.5)  # placed and streaming
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as shed:
                await oai.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt + " again"}], max_tokens=60,
                    stream=stream,
                )  # fmt: skip
            assert shed.value.code == "at_capacity"
            retry_after = shed.value.response.headers["retry-after"]
            assert retry_after.isdigit() and int(retry_after) >= 1
        assert not first.done()
        assert (await first).usage.completion_tokens == 150  # type: ignore[union-attr]


async def test_the_raw_wire_is_openai_shaped(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 2000)}, http=True)
    url = fleet.http_base_url
    async with aiohttp.ClientSession() as http:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        }
        async with http.post(f"{url}/chat/completions", json=body) as response:
            assert response.status == 200
            events = (await response.text()).split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all(e.startswith("data: ") for e in events[:-2])
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len({c["id"] for c in chunks}) == 1

        for method, path, data, status in (
            ("POST", "/chat/completions", b"{not json", 400),
            ("POST", "/chat/completions", b"\xff\xfe", 400),
            ("GET", "/nothing-here", None, 404),
            ("GET", "/chat/completions", None, 405),
        ):
            async with http.request(method, f"{url}{path}", data=data) as response:
                assert response.status == status, path
                error = (await response.json())["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
