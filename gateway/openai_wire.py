"""OpenAI chat-completions wire format: parse a request body, build responses. Pure; no I/O.

Only what kvgate can honour is accepted: text messages, one choice, a token limit. Sampling
fields (temperature, top_p, seed, ...) are accepted and ignored so that stock clients work;
features that would silently change the answer's meaning (tools, n > 1, non-text content)
are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from kvgate.v1 import common_pb2

UINT32_MAX = 2**32 - 1
# OpenAI's newer name for the system role; kvgate's chat template knows "system".
ROLE_ALIASES = {"developer": "system"}
FINISH_REASONS = ("stop", "length")

JsonObject = dict[str, Any]


class WireError(Exception):
    """The body is not a chat-completions request kvgate can serve; `param` names the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[common_pb2.Message]
    max_tokens: int  # 0: the gateway's default
    max_tokens_param: str  # the field the client used, for error messages
    stream: bool
    include_usage: bool


def parse_chat_request(body: object) -> ChatRequest:
    if not isinstance(body, dict):
        raise WireError("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise WireError("model is required (a string naming one of GET /v1/models)", "model")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise WireError(f"{unsupported} are not supported by this server", unsupported)
    n = body.get("n")
    if n is not None and n != 1:
        raise WireError("n must be 1: this server returns one choice", "n")
    max_tokens, max_tokens_param = _max_tokens(body)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise WireError("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise WireError("stream_options must be an object", "stream_options")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise WireError("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return ChatRequest(
        model=_encodable(model, "model"),
        messages=_messages(body.get("messages")),
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        stream=stream,
        include_usage=include_usage,
    )


def _max_tokens(body: JsonObject) -> tuple[int, str]:
    # max_completion_tokens is the current name; max_tokens the deprecated one. Either works.
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= UINT32_MAX:
            raise WireError(f"{param} must be a positive integer", param)
        return value, param
    return 0, "max_tokens"


def _messages(raw: object) -> list[common_pb2.Message]:
    # Only the JSON shape is checked here; roles, emptiness and sizes are the Chat service's
    # validation (one code path for gRPC and HTTP), and its messages name the same fields.
    if not isinstance(raw, list) or not raw:
        raise WireError("messages must be a non-empty array of {role, content} objects", "messages")
    messages: list[common_pb2.Message] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise WireError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = item.get("role")
        if not isinstance(role, str):
            raise WireError(f"messages[{i}].role must be a string", f"messages[{i}].role")
        content = _encodable(_text(item.get("content"), f"messages[{i}].content"), f"messages[{i}].content")
        role = _encodable(role, f"messages[{i}].role")
        messages.append(common_pb2.Message(role=ROLE_ALIASES.get(role, role), content=content))
    return messages


def _text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise WireError(f"{param}[{j}]: only text content parts are supported", f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise WireError(f"{param} must be a string or an array of text parts", param)


def _encodable(text: str, param: str) -> str:
    """`text`, unless JSON smuggled in a lone surrogate (e.g. "\\ud800"), which UTF-8 cannot carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WireError(
            f"{param} is not valid UTF-8 (lone surrogate U+{ord(text[exc.start]):04X} at offset {exc.start})",
            param,
        ) from None
    return text


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def finish_reason(reason: str) -> str:
    # Workers say "stop" or "length"; anything else (an engine's own word) reads as a stop.
    return reason if reason in FINISH_REASONS else "stop"


def usage(u: common_pb2.Usage) -> JsonObject:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def chunk(
    cid: str,
    created: int,
    model: str,
    delta: JsonObject | None,
    reason: str | None = None,
    usage_json: JsonObject | None = None,
) -> JsonObject:
    """One `chat.completion.chunk`; `delta=None` is the usage-only chunk (no choices)."""
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    )
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_json,
    }


def completion(cid: str, created: int, model: str, text: str, reason: str, u: common_pb2.Usage) -> JsonObject:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(reason),
            }
        ],
        "usage": usage(u),
    }


def models(names: list[str], created: int) -> JsonObject:
    return {"object": "list", "data": [model(name, created) for name in names]}


def model(name: str, created: int) -> JsonObject:
    return {"id": name, "object": "model", "created": created, "owned_by": "kvgate"}


def error(message: str, error_type: str, param: str | None = None, code: str | None = None) -> JsonObject:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
