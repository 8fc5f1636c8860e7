"""A worker restarted under the same id is a new process: the registry tells it from late
messages of the old one (its incarnation), and what died with the old one (KV cache, pins, a
drain requested of it) goes."""

from __future__ import annotations

import asyncio
import time

from gateway.prompt import prompt_block_hashes
from kvgate.v1 import common_pb2, telemetry_pb2
from scheduler import keys
from scheduler.policy import WorkerState
from scheduler.store import Applied, FleetStore
from tests.integration.fleet import Fleet

READY = telemetry_pb2.WORKER_LIFECYCLE_READY
OFFLINE = telemetry_pb2.WORKER_LIFECYCLE_OFFLINE
OLD, NEW = 1_700_000_000_000, 1_700_000_060_000


def _kv(seq: int, incarnation: int, stored: list[int], removed: list[int] = []) -> telemetry_pb2.KvEvents:  # noqa: B006
    return telemetry_pb2.KvEvents(
        worker_id="a", seq=seq, incarnation=incarnation, stored_block_hashes=stored,
        removed_block_hashes=removed,
    )  # fmt: skip


def _stats(seq: int, incarnation: int, used: int = 0) -> telemetry_pb2.WorkerStats:
    return telemetry_pb2.WorkerStats(
        worker_id="a", region="us-east", address="a:1", model="m", engine="sim", state=READY,
        block_size=16, num_blocks_total=1000, num_blocks_used=used, seq=seq, incarnation=incarnation,
    )  # fmt: skip


def _now_ms() -> int:
    return int(time.time() * 1000)


def _status(state: int, incarnation: int) -> telemetry_pb2.WorkerStatus:
    return telemetry_pb2.WorkerStatus(worker_id="a", state=state, incarnation=incarnation, model="m")  # type: ignore[arg-type]


async def _state(store: FleetStore) -> WorkerState:
    return (await store.read_fleet()).workers["a"].state


async def test_a_restarted_worker_indexes_its_new_cache_and_late_messages_of_the_old_one_are_dropped(
    store: FleetStore,
) -> None:
    # The old process ran a while: its telemetry is far into its sequence numbers.
    await store.ingest_stats(_stats(500, OLD))
    await store.ingest_kv(_kv(400, OLD, [11, 12, 13]))
    assert (await store.lookup("", ["a"], [11, 12, 13]))[1] == {"a": 3}

    # The new process counts from 1 again and starts with an empty cache.
    await store.ingest_status(_status(READY, NEW))
    assert (await store.lookup("", ["a"], [11, 12, 13]))[1] == {}
    await store.ingest_kv(_kv(1, NEW, [21, 22]))
    assert (await store.lookup("", ["a"], [21, 22]))[1] == {"a": 2}
    await store.ingest_stats(_stats(2, NEW, used=7))
    assert (await store.read_fleet()).workers["a"].num_blocks_used == 7

    # Late messages of the old process change nothing: a KV batch, stats, its last-will.
    await store.ingest_kv(_kv(401, OLD, [11], removed=[21]))
    await store.ingest_stats(_stats(501, OLD, used=999))
    await store.ingest_status(_status(OFFLINE, OLD))
    assert (await store.lookup("", ["a"], [21, 22]))[1] == {"a": 2}
    assert (await store.lookup("", ["a"], [11]))[1] == {}
    fleet = await store.read_fleet()
    assert fleet.workers["a"].num_blocks_used == 7
    assert fleet.workers["a"].state == WorkerState.READY


async def test_the_first_message_of_a_new_process_may_be_stats_or_kv_events(store: FleetStore) -> None:
    await store.ingest_stats(_stats(300, OLD))
    await store.ingest_kv(_kv(300, OLD, [11]))
    await store.ingest_status(_status(OFFLINE, OLD))  # the old process's last-will
    assert await _state(store) == WorkerState.OFFLINE
    # The new process's stats arrive before its status: it is alive, whatever the will said.
    await store.ingest_stats(_stats(1, NEW))
    assert await _state(store) == WorkerState.READY
    await store.ingest_kv(_kv(1, NEW, [31]))
    assert (await store.lookup("", ["a"], [31]))[1] == {"a": 1}


async def test_offline_or_restart_invalidates_the_pins_that_still_name_the_worker(store: FleetStore) -> None:
    await store.ingest_stats(_stats(1, OLD))
    await store.record_placement("s1", "a", None, "new")
    await store.record_placement("s2", "a", None, "new")
    await store.record_placement("s3", "a", None, "new")
    # s3 moved to b since, by another replica whose index entry for a has not been trimmed.
    await store._redis.set(keys.session_pin("s3"), "b")

    offline = await store.ingest_status(_status(OFFLINE, OLD))
    # Every replica ingests the last-will; only the one whose script saw the transition acts.
    assert offline.pins_invalid and not (await store.ingest_status(_status(OFFLINE, OLD))).pins_invalid
    went_offline = _now_ms()
    await asyncio.sleep(0.01)
    await store.record_placement("s5", "a", None, "new")  # after the event (a racing placement)
    assert await store.invalidate_pins("a", before_ms=went_offline) == 2
    assert (await store.lookup("s1", [], []))[0] is None
    assert (await store.lookup("s2", [], []))[0] is None
    assert (await store.lookup("s3", [], []))[0] == "b"
    assert (await store.lookup("s5", [], []))[0] == "a"

    # A restart (a crash whose last-will never arrived) does the same, once.
    await store.ingest_stats(_stats(1, NEW))
    await store.record_placement("s4", "a", None, "new")
    restarted = await store.ingest_stats(_stats(9, NEW + 1))
    assert restarted.pins_invalid and not (await store.ingest_stats(_stats(10, NEW + 1))).pins_invalid
    assert await store.invalidate_pins("a", before_ms=_now_ms() + 1) == 2  # s4 and s5
    assert (await store.lookup("s4", [], []))[0] is None
    assert await store._redis.zcard(keys.worker_pins("a")) == 0


async def test_pins_are_invalidated_in_batches(store: FleetStore) -> None:
    await store.ingest_stats(_stats(1, OLD))
    for i in range(25):
        await store.record_placement(f"s{i}", "a", None, "new")
    assert await store.invalidate_pins("a", before_ms=_now_ms() + 1, batch=10) == 25
    assert [(await store.lookup(f"s{i}", [], []))[0] for i in range(25)] == [None] * 25


async def test_messages_of_an_older_process_are_reported_stale(store: FleetStore) -> None:
    assert (await store.ingest_stats(_stats(1, NEW))).applied == Applied.APPLIED
    assert (await store.ingest_stats(_stats(1, NEW))).applied == Applied.DUPLICATE
    assert (await store.ingest_stats(_stats(2, OLD))).applied == Applied.STALE
    assert (await store.ingest_kv(_kv(2, OLD, [11]))).applied == Applied.STALE
    assert (await store.ingest_status(_status(OFFLINE, OLD))).applied == Applied.STALE


async def test_a_drain_requested_by_the_scheduler_holds_until_the_worker_restarts(store: FleetStore) -> None:
    await store.ingest_stats(_stats(1, OLD))
    assert await store.set_draining("a")
    # The worker never heard of it (its Drain RPC failed) and goes on saying it is ready.
    await store.ingest_stats(_stats(2, OLD))
    await store.ingest_status(_status(READY, OLD))
    assert await _state(store) == WorkerState.DRAINING
    # A new process of it was not asked to drain.
    await store.ingest_status(_status(READY, NEW))
    assert await _state(store) == WorkerState.READY
    await store.ingest_stats(_stats(1, NEW))
    assert await _state(store) == WorkerState.READY


async def test_draining_an_offline_worker_leaves_it_offline(store: FleetStore) -> None:
    await store.ingest_stats(_stats(1, OLD))
    await store.ingest_status(_status(OFFLINE, OLD))
    assert await store.set_draining("a")
    assert await _state(store) == WorkerState.OFFLINE
    assert not await store.set_draining("nobody")


async def test_a_workers_block_set_lives_as_long_as_the_worker_reports(store: FleetStore) -> None:
    await store.ingest_kv(_kv(1, OLD, [11]))
    await store._redis.pexpire(keys.worker_blocks("a"), 500)  # as if its last KV event were old
    await store.ingest_stats(_stats(1, OLD))
    assert await store._redis.pttl(keys.worker_blocks("a")) > 500


async def _holders(
    fleet: Fleet, hashes: list[int], want: dict[str, int] | None, timeout_s: float
) -> dict[str, int]:
    """The prefix lookup's answer once it is `want` (None: once it is non-empty), or the last one."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        _, hits = await fleet.scheduler.store.lookup("", ["w1"], hashes)
        if (hits == want if want is not None else bool(hits)) or asyncio.get_running_loop().time() > deadline:
            return hits
        await asyncio.sleep(0.05)


async def test_a_crashed_and_restarted_worker_process_is_indexed_afresh(fleet: Fleet) -> None:
    await fleet.start({"w1": ("us-east", 4000)})
    system = "You answer questions about GPUs. " * 16  # several full KV blocks
    hashes = prompt_block_hashes([common_pb2.Message(role="system", content=system)])
    async with fleet.client() as client:
        pinned = await client.create_session(system_prompt=system)
        await client.reply(pinned.session_id, "What is HBM?", max_tokens=4)
    assert await _holders(fleet, hashes, None, timeout_s=10)
    store = fleet.scheduler.store
    assert (await store.lookup(pinned.session_id, [], []))[0] == "w1"
    await asyncio.sleep(1)  # the old process's telemetry gets well into its sequence numbers

    # A crash: telemetry stops without a word, and no last-will reaches the scheduler in time.
    crashed = fleet.workers["w1"]
    assert crashed.telemetry is not None
    await crashed.telemetry.fall_silent()
    await crashed.host.stop(grace_s=0)
    await crashed.engine.close()
    restarted = await fleet.add_worker("w1", "us-east", num_gpu_blocks=4000)
    assert restarted.telemetry is not None and crashed.telemetry.incarnation < restarted.telemetry.incarnation

    # The new process's cache is empty: what the old one held leaves the index, and the pins of
    # the sessions it held go (the scheduler's ingest drops them beside its telemetry)...
    assert await _holders(fleet, hashes, {}, timeout_s=10) == {}
    for _ in range(100):
        if (await store.lookup(pinned.session_id, [], []))[0] is None:
            break
        await asyncio.sleep(0.05)
    assert (await store.lookup(pinned.session_id, [], []))[0] is None
    # ... and what the new one caches enters it, though its sequence numbers started again at 1.
    async with fleet.client() as client:
        session = await client.create_session(system_prompt=system)
        await client.reply(session.session_id, "And GDDR?", max_tokens=4)
    assert len(hashes) <= (await _holders(fleet, hashes, None, timeout_s=10)).get("w1", 0)
