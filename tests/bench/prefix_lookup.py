"""Cost of the scheduler's prefix lookup (FleetStore.lookup) against fleet size, next to the
per-worker lookup it replaced (one SMISMEMBER per worker). Not a test: timings go to stdout.

    redis-server --port 6399 --save '' --appendonly no --daemonize yes
    .venv/bin/python tests/bench/prefix_lookup.py [redis://127.0.0.1:6399/0]

Two fleets of 1,000 workers, each caching 200 blocks of its own plus shared prefixes:
"popular": 8 system prompts of 32 blocks, each worker holds 3 of them whole (runs of equal
holder counts); "ragged": one 32-block prompt, each worker holds a random-length head of it
(every block has a different holder count: the lookup's worst case). The prompt is a shared
system prompt plus 32 blocks of its own (64 blocks, 1,024 tokens).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import redis.asyncio as redis

from kvgate.redis_conn import connect_redis
from kvgate.v1 import telemetry_pb2
from scheduler import keys
from scheduler.store import FleetStore, StoreSettings

REPEAT = 200


async def per_worker_lookup(client: redis.Redis, worker_ids: list[str], prompt: list[int]) -> dict[str, int]:
    async with client.pipeline(transaction=False) as pipe:
        for wid in worker_ids:
            pipe.smismember(keys.worker_blocks(wid), prompt)
        replies = await pipe.execute()
    hits = {}
    for wid, found in zip(worker_ids, replies, strict=True):
        leading = next((i for i, present in enumerate(found) if not present), len(found))
        if leading:
            hits[wid] = leading
    return hits


async def fill(store: FleetStore, rng: random.Random, heads: list[list[int]]) -> None:
    for w in range(1000):
        own = [rng.getrandbits(60) for _ in range(200)]
        blocks = [b for head in heads[w] for b in head] + own
        await store.ingest_kv(telemetry_pb2.KvEvents(worker_id=f"w{w}", seq=1, stored_block_hashes=blocks))


async def main(url: str) -> None:
    client = connect_redis(url)
    store = FleetStore(client, StoreSettings())
    workers = [f"w{w}" for w in range(1000)]
    rng = random.Random(0)
    systems = [[s * 1000 + i for i in range(32)] for s in range(1, 9)]
    fleets = {
        "popular": [rng.sample(systems, 3) for _ in workers],
        "ragged": [[systems[0][: rng.randint(0, 32)]] for _ in workers],
    }
    for name, heads in fleets.items():
        await client.flushall()
        await fill(store, rng, heads)
        prompt = systems[0] + [rng.getrandbits(60) for _ in range(32)]
        for n in (16, 100, 1000):
            ids = workers[:n]
            for how in ("block index", "per worker"):
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(REPEAT):
                    if how == "block index":
                        hits = (await store.lookup("s", ids, prompt))[1]
                    else:
                        hits = await per_worker_lookup(client, ids, prompt)
                wall_ms = 1000 * (time.perf_counter() - wall) / REPEAT
                cpu_ms = 1000 * (time.process_time() - cpu) / REPEAT
                timing = f"{wall_ms:7.2f} ms wall {cpu_ms:7.2f} ms CPU"
                print(f"{name:8s} {n:5d} workers  {how:12s} {timing}  {len(hits)} hit")
    await store.aclose()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6399/0"))
