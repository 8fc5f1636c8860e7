"""A small async client for the Chat API, for programs and for `kvgate chat`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from kvgate.service import CHANNEL_OPTIONS
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from kvgate.v1.chat_pb2_grpc import ChatAsyncStub


class ChatClient:
    def __init__(
        self,
        address: str,
        api_key: str = "",
        tls_ca: str | None = None,
        client_cert: tuple[str, str] | None = None,
    ) -> None:
        """`tls_ca`: PEM CA file to verify a TLS gateway ("" uses the system roots); `client_cert`:
        (cert, key) PEM files for a gateway that requires mutual TLS."""
        self.address = address
        if tls_ca is None and client_cert is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            cert_chain = key = None
            if client_cert is not None:
                cert_chain, key = (Path(p).read_bytes() for p in client_cert)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=key,
                certificate_chain=cert_chain,
            )
            self._channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub: ChatAsyncStub = chat_pb2_grpc.ChatStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def create_session(
        self,
        model: str = "",
        system_prompt: str = "",
        timeout: float = 10,
        metadata: Mapping[str, str] | None = None,
    ) -> chat_pb2.Session:
        """A new session of `model` (default: the gateway's first); `metadata` is stored with it."""
        return await self._stub.CreateSession(
            chat_pb2.CreateSessionRequest(model=model, system_prompt=system_prompt, metadata=metadata or {}),
            metadata=self._metadata,
            timeout=timeout,
        )

    async def list_models(self, timeout: float = 10) -> list[str]:
        """The models the gateway serves."""
        response = await self._stub.ListModels(
            chat_pb2.ListModelsRequest(), metadata=self._metadata, timeout=timeout
        )
        return list(response.models)

    async def get_session(self, session_id: str, timeout: float = 10) -> chat_pb2.Session:
        return await self._stub.GetSession(
            chat_pb2.GetSessionRequest(session_id=session_id), metadata=self._metadata, timeout=timeout
        )

    async def delete_session(self, session_id: str, timeout: float = 10) -> bool:
        response = await self._stub.DeleteSession(
            chat_pb2.DeleteSessionRequest(session_id=session_id), metadata=self._metadata, timeout=timeout
        )
        return bool(response.deleted)

    async def list_sessions(self, limit: int = 0, timeout: float = 10) -> list[chat_pb2.Session]:
        """The caller's tenant's sessions, most recently updated first (without their turns)."""
        response = await self._stub.ListSessions(
            chat_pb2.ListSessionsRequest(limit=limit), metadata=self._metadata, timeout=timeout
        )
        return list(response.sessions)

    def send(
        self,
        session_id: str,
        content: str,
        max_tokens: int = 0,
        timeout: float | None = 120,
        idempotency_key: str = "",
    ) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        """One turn's events. Send it again with the same `idempotency_key` (e.g. uuid4().hex) after
        a lost connection: a turn the gateway already stored is replayed, never stored twice.

        Closing the stream (`aclose()`, or `contextlib.aclosing` around it) before its end cancels
        the call at once, which stops the turn on the gateway and the worker."""
        request = chat_pb2.SendRequest(
            session_id=session_id, content=content, max_tokens=max_tokens, idempotency_key=idempotency_key
        )
        return self._events(request, timeout)

    def send_messages(
        self,
        messages: Sequence[tuple[str, str]],
        model: str = "",
        max_tokens: int = 0,
        affinity_key: str = "",
        timeout: float | None = 120,
    ) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        """A stateless turn's events: the whole conversation as (role, content) pairs, the user's
        turn last; nothing is stored. `affinity_key` keeps a conversation on the worker holding its
        KV cache (e.g. a conversation id of the caller's)."""
        request = chat_pb2.SendRequest(
            model=model,
            max_tokens=max_tokens,
            affinity_key=affinity_key,
            messages=[common_pb2.Message(role=role, content=content) for role, content in messages],
        )
        return self._events(request, timeout)

    async def _events(
        self, request: chat_pb2.SendRequest, timeout: float | None
    ) -> AsyncGenerator[chat_pb2.SendEvent, None]:
        call = self._stub.Send(request, metadata=self._metadata, timeout=timeout)
        try:
            async for event in call:
                yield event
        finally:
            # A caller that stops reading (closes this generator) ends the turn on the gateway
            # at once, which aborts it on the worker: without this the call would run on.
            call.cancel()

    async def reply(
        self, session_id: str, content: str, max_tokens: int = 0, idempotency_key: str = ""
    ) -> tuple[str, chat_pb2.Done, chat_pb2.Placement]:
        """Send one turn and collect it: (full text, final event, placement; empty for a replay)."""
        return await _collect(self.send(session_id, content, max_tokens, idempotency_key=idempotency_key))

    async def complete(
        self,
        messages: Sequence[tuple[str, str]],
        model: str = "",
        max_tokens: int = 0,
        affinity_key: str = "",
    ) -> tuple[str, chat_pb2.Done, chat_pb2.Placement]:
        """A stateless turn (see send_messages), collected: (full text, final event, placement)."""
        return await _collect(self.send_messages(messages, model, max_tokens, affinity_key))


async def _collect(
    events: AsyncGenerator[chat_pb2.SendEvent, None],
) -> tuple[str, chat_pb2.Done, chat_pb2.Placement]:
    parts: list[str] = []
    done = chat_pb2.Done()
    placement = chat_pb2.Placement()
    async with contextlib.aclosing(events):
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "delta":
                parts.append(event.delta.text)
            elif kind == "placement":
                placement = event.placement  # the last one names the worker that finished the turn
            elif kind == "done":
                done = event.done
    return "".join(parts), done, placement
