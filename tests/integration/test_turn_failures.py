"""What a client sees when a turn's worker dies before its first token, when the client's
deadline or the client itself ends the turn, and when a worker answers like no worker does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from gpu_worker.server import WorkerService
from gpu_worker.sim.tokenizer import SimTokenizer
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2, telemetry_pb2
from tests.integration.fleet import Fleet


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _until_idle(worker: WorkerService, timeout_s: float = 3.0) -> None:
    """Wait until the worker runs nothing and holds no KV blocks for a request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = worker.engine.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.num_blocks_used == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"worker still busy after {timeout_s}s: {worker.engine.stats()}")


async def test_a_worker_killed_before_the_first_token_is_replaced_invisibly(fleet: Fleet) -> None:
    await fleet.add_worker("survivor-1", "eu-west", num_gpu_blocks=2000)
    await fleet.start_control_plane()
    # A worker process with the most free KV (placement picks it) and a 20x slowed GPU: its
    # prefill of a long prompt takes seconds, time to SIGKILL it before any token.
    doomed = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kvgate.cli", "worker", "--worker-id", "doomed-1", "--region", "us-east",
          "--listen", "127.0.0.1:0", "--mqtt-url", fleet.mqtt_url, "--num-gpu-blocks", "8000",
          "--time-scale", "20", "--stats-interval", "0.1", "--mqtt-keepalive", "2"],
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await fleet.wait_for_workers({"doomed-1": "ready", "survivor-1": "ready"}, timeout_s=30)
        before = _sample("kvgate_gateway_failovers_total", {"after_first_token": "false"})
        async with fleet.client() as client:
            session = await client.create_session()
            kinds: list[str] = []
            placements: list[str] = []
            parts: list[str] = []
            done = None
            async for event in client.send(session.session_id, "word " * 6000, max_tokens=16):
                kind = event.WhichOneof("event") or ""
                kinds.append(kind)
                if kind == "placement":
                    placements.append(event.placement.worker_id)
                    if event.placement.worker_id == "doomed-1":
                        os.kill(doomed.pid, signal.SIGKILL)
                elif kind == "delta":
                    parts.append(event.delta.text)
                elif kind == "done":
                    done = event.done
            # A normal stream: placements, then the answer, then done; nothing resumed.
            assert placements == ["doomed-1", "survivor-1"]
            assert kinds[:2] == ["placement", "placement"] and kinds[-1] == "done"
            assert done is not None and not done.usage.resumed and done.usage.completion_tokens == 16
            text = "".join(parts)
            assert len(SimTokenizer().encode(text)) == 16
            stored = (await client.get_session(session.session_id)).turns
            assert [(t.assistant, t.worker_id) for t in stored] == [(text, "survivor-1")]
        assert _sample("kvgate_gateway_failovers_total", {"after_first_token": "false"}) == before + 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            doomed.kill()
        await doomed.wait()


async def test_a_client_deadline_ends_the_turn_on_the_worker_too(fleet: Fleet) -> None:
    await fleet.start({"deadline-1": ("us-east", 2000)}, time_scale=20.0)
    worker = fleet.workers["deadline-1"]
    async with fleet.client() as client:
        session = await client.create_session()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in client.send(session.session_id, "a long story", max_tokens=400, timeout=1.5):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until_idle(worker)
        assert len((await client.get_session(session.session_id)).turns) == 0


async def test_a_client_that_goes_away_stops_its_turn_on_the_worker_at_once(fleet: Fleet) -> None:
    await fleet.start({"cancel-1": ("us-east", 2000)}, time_scale=20.0)
    worker = fleet.workers["cancel-1"]
    async with fleet.client() as client:
        session = await client.create_session()
        events = client.send(session.session_id, "a long story", max_tokens=400)
        async with contextlib.aclosing(events):
            async for event in events:
                if event.WhichOneof("event") == "delta":
                    assert worker.engine.stats().running == 1
                    break  # closing the stream cancels the call
        await _until_idle(worker, timeout_s=1.0)
        assert len((await client.get_session(session.session_id)).turns) == 0


async def test_a_worker_answering_like_no_worker_does_is_unavailable_to_the_client(fleet: Fleet) -> None:
    await fleet.start_control_plane()
    # The address of a worker that went away now belongs to another gRPC service (here the
    # scheduler): it answers UNIMPLEMENTED, which is the fleet's fault, not the client's.
    await fleet.scheduler.store.ingest_stats(
        telemetry_pb2.WorkerStats(
            worker_id="imposter-1", region="us-east", address=fleet.scheduler.address, model="llama-3-8b",
            engine="sim", state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16,
            num_blocks_total=2000, num_blocks_used=0, seq=int(time.time() * 1000), tokens_per_s=2000.0,
        )
    )  # fmt: skip
    await fleet.wait_for_workers({"imposter-1": "ready"})
    before = _sample("kvgate_gateway_turns_total", {"outcome": "worker_error"})
    assert fleet.gateway is not None
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        request = chat_pb2.SendRequest(
            model="llama-3-8b", messages=[common_pb2.Message(role="user", content="hi")], max_tokens=4
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Send(request, timeout=30):
                pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "the worker serving the turn failed (unimplemented); retry shortly"
    assert dict(info.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms") == "1000"
    assert _sample("kvgate_gateway_turns_total", {"outcome": "worker_error"}) == before + 1
