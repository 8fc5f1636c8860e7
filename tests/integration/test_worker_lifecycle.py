"""Worker liveness as the fleet sees it: last-will on SIGKILL, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiomqtt
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker import telemetry
from kvgate import cli, topics
from kvgate.containers import MosquittoServer
from kvgate.mqtt_url import MqttUrl
from kvgate.service import LIVENESS_SERVICE
from kvgate.v1 import telemetry_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.fleet import Fleet

OFFLINE = telemetry_pb2.WORKER_LIFECYCLE_OFFLINE
READY = telemetry_pb2.WORKER_LIFECYCLE_READY


async def _wait_status(broker: MqttUrl, worker_id: str, want: int, timeout_s: float) -> float:
    """Seconds until the retained status topic says `want`."""
    started = time.monotonic()
    async with aiomqtt.Client(hostname=broker.host, port=broker.port) as client:
        await client.subscribe(topics.topic(worker_id, topics.STATUS), qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if telemetry_pb2.WorkerStatus.FromString(message.payload).state == want:
                    return time.monotonic() - started
    raise AssertionError("unreachable")


async def test_sigkilled_worker_is_offline_in_the_broker_within_keepalive(
    mosquitto_server: MosquittoServer,
) -> None:
    broker = MqttUrl.parse(mosquitto_server.url)
    keepalive = 2
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kvgate.cli", "worker", "--worker-id", "doomed", "--region", "us-east",
          "--listen", "127.0.0.1:0", "--mqtt-url", mosquitto_server.url, "--mqtt-keepalive", str(keepalive)],
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_status(broker, "doomed", READY, timeout_s=30)
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        # The broker fires the last-will after 1.5 x keepalive without a packet.
        elapsed = await _wait_status(broker, "doomed", OFFLINE, timeout_s=keepalive * 1.5 + 5)
        assert elapsed <= keepalive * 1.5 + 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_draining_worker_refuses_new_requests_and_finishes_in_flight(fleet: Fleet) -> None:
    worker = await fleet.add_worker("drainer", "us-east", time_scale=5.0)
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.GenerateRequest(
            request_id="in-flight", messages=[{"role": "user", "content": "hello"}], max_tokens=40
        )
        stream = stub.Generate(request)
        first = await stream.read()
        assert isinstance(first, worker_pb2.GenerateChunk)

        await stub.Drain(worker_pb2.DrainRequest())
        refused = stub.Generate(
            worker_pb2.GenerateRequest(request_id="late", messages=request.messages, max_tokens=4)
        )
        try:
            await refused.read()
            raise AssertionError("a draining worker accepted a new request")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "draining" in (exc.details() or "")

        # Readiness probes see the drain too.
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(50):
            status = (await health.Check(health_pb2.HealthCheckRequest())).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ... while liveness probes must not kill it mid-drain.
        alive = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
        assert alive.status == health_pb2.HealthCheckResponse.SERVING

        tokens = first.num_tokens
        finished = False
        while (chunk := await stream.read()) is not grpc.aio.EOF:
            assert isinstance(chunk, worker_pb2.GenerateChunk)
            tokens += chunk.num_tokens
            finished = finished or chunk.finished
        assert finished and tokens == 40


async def test_cancelled_stream_frees_its_kv_blocks_at_once(fleet: Fleet) -> None:
    worker = await fleet.add_worker("canceller", "us-east", time_scale=5.0)
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        call = stub.Generate(
            worker_pb2.GenerateRequest(
                request_id="to-cancel", messages=[{"role": "user", "content": "word " * 500}], max_tokens=500
            )
        )
        await call.read()
        assert worker.engine.stats().num_blocks_used > 0
        call.cancel()
        for _ in range(50):
            if worker.engine.stats().num_blocks_used == 0:
                break
            await asyncio.sleep(0.02)
        stats = worker.engine.stats()
        assert stats.num_blocks_used == 0 and stats.running == 0 and stats.waiting == 0


async def test_a_stale_offline_after_ready_is_corrected_by_the_workers_status_refresh(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A last-will of a previous connection can reach the broker after the restarted worker's
    # READY; the worker re-sends its status, so the scheduler takes it back.
    monkeypatch.setattr(telemetry, "STATUS_REFRESH_S", 3.0)  # > the 1 s OFFLINE confirmation
    await fleet.start({"stale-will-1": ("us-east", 2000)})
    stale = telemetry_pb2.WorkerStatus(worker_id="stale-will-1", state=OFFLINE)
    broker = MqttUrl.parse(fleet.mqtt_url)
    async with aiomqtt.Client(hostname=broker.host, port=broker.port) as client:
        await client.publish(
            topics.topic("stale-will-1", topics.STATUS), stale.SerializeToString(), qos=1, retain=True
        )
    # Without the refresh the OFFLINE is applied after its 1 s confirmation and sticks; with it,
    # the worker is back (or never left, if a refresh came within that second).
    await asyncio.sleep(1.5)
    await fleet.wait_for_workers({"stale-will-1": "ready"}, timeout_s=10)
    assert await _wait_status(broker, "stale-will-1", READY, timeout_s=5) >= 0  # retained is READY again


async def test_kvgate_drain_takes_a_worker_out_of_placement_through_the_scheduler(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    await fleet.start({"keep-1": ("us-east", 2000), "drain-1": ("eu-west", 2000)})
    drain = ["drain", "--scheduler", fleet.scheduler.address]
    assert await asyncio.to_thread(cli.main, [*drain, "drain-1"]) == 0
    assert "drain-1: draining" in capsys.readouterr().out
    # The worker heard of it (it refuses new requests), and the scheduler places elsewhere.
    assert fleet.workers["drain-1"].servicer.draining
    await fleet.wait_for_workers({"drain-1": "draining", "keep-1": "ready"})
    async with fleet.client() as client:
        for _ in range(4):
            session = await client.create_session()
            _, _, placement = await client.reply(session.session_id, "hello", max_tokens=2)
            assert placement.worker_id == "keep-1"
    assert await asyncio.to_thread(cli.main, [*drain, "no-such-worker"]) == 1
    assert "no worker 'no-such-worker'" in capsys.readouterr().err
