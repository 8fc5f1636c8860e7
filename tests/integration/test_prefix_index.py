"""Workers' KV block events build the scheduler's prefix index in Redis."""

from __future__ import annotations

import asyncio

from gateway.prompt import prompt_block_hashes
from kvgate.v1 import common_pb2
from tests.integration.fleet import Fleet


async def test_kv_events_index_the_blocks_a_worker_caches(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 4000), "eu-1": ("eu-west", 2000)})
    system = "You are a helpful assistant. " * 20  # several full KV blocks
    async with fleet.client() as client:
        session = await client.create_session(system_prompt=system)
        _, _, placement = await client.reply(session.session_id, "hello there", max_tokens=8)
    assert placement.worker_id == "us-1"

    # A new conversation with the same system prompt shares its leading blocks.
    messages = [
        common_pb2.Message(role="system", content=system),
        common_pb2.Message(role="user", content="a different question"),
    ]
    hashes = prompt_block_hashes(messages)
    assert len(hashes) >= 8
    hits: dict[str, int] = {}
    for _ in range(50):  # KV events arrive with the next telemetry tick
        _, hits = await fleet.scheduler.store.lookup("", ["us-1", "eu-1"], hashes)
        if hits:
            break
        await asyncio.sleep(0.1)
    assert set(hits) == {"us-1"}
    # The shared system prompt is cached; the differing user turn is not.
    assert 8 <= hits["us-1"] < len(hashes)


async def test_new_session_sharing_a_prefix_goes_where_that_prefix_is_cached(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 4000), "eu-1": ("eu-west", 4000)})
    system = "You are kvgate's support assistant. Answer briefly. " * 12
    async with fleet.client() as client:
        first = await client.create_session(system_prompt=system)
        _, _, placed_first = await client.reply(first.session_id, "What is a KV cache?", max_tokens=8)
        holder = placed_first.worker_id
        hashes = prompt_block_hashes([common_pb2.Message(role="system", content=system)])
        for _ in range(50):  # wait for the holder's KV events to reach the index
            _, hits = await fleet.scheduler.store.lookup("", [holder], hashes)
            if hits:
                break
            await asyncio.sleep(0.1)
        # The holder now has less free KV than the other worker, yet the shared prefix wins.
        second = await client.create_session(system_prompt=system)
        _, done, placed_second = await client.reply(second.session_id, "And a block?", max_tokens=8)
        assert placed_second.worker_id == holder
        assert done.usage.cached_tokens >= 8 * 16  # the shared system prompt, ~9 blocks
