"""gRPC statuses from the Chat service as OpenAI-style HTTP errors.

The status, the error `type` and `code` follow OpenAI's API so its SDKs raise the matching
exception (AuthenticationError, RateLimitError, ...); the gRPC retry pushback becomes
`Retry-After`. Internal statuses never leak their details: the client gets a generic 502.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from gateway import openai_wire
from gateway.servicer import AT_CAPACITY_MESSAGE

# Chat service validation messages start with the field they name ("messages[2].content is ...").
_FIELD = re.compile(r"^(messages\[\d+\]\.(?:role|content)|messages|max_tokens|model|affinity_key)\b")

_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    # The gateway itself is stopping (its loopback call was cancelled under it).
    grpc.StatusCode.CANCELLED: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
UPSTREAM_FAILED = (502, "server_error", "upstream_error")
UPSTREAM_FAILED_MESSAGE = "the gateway could not complete the request; retry shortly"


@dataclass(frozen=True)
class HttpError:
    status: int
    body: openai_wire.JsonObject
    retry_after_s: int | None = None


def from_wire_error(exc: openai_wire.WireError) -> HttpError:
    return HttpError(400, openai_wire.error(str(exc), "invalid_request_error", exc.param, "invalid_value"))


def from_rpc_error(exc: grpc.aio.AioRpcError, params: Mapping[str, str] | None = None) -> HttpError:
    """`params` renames the Chat service's field names to the HTTP request's (max_tokens ->
    max_completion_tokens, affinity_key -> the x-session-id header)."""
    code = exc.code()
    status, error_type, error_code = _BY_CODE.get(code, UPSTREAM_FAILED)
    message = exc.details() or code.name.lower()
    if (status, error_type, error_code) == UPSTREAM_FAILED:
        message = UPSTREAM_FAILED_MESSAGE  # INTERNAL/UNKNOWN details are not for clients
    param = None
    if status == 400:
        match = _FIELD.match(message)
        if match:
            param = (params or {}).get(match.group(1), match.group(1))
            if param == "model":
                error_code = "model_not_found"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and message == AT_CAPACITY_MESSAGE:
        error_code = "at_capacity"
    retry_after = _retry_after_s(exc) if status in (429, 503) else None
    return HttpError(status, openai_wire.error(message, error_type, param, error_code), retry_after)


def _retry_after_s(exc: grpc.aio.AioRpcError) -> int | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms" and isinstance(value, str) and value.isdigit():
            # Retry-After is whole seconds: round up so a client never comes back too early.
            return max(1, math.ceil(int(value) / 1000))
    return None
