"""`kvgate bench relay`: what the gateway adds to a token stream, measured side by side.

It starts what it needs (Redis and Mosquitto containers unless given, a scheduler, one fast
sim worker and two gateway processes, identical but for --coalesce-ms) and reports:
- tokens/s relayed by one gateway with coalescing vs per-chunk relay, alternating rounds of
  the same load, medians;
- time to first token through the gateway vs calling the worker directly (p50s, same run);
- the coalescing gateway's RSS while 2,000 streams are open at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from kvgate.bench_util import free_port, print_result, progress
from kvgate.service import CHANNEL_OPTIONS
from kvgate.v1 import chat_pb2, chat_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc

MODEL = "llama-3-8b"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default="", help="Redis (default: a throwaway container)")
    parser.add_argument("--mqtt-url", default="", help="MQTT broker (default: a throwaway container)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per throughput round")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per stream (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per mode (default: %(default)s)"
    )
    parser.add_argument("--open-streams", type=int, default=2000, help="streams held open for the RSS figure")
    parser.add_argument("--time-scale", type=float, default=0.02, help="sim worker slow-down; <1 is faster")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _kvgate(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kvgate.cli", "--log-level", "ERROR", *args], stdout=subprocess.DEVNULL
    )


@contextlib.contextmanager
def _brokers(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if args.redis_url and args.mqtt_url:
        yield args.redis_url, args.mqtt_url
        return
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    from kvgate.containers import MosquittoServer, RedisServer

    redis_server, mqtt_server = RedisServer().start(), MosquittoServer().start()
    try:
        yield args.redis_url or redis_server.url, args.mqtt_url or mqtt_server.url
    finally:
        redis_server.stop()
        mqtt_server.stop()


@dataclass
class Processes:
    worker: str
    gateways: dict[str, tuple[str, int]]  # mode -> (address, pid)
    procs: list[subprocess.Popen[bytes]]


@contextlib.contextmanager
def _services(redis_url: str, mqtt_url: str, time_scale: float) -> Iterator[Processes]:
    sched, worker = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = [
        _kvgate("scheduler", "--listen", sched, "--redis-url", redis_url, "--mqtt-url", mqtt_url),
        _kvgate("worker", "--worker-id", "bench-relay", "--region", "local", "--listen", worker,
                "--mqtt-url", mqtt_url, "--time-scale", str(time_scale), "--max-num-seqs", "512"),
    ]  # fmt: skip
    gateways = {}
    for mode, coalesce in (("coalesced", "15"), ("per_chunk", "0")):
        address = f"127.0.0.1:{free_port()}"
        proc = _kvgate("gateway", "--listen", address, "--scheduler", sched, "--redis-url", redis_url,
                       "--auth", "off", "--rate-limit", "off", "--coalesce-ms", coalesce)  # fmt: skip
        procs.append(proc)
        gateways[mode] = (address, proc.pid)
    try:
        yield Processes(worker, gateways, procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)


def _request(tokens: int, text: str = "Tell me about KV caches.") -> chat_pb2.SendRequest:
    return chat_pb2.SendRequest(
        model=MODEL, max_tokens=tokens, messages=[common_pb2.Message(role="user", content=text)]
    )


async def _stream(stub: Any, request: chat_pb2.SendRequest) -> tuple[int, int, float]:
    """(completion tokens, delta messages, seconds to first delta)."""
    started = time.perf_counter()
    first = 0.0
    deltas = tokens = 0
    async for event in stub.Send(request, timeout=300):
        kind = event.WhichOneof("event")
        if kind == "delta":
            deltas += 1
            if not first:
                first = time.perf_counter() - started
        elif kind == "done":
            tokens = event.done.usage.completion_tokens
    return tokens, deltas, first


async def _wait_ready(address: str) -> None:
    """Until a one-token turn goes through (scheduler sees the worker, gateway is up)."""
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        while True:
            try:
                await _stream(stub, _request(1))
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def _throughput(address: str, streams: int, tokens: int) -> tuple[float, float]:
    """(tokens/s, tokens per client message) for `streams` concurrent streams."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        started = time.perf_counter()
        results = await asyncio.gather(*[_stream(stub, _request(tokens)) for _ in range(streams)])
        elapsed = time.perf_counter() - started
    total = sum(r[0] for r in results)
    return total / elapsed, total / max(1, sum(r[1] for r in results))


async def _ttfts(gateway: str, worker: str, samples: int) -> tuple[list[float], list[float]]:
    via_gateway, direct = [], []
    async with (
        grpc.aio.insecure_channel(gateway, options=CHANNEL_OPTIONS) as g,
        grpc.aio.insecure_channel(worker, options=CHANNEL_OPTIONS) as w,
    ):
        chat, engine = chat_pb2_grpc.ChatStub(g), worker_pb2_grpc.WorkerStub(w)
        for _ in range(samples):
            via_gateway.append((await _stream(chat, _request(4)))[2])
            started = time.perf_counter()
            call = engine.Generate(
                worker_pb2.GenerateRequest(
                    request_id=uuid.uuid4().hex, max_tokens=4,
                    messages=[common_pb2.Message(role="user", content="Tell me about KV caches.")],
                )
            )  # fmt: skip
            async for chunk in call:
                if chunk.text:
                    direct.append(time.perf_counter() - started)
                    break
            call.cancel()
    return via_gateway, direct


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _rss_with_open_streams(address: str, pid: int, count: int, progress: Any) -> tuple[float, int]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        calls = [stub.Send(_request(4000), timeout=300) for _ in range(count)]
        opened = 0

        async def first_event(call: Any) -> None:
            nonlocal opened
            with contextlib.suppress(grpc.aio.AioRpcError, StopAsyncIteration):
                await call.read()
                opened += 1

        readers = [asyncio.create_task(first_event(c)) for c in calls]
        await asyncio.sleep(5)  # every call reaches the gateway; admitted ones start streaming
        progress(f"{count} streams open ({opened} already streaming); sampling gateway RSS")
        samples = []
        for _ in range(3):
            samples.append(_rss_mb(pid))
            await asyncio.sleep(0.5)
        rss = max(samples)
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        return rss, count


async def run_bench(args: argparse.Namespace, procs: Processes, progress: Any) -> dict[str, Any]:
    for address, _ in procs.gateways.values():
        await _wait_ready(address)
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in procs.gateways}
    for round_no in range(args.rounds):
        for mode, (address, _) in procs.gateways.items():
            progress(
                f"round {round_no + 1}/{args.rounds}: {mode}, {args.streams} streams x {args.tokens} tokens"
            )
            results[mode].append(await _throughput(address, args.streams, args.tokens))
    coalesced = statistics.median(r[0] for r in results["coalesced"])
    per_chunk = statistics.median(r[0] for r in results["per_chunk"])
    progress("time to first token: via the gateway vs the worker directly")
    via, direct = await _ttfts(procs.gateways["coalesced"][0], procs.worker, 50)
    address, pid = procs.gateways["coalesced"]
    rss, streams = await _rss_with_open_streams(address, pid, args.open_streams, progress)
    return {
        "coalesced_tokens_per_s": round(coalesced),
        "per_token_tokens_per_s": round(per_chunk),
        "coalescing_speedup": round(coalesced / per_chunk, 2),
        "tokens_per_message_coalesced": round(statistics.median(r[1] for r in results["coalesced"]), 2),
        "tokens_per_message_per_token": round(statistics.median(r[1] for r in results["per_chunk"]), 2),
        "ttft_gateway_p50_ms": round(statistics.median(via) * 1000, 3),
        "ttft_direct_p50_ms": round(statistics.median(direct) * 1000, 3),
        "added_ttft_p50_ms": round((statistics.median(via) - statistics.median(direct)) * 1000, 3),
        "open_streams": streams,
        f"rss_mb_at_{streams}_streams": round(rss, 1),
        "rss_mb_at_2000_streams": round(rss, 1) if streams == 2000 else None,
    }


def run(args: argparse.Namespace) -> int:
    with _brokers(args) as (redis_url, mqtt_url), _services(redis_url, mqtt_url, args.time_scale) as procs:
        result = asyncio.run(run_bench(args, procs, progress))
    print_result(result, args.json)
    return 0
