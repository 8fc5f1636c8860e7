"""A placement usually costs one Redis round trip: the policy's guess is reserved in the same write
as the pin and prefix lookup (scheduler/servicer.py). When the lookup changes the decision, the
guess is given back and nothing is left reserved on it. Against real Redis, counting writes."""

from __future__ import annotations

import asyncio
from typing import Any

from kvgate.v1 import scheduler_pb2
from scheduler.fleet_cache import FleetCache
from scheduler.policy import make_policy
from scheduler.servicer import SchedulerServicer
from scheduler.store import FleetStore
from tests.integration.fleet import report_worker


async def _servicer_with_scripts_loaded(store: FleetStore, policy: str = "kvgate") -> SchedulerServicer:
    """A servicer whose fleet snapshot is read (in service it refreshes in the background) and
    whose Lua scripts Redis already has (the first EVALSHA of a process loads them: two more
    round trips, once)."""
    await store.reserve("nobody", "warm-up", 1)

    async def no_drain(worker_id: str) -> None:
        pass

    servicer = SchedulerServicer(store, FleetCache(store, max_age_s=3600), make_policy(policy), no_drain)
    await servicer._fleet.get()
    return servicer


def _request(
    request_id: str, session_id: str, first_turn: bool = False, last_worker: str = ""
) -> scheduler_pb2.PlaceRequest:
    return scheduler_pb2.PlaceRequest(
        request_id=request_id, session_id=session_id, model="m", tier="free", prompt_tokens=100,
        max_new_tokens=60, block_hashes=[11, 12], first_turn=first_turn, last_worker=last_worker,
    )  # fmt: skip


async def _settle(servicer: SchedulerServicer) -> None:
    """Let the background pin writes and give-backs finish."""
    for _ in range(100):
        if not servicer._background:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("background Redis writes did not finish")


async def test_first_turns_and_stateless_turns_are_placed_in_one_round_trip(
    store: FleetStore, writes: list[int]
) -> None:
    await report_worker(store, "idle", used_blocks=0)
    await report_worker(store, "busy", used_blocks=800)
    servicer = await _servicer_with_scripts_loaded(store)
    decisions = 0
    place = servicer._policy.place

    def counted(*args: Any) -> Any:
        nonlocal decisions
        decisions += 1
        return place(*args)

    servicer._policy.place = counted  # type: ignore[method-assign]
    for request_id, session_id, first_turn in (("r1", "s1", True), ("r2", "", False)):
        writes[0] = decisions = 0
        response = await servicer._place(_request(request_id, session_id, first_turn))
        assert response.placed.worker_id == "idle"
        assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_NEW
        assert writes[0] == 1, (session_id, writes[0])
        # No pin and no cached prefix anywhere: the lookup changed nothing, so no second decision.
        assert decisions == 1
    assert await store.reserved_tokens("idle") == 2 * 160
    await _settle(servicer)


async def test_a_pin_this_replica_has_not_seen_is_looked_up_first_then_remembered(
    store: FleetStore, writes: list[int]
) -> None:
    await report_worker(store, "idle", used_blocks=0)
    await report_worker(store, "holder", used_blocks=500)
    # Another replica placed the session's last turn on "holder".
    await store.record_placement("s2", "holder", None, "new")
    servicer = await _servicer_with_scripts_loaded(store)
    writes[0] = 0
    response = await servicer._place(_request("r3", "s2"))
    assert response.placed.worker_id == "holder"
    assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT
    assert writes[0] == 2  # lookup, then commit: no guess to give back
    await _settle(servicer)
    assert await store.reserved_tokens("idle") == 0
    # The session's next turn: this replica knows the pin now, so its guess holds.
    writes[0] = 0
    response = await servicer._place(_request("r4", "s2"))
    assert response.placed.worker_id == "holder" and writes[0] == 1
    await _settle(servicer)


async def test_a_session_another_replica_placed_is_placed_in_one_round_trip_given_its_last_worker(
    store: FleetStore, writes: list[int]
) -> None:
    # With several replicas behind a round-robin channel, a session's next turn usually reaches
    # a replica that did not place its last one; the gateway names that turn's worker from the
    # stored history, so the guess is reserved with the lookup as for a pin this replica saw.
    await report_worker(store, "idle", used_blocks=0)
    await report_worker(store, "holder", used_blocks=500)
    await store.record_placement("s8", "holder", None, "new")
    servicer = await _servicer_with_scripts_loaded(store)
    writes[0] = 0
    response = await servicer._place(_request("r8", "s8", last_worker="holder"))
    assert response.placed.worker_id == "holder"
    assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT
    assert writes[0] == 1
    await _settle(servicer)
    assert await store.reserved_tokens("idle") == 0


async def test_a_last_worker_the_session_has_left_costs_a_round_trip_and_leaves_no_reservation(
    store: FleetStore, writes: list[int]
) -> None:
    await report_worker(store, "a", used_blocks=0)
    await report_worker(store, "b", used_blocks=500)
    # The history says "a", but the session was moved to "b" since (its pin says so).
    await store.record_placement("s9", "b", "a", "moved")
    servicer = await _servicer_with_scripts_loaded(store)
    writes[0] = 0
    response = await servicer._place(_request("r9", "s9", last_worker="a"))
    assert response.placed.worker_id == "b"
    assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT
    assert writes[0] == 2
    await _settle(servicer)
    assert await store.reserved_tokens("a") == 0
    assert await store.reserved_tokens("b") == 160


async def test_a_stale_pin_hint_costs_a_round_trip_and_leaves_no_reservation(
    store: FleetStore, writes: list[int]
) -> None:
    await report_worker(store, "a", used_blocks=0)
    await report_worker(store, "b", used_blocks=500)
    servicer = await _servicer_with_scripts_loaded(store)
    first = await servicer._place(_request("r5", "s5", first_turn=True))
    assert first.placed.worker_id == "a"
    await _settle(servicer)
    await store.release("a", "r5")
    # Another replica moved the session to "b" since: this replica's hint still says "a".
    await store.record_placement("s5", "b", "a", "moved")
    before = dict((await servicer._fleet.get()).workers)  # views are replaced, not changed
    writes[0] = 0
    response = await servicer._place(_request("r6", "s5"))
    assert response.placed.worker_id == "b"
    assert response.placed.outcome == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT
    assert writes[0] == 2  # the guess ("a") with the lookup, then the commit on "b"
    await _settle(servicer)
    assert await store.reserved_tokens("a") == 0  # the guess was given back
    assert await store.reserved_tokens("b") == 160
    # This replica's snapshot counts only what it holds: nothing more on "a", the turn on "b".
    after = (await servicer._fleet.get()).workers
    assert after["a"].reserved_tokens == before["a"].reserved_tokens
    assert after["b"].reserved_tokens == before["b"].reserved_tokens + 160


async def test_a_guess_that_finds_no_room_falls_back_to_the_next_candidate(
    store: FleetStore, writes: list[int]
) -> None:
    await report_worker(store, "a", used_blocks=0)
    await report_worker(store, "b", used_blocks=100)
    servicer = await _servicer_with_scripts_loaded(store)
    # Telemetry says "a" is empty, but another replica has just reserved all of it.
    assert (await store.reserve("a", "elsewhere", 16_000)).status.name == "RESERVED"
    response = await servicer._place(_request("r7", "s7", first_turn=True))
    assert response.placed.worker_id == "b"
    await _settle(servicer)
    assert await store.reserved_tokens("a") == 16_000
    assert await store.reserved_tokens("b") == 160


async def test_a_baseline_policy_decides_once_per_placement(store: FleetStore, writes: list[int]) -> None:
    # Round-robin reads no pin: it decides before the lookup answers, and only once, so its
    # counter steps through the fleet one worker per placement.
    for worker_id in ("w0", "w1", "w2"):
        await report_worker(store, worker_id, used_blocks=0)
    await store.record_placement("old", "w2", None, "new")

    servicer = await _servicer_with_scripts_loaded(store, "round-robin")
    chosen, outcomes = [], []
    for i, session_id in enumerate(("a", "b", "old", "")):
        writes[0] = 0
        response = await servicer._place(_request(f"r{i}", session_id))
        chosen.append(response.placed.worker_id)
        outcomes.append(response.placed.outcome)
        assert writes[0] == 1
        await _settle(servicer)
    assert chosen == ["w0", "w1", "w2", "w0"]
    # The outcome still comes from the pin the lookup found.
    assert outcomes[2] == scheduler_pb2.PLACE_OUTCOME_PINNED_HIT
    assert outcomes[0] == scheduler_pb2.PLACE_OUTCOME_NEW
