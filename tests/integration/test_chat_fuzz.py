"""Property test: whatever a client sends, the Chat service answers with a deliberate status.

Random `SendRequest` and `CreateSessionRequest` contents (control characters, any non-surrogate
unicode, empty, huge, random token limits, roles, session ids and idempotency keys), and the
same requests with random bytes overwritten (invalid UTF-8, broken lengths), go to the real
gateway over a real channel. The answer is OK or one of the statuses the API promises for bad input, never
INTERNAL/UNKNOWN, never a traceback in the details.
"""

from __future__ import annotations

import asyncio

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.validation import Limits
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.integration.fleet import Fleet

MODEL = "llama-3-8b"
# Small token limits keep valid turns quick on the sim worker; larger asks are INVALID_ARGUMENT.
LIMITS = Limits(max_tokens_limit=8, default_max_tokens=4)

characters = st.characters(exclude_categories=("Cs",))  # protobuf strings cannot hold surrogates
texts = st.one_of(
    st.text(characters, max_size=40),
    st.sampled_from(["", " ", "\n\t", "hello", "\x00", "\x1b[31m", "\u202e", "💥" * 3]),
    # Huge: around and over the 32 KiB message limit.
    st.builds(lambda ch, n: ch * n, characters, st.integers(20_000, 70_000)),
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]), texts)
messages = st.lists(st.builds(common_pb2.Message, role=roles, content=texts), max_size=4)
max_tokens = st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))

SEND_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,  # a random session id
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a prompt bigger than the fleet's free KV is shed
}
CREATE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def check(error: grpc.RpcError | None, allowed: set[grpc.StatusCode]) -> None:
    if error is None:
        return
    code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
    assert code in allowed, (code, details[:300])
    assert "Traceback" not in details and 'File "' not in details, details[:300]


def call_send(stub: chat_pb2_grpc.ChatStub, request: chat_pb2.SendRequest) -> grpc.RpcError | None:
    try:
        events = list(stub.Send(request, timeout=30))
    except grpc.RpcError as error:
        return error
    assert events[-1].WhichOneof("event") == "done"
    return None


def call_raw_send(channel: grpc.Channel, request: bytes) -> grpc.RpcError | None:
    try:
        list(channel.unary_stream("/kvgate.v1.Chat/Send")(request, timeout=30))
    except grpc.RpcError as error:
        return error
    return None


async def test_random_requests_never_crash_the_chat_service(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 2000)}, gateway_overrides={"limits": LIMITS, "rate_limits": None})
    assert fleet.gateway is not None
    # A synchronous client in a thread: hypothesis drives plain functions, and the fleet keeps
    # this event loop to itself.
    channel = grpc.insecure_channel(fleet.gateway.address)
    stub = chat_pb2_grpc.ChatStub(channel)
    # Called from a thread too: a blocking call on this loop would wait for itself.
    real_session = (
        await asyncio.to_thread(stub.CreateSession, chat_pb2.CreateSessionRequest(), timeout=10)
    ).session_id
    session_ids = st.one_of(st.just(""), st.just(real_session), texts)

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(
        session_id=session_ids,
        content=texts,
        tokens=max_tokens,
        history=messages,
        model=st.one_of(st.just(MODEL), texts),
        affinity_key=st.one_of(st.just(""), texts),
        system_prompt=texts,
        metadata=st.dictionaries(texts, texts, max_size=40),
        idempotency_key=st.one_of(st.just(""), st.just("k1"), texts),
        corruption=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=3),
    )
    def property_holds(
        session_id: str,
        content: str,
        tokens: int,
        history: list[common_pb2.Message],
        model: str,
        affinity_key: str,
        system_prompt: str,
        metadata: dict[str, str],
        idempotency_key: str,
        corruption: list[tuple[int, int]],
    ) -> None:
        send = chat_pb2.SendRequest(
            session_id=session_id,
            content=content,
            max_tokens=tokens,
            messages=history,
            model=model,
            affinity_key=affinity_key,
            idempotency_key=idempotency_key,
        )
        check(call_send(stub, send), SEND_CODES)
        # The same request with a few bytes overwritten, as a buggy or hostile client would send
        # it: protobuf may refuse it (invalid UTF-8, a broken length); still a deliberate status.
        raw = bytearray(send.SerializeToString())
        for offset, byte in corruption:
            if raw:
                raw[offset % len(raw)] = byte
        check(call_raw_send(channel, bytes(raw)), SEND_CODES)
        create = chat_pb2.CreateSessionRequest(model=model, system_prompt=system_prompt, metadata=metadata)
        try:
            stub.CreateSession(create, timeout=10)
            error = None
        except grpc.RpcError as exc:
            error = exc
        check(error, CREATE_CODES)

    try:
        await asyncio.to_thread(property_holds)
    finally:
        channel.close()
