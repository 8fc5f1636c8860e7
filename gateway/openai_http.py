"""OpenAI-compatible HTTP facade: `/v1/chat/completions` and `/v1/models` over the Chat service.

Design choice: the facade is a thin translator. It runs inside the gateway process (aiohttp,
on `--http-listen`) and calls the gateway's own gRPC `Chat` service over a loopback channel,
forwarding the client's `Authorization` header as the `authorization` metadata. So exactly one
code path — the Chat servicer — enforces API keys, tiers, rate limits, quarantine, validation,
placement and failover for both protocols; the facade only maps JSON to `SendRequest` (stateless
mode: the client sends the whole conversation) and gRPC statuses to HTTP ones
(`gateway.openai_errors`). The loopback hop costs a local HTTP/2 frame per message, far below
the token pace.

Affinity: an OpenAI client resends the conversation each turn and has no session. The facade
sets `SendRequest.affinity_key` from the `x-session-id` header or, without it, from the
conversation's fixed prefix (system prompt + first user message), so follow-up turns are
pinned to the worker that holds their KV cache. Responses carry `x-kvgate-worker`,
`x-kvgate-region` and `x-kvgate-cache-hit`; a stream's headers wait for the first token (the
placement comes before it, and again after a failover) so that a shed or a request the worker
rejects is still a proper 4xx/5xx instead of an error mid-stream.

On stop the listener closes at once and open responses get the gateway's grace to finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from aiohttp import web

from gateway import affinity, openai_errors, openai_wire
from gateway.openai_errors import HttpError
from gateway.validation import Limits, quoted
from kvgate.service import CHANNEL_OPTIONS
from kvgate.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:
    from kvgate.v1.chat_pb2_grpc import ChatAsyncStub

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
SSE_DONE = b"data: [DONE]\n\n"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_listen(listen: str) -> tuple[str, int]:
    """ "0.0.0.0:8080" / "[::]:8080" -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# JSON may write any character as a \uXXXX escape: 6 bytes for a 1-byte character. Encoders do
# so for more than control characters: Go's encoding/json escapes every <, > and & by default
# (\u003c), so HTML or code stretches 6x; an emoji's 4 UTF-8 bytes are 12 as \ud83d\ude00.
MAX_ESCAPE_STRETCH = 6
# A message's own JSON ({"role": "assistant", "content": ""}, pretty-printed, an optional name).
MESSAGE_JSON_BYTES = 128
BODY_SLACK_BYTES = 64 * 1024


def max_body_bytes(limits: Limits) -> int:
    """The largest request body that can carry a conversation the Chat service accepts, however
    its JSON was escaped. Anything larger cannot be served, so it is not read, let alone parsed;
    the conversation cap (checked by the Chat service on the parsed text) stays the real limit."""
    return (
        MAX_ESCAPE_STRETCH * limits.max_conversation_bytes
        + MESSAGE_JSON_BYTES * limits.max_conversation_messages
        + BODY_SLACK_BYTES
    )


class OpenAIFacade:
    def __init__(
        self,
        listen: str,
        grace_s: float,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.listen = listen
        self._grace_s = grace_s
        self._ssl_context = ssl_context
        self._limits = limits or Limits()
        self._channel: grpc.aio.Channel | None = None
        self._stub: ChatAsyncStub | None = None
        self._runner: web.AppRunner | None = None
        self._started = openai_wire.now_s()
        self.port = 0

    async def start(self, chat_address: str) -> None:
        """Serve HTTP, calling the Chat service at `chat_address` (the gateway's own gRPC port)."""
        self._channel = grpc.aio.insecure_channel(chat_address, options=CHANNEL_OPTIONS)
        self._stub = chat_pb2_grpc.ChatStub(self._channel)
        # Stateless turns carry whole conversations: allow what the largest one accepted takes.
        app = web.Application(client_max_size=max_body_bytes(self._limits), middlewares=[_json_errors])
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        # Cancelling the handler when the client disconnects cancels the gRPC call, and with it
        # the worker's generation: a closed tab stops spending KV.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=self._grace_s)
        await self._runner.setup()
        host, port = split_listen(self.listen)
        await web.TCPSite(self._runner, host, port, ssl_context=self._ssl_context).start()
        self.port = self._runner.addresses[0][1]
        log.info("gateway serving the OpenAI-compatible HTTP API on %s:%d", host, self.port)

    @property
    def address(self) -> str:
        host, _ = split_listen(self.listen)
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.port}"

    async def stop(self) -> None:
        # Stops accepting, closes idle keep-alive connections, waits up to the grace for open
        # responses (streams in flight keep their loopback gRPC calls), then cancels them.
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close()

    @property
    def stub(self) -> ChatAsyncStub:
        assert self._stub is not None, "start() first"
        return self._stub

    async def _models(self, request: web.Request) -> web.Response:
        names, error = await self._served_models(request)
        if error is not None:
            return error_response(error)
        return web.json_response(openai_wire.models(names, self._started))

    async def _model(self, request: web.Request) -> web.Response:
        names, error = await self._served_models(request)
        if error is not None:
            return error_response(error)
        name = request.match_info["model"]
        if name not in names:
            message = f"model {quoted(name)} is not served; available: {', '.join(names)}"
            body = openai_wire.error(message, "invalid_request_error", "model", "model_not_found")
            return error_response(HttpError(404, body))
        return web.json_response(openai_wire.model(name, self._started))

    async def _served_models(self, request: web.Request) -> tuple[list[str], HttpError | None]:
        metadata, error = _metadata(request)
        if error is not None:
            return [], error
        try:
            response = await self.stub.ListModels(chat_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return [], openai_errors.from_rpc_error(exc)
        return list(response.models), None

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            message = (
                f"the request body is over {max_body_bytes(self._limits)} bytes; messages may total "
                f"at most {self._limits.max_conversation_bytes} bytes of content"
            )
            return error_response(
                HttpError(
                    413, openai_wire.error(message, "invalid_request_error", "messages", "invalid_value")
                )
            )
        except (ValueError, UnicodeDecodeError):
            return error_response(
                HttpError(
                    400, openai_wire.error("the request body is not valid JSON", "invalid_request_error")
                )
            )
        try:
            chat = openai_wire.parse_chat_request(body)
        except openai_wire.WireError as exc:
            return error_response(openai_errors.from_wire_error(exc))
        metadata, error = _metadata(request)
        if error is not None:
            return error_response(error)
        session_header = request.headers.get(SESSION_HEADER, "")
        params = {"max_tokens": chat.max_tokens_param, "affinity_key": SESSION_HEADER}
        call = self.stub.Send(
            chat_pb2.SendRequest(
                model=chat.model,
                messages=chat.messages,
                max_tokens=chat.max_tokens,
                affinity_key=session_header or affinity.conversation_key(chat.messages),
            ),
            metadata=metadata,
        )
        try:
            async with contextlib.aclosing(_events(call)) as events:
                placement: chat_pb2.Placement | None = None
                try:
                    first = await anext(events, None)
                    while first is not None and first.HasField("placement"):
                        placement = first.placement
                        first = await anext(events, None)
                except grpc.aio.AioRpcError as exc:
                    return error_response(openai_errors.from_rpc_error(exc, params))
                headers = _placement_headers(placement)
                turn = _Turn(openai_wire.completion_id(), openai_wire.now_s(), chat.model)
                async with contextlib.aclosing(_chain([] if first is None else [first], events)) as rest:
                    if chat.stream:
                        return await turn.stream(request, headers, rest, chat.include_usage, params)
                    return await turn.collect(headers, rest, params)
        finally:
            # No-op once finished; on a disconnect or an error it stops the turn on the worker.
            call.cancel()


class _Turn:
    """One chat completion's response, from the Chat service's events."""

    def __init__(self, cid: str, created: int, model: str) -> None:
        self.cid = cid
        self.created = created
        self.model = model

    async def collect(
        self, headers: dict[str, str], events: AsyncIterator[chat_pb2.SendEvent], params: dict[str, str]
    ) -> web.Response:
        parts: list[str] = []
        try:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    parts.append(event.delta.text)
                elif kind == "done":
                    body = openai_wire.completion(
                        self.cid,
                        self.created,
                        self.model,
                        "".join(parts),
                        event.done.finish_reason,
                        event.done.usage,
                    )
                    return web.json_response(body, headers=headers)
        except grpc.aio.AioRpcError as exc:
            return error_response(openai_errors.from_rpc_error(exc, params))
        return error_response(_ended_early())

    async def stream(
        self,
        request: web.Request,
        headers: dict[str, str],
        events: AsyncIterator[chat_pb2.SendEvent],
        include_usage: bool,
        params: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must not buffer the tokens
            }
        )
        await response.prepare(request)
        # A client gone mid-stream ends the handler: the caller's finally cancels the turn.
        with contextlib.suppress(ConnectionResetError):
            await _send(response, self._chunk({"role": "assistant", "content": ""}))
            try:
                async for event in events:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        await _send(response, self._chunk({"content": event.delta.text}))
                    elif kind == "done":
                        reason = openai_wire.finish_reason(event.done.finish_reason)
                        await _send(response, self._chunk({}, reason))
                        if include_usage:
                            usage = openai_wire.usage(event.done.usage)
                            await _send(response, self._chunk(None, usage_json=usage))
                        await response.write(SSE_DONE)
                        await response.write_eof()
                        return response
                error = _ended_early()
            except grpc.aio.AioRpcError as exc:
                error = openai_errors.from_rpc_error(exc, params)
            # Headers are gone: OpenAI's SDKs raise on an `error` event; no [DONE] follows it.
            await _send(response, error.body)
            await response.write_eof()
        return response

    def _chunk(
        self,
        delta: openai_wire.JsonObject | None,
        reason: str | None = None,
        usage_json: openai_wire.JsonObject | None = None,
    ) -> openai_wire.JsonObject:
        return openai_wire.chunk(self.cid, self.created, self.model, delta, reason, usage_json)


def _metadata(request: web.Request) -> tuple[tuple[tuple[str, str], ...], HttpError | None]:
    authorization = request.headers.get("Authorization", "")
    if not authorization:
        return (), None
    # gRPC metadata values are printable ASCII; anything else cannot be a kvgate key.
    if not (authorization.isascii() and authorization.isprintable()):
        body = openai_wire.error(
            "malformed Authorization header", "authentication_error", None, "invalid_api_key"
        )
        return (), HttpError(401, body)
    return (("authorization", authorization),), None


def _placement_headers(placement: chat_pb2.Placement | None) -> dict[str, str]:
    if placement is None:
        return {}
    return {
        "x-kvgate-worker": placement.worker_id,
        "x-kvgate-region": placement.region,
        "x-kvgate-cache-hit": "true" if placement.cache_hit else "false",
    }


def _ended_early() -> HttpError:
    body = openai_wire.error(openai_errors.UPSTREAM_FAILED_MESSAGE, "server_error", None, "upstream_error")
    return HttpError(502, body)


def error_response(error: HttpError) -> web.Response:
    headers = {} if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return web.json_response(error.body, status=error.status, headers=headers)


async def _send(response: web.StreamResponse, payload: openai_wire.JsonObject) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


async def _events(
    call: grpc.aio.UnaryStreamCall[chat_pb2.SendRequest, chat_pb2.SendEvent],
) -> AsyncGenerator[chat_pb2.SendEvent, None]:
    async for event in call:
        yield event


async def _chain(
    first: list[chat_pb2.SendEvent], rest: AsyncGenerator[chat_pb2.SendEvent, None]
) -> AsyncGenerator[chat_pb2.SendEvent, None]:
    async with contextlib.aclosing(rest):
        for event in first:
            yield event
        async for event in rest:
            yield event


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is OpenAI-shaped JSON; an unexpected one is logged here, never sent."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_type = "server_error" if exc.status >= 500 else "invalid_request_error"
        code = exc.reason.lower().replace(" ", "_")
        return error_response(HttpError(exc.status, openai_wire.error(exc.reason, error_type, None, code)))
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        body = openai_wire.error("internal error", "server_error", None, "internal_error")
        return error_response(HttpError(500, body))
