"""IndexedFleetView + fleet_index.fast_top: the same candidates, in the same order, as the full
pipeline on a plain FleetView (the shortcut is a performance change only)."""

from __future__ import annotations

import random
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.policy import (
    FleetView,
    KvgateConfig,
    KvgatePolicy,
    PlacementRequest,
    WorkerState,
    WorkerView,
    default_pipeline,
)
from scheduler.policy.fleet_index import IndexedFleetView, _xor_smallest

CONFIGS = (
    KvgateConfig(),
    KvgateConfig(region_weight=0.7, batch_weight=0.0),
    KvgateConfig(free_tokens_weight=0.0, max_candidates=3),
    KvgateConfig(prefix_weight=2.0, batch_weight=1.0, max_candidates=1),
)


def _view(rng: random.Random, wid: str, uniform: bool) -> WorkerView:
    total = 64 if uniform else rng.choice((16, 64, 200))
    used = 0 if uniform and rng.random() < 0.6 else rng.choice((0, 1, 5, 40, total))
    return WorkerView(
        worker_id=wid,
        region=rng.choice(("eu", "us")),
        model="m1" if uniform or rng.random() < 0.9 else "m2",
        state=WorkerState.READY if uniform or rng.random() < 0.9 else rng.choice(list(WorkerState)),
        block_size=16,
        num_blocks_total=total,
        num_blocks_used=used,
        reserved_tokens=rng.choice((0, 0, 0, 16, 100)),
        running=0 if used == 0 else rng.choice((1, 3, 70, 200, 300)),
        waiting=rng.choice((0, 0, 0, 1, 4)),
        age_s=0.0 if uniform or rng.random() < 0.8 else rng.choice((1.0, 3.0, 12.0)),
        max_num_seqs=256,
    )


def _request(rng: random.Random, ids: list[str], n: int) -> PlacementRequest:
    blocks = rng.choice((0, 4, 10))
    hits = {w: rng.randint(0, 12) for w in rng.sample(ids, min(len(ids), rng.choice((0, 0, 1, 3))))}
    return PlacementRequest(
        request_id=f"r{n}",
        session_id=rng.choice(("", f"s{n}", "s1")),
        model="m1",
        prompt_tokens=rng.choice((1, 100, 500, 2000)),
        max_new_tokens=rng.choice((1, 50, 300)),
        tier=rng.choice(("free", "plus", "enterprise", "odd")),
        block_hashes=tuple(range(blocks)),
        prefix_hit_blocks=hits if blocks else {},
        client_region=rng.choice(("", "eu")),
        pinned_worker=rng.choice((None, None, ids[0] if ids else None)),
    )


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 60), st.booleans())
def test_fast_top_matches_full_pipeline(seed: int, n_workers: int, uniform: bool) -> None:
    rng = random.Random(seed)
    ids = [f"w{i:04d}-{rng.choice(('h100', 'a100', 'l4'))}" for i in range(n_workers)]
    views = {wid: _view(rng, wid, uniform) for wid in ids}
    indexed = IndexedFleetView(dict(views))
    for n in range(20):
        # Updates go through put(), as in the simulator.
        for wid in rng.sample(ids, min(len(ids), 3)):
            views[wid] = _view(rng, wid, uniform)
            indexed.put(views[wid])
        plain = FleetView(dict(views))
        assert dict(indexed.workers) == plain.workers
        request = _request(rng, ids, n)
        for config in CONFIGS:
            pipeline = default_pipeline(config)
            for k in (1, 2, config.max_candidates, 9, 100):
                fast = [w.worker_id for w in pipeline.top(request, indexed, k)]
                full = [w.worker_id for w in pipeline.top(request, plain, k)]
                assert fast == full, (config, k)
            policy = KvgatePolicy(config=config)
            assert policy.place(request, indexed) == policy.place(request, plain)


def test_big_tied_class_uses_the_crc_order() -> None:
    """An idle fleet is one class; the pick is still the tie-break's order."""
    ids = [f"w{i:04d}-h100" for i in range(1000)]
    views = {
        wid: WorkerView(wid, "eu", "m1", WorkerState.READY, 16, 1000, 0, max_num_seqs=256) for wid in ids
    }
    indexed = IndexedFleetView(dict(views))
    plain = FleetView(dict(views))
    pipeline = default_pipeline(KvgateConfig())
    for s in range(50):
        request = PlacementRequest(f"r{s}", f"s{s}", "m1", 100, 10)
        assert pipeline.top(request, indexed, 8) == pipeline.top(request, plain, 8)


def test_xor_smallest() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 300)
        crcs = [rng.getrandbits(32) if rng.random() < 0.9 else 7 for _ in range(n)]
        members = sorted(c << 24 | i for i, c in enumerate(crcs))
        d = rng.getrandbits(32)
        m = rng.randint(1, n)
        want = sorted(members, key=lambda p: (((p >> 24) ^ d), p & 0xFFFFFF))[:m]
        assert _xor_smallest(members, d, m)[:m] == want


def test_crc32_is_affine_for_ids_of_one_length() -> None:
    a, b = b"w0001-h100", b"w0917-a100"
    for salt in (0, 1, 0xDEADBEEF, zlib.crc32(b"session")):
        assert zlib.crc32(a, salt) ^ zlib.crc32(a) == zlib.crc32(b, salt) ^ zlib.crc32(b)


def test_simulator_views_derived_like_replace() -> None:
    """The simulator's cheap view copies equal dataclasses.replace and a fresh build."""
    import dataclasses

    from scheduler.fleetsim.simulator import FleetSim, WorkerSpec, _derive_view
    from scheduler.fleetsim.trace import load_trace, scaled_requests
    from scheduler.policy import make_policy

    view = WorkerView("w1", "eu", "m1", WorkerState.READY, 16, 100, 3, running=2)
    assert view.free_tokens == (100 - 3) * 16
    derived = _derive_view(view, {"reserved_tokens": 40, "running": 5})
    assert derived == dataclasses.replace(view, reserved_tokens=40, running=5)
    assert derived.free_tokens == (100 - 3) * 16 - 40

    trace = load_trace("synthetic")
    specs = [WorkerSpec(f"w{i:04d}-h100", "h100", "eu") for i in range(3)]
    sim = FleetSim(specs, make_policy("kvgate"), trace, scaled_requests(trace, 1.0, 0, 60.0))
    sim.run()
    for w in sim.workers:
        w.reserved = 7
        assert sim._make_view(w) == sim._new_view(w)


def test_simulator_indexes_the_fleet_only_for_kvgate() -> None:
    from scheduler.fleetsim.simulator import FleetSim, WorkerSpec
    from scheduler.fleetsim.trace import load_trace, scaled_requests
    from scheduler.policy import make_policy

    trace = load_trace("synthetic")
    specs = [WorkerSpec(f"w{i:04d}-h100", "h100", "eu") for i in range(2)]
    for name, indexed in (("kvgate", True), ("round-robin", False), ("least-kv", False)):
        sim = FleetSim(specs, make_policy(name), trace, scaled_requests(trace, 1.0, 0, 10.0))
        assert isinstance(sim.fleet, IndexedFleetView) == indexed
