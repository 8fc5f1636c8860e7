"""Send with an idempotency key: a retried turn is replayed, never stored twice, never run twice."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from gateway import idempotency
from gateway.sessions import Claim, SessionStore
from kvgate.redis_conn import connect_redis
from kvgate.v1 import chat_pb2
from tests.integration.fleet import Fleet
from tests.integration.slow_redis import SlowReplyProxy

# The retry loops below ask again every 0.1 s: more than the free tier's requests per second.
NO_RATE_LIMITS = {"rate_limits": None}


async def _until_not_running(attempt: object, timeout_s: float = 10.0) -> object:
    """Retry `attempt()` while the gateway answers ABORTED (the first attempt is still running)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await attempt()  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_retried_turn_is_replayed_from_history_not_stored_twice(fleet: Fleet) -> None:
    await fleet.start({"idem-a": ("us-east", 2000)})
    async with fleet.client() as client:
        session = await client.create_session()
        text, done, placement = await client.reply(
            session.session_id, "Hello there", max_tokens=12, idempotency_key="turn-1"
        )
        assert not done.replayed and placement.worker_id == "idem-a" and text

        # The client lost the connection before Done and sends the turn again: same answer,
        # marked replayed, no placement, and the history holds it once.
        again, replay_done, replay_placement = await client.reply(
            session.session_id, "Hello there", max_tokens=12, idempotency_key="turn-1"
        )
        assert replay_done.replayed and again == text
        assert replay_done.turn_index == done.turn_index == 0
        assert replay_done.usage.completion_tokens == done.usage.completion_tokens == 12
        assert replay_placement.worker_id == ""
        history = await client.get_session(session.session_id)
        assert [t.user for t in history.turns] == ["Hello there"]

        # A new key is a new turn; the old key with another message is refused, naming the key.
        _, second, _ = await client.reply(
            session.session_id, "Hello there", max_tokens=4, idempotency_key="turn-2"
        )
        assert second.turn_index == 1 and not second.replayed
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "Something else", idempotency_key="turn-1")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "idempotency_key 'turn-1' was already used for another message" in (info.value.details() or "")
        assert len((await client.get_session(session.session_id)).turns) == 2


async def test_a_retry_while_the_first_attempt_runs_waits_for_it(fleet: Fleet) -> None:
    # time_scale 5: a 200-token answer takes a few seconds, long enough to retry during it.
    await fleet.start({"idem-b": ("us-east", 2000)}, time_scale=5.0, gateway_overrides=NO_RATE_LIMITS)
    async with fleet.client() as client:
        session = await client.create_session()
        first = asyncio.create_task(
            client.reply(session.session_id, "Tell me a story", max_tokens=200, idempotency_key="slow")
        )
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "Tell me a story", max_tokens=200, idempotency_key="slow")
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "still running" in (info.value.details() or "")
        pushback = dict(info.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        assert pushback is not None and int(pushback) > 0
        # Past the claim's 3 s lifetime the first attempt still holds it: it renews the claim.
        await asyncio.sleep(idempotency.CLAIM_TTL_S + 0.5)
        assert not first.done()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "Tell me a story", max_tokens=200, idempotency_key="slow")
        assert info.value.code() == grpc.StatusCode.ABORTED

        text, done, _ = await first
        retried = await _until_not_running(
            lambda: client.reply(
                session.session_id, "Tell me a story", max_tokens=200, idempotency_key="slow"
            )
        )
        again, replayed, _ = retried  # type: ignore[misc]
        assert replayed.replayed and again == text and not done.replayed
        assert len((await client.get_session(session.session_id)).turns) == 1


async def test_a_cancelled_attempt_frees_its_key_for_a_real_retry(fleet: Fleet) -> None:
    await fleet.start({"idem-c": ("us-east", 2000)}, time_scale=5.0, gateway_overrides=NO_RATE_LIMITS)
    async with fleet.client() as client:
        session = await client.create_session()
        events = client.send(session.session_id, "Count slowly", max_tokens=200, idempotency_key="cut")
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if event.WhichOneof("event") == "delta":
                    break  # the client goes away mid-answer: nothing is stored
        retried = await _until_not_running(
            lambda: client.reply(session.session_id, "Count slowly", max_tokens=8, idempotency_key="cut")
        )
        text, done, placement = retried  # type: ignore[misc]
        assert not done.replayed and placement.worker_id == "idem-c" and done.usage.completion_tokens == 8
        history = await client.get_session(session.session_id)
        assert [t.assistant for t in history.turns] == [text]


async def test_a_claim_whose_gateway_died_lapses_within_seconds(fleet: Fleet) -> None:
    await fleet.start({"idem-e": ("us-east", 2000)}, gateway_overrides=NO_RATE_LIMITS)
    async with fleet.client() as client:
        session = await client.create_session()
        # A gateway claims the key and dies before storing the turn: nobody renews its claim.
        store_client = connect_redis(fleet.redis_url)
        try:
            dead = await SessionStore(store_client, 3600).claim_turn(
                session.session_id, "orphan", idempotency.CLAIM_TTL_S
            )
        finally:
            await store_client.aclose()
        assert dead.outcome is Claim.CLAIMED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "hello", max_tokens=4, idempotency_key="orphan")
        assert info.value.code() == grpc.StatusCode.ABORTED
        await asyncio.sleep(idempotency.CLAIM_TTL_S + 0.2)
        _, done, _ = await client.reply(session.session_id, "hello", max_tokens=4, idempotency_key="orphan")
        assert not done.replayed and done.usage.completion_tokens == 4


async def test_idempotency_key_is_checked(fleet: Fleet) -> None:
    await fleet.start({"idem-d": ("us-east", 2000)})
    async with fleet.client() as client:
        session = await client.create_session()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "hi", idempotency_key="k" * 129)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "idempotency_key is 129 bytes; the limit is 128"
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        from kvgate.v1 import chat_pb2_grpc, common_pb2

        stub = chat_pb2_grpc.ChatStub(channel)
        stateless = chat_pb2.SendRequest(
            model="llama-3-8b",
            messages=[common_pb2.Message(role="user", content="hi")],
            idempotency_key="k1",
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Send(stateless):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "idempotency_key needs session_id" in (info.value.details() or "")


async def test_a_turn_whose_store_reply_was_lost_is_stored_once(
    fleet: Fleet, slow_proxy: SlowReplyProxy
) -> None:
    await fleet.start(
        {"idem-f": ("us-east", 2000)}, gateway_overrides={"redis_url": slow_proxy.url, **NO_RATE_LIMITS}
    )
    async with fleet.client() as client:
        session = await client.create_session()
        # Redis applies the append, but its answer comes after the gateway's Redis client gave up
        # waiting (2 s); the client sends the append again, which must find the turn stored.
        slow_proxy.hold(b"slow answer", 2.5)
        _, done, _ = await client.reply(session.session_id, "slow answer", max_tokens=4)
        assert done.turn_index == 0
        assert [t.user for t in (await client.get_session(session.session_id)).turns] == ["slow answer"]

        # No answer arrives in time at all: the turn is stored, the gateway cannot know it and
        # says so, and the retry with the same key replays it.
        slow_proxy.hold(b"lost answer", 2.5, times=4)  # every attempt of the Redis client
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.reply(session.session_id, "lost answer", max_tokens=4, idempotency_key="k-lost")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "may not have been saved" in (info.value.details() or "")
        assert "same idempotency_key" in (info.value.details() or "")
        _, replayed, _ = await client.reply(
            session.session_id, "lost answer", max_tokens=4, idempotency_key="k-lost"
        )
        assert replayed.replayed and replayed.turn_index == 1
        history = await client.get_session(session.session_id)
        assert [t.user for t in history.turns] == ["slow answer", "lost answer"]
