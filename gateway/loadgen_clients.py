"""`kvgate bench load`: one attempt at one turn, over gRPC (ChatClient) or the OpenAI HTTP API.

A client only streams and classifies; whether to retry, and what the run makes of it, is the
runner's business (gateway.loadgen). Classification follows what the gateway promises:
- UNAVAILABLE (gRPC), 5xx or a dropped connection (HTTP): the turn can be sent again (a gateway
  replica died, Redis blipped, no worker could finish it) -> "retry";
- RESOURCE_EXHAUSTED / 429: the fleet (or the tenant's rate limit) said no, with a retry hint
  -> "shed";
- anything else is the request's own fault or a bug -> "error", named by its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp
import grpc

from gateway.client import ChatClient
from gateway.openai_http import SESSION_HEADER
from gateway.servicer import AT_CAPACITY_MESSAGE

Status = Literal["ok", "shed", "retry", "error"]

# HTTP error `code`s (gateway.openai_errors) that mean "the service, not the request": send again.
HTTP_RETRYABLE_CODES = frozenset({"unavailable", "upstream_error"})


@dataclass
class Conversation:
    """Client-side state of one trace conversation across its turns."""

    key: str  # the trace's session id
    turns: int  # planned turns in this run
    session_id: str = ""  # gRPC: the gateway session, created with the first turn
    affinity: str = ""  # HTTP: x-session-id (multi-turn only), so turns stay on their KV cache
    # HTTP is stateless: the acknowledged conversation, resent with every turn.
    messages: list[dict[str, str]] = field(default_factory=list)
    trace_covered: int = 0  # trace prompt positions already in the conversation
    context_tokens: int = 0  # tokens of messages + answers so far (for --max-prompt-tokens)


@dataclass
class TurnResult:
    status: Status
    code: str = ""  # why it was not ok: a gRPC status name, an HTTP error code, "connection", ...
    pushback_ms: int | None = None
    shed_reason: str = ""
    parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None  # time.monotonic()
    ended_at: float = 0.0
    gaps: array[float] = field(default_factory=lambda: array("d"))
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    resumed: bool = False
    worker_id: str = ""
    region: str = ""
    engine: str = ""
    cache_hit: bool = False
    turn_index: int | None = None
    _last_delta_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def delta(self, text: str) -> None:
        now = time.monotonic()
        if self._last_delta_at is None:
            self.first_token_at = now
        else:
            self.gaps.append(now - self._last_delta_at)
        self._last_delta_at = now
        self.parts.append(text)

    def fail(self, status: Status, code: str, pushback_ms: int | None = None) -> TurnResult:
        self.status, self.code, self.pushback_ms = status, code, pushback_ms
        return self


class TurnClient(Protocol):
    async def turn(
        self, conv: Conversation, content: str, max_tokens: int, timeout_s: float, idempotency_key: str
    ) -> TurnResult:
        """`idempotency_key` is the same for every attempt at one turn."""
        ...

    async def close(self) -> None: ...


class GrpcTurns:
    """Turns on gateway sessions: the first turn of a conversation creates its session."""

    def __init__(self, address: str, api_key: str, tls_ca: str | None, model: str) -> None:
        self._client = ChatClient(address, api_key=api_key, tls_ca=tls_ca)
        self._model = model

    async def turn(
        self, conv: Conversation, content: str, max_tokens: int, timeout_s: float, idempotency_key: str
    ) -> TurnResult:
        result = TurnResult("ok")
        try:
            if not conv.session_id:
                session = await self._client.create_session(model=self._model, timeout=min(timeout_s, 10))
                conv.session_id = session.session_id
            done = False
            # ChatClient.send is an async generator: closed here, its call is cancelled at once.
            events = self._client.send(
                conv.session_id, content, max_tokens, timeout=timeout_s, idempotency_key=idempotency_key
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        result.delta(event.delta.text)
                    elif kind == "placement":
                        p = event.placement
                        result.worker_id, result.region, result.engine = p.worker_id, p.region, p.engine
                        result.cache_hit = p.cache_hit
                    elif kind == "done":
                        u = event.done.usage
                        result.prompt_tokens, result.cached_tokens = u.prompt_tokens, u.cached_tokens
                        result.completion_tokens, result.resumed = u.completion_tokens, u.resumed
                        result.turn_index = event.done.turn_index
                        done = True
            result.ended_at = time.monotonic()
            if not done:
                return result.fail("error", "NO_DONE")  # a gateway bug: OK status without Done
            return result
        except grpc.aio.AioRpcError as exc:
            result.ended_at = time.monotonic()
            code = exc.code()
            pushback = _pushback_ms(exc.trailing_metadata())
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                result.shed_reason = "at_capacity" if exc.details() == AT_CAPACITY_MESSAGE else "rate_limited"
                return result.fail("shed", code.name, pushback)
            # ABORTED: an earlier attempt at this turn (same idempotency key) is still running.
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                return result.fail("retry", code.name, pushback)
            return result.fail("error", code.name, pushback)

    async def close(self) -> None:
        await self._client.close()


class HttpTurns:
    """Turns through `POST {base}/chat/completions` (streamed SSE, usage in a final chunk)."""

    def __init__(
        self, base_url: str, api_key: str, tls_ca: str | None, model: str, max_in_flight: int
    ) -> None:
        self._base = base_url.rstrip("/")
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        ssl_context: ssl.SSLContext | bool = True
        if tls_ca:
            ssl_context = ssl.create_default_context(cafile=tls_ca)
        # aiohttp pools 100 connections by default; an open-loop run needs one per stream.
        connector = aiohttp.TCPConnector(limit=max_in_flight, ssl=ssl_context)
        self._http = aiohttp.ClientSession(connector=connector)

    async def resolve_model(self) -> str:
        """--model, or the gateway's default (the first of GET /models)."""
        if self._model:
            return self._model
        async with self._http.get(f"{self._base}/models", headers=self._headers) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"GET {self._base}/models: HTTP {response.status}: {_error_message(body)}")
        self._model = str(body["data"][0]["id"])
        return self._model

    async def turn(
        self, conv: Conversation, content: str, max_tokens: int, timeout_s: float, idempotency_key: str
    ) -> TurnResult:
        # HTTP turns carry the whole conversation and store nothing: there is nothing to repeat.
        del idempotency_key
        result = TurnResult("ok")
        body = {
            "model": self._model,
            "messages": [*conv.messages, {"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {**self._headers, SESSION_HEADER: conv.affinity} if conv.affinity else self._headers
        try:
            async with self._http.post(
                f"{self._base}/chat/completions",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if response.status != 200:
                    return _http_failure(result, response.status, await _json(response), response.headers)
                result.worker_id = response.headers.get("x-kvgate-worker", "")
                result.region = response.headers.get("x-kvgate-region", "")
                result.cache_hit = response.headers.get("x-kvgate-cache-hit") == "true"
                finished = await _read_sse(response, result)
            result.ended_at = time.monotonic()
            if result.status != "ok":
                return result
            if not finished:
                return result.fail("retry", "connection")  # the stream ended without [DONE]
            # Stateless API: the client keeps the acknowledged conversation and resends it.
            conv.messages += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": result.text},
            ]
            return result
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            result.ended_at = time.monotonic()
            return result.fail("retry", "connection")
        except TimeoutError:
            result.ended_at = time.monotonic()
            return result.fail("error", "timeout")

    async def close(self) -> None:
        await self._http.close()


async def _read_sse(response: aiohttp.ClientResponse, result: TurnResult) -> bool:
    """Fill `result` from the event stream; True once `data: [DONE]` arrived."""
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            event = json.loads(data)
        except ValueError:
            result.fail("error", "bad_sse")  # not what the facade sends: report, don't crash the run
            return False
        if not isinstance(event, dict):
            result.fail("error", "bad_sse")
            return False
        if "error" in event:
            # Headers were sent, so the gateway reports a late failure as an `error` event.
            code = str(event["error"].get("code") or "error")
            if code in ("at_capacity", "rate_limit_exceeded"):
                result.shed_reason = "at_capacity" if code == "at_capacity" else "rate_limited"
                result.fail("shed", code)
            else:
                result.fail("retry" if code in HTTP_RETRYABLE_CODES else "error", code)
            return False
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                result.delta(text)
        usage = event.get("usage")
        if usage:
            result.prompt_tokens = int(usage.get("prompt_tokens", 0))
            result.completion_tokens = int(usage.get("completion_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            result.cached_tokens = int(details.get("cached_tokens") or 0)
    return False


def _http_failure(result: TurnResult, status: int, body: Any, headers: Any) -> TurnResult:
    code = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code") or "")
    retry_after = headers.get("Retry-After", "")
    pushback = int(retry_after) * 1000 if retry_after.isdigit() else None
    result.ended_at = time.monotonic()
    if status == 429:
        result.shed_reason = "at_capacity" if code == "at_capacity" else "rate_limited"
        return result.fail("shed", code or "http_429", pushback)
    return result.fail("retry" if status >= 500 else "error", code or f"http_{status}", pushback)


async def _json(response: aiohttp.ClientResponse) -> Any:
    with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
        return await response.json(content_type=None)
    return None


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return str(body)[:200]


def _pushback_ms(metadata: Any) -> int | None:
    """grpc-retry-pushback-ms from a call's trailing metadata (pairs of key and value)."""
    for key, value in metadata or ():
        if key == "grpc-retry-pushback-ms" and isinstance(value, str) and value.isdigit():
            return int(value)
    return None


async def sleep_before_retry(attempt: int, pushback_ms: int | None) -> None:
    """Short: the server's hint when it gave one (at most 5 s), else 0.25 s doubling to 2 s."""
    if pushback_ms is not None:
        await asyncio.sleep(min(pushback_ms, 5000) / 1000)
    else:
        await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
