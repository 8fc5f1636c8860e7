"""Limits on what one request may make the gateway do: a stateless conversation's size is capped
(gRPC and HTTP), max_tokens is bounded, and the costly work on a prompt comes after its charge."""

from __future__ import annotations

import json

import aiohttp
import grpc
import openai
import pytest
from openai import AsyncOpenAI

from gateway import prompt
from gateway.buckets import TierLimits
from gateway.openai_http import max_body_bytes
from gateway.validation import Limits
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.integration.fleet import Fleet

MODEL = "llama-3-8b"
SMALL = Limits(max_conversation_bytes=64 * 1024)


async def _send_error(stub: chat_pb2_grpc.ChatStub, request: chat_pb2.SendRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Send(request, timeout=30):
            pass
    return info.value


def _user(content: str) -> common_pb2.Message:
    return common_pb2.Message(role="user", content=content)


async def test_grpc_refuses_oversized_input_naming_the_field_and_stores_nothing(fleet: Fleet) -> None:
    await fleet.start({"lim-1": ("us-east", 2000)}, gateway_overrides={"limits": SMALL})
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        stateless = chat_pb2.SendRequest(model=MODEL, messages=[_user("x" * 30_000)] * 3)
        error = await _send_error(stub, stateless)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            "messages total 90000 bytes of content; the limit is 65536 (--max-conversation-bytes)"
        )
        error = await _send_error(stub, chat_pb2.SendRequest(model=MODEL, messages=[_user("x" * 40_000)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "messages[0].content is 40000 bytes; the limit is 32768"

        session = await stub.CreateSession(chat_pb2.CreateSessionRequest())
        for request, expected in (
            (
                chat_pb2.SendRequest(session_id=session.session_id, content="hi", max_tokens=5000),
                "max_tokens is 5000; the limit is 4096",
            ),
            (
                chat_pb2.SendRequest(session_id=session.session_id, content="x" * 40_000),
                "content is 40000 bytes; the limit is 32768",
            ),
        ):
            error = await _send_error(stub, request)
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
        # A raw client can put -1 in the uint32 field: it arrives as 2^32 - 1, over the limit.
        raw = chat_pb2.SendRequest(session_id=session.session_id, content="hi").SerializeToString()
        raw += b"\x18" + b"\xff" * 9 + b"\x01"  # field 3 (max_tokens), varint -1
        send = channel.unary_stream("/kvgate.v1.Chat/Send")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in send(raw, timeout=30):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("max_tokens is 4294967295; the limit is 4096")
        # max_tokens 0 is "unset" in proto3: the gateway's default (256 tokens).
        done = [e async for e in stub.Send(chat_pb2.SendRequest(model=MODEL, messages=[_user("hi")]))][-1]
        assert done.done.usage.completion_tokens == 256
        stored = await stub.GetSession(chat_pb2.GetSessionRequest(session_id=session.session_id))
        assert len(stored.turns) == 0


async def test_http_refuses_an_oversized_conversation_naming_messages(fleet: Fleet) -> None:
    await fleet.start({"lim-2": ("us-east", 2000)}, http=True, gateway_overrides={"limits": SMALL})
    async with AsyncOpenAI(base_url=fleet.http_base_url, api_key="x", max_retries=0, timeout=30) as oai:
        with pytest.raises(openai.BadRequestError) as big:
            await oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x" * 30_000}] * 3, max_tokens=4
            )
        assert big.value.param == "messages" and big.value.status_code == 400
        assert "the limit is 65536" in str(big.value)
    # A body larger than any acceptable conversation is not even read.
    limit = max_body_bytes(SMALL)
    body = b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fleet.http_base_url}/chat/completions", data=body) as response:
            assert response.status == 413
            error = (await response.json())["error"]
    assert error["param"] == "messages"
    assert f"over {limit} bytes" in error["message"] and "65536" in error["message"]


def _go_json(body: dict[str, object]) -> bytes:
    """`body` as Go's encoding/json writes it: every <, > and & escaped as \\u003c, \\u003e, \\u0026."""
    text = json.dumps(body, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


async def test_http_serves_a_conversation_under_the_cap_however_its_json_is_escaped(fleet: Fleet) -> None:
    # Every character of the conversation is escaped to 6 bytes; a 32k-context model holds it.
    limits = Limits(max_conversation_bytes=32 * 1024, max_conversation_messages=16)
    model = "mixtral-8x7b"
    await fleet.add_worker("esc-1", "us-east", model=model, num_gpu_blocks=4000, time_scale=0.05)
    await fleet.start_control_plane(http=True, gateway_overrides={"limits": limits, "models": (model,)})
    await fleet.wait_for_workers({"esc-1": "ready"})
    code = "<&>" * 10_000  # 30,000 bytes of content, 180,000 bytes of JSON
    body = _go_json({"model": model, "messages": [{"role": "user", "content": code}], "max_tokens": 4})
    assert len(body) > 5.5 * len(code)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{fleet.http_base_url}/chat/completions", data=body, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
            completion = await response.json()
        assert completion["usage"]["completion_tokens"] == 4
        # The conversation cap stays the limit: over it, escaped the same way, is a 400 naming it.
        over = [{"role": "user", "content": "<&>" * 7_000}] * 2  # 42,000 bytes
        body = _go_json({"model": model, "messages": over, "max_tokens": 4})
        async with http.post(
            f"{fleet.http_base_url}/chat/completions", data=body, headers=headers
        ) as response:
            assert response.status == 400
            error = (await response.json())["error"]
    assert error["param"] == "messages"
    assert "messages total 42000 bytes of content; the limit is 32768" in error["message"]


async def test_a_prompt_is_hashed_only_once_its_tokens_are_charged(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[int] = []
    real = prompt.prompt_block_hashes

    def counted(messages: list[common_pb2.Message], block_size: int = prompt.KV_BLOCK_SIZE) -> list[int]:
        hashed.append(len(messages))
        return real(messages, block_size)

    monkeypatch.setattr(prompt, "prompt_block_hashes", counted)
    tight = {"free": TierLimits(requests_per_s=50, request_burst=50, tokens_per_min=1000)}
    await fleet.start({"lim-3": ("us-east", 2000)}, gateway_overrides={"rate_limits": tight})
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        request = chat_pb2.SendRequest(model=MODEL, messages=[_user("word " * 1000)] * 4, max_tokens=4)
        async for _ in stub.Send(request, timeout=30):  # a full bucket pays for one
            pass
        error = await _send_error(stub, request)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens per minute" in (error.details() or "")
    assert hashed == [4]
