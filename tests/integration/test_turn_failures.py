"""What a client sees when a turn ends in a way the relay does not fail over."""

from __future__ import annotations

import time

import grpc
import pytest
from prometheus_client import REGISTRY

from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2, telemetry_pb2
from tests.integration.fleet import Fleet


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


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
