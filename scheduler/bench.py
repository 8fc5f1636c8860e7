"""`kvgate bench placement`: placement latency and throughput of two scheduler replicas on real Redis.

Two `kvgate scheduler` processes share one Redis holding 64 registered workers; an
open-loop client sends Place RPCs at a fixed rate, alternating replicas, half of them
continuing earlier sessions (pins; each names its session's last worker, as the gateway does
from the stored history). Reported side by side from one run:
- latency inside the schedulers (policy + atomic commit), from their Prometheus histograms,
  scraped before and after the measured window (the warm-up is not counted);
- the client-side Place round trip;
- a bare Redis round trip (PING), the floor for any atomic placement: sent through the same
  pipelined connection the schedulers place with (scheduler/redis_mux.py), a few hundred a
  second, from a process of its own so that the load generator's busy event loop does not
  inflate it;
- CPU per placement of the schedulers and per RPC of the load generator (from /proc);
- over-commits: workers whose reservations exceed their free KV after the run (must be 0).

A throwaway Redis container is reached at its bridge address when the host can route to it
(`RedisServer.direct_url`: no docker-proxy hops; the RTT shows the path either way).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import redis.asyncio as redis

from kvgate.bench_util import free_port, print_result, process_cpu_s, progress, spawn_kvgate
from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc, telemetry_pb2
from scheduler.redis_mux import RedisMux
from scheduler.store import FleetStore, StoreSettings

BLOCK_SIZE = 16
BLOCKS_PER_WORKER = 28_019  # Llama-3-8B on one H100 at 0.9 utilisation (kvgate engine-profile)
# Enough samples for a stable median, few enough to cost the machine nothing noticeable.
RTT_PROBES_PER_S = 200.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default="", help="Redis to use (default: start a throwaway container)")
    parser.add_argument("--workers", type=int, default=64, help="registered workers (default: %(default)s)")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="placements per second (default: %(default)s)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=2, help="scheduler processes (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@contextmanager
def _redis_url(given: str) -> Iterator[str]:
    if given:
        yield given
        return
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    try:
        from kvgate.containers import RedisServer
    except ImportError as exc:
        raise SystemExit(
            "kvgate bench placement: pass --redis-url, or install the dev extra (testcontainers)"
        ) from exc
    server = RedisServer().start()
    try:
        yield server.direct_url
    finally:
        server.stop()


@contextmanager
def _schedulers(redis_url: str, count: int) -> Iterator[list[tuple[str, int, int]]]:
    """(grpc address, metrics port, pid) of `count` scheduler processes."""
    procs, endpoints = [], []
    try:
        for i in range(count):
            grpc_port, metrics_port = free_port(), free_port()
            procs.append(
                spawn_kvgate(
                    "scheduler", "--listen", f"127.0.0.1:{grpc_port}", "--redis-url", redis_url,
                    # No broker: the bench registers workers in Redis directly.
                    "--mqtt-url", "mqtt://127.0.0.1:1", "--metrics-port", str(metrics_port),
                    "--replica-id", f"bench-{i}", "--dead-after", "3600", "--stale-after", "3600",
                )
            )  # fmt: skip
            endpoints.append((f"127.0.0.1:{grpc_port}", metrics_port, procs[-1].pid))
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def _register(store: FleetStore, workers: int) -> None:
    for i in range(workers):
        await store.ingest_stats(
            telemetry_pb2.WorkerStats(
                worker_id=f"bench-w{i:03d}", region=("us-east", "eu-west", "ap-south")[i % 3],
                address=f"bench-w{i:03d}:50061", model="llama-3-8b", engine="sim",
                state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=BLOCK_SIZE,
                num_blocks_total=BLOCKS_PER_WORKER, seq=int(time.time() * 1000),
            )
        )  # fmt: skip


async def _wait_ready(addresses: list[str]) -> None:
    deadline = time.monotonic() + 30
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            while True:
                try:
                    await scheduler_pb2_grpc.SchedulerStub(channel).FleetStatus(
                        scheduler_pb2.FleetStatusRequest(), timeout=1
                    )
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)


async def _load(
    addresses: list[str], rate: float, duration: float, progress: Any
) -> tuple[list[float], int, int]:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [scheduler_pb2_grpc.SchedulerStub(c) for c in channels]
    rng = random.Random(1)
    latencies: list[float] = []
    shed = errors = 0
    sessions: list[str] = []
    # Where each session's last turn was placed, named in its next Place as the gateway does
    # from the session's stored history.
    last_worker: dict[str, str] = {}

    async def one(i: int) -> None:
        nonlocal shed, errors
        session = rng.choice(sessions) if sessions and rng.random() < 0.5 else f"s{i}"
        sessions.append(session)
        request = scheduler_pb2.PlaceRequest(
            request_id=f"bench-{i}", session_id=session, model="llama-3-8b", tier="free",
            prompt_tokens=rng.randint(200, 2000), max_new_tokens=256, first_turn=session == f"s{i}",
            last_worker=last_worker.get(session, ""),
        )  # fmt: skip
        started = time.perf_counter()
        try:
            response = await stubs[i % len(stubs)].Place(request, timeout=5)
        except grpc.aio.AioRpcError:
            errors += 1
            return
        latencies.append(time.perf_counter() - started)
        shed += response.WhichOneof("result") == "shed"
        if response.WhichOneof("result") == "placed":
            last_worker[session] = response.placed.worker_id

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    total = int(rate * duration)
    for i in range(total):
        # Open loop: send on schedule whether or not earlier calls have returned.
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if i and i % int(rate) == 0:
            progress(f"{i}/{total} placements sent")
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return latencies, shed, errors


def _scrape_placement_histogram(metrics_ports: list[int]) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of the kvgate_scheduler_placement_seconds
    histograms of all replicas, summed."""
    buckets: dict[float, float] = {}
    for port in metrics_ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("kvgate_scheduler_placement_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def window_quantiles(
    before: dict[float, float], after: dict[float, float], quantiles: tuple[float, ...]
) -> list[float]:
    """Quantiles (s) of the observations made between two scrapes of a cumulative histogram (the
    warm-up before the measured window must not count), interpolated within buckets the way
    Prometheus's histogram_quantile does."""
    buckets = {bound: count - before.get(bound, 0.0) for bound, count in after.items()}
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        raise ValueError("no placements observed between the two scrapes")
    out = []
    for q in quantiles:
        rank, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= rank:
                upper = bound if bound != float("inf") else lower
                span = buckets[bound] - below
                out.append(lower + (upper - lower) * ((rank - below) / span if span else 0.0))
                break
            lower, below = bound, buckets[bound]
    return out


def _probe_rtts(redis_url: str, duration_s: float, rate: float) -> list[float]:
    """PING round trips (s) through a RedisMux, `rate` a second for `duration_s` (runs in a
    process of its own)."""

    async def probe() -> list[float]:
        mux = RedisMux.like(redis.Redis.from_url(redis_url))
        rtts: list[float] = []
        try:
            await mux.execute("PING")
            start = time.perf_counter()
            for i in range(int(duration_s * rate)):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                started = time.perf_counter()
                await mux.execute("PING")
                rtts.append(time.perf_counter() - started)
        finally:
            await mux.aclose()
        return rtts

    return asyncio.run(probe())


async def _overcommits(store: FleetStore, workers: int) -> int:
    """Workers whose reservations exceed their free KV (the running total and the hash agree)."""
    fleet = await store.read_fleet()
    bad = 0
    for i in range(workers):
        worker = fleet.workers[f"bench-w{i:03d}"]
        reserved = await store.reserved_tokens(worker.worker_id)
        free = (worker.num_blocks_total - worker.num_blocks_used) * worker.block_size
        bad += int(reserved > free or reserved != worker.reserved_tokens)
    return bad


async def run_bench(args: argparse.Namespace, redis_url: str, progress: Any) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    store = FleetStore(client, StoreSettings(dead_after_s=3600))
    await _register(store, args.workers)
    loop = asyncio.get_running_loop()
    with (
        _schedulers(redis_url, args.replicas) as endpoints,
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as prober,
    ):
        addresses = [a for a, _, _ in endpoints]
        await _wait_ready(addresses)
        progress(f"{args.replicas} schedulers up; {args.workers} workers registered; warming up")
        await _load(addresses, rate=200, duration=1, progress=lambda _: None)
        # Start the prober before the load: spawning it must not overlap the measured window.
        await loop.run_in_executor(prober, _probe_rtts, redis_url, 0.0, 1.0)
        progress(f"open-loop load: {args.rate:.0f} placements/s for {args.duration:.0f} s")
        pids = [pid for _, _, pid in endpoints]
        metrics_ports = [p for _, p, _ in endpoints]
        histogram_before = _scrape_placement_histogram(metrics_ports)
        cpu_before = [process_cpu_s(pid) for pid in (*pids, os.getpid())]
        before = time.perf_counter()
        rtt_future = loop.run_in_executor(prober, _probe_rtts, redis_url, args.duration, RTT_PROBES_PER_S)
        latencies, shed, errors = await _load(addresses, args.rate, args.duration, progress)
        elapsed = time.perf_counter() - before
        cpu = [process_cpu_s(pid) - c for pid, c in zip((*pids, os.getpid()), cpu_before, strict=True)]
        rtts = await rtt_future
        inside_p50, inside_p99 = window_quantiles(
            histogram_before, _scrape_placement_histogram(metrics_ports), (0.5, 0.99)
        )
    overcommits = await _overcommits(store, args.workers)
    await store.aclose()
    await client.aclose()
    q = statistics.quantiles(latencies, n=100)
    rtt_p50 = statistics.median(rtts)
    sent = int(args.rate * args.duration)
    return {
        "replicas": args.replicas,
        "workers": args.workers,
        "target_rate": args.rate,
        "placements": len(latencies),
        "placements_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(inside_p50 * 1000, 3),
        "p99_ms": round(inside_p99 * 1000, 3),
        "rpc_p50_ms": round(q[49] * 1000, 3),
        "rpc_p99_ms": round(q[98] * 1000, 3),
        "redis_rtt_p50_ms": round(rtt_p50 * 1000, 3),
        "p50_over_rtt": round(inside_p50 / rtt_p50, 2),
        # CPU over the measured window, per placement answered (schedulers, all replicas) and
        # per RPC sent (the load generator, this process).
        "scheduler_cpu_ms_per_placement": round(sum(cpu[:-1]) * 1000 / max(1, len(latencies)), 3),
        "client_cpu_ms_per_rpc": round(cpu[-1] * 1000 / max(1, sent), 3),
        "shed": shed,
        "errors": errors,
        "overcommits": overcommits,
    }


def run(args: argparse.Namespace) -> int:
    with _redis_url(args.redis_url) as url:
        result = asyncio.run(run_bench(args, url, progress))
    print_result(result, args.json)
    return 0
