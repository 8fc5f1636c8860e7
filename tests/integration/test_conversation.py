"""The foundation path: gateway -> scheduler -> sim worker, over real Redis and Mosquitto."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

import gateway.server
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.integration.fleet import Fleet


async def test_two_turn_conversation_is_placed_by_free_kv_and_pinned(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    places = _record_place_requests(monkeypatch)
    # The eu worker has twice the KV blocks: placement by free KV tokens must choose it.
    await fleet.start({"us-1": ("us-east", 2000), "eu-1": ("eu-west", 4000)})

    async with fleet.client() as client:
        session = await client.create_session(system_prompt="You are a terse assistant.")
        text1, done1, placement1 = await client.reply(
            session.session_id, "Hello, who are you?", max_tokens=24
        )
        text2, done2, placement2 = await client.reply(session.session_id, "Tell me more.", max_tokens=16)

        assert placement1.worker_id == "eu-1"
        assert placement1.region == "eu-west"
        assert placement1.engine == "sim"
        assert not placement1.cache_hit
        assert done1.usage.completion_tokens == 24 and text1.strip()
        # Turn 2 lands on the worker holding the session's KV cache, and reuses it.
        assert placement2.worker_id == "eu-1"
        assert placement2.cache_hit
        assert done2.usage.completion_tokens == 16 and text2.strip()
        assert done2.usage.cached_tokens > 0
        assert done2.usage.prompt_tokens > done1.usage.prompt_tokens
        assert done1.usage.ttft_s > 0

        stored = await client.get_session(session.session_id)
        assert [t.user for t in stored.turns] == ["Hello, who are you?", "Tell me more."]
        assert [t.assistant for t in stored.turns] == [text1, text2]
        assert [t.worker_id for t in stored.turns] == ["eu-1", "eu-1"]
        assert (done1.turn_index, done2.turn_index) == (0, 1)
        # Turn 2's Place named turn 1's worker from the stored history (any scheduler replica
        # can then reserve it in the pin lookup's round trip); turn 1 had none to name.
        assert [(p.first_turn, p.last_worker) for p in places] == [(True, ""), (False, "eu-1")]


def _record_place_requests(monkeypatch: pytest.MonkeyPatch) -> list[scheduler_pb2.PlaceRequest]:
    """The PlaceRequests of gateways started after this call, as they reach the real scheduler."""
    places: list[scheduler_pb2.PlaceRequest] = []

    class RecordingStub(scheduler_pb2_grpc.SchedulerStub):
        def __init__(self, channel: grpc.aio.Channel) -> None:
            super().__init__(channel)
            place = self.Place

            def recording(request: scheduler_pb2.PlaceRequest, **kwargs: Any) -> Any:
                places.append(request)
                return place(request, **kwargs)

            self.Place = recording  # type: ignore[method-assign]

    monkeypatch.setattr(gateway.server.scheduler_pb2_grpc, "SchedulerStub", RecordingStub)
    return places


async def test_bad_input_names_the_field(fleet: Fleet) -> None:
    await fleet.add_worker("us-1", "us-east")
    await fleet.start_control_plane()
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        session = await stub.CreateSession(chat_pb2.CreateSessionRequest())

        async def send_error(request: chat_pb2.SendRequest) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Send(request, timeout=10):
                    pass
            return info.value

        empty = await send_error(chat_pb2.SendRequest(session_id=session.session_id, content="  \n "))
        assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "content" in (empty.details() or "")

        huge = await send_error(chat_pb2.SendRequest(session_id=session.session_id, content="x" * 40_000))
        assert huge.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "content is 40000 bytes" in (huge.details() or "")

        unknown = await send_error(chat_pb2.SendRequest(session_id="no-such-session", content="hi"))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert "session_id" in (unknown.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSession(chat_pb2.CreateSessionRequest(model="gpt-17"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gpt-17" in (info.value.details() or "")

        # Nothing was stored by the rejected turns.
        stored = await stub.GetSession(chat_pb2.GetSessionRequest(session_id=session.session_id))
        assert len(stored.turns) == 0


async def test_turns_show_in_the_latency_and_in_flight_metrics(fleet: Fleet) -> None:
    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    # A worker id of its own: the broker keeps each worker's last (retained) status across tests.
    await fleet.start({"metered": ("us-east", 2000)})
    itl_before = sample("kvgate_worker_itl_seconds_count", {"engine": "sim"})
    ttft_before = sample("kvgate_worker_ttft_seconds_count", {"engine": "sim"})
    async with fleet.client() as client:
        session = await client.create_session()
        seen_in_flight = 0.0
        async for event in client.send(session.session_id, "count the tokens", 24):
            if event.WhichOneof("event") == "delta":
                seen_in_flight = max(
                    seen_in_flight, sample("kvgate_gateway_inflight_turns", {"tier": "free"})
                )
    # Every token after the first is one ITL observation (the gateway's coalescing does not matter).
    assert sample("kvgate_worker_itl_seconds_count", {"engine": "sim"}) - itl_before == 23
    assert sample("kvgate_worker_ttft_seconds_count", {"engine": "sim"}) - ttft_before == 1
    assert seen_in_flight >= 1
    assert sample("kvgate_gateway_inflight_turns", {"tier": "free"}) == 0


async def test_a_stateless_turn_without_a_model_gets_the_default_one_like_a_session(fleet: Fleet) -> None:
    await fleet.start({"us-2": ("us-east", 2000)})
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        session = await stub.CreateSession(chat_pb2.CreateSessionRequest())
        assert session.model == "llama-3-8b"
        request = chat_pb2.SendRequest(messages=[common_pb2.Message(role="user", content="hi")], max_tokens=3)
        events = [event async for event in stub.Send(request, timeout=30)]
        assert events[0].placement.worker_id == "us-2"
        assert events[-1].done.usage.completion_tokens == 3
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Send(chat_pb2.SendRequest(model="gpt-17", messages=request.messages)):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model 'gpt-17' is not served" in (info.value.details() or "")


async def test_the_python_client_covers_models_metadata_and_stateless_turns(fleet: Fleet) -> None:
    await fleet.start({"us-3": ("us-east", 2000), "eu-3": ("eu-west", 2000)})
    async with fleet.client() as client:
        assert await client.list_models() == ["llama-3-8b"]
        session = await client.create_session(metadata={"customer": "acme", "channel": "web"})
        assert dict((await client.get_session(session.session_id)).metadata) == {
            "customer": "acme",
            "channel": "web",
        }
        # Stateless: the caller keeps the conversation; its affinity key keeps it on one worker.
        history = [("system", "Be brief."), ("user", "What is a KV cache?")]
        text, done, first = await client.complete(history, max_tokens=6, affinity_key="conv-42")
        assert text and done.usage.completion_tokens == 6 and not done.session_id
        history += [("assistant", text), ("user", "And a block?")]
        _, again, second = await client.complete(history, max_tokens=6, affinity_key="conv-42")
        assert second.worker_id == first.worker_id and again.usage.cached_tokens > 0
        assert [s.session_id for s in await client.list_sessions()] == [session.session_id]
