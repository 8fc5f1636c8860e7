"""`kvgate bench relay`: what the gateway adds to a token stream, measured side by side.

It starts what it needs: a Redis container, and per mode below one fleet of its own (a
Mosquitto container, a scheduler on its own Redis database, one fast sim worker, one
gateway), so each gateway relays only its own worker's stream. The modes:

- `coalesced`: the shipped defaults. The gateway coalesces (`--coalesce-ms` default) and the
  worker merges the steps a lagging stream missed into one message (as vLLM does).
- `per_token`: the naive relay, no coalescing anywhere: the worker sends one message per
  engine step (`--no-merge-chunks`) and the gateway forwards each one (`--coalesce-ms 0`).
- `gateway_only` (breakdown): gateway coalescing on a worker that does not merge.

Throughput rounds run the same load (`--streams` concurrent streams of `--tokens` tokens)
through each mode in turn; figures are medians over `--rounds`. Wall tokens/s measures the
whole machine (client, gateway and worker share its cores), so each round also reads the
gateway's and the worker's CPU time from /proc: tokens per gateway CPU-second is the relay's
own cost, and a worker using ~1 CPU-second per second marks the worker as the bottleneck.

JSON keys (`--json`):
- `coalesced_tokens_per_s`, `per_token_tokens_per_s`: wall tokens/s received by the client;
  `coalescing_speedup` is their ratio.
- `coalesced_tokens_per_gateway_cpu_s`, `per_token_tokens_per_gateway_cpu_s`,
  `gateway_only_tokens_per_gateway_cpu_s`: tokens relayed per CPU-second of the gateway
  process; `relay_cpu_speedup` = coalesced / per_token.
- `tokens_per_message_<mode>`: tokens per client message.
- `gateway_cpu_per_s_<mode>`, `worker_cpu_per_s_<mode>`, `client_cpu_per_s_<mode>`:
  CPU-seconds per wall second of each process during the rounds (1.0 = one full core).
- `ttft_gateway_p50_ms`, `ttft_direct_p50_ms`, `added_ttft_p50_ms`: time to the first text,
  one stream at a time, through the coalesced gateway vs a Generate call to its worker, and
  the difference of the p50s; `place_p50_ms`: a Place + its reply called on the scheduler
  directly (the gateway waits for one before it can open the worker stream), so
  `added_ttft_p50_ms - place_p50_ms` approximates the gateway's own share. `grpc_rtt_p50_ms`:
  a bare unary round trip (a health check of the scheduler) sampled in the same loop, so idle
  between calls like every hop of a sequential sample: the floor of one gRPC hop on this
  machine (a process woken from idle costs far more than one kept busy), reported beside
  `added_ttft_over_grpc_rtt`.
- `rss_mb_at_2000_streams`: RSS of a coalescing gateway (a fleet of its own, whose real-time sim
  worker models room for every stream) with `--open-streams` (2,000) streams sent, sampled
  once each has had its first event; `streams_streaming_at_rss_sample` says how many were
  streaming then (all of them, unless some were refused or ended).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import prompt
from kvgate.bench_util import (
    free_port,
    print_result,
    process_cpu_s,
    progress,
    retry_rpc_until_ok,
    spawn_kvgate,
)
from kvgate.service import CHANNEL_OPTIONS
from kvgate.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

MODEL = "llama-3-8b"
PROMPT = "Tell me about KV caches."

# mode -> (extra gateway flags, extra worker flags)
MODES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coalesced": ((), ()),
    "per_token": (("--coalesce-ms", "0"), ("--no-merge-chunks",)),
    "gateway_only": ((), ("--no-merge-chunks",)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per throughput round")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per stream (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (default: %(default)s)")
    parser.add_argument("--ttft-samples", type=int, default=200, help="sequential TTFT samples per path")
    parser.add_argument("--open-streams", type=int, default=2000, help="streams held open for the RSS figure")
    parser.add_argument("--time-scale", type=float, default=0.02, help="sim worker slow-down; <1 is faster")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@dataclass
class Fleet:
    scheduler: str
    worker: str
    worker_pid: int
    gateway: str
    gateway_pid: int


# The RSS figure needs every one of --open-streams streams admitted and streaming at once: its
# own fleet, whose sim worker models a KV pool and a batch big enough for all of them (a memory
# figure of the gateway, not a claim about one GPU's capacity) and runs RSS_TIME_SCALE times
# slower than real time, so that 2,000 streams trickle tokens (a few thousand chunks a second in
# all) instead of saturating two CPU cores, and stay open while RSS is sampled.
RSS_MODE = "rss"
RSS_TOKENS = 600
RSS_PROMPT_TOKENS = 32  # PROMPT and the chat template, with room to spare
RSS_TIME_SCALE = 20.0
RSS_ADMIT_S = 120.0


def _rss_worker_flags(open_streams: int) -> tuple[str, ...]:
    blocks = open_streams * (RSS_PROMPT_TOKENS + RSS_TOKENS) * 5 // 4 // 16 + 1
    batched_tokens = max(8192, open_streams * RSS_PROMPT_TOKENS)  # every prompt in one prefill step
    return (
        "--time-scale", str(RSS_TIME_SCALE), "--max-num-seqs", str(open_streams),
        "--num-gpu-blocks", str(blocks), "--max-num-batched-tokens", str(batched_tokens),
    )  # fmt: skip


def _fleet_plan(args: argparse.Namespace) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """mode -> (gateway flags, worker flags) of each fleet the bench starts."""
    fast = ("--time-scale", str(args.time_scale), "--max-num-seqs", "512")
    plan = {mode: (gateway, (*fast, *worker)) for mode, (gateway, worker) in MODES.items()}
    plan[RSS_MODE] = ((), _rss_worker_flags(args.open_streams))
    return plan


@contextlib.contextmanager
def _fleets(plan: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> Iterator[dict[str, Fleet]]:
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    from kvgate.containers import MosquittoServer, RedisServer

    servers: list[RedisServer | MosquittoServer] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_server = RedisServer().start()
        servers.append(redis_server)
        fleets = {}
        for db, (mode, (gateway_flags, worker_flags)) in enumerate(plan.items()):
            broker = MosquittoServer().start()
            servers.append(broker)
            redis_url = _redis_db(redis_server.direct_url, db)
            sched, worker, gateway = (f"127.0.0.1:{free_port()}" for _ in range(3))
            worker_proc = spawn_kvgate(
                "worker", "--worker-id", f"bench-{mode}", "--region", "local", "--listen", worker,
                "--mqtt-url", broker.url, *worker_flags,
            )  # fmt: skip
            gateway_proc = spawn_kvgate(
                "gateway", "--listen", gateway, "--scheduler", sched, "--redis-url", redis_url,
                "--auth", "off", "--rate-limit", "off", *gateway_flags,
            )  # fmt: skip
            procs += [
                spawn_kvgate(
                    "scheduler", "--listen", sched, "--redis-url", redis_url, "--mqtt-url", broker.url
                ),
                worker_proc,
                gateway_proc,
            ]
            fleets[mode] = Fleet(sched, worker, worker_proc.pid, gateway, gateway_proc.pid)
        yield fleets
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        for server in servers:
            server.stop()


def _request(tokens: int) -> chat_pb2.SendRequest:
    return chat_pb2.SendRequest(
        model=MODEL, max_tokens=tokens, messages=[common_pb2.Message(role="user", content=PROMPT)]
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
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        await retry_rpc_until_ok(lambda: _stream(stub, _request(1)), timeout_s=60, pause_s=0.5)


@dataclass
class Round:
    tokens_per_s: float
    tokens_per_message: float
    tokens_per_gateway_cpu_s: float
    gateway_cpu_per_s: float
    worker_cpu_per_s: float
    client_cpu_per_s: float


async def _throughput(fleet: Fleet, streams: int, tokens: int) -> Round:
    async with grpc.aio.insecure_channel(fleet.gateway, options=CHANNEL_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        gateway_cpu, worker_cpu, client_cpu = (
            process_cpu_s(fleet.gateway_pid),
            process_cpu_s(fleet.worker_pid),
            time.process_time(),
        )
        started = time.perf_counter()
        results = await asyncio.gather(*[_stream(stub, _request(tokens)) for _ in range(streams)])
        elapsed = time.perf_counter() - started
        gateway_cpu = process_cpu_s(fleet.gateway_pid) - gateway_cpu
        worker_cpu = process_cpu_s(fleet.worker_pid) - worker_cpu
        client_cpu = time.process_time() - client_cpu
    total = sum(r[0] for r in results)
    return Round(
        tokens_per_s=total / elapsed,
        tokens_per_message=total / max(1, sum(r[1] for r in results)),
        tokens_per_gateway_cpu_s=total / max(gateway_cpu, 1e-9),
        gateway_cpu_per_s=gateway_cpu / elapsed,
        worker_cpu_per_s=worker_cpu / elapsed,
        client_cpu_per_s=client_cpu / elapsed,
    )


@dataclass
class Ttfts:
    gateway: list[float]
    direct: list[float]
    place: list[float]
    bare_rtt: list[float]


async def _ttfts(fleet: Fleet, samples: int) -> Ttfts:
    """One stream at a time (no queueing anywhere), the three paths interleaved."""
    out = Ttfts([], [], [], [])
    messages = [common_pb2.Message(role="user", content=PROMPT)]
    async with (
        grpc.aio.insecure_channel(fleet.gateway, options=CHANNEL_OPTIONS) as g,
        grpc.aio.insecure_channel(fleet.worker, options=CHANNEL_OPTIONS) as w,
        grpc.aio.insecure_channel(fleet.scheduler, options=CHANNEL_OPTIONS) as s,
    ):
        chat, engine = chat_pb2_grpc.ChatStub(g), worker_pb2_grpc.WorkerStub(w)
        scheduler, health = scheduler_pb2_grpc.SchedulerStub(s), health_pb2_grpc.HealthStub(s)
        for _ in range(samples):
            out.gateway.append((await _stream(chat, _request(4)))[2])
            started = time.perf_counter()
            call = engine.Generate(
                worker_pb2.GenerateRequest(request_id=uuid.uuid4().hex, max_tokens=4, messages=messages)
            )
            async for chunk in call:
                if chunk.text:
                    out.direct.append(time.perf_counter() - started)
                    break
            call.cancel()
            request_id = uuid.uuid4().hex
            started = time.perf_counter()
            placed = await scheduler.Place(
                scheduler_pb2.PlaceRequest(
                    request_id=request_id, model=MODEL, tier="free", max_new_tokens=4,
                    prompt_tokens=prompt.estimate_tokens(messages),
                    block_hashes=prompt.prompt_block_hashes(messages),
                ),
                timeout=5,
            )  # fmt: skip
            out.place.append(time.perf_counter() - started)
            await scheduler.Release(
                scheduler_pb2.ReleaseRequest(request_id=request_id, worker_id=placed.placed.worker_id)
            )
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            out.bare_rtt.append(time.perf_counter() - started)
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _rss_with_open_streams(address: str, pid: int, count: int, progress: Any) -> tuple[float, int]:
    """(peak RSS in MB over three samples, streams open and streaming then): sampled once every
    stream has had its first event or been refused (or after RSS_ADMIT_S)."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        calls = [stub.Send(_request(RSS_TOKENS), timeout=600) for _ in range(count)]
        started = refused = finished = 0
        refusals: collections.Counter[str] = collections.Counter()
        all_settled = asyncio.Event()

        def settle(first_event: bool) -> None:
            nonlocal started, refused
            started += first_event
            refused += not first_event
            if started + refused == count:
                all_settled.set()

        async def follow(call: Any) -> None:
            nonlocal finished
            first = True
            try:
                while (event := await call.read()) is not grpc.aio.EOF:
                    if first:
                        first = False
                        settle(True)
                    if event.WhichOneof("event") == "done":
                        break
            except grpc.aio.AioRpcError as exc:
                if first:
                    refusals[exc.code().name] += 1
            if first:
                settle(False)
            finished += 1

        readers = [asyncio.create_task(follow(c)) for c in calls]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_settled.wait(), RSS_ADMIT_S)
        open_now = started - (finished - refused)
        progress(
            f"{count} streams sent: {open_now} streaming, {refused} refused {dict(refusals)}; sampling RSS"
        )
        samples = []
        for _ in range(3):
            samples.append(_rss_mb(pid))
            await asyncio.sleep(0.5)
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        return max(samples), open_now


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def run_bench(args: argparse.Namespace, fleets: dict[str, Fleet], progress: Any) -> dict[str, Any]:
    for fleet in fleets.values():
        await _wait_ready(fleet.gateway)
    rounds: dict[str, list[Round]] = {mode: [] for mode in MODES}
    for round_no in range(args.rounds):
        for mode in MODES:
            fleet = fleets[mode]
            progress(
                f"round {round_no + 1}/{args.rounds}: {mode}, {args.streams} streams x {args.tokens} tokens"
            )
            rounds[mode].append(await _throughput(fleet, args.streams, args.tokens))

    def median(mode: str, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in rounds[mode]))

    progress(f"time to first token, {args.ttft_samples} sequential samples: gateway, worker, Place")
    ttft = await _ttfts(fleets["coalesced"], args.ttft_samples)
    gateway_p50, direct_p50 = statistics.median(ttft.gateway), statistics.median(ttft.direct)
    place_p50 = statistics.median(ttft.place)
    rtt_p50 = statistics.median(ttft.bare_rtt)
    rss, streaming = await _rss_with_open_streams(
        fleets[RSS_MODE].gateway, fleets[RSS_MODE].gateway_pid, args.open_streams, progress
    )
    result: dict[str, Any] = {
        "coalesced_tokens_per_s": round(median("coalesced", "tokens_per_s")),
        "per_token_tokens_per_s": round(median("per_token", "tokens_per_s")),
        "coalescing_speedup": round(
            median("coalesced", "tokens_per_s") / median("per_token", "tokens_per_s"), 2
        ),
    }
    for mode in MODES:
        result[f"{mode}_tokens_per_gateway_cpu_s"] = round(median(mode, "tokens_per_gateway_cpu_s"))
    result["relay_cpu_speedup"] = round(
        median("coalesced", "tokens_per_gateway_cpu_s") / median("per_token", "tokens_per_gateway_cpu_s"), 2
    )
    for field in ("tokens_per_message", "gateway_cpu_per_s", "worker_cpu_per_s", "client_cpu_per_s"):
        for mode in MODES:
            result[f"{field}_{mode}"] = round(median(mode, field), 2)
    result |= {
        "ttft_gateway_p50_ms": _ms(gateway_p50),
        "ttft_direct_p50_ms": _ms(direct_p50),
        "added_ttft_p50_ms": _ms(gateway_p50 - direct_p50),
        "place_p50_ms": _ms(place_p50),
        "grpc_rtt_p50_ms": _ms(rtt_p50),
        "added_ttft_over_grpc_rtt": round((gateway_p50 - direct_p50) / rtt_p50, 2),
        "open_streams": args.open_streams,
        "streams_streaming_at_rss_sample": streaming,
        f"rss_mb_at_{args.open_streams}_streams": round(rss, 1),
        "rss_mb_at_2000_streams": round(rss, 1) if args.open_streams == 2000 else None,
    }
    return result


def run(args: argparse.Namespace) -> int:
    with _fleets(_fleet_plan(args)) as fleets:
        result = asyncio.run(run_bench(args, fleets, progress))
    print_result(result, args.json)
    return 0
