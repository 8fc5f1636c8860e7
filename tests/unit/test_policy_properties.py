"""Properties of every policy on random fleets: candidates are feasible for the request's tier
and distinct, and a shed happens only when no worker could take the request."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.policy import (
    POLICIES,
    AcceptsNewSessions,
    Alive,
    Fits,
    FleetView,
    KvgateConfig,
    Placed,
    PlacementRequest,
    ServesModel,
    Shed,
    ShedCode,
    WorkerState,
    WorkerView,
    default_filters,
    make_policy,
)

MODELS = ("m1", "m2")
TIERS = ("free", "plus", "enterprise", "unknown")


@st.composite
def workers(draw: st.DrawFn, wid: str) -> WorkerView:
    total = draw(st.integers(1, 400))
    return WorkerView(
        worker_id=wid,
        region=draw(st.sampled_from(("eu", "us"))),
        model=draw(st.sampled_from(MODELS)),
        state=draw(st.sampled_from(list(WorkerState))),
        block_size=draw(st.sampled_from((1, 16))),
        num_blocks_total=total,
        num_blocks_used=draw(st.integers(0, total)),
        reserved_tokens=draw(st.integers(0, 500)),
        running=draw(st.integers(0, 300)),
        waiting=draw(st.integers(0, 10)),
        step_ms=draw(st.floats(0, 100)),
        tokens_per_s=draw(st.floats(0, 5000)),
        prefill_tokens_per_s=draw(st.floats(1, 20_000)),
        age_s=draw(st.floats(0, 15)),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[PlacementRequest, FleetView]:
    ids = draw(st.lists(st.sampled_from([f"w{i}" for i in range(12)]), max_size=8, unique=True))
    fleet = FleetView({wid: draw(workers(wid)) for wid in ids})
    maybe_ids = st.sampled_from([*ids, "gone"])
    blocks = draw(st.integers(0, 20))
    request = PlacementRequest(
        request_id="r",
        session_id=draw(st.sampled_from(("", "s1", "s2"))),
        model=draw(st.sampled_from(MODELS)),
        prompt_tokens=draw(st.integers(0, 3000)),
        max_new_tokens=draw(st.integers(0, 1000)),
        tier=draw(st.sampled_from(TIERS)),
        block_hashes=tuple(range(blocks)),
        exclude_workers=frozenset(draw(st.lists(maybe_ids, max_size=3))),
        pinned_worker=draw(st.one_of(st.none(), maybe_ids)),
        client_region=draw(st.sampled_from(("", "eu"))),
        prefix_hit_blocks=draw(st.dictionaries(maybe_ids, st.integers(0, 30), max_size=4)),
        history_tokens=draw(st.one_of(st.none(), st.integers(0, 100_000))),
    )
    return request, fleet


CONFIG = KvgateConfig()
FILTERS = default_filters(CONFIG)


def _feasible(request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
    return all(f.keep(request, worker, fleet) for f in FILTERS)


@settings(max_examples=400, deadline=None)
@given(case=cases(), name=st.sampled_from(sorted(POLICIES)), seed=st.integers(0, 3))
def test_candidates_are_feasible_and_distinct_and_shed_only_when_nothing_fits(
    case: tuple[PlacementRequest, FleetView], name: str, seed: int
) -> None:
    request, fleet = case
    decision = make_policy(name, seed=seed, config=CONFIG).place(request, fleet)
    any_fits = any(_feasible(request, w, fleet) for w in fleet.workers.values())
    if isinstance(decision, Shed):
        assert not any_fits
        assert decision.tier in CONFIG.tier_headroom
        headroom = CONFIG.headroom_fraction(request.tier)
        registered = [w for w in fleet.workers.values() if w.model == request.model]
        serving = [w for w in registered if fleet.is_alive(w)]
        largest = max((w.capacity_tokens - headroom * w.capacity_tokens for w in registered), default=None)
        # Workers that could take the request once they have room.
        takers = [
            w
            for w in serving
            if w.state == WorkerState.READY
            and w.worker_id not in request.exclude_workers
            and request.tokens_needed <= w.capacity_tokens - headroom * w.capacity_tokens
        ]
        if decision.code is ShedCode.TOO_LARGE:
            # No retry can help: even the largest worker of the model, empty and alive, is too small.
            assert largest is not None and request.tokens_needed > largest
            assert decision.limit_tokens == math.floor(largest) and decision.retry_after_s == 0.0
            return
        assert 0.25 <= decision.retry_after_s <= 30.0
        assert decision.code is (ShedCode.AT_CAPACITY if takers else ShedCode.NO_WORKER)
        return
    assert isinstance(decision, Placed)
    candidates = list(decision.candidates)
    assert candidates and len(set(candidates)) == len(candidates)
    assert len(candidates) <= CONFIG.max_candidates
    rest = candidates
    if decision.wait_for_pinned:
        # The one candidate allowed not to fit yet: the pinned worker the committer waits for.
        assert candidates[0] == request.pinned_worker and 0.0 <= decision.expected_wait_s
        assert decision.expected_wait_s <= CONFIG.max_pin_wait_s
        rest = candidates[1:]
    for wid in rest:
        assert _feasible(request, fleet.workers[wid], fleet), wid
    pinned = fleet.workers.get(request.pinned_worker or "")
    if name == "kvgate" and pinned is not None and _feasible(request, pinned, fleet) and pinned.waiting == 0:
        assert candidates[0] == pinned.worker_id  # a pinned worker that fits, with no queue, is always first


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_batched_free_tokens_match_the_per_worker_computation(
    case: tuple[PlacementRequest, FleetView],
) -> None:
    _, fleet = case
    ws = list(fleet.workers.values())
    assert fleet.usable_free_tokens_of(ws) == [fleet.usable_free_tokens(w) for w in ws]
    request = case[0]
    # Each filter's fast whole-list `select` agrees with its per-worker `keep`.
    for f in (ServesModel(), Alive(), AcceptsNewSessions(), Fits(tier_headroom=CONFIG.tier_headroom)):
        assert f.select(request, ws, fleet) == [w for w in ws if f.keep(request, w, fleet)]
