"""The OpenAI facade's pure parts: request parsing, gRPC -> HTTP errors, affinity keys."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from gateway import affinity, openai_errors, openai_wire
from gateway.servicer import AT_CAPACITY_MESSAGE
from kvgate.v1 import common_pb2

HELLO = [{"role": "user", "content": "hi"}]


def rpc_error(code: grpc.StatusCode, details: str, pushback_ms: str | None = None) -> AioRpcError:
    trailers = Metadata(("grpc-retry-pushback-ms", pushback_ms)) if pushback_ms else Metadata()
    return AioRpcError(code, Metadata(), trailers, details)


def test_a_request_parses_into_a_stateless_turn() -> None:
    chat = openai_wire.parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
                },
            ],
            "max_completion_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.2,  # accepted, ignored
        }
    )
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "Hello")]
    assert (chat.max_tokens, chat.max_tokens_param, chat.stream, chat.include_usage) == (
        7,
        "max_completion_tokens",
        True,
        True,
    )
    defaults = openai_wire.parse_chat_request({"model": "m", "messages": HELLO})
    assert (defaults.max_tokens, defaults.stream, defaults.include_usage) == (0, False, False)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": HELLO}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ({"model": "m", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": HELLO, "max_tokens": 2**32}, "max_tokens"),
        ({"model": "m", "messages": HELLO, "max_completion_tokens": True}, "max_completion_tokens"),
        ({"model": "m", "messages": HELLO, "n": 2}, "n"),
        ({"model": "m", "messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "messages": HELLO, "stream": "yes"}, "stream"),
        # JSON can spell lone surrogates ("\ud800"), which UTF-8 and protobuf cannot carry.
        ({"model": "m\ud800", "messages": HELLO}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "a\udc80"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "us\ud800er", "content": "a"}]}, "messages[0].role"),
        (
            {"model": "m", "messages": HELLO, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
    ],
)
def test_bad_requests_name_the_field(body: Any, param: str | None) -> None:
    with pytest.raises(openai_wire.WireError) as info:
        openai_wire.parse_chat_request(body)
    assert info.value.param == param
    error = openai_errors.from_wire_error(info.value)
    assert error.status == 400 and error.body["error"]["param"] == param


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    ],
)
def test_statuses_map_to_openai_errors(code: grpc.StatusCode, status: int, error_type: str) -> None:
    error = openai_errors.from_rpc_error(rpc_error(code, "why"))
    assert (error.status, error.body["error"]["type"], error.body["error"]["message"]) == (
        status,
        error_type,
        "why",
    )


def test_internal_details_never_reach_the_client() -> None:
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        error = openai_errors.from_rpc_error(
            rpc_error(code, 'Traceback (most recent call last): File "x.py"')
        )
        assert error.status == 502
        assert error.body["error"]["message"] == openai_errors.UPSTREAM_FAILED_MESSAGE


def test_pushback_becomes_retry_after_rounded_up() -> None:
    shed = openai_errors.from_rpc_error(
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, AT_CAPACITY_MESSAGE, "1200")
    )
    assert (shed.status, shed.retry_after_s, shed.body["error"]["code"]) == (429, 2, "at_capacity")
    limited = openai_errors.from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit", "5"))
    assert (limited.retry_after_s, limited.body["error"]["code"]) == (1, "rate_limit_exceeded")


def test_validation_messages_name_the_http_field() -> None:
    renames = {"max_tokens": "max_completion_tokens", "affinity_key": "x-session-id"}
    for details, param in [
        ("messages[3].content must not be empty", "messages[3].content"),
        ("max_tokens is 9000; the limit is 4096", "max_completion_tokens"),
        ("affinity_key is 300 bytes; the limit is 256", "x-session-id"),
        ("model 'gpt-17' is not served; available: m", "model"),
        ("the prompt is too long", None),
    ]:
        error = openai_errors.from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, details), renames)
        assert error.body["error"]["param"] == param, details


def test_affinity_keys_follow_the_conversation_prefix_and_the_tenant() -> None:
    def msgs(*pairs: tuple[str, str]) -> list[common_pb2.Message]:
        return [common_pb2.Message(role=r, content=c) for r, c in pairs]

    first = affinity.conversation_key(msgs(("system", "s"), ("user", "hello")))
    later = affinity.conversation_key(
        msgs(("system", "s"), ("user", "hello"), ("assistant", "hi"), ("user", "more"))
    )
    assert first == later and first
    assert affinity.conversation_key(msgs(("system", "t"), ("user", "hello"))) != first
    assert affinity.conversation_key(msgs(("user", "hello"))) != first

    pinned = affinity.placement_session_id("acme", first)
    assert pinned.startswith(affinity.PREFIX) and pinned == affinity.placement_session_id("acme", first)
    assert affinity.placement_session_id("other", first) != pinned
    assert affinity.placement_session_id("acme", "") == ""
    # Client text never reaches a Redis key name as such.
    assert "{" not in affinity.placement_session_id("acme", "}{evil")
