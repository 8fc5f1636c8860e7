"""gRPC `Chat` service: sessions, validation, and streaming one assistant turn per Send.

Every call is admitted by the Gate first (API key -> tenant and tier, rate limits). Sessions
are the caller's tenant's only; a quarantined key's turns go to the canned Meower instead of
the fleet.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc
import redis.exceptions

from gateway import affinity, idempotency, prompt
from gateway.aborts import REDIS_DOWN_RETRY_MS, abort, abort_with_pushback, redis_down
from gateway.auth import Caller
from gateway.gate import Gate
from gateway.idempotency import RunningTurn
from gateway.metrics import IN_FLIGHT_TURNS, TTFT_SECONDS, TURNS
from gateway.refunds import RefundUnlessServed
from gateway.relay import AtCapacity, PlacementUnavailable, Runner, TurnJob, TurnProgress, TurnRejected
from gateway.sessions import Claim, SessionGone, SessionStore, TurnClaim, new_turn_id, now_ms
from gateway.validation import Limits, check_max_tokens, check_messages, check_metadata, check_text, quoted
from gateway.worker_errors import worker_failure
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

# A failed append may have been applied with only its reply lost: the client is told how to retry
# without storing the turn twice.
NOT_SAVED_MESSAGE = (
    "the reply may not have been saved (session store unavailable); send the turn again with the "
    "same idempotency_key: it is replayed if it was saved, run again if not"
)
NOT_SAVED_NO_KEY_MESSAGE = (
    "the reply may not have been saved (session store unavailable); check the session's history "
    "(GetSession) before sending the turn again, or send turns with an idempotency_key"
)

AT_CAPACITY_MESSAGE = "kvgate is at capacity right now; retry after the pushback delay"


class ChatServicer(chat_pb2_grpc.ChatServicer):
    def __init__(
        self,
        sessions: SessionStore,
        runner: Runner,
        models: Sequence[str],
        limits: Limits,
        gate: Gate,
        quarantine: Runner,
    ) -> None:
        self._sessions = sessions
        self._runner = runner
        self._models = list(models)
        self._limits = limits
        self._gate = gate
        self._quarantine = quarantine

    async def CreateSession(
        self, request: chat_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.Session:
        caller = await self._gate.admit(context)
        model = request.model or self._models[0]
        if model not in self._models:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model {quoted(model)} is not served; available: {', '.join(self._models)}",
            )
        problem = check_text(
            "system_prompt", request.system_prompt, self._limits.max_system_prompt_bytes, required=False
        )
        if not problem:
            problem = check_metadata(request.metadata, self._limits)
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            return await self._sessions.create(
                caller.tenant, model, request.system_prompt, dict(request.metadata)
            )
        except redis.exceptions.RedisError:
            await redis_down(context)

    async def GetSession(
        self, request: chat_pb2.GetSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.Session:
        caller = await self._gate.admit(context)
        return await self._load(caller, request.session_id, context)

    async def DeleteSession(
        self, request: chat_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.DeleteSessionResponse:
        caller = await self._gate.admit(context)
        await self._load(caller, request.session_id, context)
        try:
            deleted = await self._sessions.delete(caller.tenant, request.session_id)
            return chat_pb2.DeleteSessionResponse(deleted=deleted)
        except redis.exceptions.RedisError:
            await redis_down(context)

    async def ListSessions(
        self, request: chat_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.ListSessionsResponse:
        caller = await self._gate.admit(context)
        limit = min(request.limit or 50, 1000)
        try:
            sessions = await self._sessions.list_recent(caller.tenant, limit)
            return chat_pb2.ListSessionsResponse(sessions=sessions)
        except redis.exceptions.RedisError:
            await redis_down(context)

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.ListModelsResponse:
        # Admitted like every call: the model list is for key holders only.
        await self._gate.admit(context)
        return chat_pb2.ListModelsResponse(models=self._models)

    async def _load(
        self, caller: Caller, session_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> chat_pb2.Session:
        if not session_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        try:
            # Another tenant's session is None too: the same NOT_FOUND as one that never existed.
            session = await self._sessions.get(caller.tenant, session_id)
        except redis.exceptions.RedisError:
            await redis_down(context)
        if session is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"session_id {quoted(session_id)} not found")
        return session

    async def Send(
        self, request: chat_pb2.SendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        # Counted as a request before any work (even one that turns out invalid); its tokens are
        # charged below, once the prompt is known.
        caller = await self._gate.admit(context)
        session, messages = await self._conversation(caller, request, context)
        max_tokens = request.max_tokens or self._limits.default_max_tokens
        problem = check_max_tokens(max_tokens, self._limits)
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        running = None
        if session is not None and request.idempotency_key:
            claim = await self._claim(caller, session, request, context)
            if claim.outcome is Claim.STORED:
                if claim.turn_index >= len(session.turns):  # stored after the session was read
                    session = await self._load(caller, session.session_id, context)
                stored = session.turns[claim.turn_index]
                if stored.user != request.content:
                    await abort(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"idempotency_key {quoted(request.idempotency_key)} was already used for "
                        f"another message in this session (turn {claim.turn_index})",
                    )
                TURNS.labels(outcome="replayed").inc()
                for event in idempotency.replay(session, claim.turn_index):
                    yield event
                return
            running = RunningTurn(self._sessions, session.session_id, request.idempotency_key, claim.token)
        try:
            # aclosing, here and below: a client going away closes this stream, and the turn's
            # own stream (down to the worker's call) must end now, not when it is garbage collected.
            async with contextlib.aclosing(
                self._run_turn(caller, request, session, messages, max_tokens, running, context)
            ) as events:
                async for event in events:
                    yield event
        finally:
            if running is not None:
                await running.release()

    async def _claim(
        self,
        caller: Caller,
        session: chat_pb2.Session,
        request: chat_pb2.SendRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> TurnClaim:
        try:
            claim = await self._sessions.claim_turn(
                session.session_id, request.idempotency_key, idempotency.CLAIM_TTL_S
            )
        except redis.exceptions.RedisError:
            await redis_down(context)
        if claim.outcome is Claim.RUNNING:
            await abort_with_pushback(
                context,
                grpc.StatusCode.ABORTED,
                "a turn with this idempotency_key is still running; retry after the pushback delay",
                idempotency.RUNNING_RETRY_MS,
            )
        return claim

    async def _run_turn(
        self,
        caller: Caller,
        request: chat_pb2.SendRequest,
        session: chat_pb2.Session | None,
        messages: list[common_pb2.Message],
        max_tokens: int,
        running: RunningTurn | None,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        remaining = context.time_remaining()
        job = TurnJob(
            # A stateless turn with an affinity key is placed like a session (pinned to the worker
            # holding its KV cache) but nothing is stored for it.
            session_id=session.session_id
            if session
            else affinity.placement_session_id(caller.tenant, request.affinity_key),
            model=session.model if session else self._model(request),
            tier=caller.tier,
            messages=messages,
            prompt_tokens_estimate=prompt.estimate_tokens(messages),
            max_tokens=max_tokens,
            deadline=time.monotonic() + remaining if remaining is not None else None,
            first_turn=session is not None and not session.turns,
            last_worker=session.turns[-1].worker_id if session and session.turns else "",
        )
        # Charged at admission for the most the turn can cost: prompt plus every allowed token;
        # before the prompt's blocks are hashed (the relay's first step). Given back if the turn
        # ends without being served.
        charged = job.prompt_tokens_estimate + job.max_tokens
        await self._gate.charge(context, caller, requests=0, tokens=charged)
        runner = RefundUnlessServed(
            self._quarantine if caller.quarantined else self._runner, self._gate, caller, charged
        )
        progress = TurnProgress()
        in_flight = IN_FLIGHT_TURNS.labels(tier=caller.tier)
        in_flight.inc()
        try:
            async with contextlib.aclosing(runner.stream(job, progress)) as events:
                async for event in events:
                    yield event
        except AtCapacity as exc:
            TURNS.labels(outcome="shed").inc()
            await abort_with_pushback(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, AT_CAPACITY_MESSAGE, exc.retry_after_ms
            )
        except PlacementUnavailable as exc:
            TURNS.labels(outcome="unavailable").inc()
            await abort_with_pushback(context, grpc.StatusCode.UNAVAILABLE, str(exc), exc.retry_after_ms)
        except TurnRejected as exc:
            TURNS.labels(outcome="invalid").inc()
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.aio.AioRpcError as exc:
            # A worker status the relay does not fail over on: the client gets its own reading.
            failure = worker_failure(exc)
            TURNS.labels(outcome=failure.outcome).inc()
            if failure.retry_after_ms is None:
                await abort(context, failure.code, failure.message)
            await abort_with_pushback(context, failure.code, failure.message, failure.retry_after_ms)
        finally:
            in_flight.dec()

        finished = time.monotonic()
        ttft = (progress.first_token_at or finished) - progress.started_at
        TTFT_SECONDS.observe(ttft)
        usage = common_pb2.Usage(
            prompt_tokens=progress.prompt_tokens,
            cached_tokens=progress.cached_tokens,
            completion_tokens=progress.completion_tokens,
            ttft_s=ttft,
            total_s=finished - progress.started_at,
            resumed=progress.resumed,
        )
        turn_index = 0
        if session is not None:
            turn = chat_pb2.Turn(
                user=request.content,
                assistant=progress.text,
                finish_reason=progress.finish_reason,
                usage=usage,
                worker_id=progress.worker_id,
                created_unix_ms=now_ms(),
            )
            try:
                # Durable before acknowledged: Done is sent only once the turn is stored. The turn id
                # makes the store's retry of an append whose reply was lost a no-op.
                turn_index = await self._sessions.append_turn(
                    caller.tenant, session.session_id, turn, request.idempotency_key or new_turn_id()
                )
                if running is not None:
                    running.stored = True
            except SessionGone:
                TURNS.labels(outcome="session_gone").inc()
                await abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"session_id {quoted(session.session_id)} was deleted while the turn ran; "
                    "the reply was not stored",
                )
            except redis.exceptions.RedisError:
                TURNS.labels(outcome="not_saved").inc()
                await abort_with_pushback(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    NOT_SAVED_MESSAGE if request.idempotency_key else NOT_SAVED_NO_KEY_MESSAGE,
                    REDIS_DOWN_RETRY_MS,
                )
        TURNS.labels(outcome="ok").inc()
        yield chat_pb2.SendEvent(
            done=chat_pb2.Done(
                finish_reason=progress.finish_reason,
                usage=usage,
                session_id=session.session_id if session else "",
                turn_index=turn_index,
            )
        )

    async def _conversation(
        self, caller: Caller, request: chat_pb2.SendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[chat_pb2.Session | None, list[common_pb2.Message]]:
        if request.session_id:
            if request.messages:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "messages must be empty when session_id is set (the session holds the history)",
                )
            problem = check_text("content", request.content, self._limits.max_message_bytes)
            if not problem and request.affinity_key:
                problem = "affinity_key must be empty when session_id is set (the session is pinned)"
            if not problem:
                problem = check_text(
                    "idempotency_key",
                    request.idempotency_key,
                    self._limits.max_idempotency_key_bytes,
                    required=False,
                )
            if problem:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            session = await self._load(caller, request.session_id, context)
            return session, prompt.conversation(session, request.content)
        problem = check_messages(request.messages, self._limits)
        if not problem and request.content:
            problem = "content must be empty in stateless mode: put the user turn last in messages"
        if not problem and request.idempotency_key:
            problem = (
                "idempotency_key needs session_id: a stateless turn is never stored, "
                "so a retry cannot repeat it"
            )
        if not problem:
            problem = check_text(
                "affinity_key", request.affinity_key, self._limits.max_affinity_key_bytes, required=False
            )
        if not problem and self._model(request) not in self._models:
            problem = f"model {quoted(request.model)} is not served; available: {', '.join(self._models)}"
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        return None, list(request.messages)

    def _model(self, request: chat_pb2.SendRequest) -> str:
        """A stateless turn's model: as for CreateSession, none named means the first served."""
        return request.model or self._models[0]
