"""`kvgate gateway` as a real process: SIGTERM drains it gracefully, for gRPC and HTTP clients."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import AsyncOpenAI

from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from tests.integration.fleet import Fleet

GRACE_S = 15.0
MODEL = "llama-3-8b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_serving(address: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"gateway at {address} not serving within {timeout_s}s")


async def test_sigterm_stops_admitting_and_lets_streams_finish(fleet: Fleet, tmp_path: Path) -> None:
    # ~20x slower than an H100: a 20-token reply takes a few seconds, outliving the SIGTERM.
    await fleet.add_worker("slow-1", "us-east", time_scale=20.0)
    scheduler = await fleet.start_scheduler()
    await fleet.wait_for_workers({"slow-1": "ready"})
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "kvgate.cli", "gateway", "--listen", grpc_address,
          "--http-listen", f"127.0.0.1:{http_port}", "--scheduler", scheduler.address,
          "--redis-url", fleet.redis_url, "--auth", "off", "--grace", str(GRACE_S)],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        await wait_serving(grpc_address)
        async with (
            grpc.aio.insecure_channel(grpc_address) as channel,
            AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x", max_retries=0) as oai,
        ):
            chat = chat_pb2_grpc.ChatStub(channel)
            hello = [common_pb2.Message(role="user", content="Tell me a long story.")]
            grpc_stream = chat.Send(chat_pb2.SendRequest(model=MODEL, messages=hello, max_tokens=20))
            http_stream = await oai.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Another story"}],
                max_tokens=20,
                stream=True,
            )
            grpc_events = [await grpc_stream.read() for _ in range(2)]  # placement, first delta
            http_chunks = [await anext(aiter(http_stream))]
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            os.kill(proc.pid, signal.SIGTERM)
            terminated = time.monotonic()
            # Load balancers hear NOT_SERVING at once.
            update = await asyncio.wait_for(watch.read(), 2)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

            # No new turns, on either protocol.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in chat.Send(chat_pb2.SendRequest(model=MODEL, messages=hello, max_tokens=4)):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(openai.APIConnectionError):
                await oai.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "late"}], max_tokens=4
                )

            # The turns in flight finish in full.
            while (event := await grpc_stream.read()) is not grpc.aio.EOF:
                grpc_events.append(event)
            http_chunks += [chunk async for chunk in http_stream]
        assert grpc_events[-1].done.usage.completion_tokens == 20
        assert [c.finish_reason for chunk in http_chunks for c in chunk.choices if c.finish_reason] == [
            "length"
        ]
        assert time.monotonic() - terminated > 0.5  # they really were in flight at SIGTERM

        assert await asyncio.wait_for(proc.wait(), GRACE_S + 5) == 0
        assert time.monotonic() - terminated < GRACE_S
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        print((tmp_path / "gateway.log").read_text()[-3000:])
