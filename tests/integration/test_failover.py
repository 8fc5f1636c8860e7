"""What users are promised when workers leave: pins move, drains are honoured, streams resume."""

from __future__ import annotations

import asyncio

import grpc

from gpu_worker.sim.tokenizer import SimTokenizer
from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.fleet import Fleet


async def test_session_moves_when_its_pinned_worker_goes_offline(fleet: Fleet) -> None:
    await fleet.start({"a": ("us-east", 4000), "b": ("eu-west", 2000)})
    async with fleet.client() as client:
        session = await client.create_session()
        _, _, first = await client.reply(session.session_id, "hello", max_tokens=8)
        assert first.worker_id == "a"
        await fleet.workers["a"].stop()  # graceful: drains, then says OFFLINE
        await fleet.wait_for_workers({"a": "offline"})
        _, done, second = await client.reply(session.session_id, "still there?", max_tokens=8)
        assert second.worker_id == "b" and not second.cache_hit
        assert done.usage.completion_tokens == 8


async def test_drained_worker_gets_no_new_sessions(fleet: Fleet) -> None:
    await fleet.start({"big": ("us-east", 8000), "small": ("eu-west", 1000)})
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as channel:
        response = await scheduler_pb2_grpc.SchedulerStub(channel).DrainWorker(
            scheduler_pb2.DrainWorkerRequest(worker_id="big")
        )
        assert response.found
    await fleet.wait_for_workers({"big": "draining"})
    async with fleet.client() as client:
        for _ in range(3):
            session = await client.create_session()
            _, _, placement = await client.reply(session.session_id, "hi", max_tokens=4)
            assert placement.worker_id == "small"


async def test_stream_resumes_on_another_worker_when_its_worker_dies_mid_answer(fleet: Fleet) -> None:
    # Slowed down 20x so the kill lands mid-answer.
    await fleet.start({"first": ("us-east", 4000), "second": ("eu-west", 2000)}, time_scale=20.0)
    async with fleet.client() as client:
        session = await client.create_session()
        parts: list[str] = []
        killed = False
        done = None
        async for event in client.send(session.session_id, "tell me a long story", max_tokens=60):
            kind = event.WhichOneof("event")
            if kind == "delta":
                parts.append(event.delta.text)
                if len(parts) == 5 and not killed:
                    killed = True
                    # Abrupt: the gRPC server cancels every open stream, like a crashed process.
                    asyncio.get_running_loop().create_task(fleet.workers["first"].host.server.stop(0))
            elif kind == "done":
                done = event.done
        assert killed and done is not None
        assert done.usage.resumed
        assert done.usage.completion_tokens == 60
        # Nothing repeated, nothing missing: the text is exactly the 60 tokens the workers made
        # between them (the sim tokenizer is the workers' own), ...
        text = "".join(parts)
        assert len(SimTokenizer().encode(text)) == 60
        # ... and the client saw exactly the stored answer.
        stored = await client.get_session(session.session_id)
        assert stored.turns[0].assistant == text
        assert stored.turns[0].worker_id == "second"


async def test_worker_whose_telemetry_stops_turns_stale_then_gets_no_placements(fleet: Fleet) -> None:
    await fleet.start(
        {"silent": ("us-east", 8000), "chatty": ("eu-west", 1000)}, stale_after_s=0.5, dead_after_s=2.0
    )
    big = fleet.workers["silent"]
    # Telemetry stops without an OFFLINE status (a partition, not a crash): age decides.
    assert big.telemetry is not None
    await big.telemetry.fall_silent()
    await fleet.wait_for_workers({"silent": "stale"}, timeout_s=5)
    await fleet.wait_for_workers({"silent": "offline"}, timeout_s=5)
    async with fleet.client() as client:
        session = await client.create_session()
        _, _, placement = await client.reply(session.session_id, "anyone there?", max_tokens=4)
        assert placement.worker_id == "chatty"
