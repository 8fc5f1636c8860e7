"""`kvgate bench worker`: token throughput of a live sim worker over gRPC, against its own model.

Starts one `kvgate worker` process (sim engine, H100 / Llama-3-8B by default) and a throwaway
Mosquitto unless `--mqtt-url` is given, then sends `--streams` concurrent Generate streams of
`--tokens` tokens each, and reports:
- tokens/s the live worker streamed at `--time-scale 1` (real time for the modelled GPU),
  beside the tokens/s the same engine model gives for the same batch on a virtual clock (no
  gRPC, no asyncio): `realtime_ratio` = live / model says whether the live worker keeps up
  with the GPU it models, or falls behind because its CPU work is slower than the modelled step;
- the same at `--fast-time-scale` (e.g. 0.05: a step takes 5% of its modelled time), where the
  worker is CPU-bound: `fast_tokens_per_s` is the most one worker process streams on this
  machine, with the worker's CPU seconds per 1,000 tokens.
Each configuration runs `--rounds` times and medians are reported.
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

from gpu_worker.sim import EngineConfig, SimEngine
from kvgate.bench_util import (
    free_port,
    print_result,
    process_cpu_s,
    progress,
    retry_rpc_until_ok,
    spawn_kvgate,
)
from kvgate.service import CHANNEL_OPTIONS
from kvgate.v1 import common_pb2, worker_pb2, worker_pb2_grpc

GPU, MODEL = "h100", "llama-3-8b"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mqtt-url", default="", help="MQTT broker (default: a throwaway container)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream (default: %(default)s)")
    parser.add_argument(
        "--prompt-words", type=int, default=400, help="words in each stream's prompt (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per time scale (default: %(default)s)")
    parser.add_argument(
        "--fast-time-scale",
        type=float,
        default=0.05,
        help="time scale of the CPU-bound run; <1 is faster than the modelled GPU (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass
class LiveRound:
    wall_s: float
    completion_tokens: int
    prompt_tokens: list[int]
    worker_cpu_s: float


@contextlib.contextmanager
def _broker(mqtt_url: str) -> Iterator[str]:
    if mqtt_url:
        yield mqtt_url
        return
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    from kvgate.containers import MosquittoServer

    server = MosquittoServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def _worker(mqtt_url: str, time_scale: float, streams: int) -> Iterator[tuple[str, int]]:
    address = f"127.0.0.1:{free_port()}"
    proc = spawn_kvgate(
        "worker", "--worker-id", f"bench-live-{uuid.uuid4().hex[:8]}", "--region", "local",
        "--listen", address, "--mqtt-url", mqtt_url, "--gpu", GPU, "--model", MODEL,
        "--time-scale", str(time_scale), "--max-num-seqs", str(max(streams, 1)),
    )  # fmt: skip
    try:
        yield address, proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)


def _prompt(stream: int, words: int, tag: str) -> str:
    # Distinct words per stream and per round: no prefix is shared, nor cached from an earlier
    # round (its prefill would be skipped), as in the virtual-clock model below.
    return " ".join(f"{tag}s{stream}w{i}" for i in range(words))


async def _generate(stub: Any, stream: int, words: int, tokens: int, tag: str = "") -> tuple[int, int]:
    """(completion tokens, prompt tokens) of one stream."""
    request = worker_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex,
        session_id=f"bench-{stream}",
        messages=[common_pb2.Message(role="user", content=_prompt(stream, words, tag))],
        max_tokens=tokens,
        seed=stream,
    )
    completion = prompt = 0
    async for chunk in stub.Generate(request, timeout=600):
        completion += chunk.num_tokens
        prompt = prompt or chunk.prompt_tokens
    return completion, prompt


async def _wait_ready(address: str) -> None:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        await retry_rpc_until_ok(lambda: _generate(stub, 999_999, 4, 1), timeout_s=60, pause_s=0.3)


async def _live_round(address: str, pid: int, streams: int, words: int, tokens: int) -> LiveRound:
    tag = uuid.uuid4().hex[:6]
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        cpu = process_cpu_s(pid)
        started = time.perf_counter()
        results = await asyncio.gather(*[_generate(stub, s, words, tokens, tag) for s in range(streams)])
        wall = time.perf_counter() - started
        cpu = process_cpu_s(pid) - cpu
    return LiveRound(wall, sum(c for c, _ in results), [p for _, p in results], cpu)


def model_seconds(prompt_tokens: list[int], tokens: int, streams: int) -> float:
    """Modelled GPU seconds for the same batch: all streams arrive at once, run to the end."""
    engine = SimEngine(EngineConfig(gpu=GPU, model=MODEL, max_num_seqs=max(streams, 1)))
    for i, length in enumerate(prompt_tokens):
        engine.add_request(f"m{i}", range(i * 1_000_000, i * 1_000_000 + length), tokens, seed=i)
    clock = 0.0
    while engine.has_unfinished():
        clock += engine.step().duration_s
    return clock


def _measure(args: argparse.Namespace, mqtt_url: str, time_scale: float, label: str) -> list[LiveRound]:
    rounds = []
    with _worker(mqtt_url, time_scale, args.streams) as (address, pid):
        asyncio.run(_wait_ready(address))
        for r in range(args.rounds):
            progress(f"{label}: round {r + 1}/{args.rounds}, {args.streams} streams x {args.tokens} tokens")
            rounds.append(
                asyncio.run(_live_round(address, pid, args.streams, args.prompt_words, args.tokens))
            )
    return rounds


def run_worker_bench(args: argparse.Namespace) -> dict[str, Any]:
    with _broker(args.mqtt_url) as mqtt_url:
        realtime = _measure(args, mqtt_url, 1.0, "time scale 1 (real time)")
        fast = _measure(args, mqtt_url, args.fast_time_scale, f"time scale {args.fast_time_scale}")
    prompts = realtime[0].prompt_tokens
    model_s = model_seconds(prompts, args.tokens, args.streams)
    total = args.streams * args.tokens
    model_tps = total / model_s
    live_tps = statistics.median(r.completion_tokens / r.wall_s for r in realtime)
    fast_tps = statistics.median(r.completion_tokens / r.wall_s for r in fast)
    incomplete = [r.completion_tokens for r in realtime + fast if r.completion_tokens != total]
    return {
        "gpu": GPU,
        "model": MODEL,
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "prompt_tokens_mean": round(statistics.fmean(prompts), 1),
        "model_tokens_per_s": round(model_tps, 1),
        "live_tokens_per_s": round(live_tps, 1),
        "realtime_ratio": round(live_tps / model_tps, 3),
        "fast_time_scale": args.fast_time_scale,
        "fast_tokens_per_s": round(fast_tps, 1),
        "fast_ratio_to_model": round(fast_tps / (model_tps / args.fast_time_scale), 3),
        "worker_cpu_s_per_1k_tokens": round(
            statistics.median(1000 * r.worker_cpu_s / r.completion_tokens for r in fast), 3
        ),
        "incomplete_streams_tokens": incomplete,
        "rounds": args.rounds,
    }


def run(args: argparse.Namespace) -> int:
    for name in ("streams", "tokens", "prompt_words", "rounds"):
        if getattr(args, name) < 1:
            print(f"kvgate bench worker: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.fast_time_scale <= 0:
        print("kvgate bench worker: --fast-time-scale must be > 0", file=sys.stderr)
        return 2
    print_result(run_worker_bench(args), args.json)
    return 0
