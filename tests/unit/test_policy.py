from __future__ import annotations

import dataclasses

from scheduler.policy import FleetView, KvgatePolicy, Placed, PlacementRequest, Shed, WorkerState, WorkerView


def worker(wid: str, blocks_total: int, blocks_used: int = 0, **kw: object) -> WorkerView:
    base = WorkerView(
        worker_id=wid, region="r1", model="llama-3-8b", state=WorkerState.READY,
        block_size=16, num_blocks_total=blocks_total, num_blocks_used=blocks_used,
    )  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def fleet(*workers: WorkerView) -> FleetView:
    return FleetView({w.worker_id: w for w in workers})


def request(**kw: object) -> PlacementRequest:
    base = PlacementRequest(
        request_id="r", session_id="s", model="llama-3-8b", prompt_tokens=100, max_new_tokens=100
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_new_session_goes_to_the_worker_with_most_free_kv_tokens() -> None:
    # b has fewer blocks in total but more of them free: absolute free tokens decide.
    decision = KvgatePolicy().place(request(), fleet(worker("a", 1000, 900), worker("b", 500, 0)))
    assert isinstance(decision, Placed)
    assert decision.candidates[0] == "b"
    assert decision.outcome_for("b").value == "new"


def test_reservations_count_against_free_capacity() -> None:
    decision = KvgatePolicy().place(
        request(), fleet(worker("a", 1000, 0, reserved_tokens=15_000), worker("b", 1000, 100))
    )
    assert isinstance(decision, Placed) and decision.candidates[0] == "b"


def test_pinned_session_stays_even_when_another_worker_is_emptier() -> None:
    decision = KvgatePolicy().place(
        request(pinned_worker="a"), fleet(worker("a", 1000, 800), worker("b", 1000, 0))
    )
    assert isinstance(decision, Placed)
    assert decision.candidates[0] == "a" and decision.outcome_for("a").value == "pinned_hit"


def test_pinned_worker_that_is_full_offline_or_excluded_moves_the_session() -> None:
    for pinned in (
        worker("a", 1000, 1000),
        worker("a", 1000, 0, state=WorkerState.OFFLINE),
        worker("a", 1000, 0, age_s=60.0),
    ):
        decision = KvgatePolicy().place(request(pinned_worker="a"), fleet(pinned, worker("b", 1000, 0)))
        assert isinstance(decision, Placed)
        assert decision.candidates == ["b"] and decision.outcome_for("b").value == "moved"
    excluded = KvgatePolicy().place(
        request(pinned_worker="a", exclude_workers=frozenset({"a"})),
        fleet(worker("a", 1000), worker("b", 1000)),
    )
    assert isinstance(excluded, Placed) and excluded.candidates == ["b"]


def test_draining_and_other_model_workers_get_no_new_sessions() -> None:
    decision = KvgatePolicy().place(
        request(),
        fleet(worker("a", 1000, state=WorkerState.DRAINING), worker("b", 1000, model="llama-3-70b")),
    )
    assert isinstance(decision, Shed)


def test_full_fleet_sheds_with_a_retry_hint_from_the_drain_rate() -> None:
    slow = KvgatePolicy().place(request(), fleet(worker("a", 1000, 1000, tokens_per_s=100.0)))
    fast = KvgatePolicy().place(request(), fleet(worker("a", 1000, 1000, tokens_per_s=10_000.0)))
    assert isinstance(slow, Shed) and isinstance(fast, Shed)
    assert slow.reason == "at capacity"
    assert slow.retry_after_s > fast.retry_after_s > 0


def test_stale_telemetry_is_trusted_less() -> None:
    view = FleetView({"a": worker("a", 100, 0, age_s=6.0)}, stale_after_s=2.0, dead_after_s=10.0)
    assert view.usable_free_tokens(view.workers["a"]) == 800  # half of 1600 at half-way to dead


def test_pinned_worker_with_a_long_queue_loses_to_recomputing_on_an_idle_one() -> None:
    busy = worker("a", 1000, 100, waiting=20, step_ms=250.0, prefill_tokens_per_s=10_000.0)
    idle = worker("b", 1000, 0, prefill_tokens_per_s=10_000.0)
    # ~5 s of queue on the pinned worker vs ~0.02 s to recompute 200 tokens on the idle one.
    moved = KvgatePolicy().place(request(pinned_worker="a"), fleet(busy, idle))
    assert isinstance(moved, Placed) and moved.candidates[0] == "b"
    assert moved.outcome_for("b").value == "moved"
    # A short queue keeps the session where its KV cache is (300 blocks of its history cached).
    short = dataclasses.replace(busy, waiting=1, step_ms=10.0)
    turn = request(pinned_worker="a", prompt_tokens=5000, prefix_hit_blocks={"a": 300})
    kept = KvgatePolicy().place(turn, fleet(short, idle))
    assert isinstance(kept, Placed) and kept.candidates[0] == "a"
