"""kvgate's scorers, pins (hit, move, wait-vs-recompute) and tier headroom / shedding."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from scheduler.policy import (
    POLICIES,
    BatchSweetSpot,
    Filter,
    FleetView,
    FreeTokensAfterPlacement,
    KvgateConfig,
    KvgatePolicy,
    Pipeline,
    Placed,
    PlacementRequest,
    PrefixAffinity,
    SameRegion,
    Shed,
    ShedCode,
    WeightedScorer,
    WorkerState,
    WorkerView,
    make_policy,
)
from tests.unit.test_policy import fleet, request, worker

# ---- scorers ---------------------------------------------------------------------------------


def test_free_tokens_scores_absolute_room_so_a_bigger_gpu_wins() -> None:
    h200, a100 = worker("h200", 9000, 4500), worker("a100", 5000, 2500)  # both half full
    scores = FreeTokensAfterPlacement().score(request(), [h200, a100], fleet(h200, a100))
    assert scores[0] == 1.0 and 0.0 < scores[1] < scores[0]


def test_prefix_affinity_is_the_cached_fraction_of_the_request() -> None:
    ws = [worker("a", 100), worker("b", 100), worker("c", 100)]
    req = request(block_hashes=tuple(range(10)), prefix_hit_blocks={"a": 10, "b": 4, "zz": 3})
    assert PrefixAffinity().score(req, ws, fleet(*ws)) == [1.0, 0.4, 0.0]
    # A hint longer than the request counts as a full hit, no more.
    longer = dataclasses.replace(req, prefix_hit_blocks={"a": 25})
    assert PrefixAffinity().score(longer, ws, fleet(*ws))[0] == 1.0
    assert PrefixAffinity().score(request(), ws, fleet(*ws)) == [0.0, 0.0, 0.0]


def test_batch_sweet_spot_is_flat_below_the_knee_then_falls_to_zero_at_max_num_seqs() -> None:
    scorer = BatchSweetSpot(knee=64)
    ws = [
        worker("idle", 100, running=0),
        worker("knee", 100, running=64),
        worker("mid", 100, running=160),  # half way from 64 to 256
        worker("max", 100, running=256),
        worker("over", 100, running=300),
        worker("queued", 100, running=10, waiting=4),
        worker("small-engine", 100, running=96, max_num_seqs=128),
    ]
    assert scorer.score(request(), ws, fleet(*ws)) == [1.0, 1.0, 0.5, 0.0, 0.0, 0.5, 0.5]


def test_same_region_is_a_bonus_only_when_the_client_says_where_it_is() -> None:
    ws = [worker("a", 100, region="eu"), worker("b", 100, region="us")]
    assert SameRegion().score(request(client_region="eu"), ws, fleet(*ws)) == [1.0, 0.0]
    assert SameRegion().score(request(), ws, fleet(*ws)) == [0.0, 0.0]


def test_prefix_hits_steer_a_new_session_between_equally_free_workers() -> None:
    req = request(block_hashes=tuple(range(8)), prefix_hit_blocks={"b": 8})
    decision = KvgatePolicy().place(req, fleet(worker("a", 1000), worker("b", 1000)))
    assert isinstance(decision, Placed) and decision.candidates == ["b", "a"]


def test_a_cached_prefix_does_not_pull_a_session_onto_a_much_fuller_worker() -> None:
    # b caches a quarter of the prompt but is 80 % full; a is empty.
    req = request(block_hashes=tuple(range(8)), prefix_hit_blocks={"b": 2})
    decision = KvgatePolicy().place(req, fleet(worker("a", 1000), worker("b", 1000, 800)))
    assert isinstance(decision, Placed) and decision.candidates[0] == "a"


def test_batch_size_breaks_ties_in_free_capacity() -> None:
    decision = KvgatePolicy().place(
        request(), fleet(worker("a", 1000, running=200), worker("b", 1000, running=10))
    )
    assert isinstance(decision, Placed) and decision.candidates[0] == "b"


def test_region_counts_only_when_configured() -> None:
    view = fleet(worker("a", 1000, region="us"), worker("b", 1000, region="eu"))
    req = request(client_region="eu")
    default = KvgatePolicy().place(req, view)
    regional = KvgatePolicy(config=KvgateConfig(region_weight=0.2)).place(req, view)
    assert isinstance(default, Placed) and default.candidates[0] == "a"  # tie: worker id
    assert isinstance(regional, Placed) and regional.candidates[0] == "b"


# ---- pipeline --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _OnlyKeep:
    """A filter with `keep` only (no fast `select`), as a third party would write it."""

    banned: str
    name: str = "only-keep"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return worker.worker_id != self.banned


@dataclasses.dataclass(frozen=True)
class _Exploding:
    name: str = "exploding"

    def score(self, request: PlacementRequest, workers: object, fleet: FleetView) -> list[float]:
        raise AssertionError("a zero-weight scorer must not be evaluated")


def test_pipeline_top_k_breaks_ties_the_same_way_whatever_the_fleet_order() -> None:
    ws = [worker(wid, 100) for wid in ("e", "c", "a", "d", "b")]
    only_keep: Filter = _OnlyKeep("c")
    pipeline = Pipeline(
        filters=(only_keep,),
        scorers=(WeightedScorer(FreeTokensAfterPlacement(), 1.0), WeightedScorer(_Exploding(), 0.0)),
    )
    ranked = [w.worker_id for w in pipeline.rank(request(), fleet(*ws))]
    assert sorted(ranked) == ["a", "b", "d", "e"]
    for order in (ws, ws[::-1], ws[2:] + ws[:2]):
        assert [w.worker_id for w in pipeline.rank(request(), fleet(*order))] == ranked
        assert [w.worker_id for w in pipeline.top(request(), fleet(*order), 2)] == ranked[:2]
    assert pipeline.top(request(), fleet(*ws), 0) == []


def test_ties_spread_over_equally_good_workers() -> None:
    # An idle fleet scores every worker the same: each session must not go to the same one.
    ws = [worker(f"w{i}", 100) for i in range(8)]
    pipeline = Pipeline(filters=(), scorers=(WeightedScorer(FreeTokensAfterPlacement(), 1.0),))
    firsts = Counter(
        pipeline.top(dataclasses.replace(request(), session_id=f"s{i}"), fleet(*ws), 1)[0].worker_id
        for i in range(800)
    )
    assert len(firsts) == 8 and max(firsts.values()) < 2 * min(firsts.values()), firsts


def test_candidates_are_capped_by_config() -> None:
    view = fleet(*(worker(f"w{i}", 1000, i) for i in range(20)))
    decision = KvgatePolicy(config=KvgateConfig(max_candidates=3)).place(request(), view)
    assert isinstance(decision, Placed) and decision.candidates == ["w0", "w1", "w2"]


def test_the_batched_free_token_computation_matches_the_per_worker_one() -> None:
    ws = [worker(f"w{i}", 100, 10, age_s=age) for i, age in enumerate((0.0, 2.0, 3.0, 6.0, 9.9, 10.0, 50.0))]
    view = FleetView({w.worker_id: w for w in ws}, stale_after_s=2.0, dead_after_s=10.0)
    assert view.usable_free_tokens_of(ws) == [view.usable_free_tokens(w) for w in ws]


# ---- pins ------------------------------------------------------------------------------------


def test_pinned_hit_keeps_other_workers_as_fallbacks() -> None:
    decision = KvgatePolicy().place(
        request(pinned_worker="b"), fleet(worker("a", 1000), worker("b", 1000, 500), worker("c", 1000, 100))
    )
    assert isinstance(decision, Placed)
    assert decision.candidates == ["b", "a", "c"] and not decision.wait_for_pinned
    assert decision.outcome_for("b").value == "pinned_hit" and decision.outcome_for("a").value == "moved"


def test_draining_pinned_worker_moves_the_sessions_next_turn() -> None:
    decision = KvgatePolicy().place(
        request(pinned_worker="a"),
        fleet(worker("a", 1000, state=WorkerState.DRAINING), worker("b", 1000, 500)),
    )
    assert isinstance(decision, Placed) and decision.candidates == ["b"]
    assert decision.outcome_for("b").value == "moved"


def test_pin_to_a_worker_that_left_the_fleet_or_serves_another_model_moves() -> None:
    for view in (
        fleet(worker("b", 1000)),
        fleet(worker("a", 1000, model="llama-3-70b"), worker("b", 1000)),
    ):
        decision = KvgatePolicy().place(request(pinned_worker="a"), view)
        assert isinstance(decision, Placed) and decision.candidates == ["b"]
        assert decision.outcome_for("b").value == "moved"


def _full_pin_case(**b: object) -> FleetView:
    # a: 16,000 tokens, 160 free; an enterprise request (no headroom) of 200 tokens is 40 short.
    # At 1,000 tokens/s it frees them in 0.04 s. b is empty and prefills 10,000 tokens/s.
    return fleet(worker("a", 1000, 990, tokens_per_s=1000.0), worker("b", 1000, 0, **b))


def _pinned_request(**kw: object) -> PlacementRequest:
    return request(pinned_worker="a", tier="enterprise", **kw)


def test_full_pinned_worker_waits_when_recomputing_the_history_costs_more() -> None:
    # Moving would prefill 8,000 tokens of history on b: 0.8 s against a 0.04 s wait.
    decision = KvgatePolicy().place(_pinned_request(history_tokens=8000), _full_pin_case())
    assert isinstance(decision, Placed)
    assert decision.wait_for_pinned and decision.candidates == ["a", "b"]
    assert decision.expected_wait_s == pytest.approx(0.04)
    assert decision.outcome_for("a").value == "pinned_hit"


def test_full_pinned_worker_is_left_when_recomputing_is_cheaper() -> None:
    # 100 tokens of history prefill in 0.01 s on b, cheaper than waiting 0.04 s.
    decision = KvgatePolicy().place(_pinned_request(history_tokens=100), _full_pin_case())
    assert isinstance(decision, Placed)
    assert not decision.wait_for_pinned and decision.candidates == ["b"]
    assert decision.outcome_for("b").value == "moved"


def test_recompute_cost_counts_the_queue_and_the_prefix_already_cached_elsewhere() -> None:
    queued = KvgatePolicy().place(
        _pinned_request(history_tokens=100), _full_pin_case(waiting=10, step_ms=50.0)
    )
    assert isinstance(queued, Placed) and queued.wait_for_pinned  # 0.01 s + 10 x 50 ms > 0.04 s
    # b caches the whole 8,000-token history (500 blocks of 16): nothing to recompute, so move.
    cached = KvgatePolicy().place(
        _pinned_request(history_tokens=8000, block_hashes=tuple(range(500)), prefix_hit_blocks={"b": 500}),
        _full_pin_case(),
    )
    assert isinstance(cached, Placed) and cached.candidates == ["b"] and not cached.wait_for_pinned


def test_history_defaults_to_the_prompt() -> None:
    assert request(prompt_tokens=700).recompute_tokens == 700
    assert request(prompt_tokens=700, history_tokens=500).recompute_tokens == 500
    # prompt_tokens=100 by default: 0.01 s to recompute on b, so the session moves.
    decision = KvgatePolicy().place(_pinned_request(), _full_pin_case())
    assert isinstance(decision, Placed) and decision.candidates == ["b"]


def test_no_wait_on_a_pinned_worker_that_drains_too_slowly_or_could_never_fit() -> None:
    slow = fleet(worker("a", 1000, 990, tokens_per_s=1.0), worker("b", 1000))  # 40 s
    idle = fleet(worker("a", 1000, 990), worker("b", 1000))  # reports no throughput at all
    tiny = fleet(worker("a", 10, 10, tokens_per_s=1e6), worker("b", 1000))  # 160 tokens in all
    for view in (slow, idle, tiny):
        decision = KvgatePolicy().place(_pinned_request(history_tokens=100_000), view)
        assert isinstance(decision, Placed) and decision.candidates == ["b"] and not decision.wait_for_pinned


def test_full_pinned_worker_and_nowhere_else_to_go_waits_if_short_else_sheds() -> None:
    short = KvgatePolicy().place(_pinned_request(), fleet(worker("a", 1000, 990, tokens_per_s=1000.0)))
    assert isinstance(short, Placed) and short.wait_for_pinned and short.candidates == ["a"]
    long = KvgatePolicy().place(_pinned_request(), fleet(worker("a", 1000, 990, tokens_per_s=1.0)))
    assert isinstance(long, Shed) and long.tier == "enterprise"


def test_excluded_full_pinned_worker_is_not_waited_for() -> None:
    decision = KvgatePolicy().place(
        _pinned_request(history_tokens=8000, exclude_workers=frozenset({"a"})), _full_pin_case()
    )
    assert isinstance(decision, Placed) and decision.candidates == ["b"] and not decision.wait_for_pinned


# ---- tiers and shedding ----------------------------------------------------------------------


def _fleet_at(used_fraction: float, tokens_per_s: float = 1000.0) -> FleetView:
    used = round(1000 * used_fraction)
    return fleet(*(worker(w, 1000, used, tokens_per_s=tokens_per_s) for w in ("a", "b", "c")))


def test_at_92_percent_free_is_shed_while_plus_and_enterprise_place() -> None:
    view = _fleet_at(0.92)  # 1,280 free tokens each; free tier must leave 1,600, plus 800
    free = KvgatePolicy().place(request(tier="free"), view)
    assert isinstance(free, Shed) and free.tier == "free" and free.reason == "at capacity"
    for tier in ("plus", "enterprise"):
        assert isinstance(KvgatePolicy().place(request(tier=tier), view), Placed)


def test_at_97_percent_only_enterprise_places() -> None:
    view = _fleet_at(0.97)  # 480 free tokens each
    for tier in ("free", "plus"):
        decision = KvgatePolicy().place(request(tier=tier), view)
        assert isinstance(decision, Shed) and decision.tier == tier
    assert isinstance(KvgatePolicy().place(request(tier="enterprise"), view), Placed)


def test_unknown_tiers_get_the_free_tiers_headroom() -> None:
    decision = KvgatePolicy().place(request(tier="platinum"), _fleet_at(0.92))
    assert isinstance(decision, Shed) and decision.tier == "free"


def test_tier_headroom_is_configurable() -> None:
    config = KvgateConfig(tier_headroom={"free": 0.0})
    assert isinstance(KvgatePolicy(config=config).place(request(tier="free"), _fleet_at(0.97)), Placed)


def test_retry_after_falls_as_the_fleets_drain_rate_rises() -> None:
    retries = []
    for rate in (1.0, 100.0, 1000.0, 100_000.0):
        decision = KvgatePolicy().place(request(), _fleet_at(0.92, tokens_per_s=rate))
        assert isinstance(decision, Shed)
        retries.append(decision.retry_after_s)
    # Deficit 200 + 1,600 - 1,280 = 520 tokens; the fleet drains 3 x rate.
    assert retries[1] == pytest.approx(520 / 300)
    assert retries == sorted(retries, reverse=True) and retries[0] == 30.0 and retries[-1] == 0.25


def test_retry_after_ignores_workers_that_cannot_take_the_request() -> None:
    view = fleet(
        worker("a", 1000, 920, tokens_per_s=100.0),
        worker("b", 1000, 0, tokens_per_s=1e6, state=WorkerState.DRAINING),
        worker("c", 1000, 0, tokens_per_s=1e6, model="other"),
    )
    decision = KvgatePolicy().place(request(), view)
    assert isinstance(decision, Shed)
    assert decision.retry_after_s == pytest.approx(520 / 100)
    assert decision.details["drain_tokens_per_s"] == 100.0


def test_shed_when_no_worker_serves_the_model() -> None:
    decision = KvgatePolicy().place(request(model="mystery"), _fleet_at(0.0))
    assert isinstance(decision, Shed) and "mystery" in decision.reason and decision.retry_after_s == 5.0
    assert decision.code is ShedCode.NO_WORKER


def test_no_worker_when_every_worker_serving_the_model_drains_or_is_excluded() -> None:
    view = fleet(worker("a", 1000, state=WorkerState.DRAINING), worker("b", 1000))
    decision = KvgatePolicy().place(request(exclude_workers=frozenset({"b"})), view)
    assert (
        isinstance(decision, Shed) and decision.code is ShedCode.NO_WORKER and decision.retry_after_s == 5.0
    )


def test_a_full_fleet_is_at_capacity() -> None:
    decision = KvgatePolicy().place(request(), _fleet_at(0.92))
    assert isinstance(decision, Shed) and decision.code is ShedCode.AT_CAPACITY and decision.limit_tokens == 0


# The small worker holds 1,600 tokens, the big one 3,200 and is full: the free tier may use 2,880
# of it once it empties.
_SMALL_AND_FULL_BIG = (
    worker("small", 100, 0, tokens_per_s=100.0),
    worker("big", 200, 200, tokens_per_s=100.0),
)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_request_no_worker_could_ever_hold_is_too_large_not_at_capacity(name: str) -> None:
    view = fleet(*_SMALL_AND_FULL_BIG)
    policy = make_policy(name)
    later = policy.place(request(prompt_tokens=2780, max_new_tokens=100), view)  # 2,880: fits once empty
    assert isinstance(later, Shed) and later.code is ShedCode.AT_CAPACITY and later.retry_after_s > 0
    never = policy.place(request(prompt_tokens=2781, max_new_tokens=100), view)
    assert isinstance(never, Shed) and never.code is ShedCode.TOO_LARGE
    assert never.limit_tokens == 2880 and never.retry_after_s == 0.0 and never.tier == "free"
    assert "2881" in never.reason and "2880" in never.reason


def test_too_large_is_judged_with_the_tiers_headroom_and_every_worker_of_the_model() -> None:
    view = fleet(*_SMALL_AND_FULL_BIG)
    enterprise = KvgatePolicy().place(
        request(prompt_tokens=3100, max_new_tokens=100, tier="enterprise"), view
    )
    assert isinstance(enterprise, Shed) and enterprise.code is ShedCode.AT_CAPACITY  # 3,200: all of "big"
    # A draining or excluded big worker still says what the model's workers can hold: not TOO_LARGE,
    # but no worker that could hold it takes requests now.
    turn = request(prompt_tokens=2700, max_new_tokens=100)
    small = _SMALL_AND_FULL_BIG[0]
    draining = KvgatePolicy().place(turn, fleet(small, worker("big", 200, state=WorkerState.DRAINING)))
    excluded = KvgatePolicy().place(
        dataclasses.replace(turn, exclude_workers=frozenset({"big"})), fleet(small, worker("big", 200))
    )
    for decision in (draining, excluded):
        assert isinstance(decision, Shed) and decision.code is ShedCode.NO_WORKER
    # So does a dead one (the pool of big GPUs restarting): retry later, not a permanent error.
    gone = KvgatePolicy().place(
        request(prompt_tokens=2700, max_new_tokens=100),
        fleet(_SMALL_AND_FULL_BIG[0], worker("big", 200, 0, state=WorkerState.OFFLINE)),
    )
    assert isinstance(gone, Shed) and gone.code is ShedCode.NO_WORKER and gone.retry_after_s == 5.0
    # Only when no worker of the model, alive or not, could ever hold it is it too large.
    too_large = KvgatePolicy().place(request(prompt_tokens=2700, max_new_tokens=100), fleet(small))
    assert isinstance(too_large, Shed) and too_large.code is ShedCode.TOO_LARGE
    assert too_large.limit_tokens == 1440
