"""SimEngine scheduling: admission, prefix reuse, chunked prefill, preemption, jump(k), no leaks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_worker.engine import ChatMessage, EngineError
from gpu_worker.sim import (
    EngineConfig,
    JumpOutput,
    RequestOutput,
    SimEngine,
    SimTokenizer,
    StepOutput,
    decode_run_cost,
    render_chat,
)
from gpu_worker.sim import engine as sim_engine


def make(**kw: object) -> SimEngine:
    cfg: dict[str, object] = {"gpu": "h100", "model": "llama-3-8b"}
    cfg.update(kw)
    return SimEngine(EngineConfig(**cfg))  # type: ignore[arg-type]


def run_to_end(engine: SimEngine, max_steps: int = 100_000) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("engine did not drain")


def assert_drained(engine: SimEngine) -> None:
    pool = engine.pool
    pool.check_invariants()
    assert sim_engine._NO_BLOCKS == []
    assert pool.num_used == 0
    assert pool.num_free == pool.num_blocks
    assert engine.stats().num_blocks_used == 0


def test_add_request_validation() -> None:
    engine = make()
    engine.add_request("a", [1, 2, 3], 4)
    with pytest.raises(EngineError, match="duplicate"):
        engine.add_request("a", [1], 1)
    with pytest.raises(EngineError, match="empty prompt"):
        engine.add_request("b", [], 1)
    with pytest.raises(EngineError, match="max_new_tokens"):
        engine.add_request("c", [1], 0)
    with pytest.raises(EngineError, match=r"8000.*200.*8192"):
        engine.add_request("d", [1] * 8000, 200)
    with pytest.raises(ValueError, match="unknown GPU"):
        make(gpu="tpu")


def test_single_request_generates_sampled_tokens_and_finishes() -> None:
    engine = make()
    tok = SimTokenizer()
    engine.add_request("r", list(range(100)), 5, seed=42)
    first = engine.step()
    assert first.num_scheduled_tokens == 100
    assert first.outputs[0].num_cached_tokens == 0
    assert engine.stats().admitted_request_ids == ("r",)
    tokens = first.outputs[0].new_token_ids
    steps = 1
    while engine.has_unfinished():
        out = engine.step()
        assert out.num_scheduled_tokens == 1
        tokens += out.outputs[0].new_token_ids
        steps += 1
        last = out.outputs[0]
    assert steps == 5
    assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 5
    assert tokens == [tok.sample(42, p) for p in range(5)]
    assert_drained(engine)
    # Prompt (100) + 4 computed output tokens = 104 -> 6 full blocks stay cached.
    assert engine.pool.num_cached_unreferenced == 6
    stats = engine.stats()
    assert stats.step_ms > 0 and stats.tokens_per_s > 0 and stats.admitted_request_ids == ()


def test_second_turn_hits_prefix_cache() -> None:
    engine = make()
    tok = SimTokenizer()
    history = [ChatMessage("system", "You are terse. " * 20), ChatMessage("user", "Tell me about KV caches.")]
    p1 = tok.encode(render_chat(history))
    engine.add_request("t1", p1, 60, seed=1)
    answer_ids = run_to_end(engine)["t1"]
    history += [ChatMessage("assistant", tok.decode(answer_ids)), ChatMessage("user", "And paging?")]
    p2 = tok.encode(render_chat(history))
    assert p2[: len(p1) + len(answer_ids)] == p1 + answer_ids
    engine.add_request("t2", p2, 4, seed=2)
    out = engine.step().outputs[0]
    bs = engine.block_size
    assert out.num_cached_tokens >= (len(p1) // bs) * bs
    # The answer's blocks are cached too (all computed tokens of turn 1).
    assert out.num_cached_tokens == ((len(p1) + len(answer_ids) - 1) // bs) * bs
    assert engine.stats().prefix_hit_rate > 0.5
    events = engine.take_kv_events()
    assert len(events.stored) > 0
    assert not engine.take_kv_events()


def test_full_prompt_hit_still_recomputes_last_token() -> None:
    engine = make()
    prompt = list(range(64))
    engine.add_request("a", prompt, 1)
    run_to_end(engine)
    engine.add_request("b", prompt, 1)
    out = engine.step()
    assert out.outputs[0].num_cached_tokens == 48
    assert out.num_scheduled_tokens == 16


def test_chunked_prefill_takes_three_steps() -> None:
    engine = make(max_model_len=32768)
    engine.add_request("long", list(range(20_000)), 2)
    scheduled = []
    for _ in range(3):
        out = engine.step()
        scheduled.append(out.num_scheduled_tokens)
        if len(scheduled) < 3:
            assert out.outputs == []
    assert scheduled == [8192, 8192, 20_000 - 2 * 8192]
    assert out.outputs[0].num_new_tokens == 1
    assert engine.steps_until_event() == 1


def test_decodes_and_admissions_share_the_budget() -> None:
    engine = make(max_num_batched_tokens=100, max_num_seqs=3)
    for i in range(5):
        engine.add_request(f"r{i}", list(range(i * 1000, i * 1000 + 60)), 10)
    first = engine.step()
    assert first.num_scheduled_tokens == 100  # 60 + a 40-token chunk
    assert engine.num_running == 2 and engine.num_waiting == 3
    second = engine.step()
    # r0 decodes (1), r1 finishes its prompt (20), r2 gets a 60-token prompt, max_num_seqs=3.
    assert second.num_scheduled_tokens == 81
    assert engine.num_running == 3 and engine.num_waiting == 2
    run_to_end(engine)
    assert_drained(engine)


def test_recompute_preemption_under_tiny_pool() -> None:
    engine = make(num_gpu_blocks_override=8, block_size=4)
    tok = SimTokenizer()
    for i in range(3):
        engine.add_request(f"r{i}", list(range(i * 100, i * 100 + 8)), 10, seed=i)
    tokens = run_to_end(engine)
    stats = engine.stats()
    assert stats.preemptions_total > 0
    for i in range(3):
        # Recomputation never re-emits or changes tokens.
        assert tokens[f"r{i}"] == [tok.sample(i, p) for p in range(10)]
    assert_drained(engine)


def test_request_larger_than_pool_is_rejected() -> None:
    engine = make(num_gpu_blocks_override=4, block_size=4)
    with pytest.raises(EngineError, match="needs 5 KV blocks"):
        engine.add_request("big", list(range(17)), 3)


def test_abort_frees_blocks_at_once() -> None:
    engine = make()
    engine.add_request("a", list(range(100)), 50)
    engine.add_request("b", list(range(100, 300)), 50)
    engine.step()
    assert engine.pool.num_used > 0
    assert engine.abort("a") and engine.abort("b")
    assert not engine.abort("a")
    assert not engine.has_unfinished()
    assert_drained(engine)
    engine.add_request("c", [1, 2], 3)
    assert engine.abort("c") and engine.num_waiting == 0


def test_telemetry_lists_a_request_once_its_prompt_kv_is_allocated() -> None:
    """The scheduler drops a request's KV reservation when telemetry lists it: not while it
    waits for room or is part-way through a chunked prefill, when num_blocks_used does not
    count its prompt yet."""
    engine = make(max_num_seqs=1, max_num_batched_tokens=64)
    engine.add_request("a", list(range(150)), 4)
    engine.add_request("b", list(range(1000, 1040)), 4)
    assert engine.stats().admitted_request_ids == ()  # both wait
    engine.step()  # a's first 64-token chunk; b waits for a batch slot
    assert engine.stats().admitted_request_ids == ()
    engine.step()
    engine.step()  # a's prompt is all in the cache now
    assert engine.stats().admitted_request_ids == ("a",)
    run_to_end(engine)
    assert engine.stats().admitted_request_ids == ()


def test_steps_until_event_zero_when_admitting_or_prefilling() -> None:
    engine = make(max_num_seqs=2)
    assert engine.steps_until_event() == 0
    engine.add_request("a", list(range(40)), 30)
    assert engine.steps_until_event() == 0  # waiting to be admitted
    engine.step()
    assert engine.steps_until_event() == 29
    engine.add_request("b", list(range(40, 80)), 5)
    assert engine.steps_until_event() == 0
    engine.step()
    assert engine.steps_until_event() == 4
    engine.add_request("c", list(range(80, 120)), 5)
    # max_num_seqs is reached, so "c" cannot be admitted before something finishes.
    assert engine.steps_until_event() == 4
    with pytest.raises(ValueError, match="jump"):
        engine.jump(5)


def _scenario(**kw: object) -> SimEngine:
    engine = make(**kw)
    lengths = [(37, 90), (300, 45), (5, 200), (120, 130), (64, 64), (250, 20)]
    for i, (p, n) in enumerate(lengths):
        engine.add_request(f"r{i}", list(range(i * 7, i * 7 + p)), n, seed=i)
    return engine


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_seqs": 3},
        {"num_gpu_blocks_override": 60, "block_size": 8},
        {"model": "mixtral-8x7b", "tp": 2},
    ],
)
def test_jump_equals_single_steps(kw: dict[str, object]) -> None:
    jumper, stepper = _scenario(**kw), _scenario(**kw)
    jumps = 0
    while jumper.has_unfinished():
        k = jumper.steps_until_event()
        assert k == stepper.steps_until_event()
        if k < 2:
            a, b = jumper.step(), stepper.step()
            assert a.duration_s == b.duration_s
            assert [o.new_token_ids for o in a.outputs] == [o.new_token_ids for o in b.outputs]
        else:
            jumps += 1
            j = jumper.jump(k, collect_tokens=True)
            singles = [stepper.step() for _ in range(k)]
            assert j.duration_s == pytest.approx(sum(s.duration_s for s in singles), rel=1e-6)
            assert j.num_scheduled_tokens == sum(s.num_scheduled_tokens for s in singles)
            got = {o.request_id: (o.new_token_ids, o.finished) for o in j.outputs}
            want: dict[str, tuple[list[int], bool]] = {}
            for s in singles:
                for o in s.outputs:
                    ids, _ = want.get(o.request_id, ([], False))
                    want[o.request_id] = (ids + o.new_token_ids, o.finished)
            assert got == want
        for e in (jumper, stepper):
            e.pool.check_invariants()
        assert (jumper.pool.num_used, jumper.pool.num_free, jumper.pool.num_cached_unreferenced) == (
            stepper.pool.num_used,
            stepper.pool.num_free,
            stepper.pool.num_cached_unreferenced,
        )
        assert jumper.stats().admitted_request_ids == stepper.stats().admitted_request_ids
    assert not stepper.has_unfinished()
    assert jumps > 0
    assert jumper.stats().step_ms == pytest.approx(stepper.stats().step_ms, rel=1e-3)
    assert jumper.stats().preemptions_total == stepper.stats().preemptions_total
    assert_drained(jumper)


def test_jump_without_tokens_reports_counts() -> None:
    engine = make()
    engine.add_request("a", list(range(50)), 100)
    engine.step()
    k = engine.steps_until_event()
    out = engine.jump(k)
    assert out.outputs[0].new_token_ids == [] and out.outputs[0].num_new_tokens == k == 99
    assert out.outputs[0].finished
    assert_drained(engine)
    # Deferred hashing still caches the generated blocks: 50 + 99 computed tokens.
    assert engine.pool.num_cached_unreferenced == (50 + 99) // 16


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 120), st.integers(1, 40), st.integers(0, 3)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 6), st.just(0), st.just(0)),
        st.tuples(st.just("jump"), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, caching=st.booleans(), blocks=st.integers(12, 40))
def test_block_accounting_never_leaks(
    ops: list[tuple[str, int, int, int]], caching: bool, blocks: int
) -> None:
    engine = make(
        num_gpu_blocks_override=blocks,
        block_size=4,
        max_num_batched_tokens=64,
        max_num_seqs=4,
        enable_prefix_caching=caching,
    )
    next_id = 0
    for op, a, b, c in ops:
        if op == "add":
            # A few shared prefixes (c) so prefix hits and shared blocks happen.
            prompt = [c * 1000 + t for t in range(a)]
            try:
                engine.add_request(f"r{next_id}", prompt, b, seed=next_id)
            except EngineError:
                assert (a + b + 3) // 4 > blocks
            next_id += 1
        elif op == "abort":
            engine.abort(f"r{a}")
        elif op == "step":
            for _ in range(a):
                engine.step()
        else:
            k = engine.steps_until_event()
            if k:
                engine.jump(k)
        engine.pool.check_invariants()
        stats = engine.stats()
        assert stats.num_blocks_used + engine.pool.num_free == blocks
        assert len(stats.admitted_request_ids) <= stats.running
    for i in range(next_id):
        if i % 2:
            engine.abort(f"r{i}")
    run_to_end(engine)
    assert_drained(engine)
    assert engine.pool.num_free == blocks


class _GeneralOnly(SimEngine):
    """Reference: every step through the general scheduler loop (no decode fast path)."""

    def step(self) -> StepOutput:
        self._version += 1
        return self._general_step()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_seqs": 3, "max_num_batched_tokens": 64},
        {"num_gpu_blocks_override": 45, "block_size": 8},
        {"enable_prefix_caching": False, "block_size": 8},
    ],
)
def test_decode_fast_path_equals_general_step(kw: dict[str, object]) -> None:
    cfg: dict[str, object] = {"gpu": "h100", "model": "llama-3-8b"}
    cfg.update(kw)
    fast, ref = SimEngine(EngineConfig(**cfg)), _GeneralOnly(EngineConfig(**cfg))  # type: ignore[arg-type]
    for i in range(14):
        # Staggered arrivals so admissions land in decode steps; shared prefixes hit the cache.
        for e in (fast, ref):
            e.add_request(f"r{i}", [i % 3 * 1000 + t for t in range(5 + 13 * i)], 3 + 7 * (i % 5), seed=i)
        for _ in range(i % 4 + 1):
            a, b = fast.step(), ref.step()
            assert (a.duration_s, a.num_scheduled_tokens, a.num_preempted) == (
                b.duration_s,
                b.num_scheduled_tokens,
                b.num_preempted,
            )
            assert a.outputs == b.outputs
            assert fast.steps_until_event() == ref.steps_until_event()
            assert fast.steps_within(0.05) == ref.steps_within(0.05)
    outs = run_to_end(fast), run_to_end(ref)
    assert outs[0] == outs[1]
    assert fast.stats() == ref.stats()
    assert fast.take_kv_events() == ref.take_kv_events()
    assert_drained(fast)


def test_outputs_are_a_snapshot_of_their_step() -> None:
    engine = make()
    tok = SimTokenizer()
    engine.add_request("a", list(range(40)), 6, seed=5)
    engine.step()
    second = engine.step()
    engine.step()
    jumped = engine.jump(engine.steps_until_event(), collect_tokens=True)
    # Read only now: values are those of the step that produced them.
    (out,) = second.outputs
    assert (out.new_token_ids, out.num_output_tokens, out.finished) == ([tok.sample(5, 1)], 2, False)
    assert out == RequestOutput("a", [tok.sample(5, 1)], 1, 40, 0, 2, False, "")
    (j,) = jumped.outputs
    assert j.new_token_ids == [tok.sample(5, p) for p in range(3, 6)] and j.finished
    assert j.finish_reason == "length" and j.num_new_tokens == 3 and jumped.outputs is jumped.outputs


def test_steps_within_matches_summed_step_durations() -> None:
    engine = make()
    for i in range(30):
        engine.add_request(f"r{i}", list(range(i * 500, i * 500 + 300 + 20 * i)), 400, seed=i)
    assert engine.steps_within(1.0) == 0  # nothing running
    while engine.steps_until_event() == 0:
        engine.step()
    assert engine.steps_within(0.0) == 0
    for seconds in (0.001, 0.0105, 0.2, 1.0, 3.7):
        k = engine.steps_within(seconds)
        run = decode_run_cost(engine.gpu, engine.model_profile, 1, 30, engine._ctx_sum, k).seconds
        over = decode_run_cost(engine.gpu, engine.model_profile, 1, 30, engine._ctx_sum, k + 1).seconds
        assert run <= seconds < over
    k = min(engine.steps_until_event(), engine.steps_within(0.5))
    assert engine.jump(k).duration_s <= 0.5


_workload = st.lists(
    # (prompt tokens, output tokens, shared-prefix family, steps to run before the next arrival)
    st.tuples(st.integers(1, 90), st.integers(1, 60), st.integers(0, 2), st.integers(0, 12)),
    min_size=1,
    max_size=14,
)


def _add(engine: SimEngine, i: int, prompt: int, output: int, family: int) -> None:
    engine.add_request(f"r{i}", [family * 1000 + t for t in range(prompt)], output, seed=i)


def _feed(
    workload: list[tuple[int, int, int, int]],
    engines: Sequence[SimEngine],
    advance: Callable[[], None],
    after_arrival: Callable[[], None] = lambda: None,
) -> None:
    """Every request of the workload to every engine alike (one the engine refuses is refused by
    all), each followed by its number of `advance()` calls while the first engine has work and
    then `after_arrival()`. Draining what is left is the caller's."""
    for i, (prompt, output, family, steps) in enumerate(workload):
        for e in engines:
            try:
                _add(e, i, prompt, output, family)
            except EngineError:
                pass
        for _ in range(steps):
            if engines[0].has_unfinished():
                advance()
        after_arrival()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=_workload, blocks=st.integers(30, 90), caching=st.booleans(), cut=st.booleans())
def test_jump_equals_single_steps_on_random_workloads(
    workload: list[tuple[int, int, int, int]], blocks: int, caching: bool, cut: bool
) -> None:
    """jump(k) leaves the engine as k step() calls do: same tokens, finishes, pool counters,
    KV events and stats, with shared prefixes, preemption (small pools) and arrivals between runs.
    With `cut`, runs stop halfway (as when a request arrives mid-run)."""
    kw = {"num_gpu_blocks_override": blocks, "block_size": 4, "max_num_seqs": 5}
    jumper, stepper = make(enable_prefix_caching=caching, **kw), make(enable_prefix_caching=caching, **kw)

    def advance() -> None:
        k = jumper.steps_until_event()
        assert k == stepper.steps_until_event()
        for e in (jumper, stepper):
            # What the last step or jump left behind for steps_until_event (the decode clock's
            # heaps) agrees with a rescan.
            e._heaps_ok = False
            e._event_cache = (-1, 0)
            assert e.steps_until_event() == k
        if k < 2:
            a, b = jumper.step(), stepper.step()
            assert (a.duration_s, a.num_scheduled_tokens, a.num_preempted) == (
                b.duration_s,
                b.num_scheduled_tokens,
                b.num_preempted,
            )
            assert a.outputs == b.outputs
            return
        if cut:
            k = max(2, k // 2)
        j = jumper.jump(k, collect_tokens=True)
        singles = [stepper.step() for _ in range(k)]
        assert j.duration_s == pytest.approx(sum(s.duration_s for s in singles), rel=1e-9)
        want: dict[str, tuple[list[int], bool]] = {}
        for s in singles:
            for o in s.outputs:
                ids, _ = want.get(o.request_id, ([], False))
                want[o.request_id] = (ids + o.new_token_ids, o.finished)
        assert {o.request_id: (o.new_token_ids, o.finished) for o in j.outputs} == want

    def same_state() -> None:
        for e in (jumper, stepper):
            e.pool.check_invariants()
        a, b = jumper.stats(), stepper.stats()
        assert (a.num_blocks_used, a.num_blocks_cached, a.running, a.waiting, a.preemptions_total) == (
            b.num_blocks_used,
            b.num_blocks_cached,
            b.running,
            b.waiting,
            b.preemptions_total,
        )
        assert a.admitted_request_ids == b.admitted_request_ids
        assert a.prefix_hit_rate == b.prefix_hit_rate
        assert jumper.take_kv_events() == stepper.take_kv_events()

    _feed(workload, (jumper, stepper), advance, same_state)
    while jumper.has_unfinished():
        advance()
        same_state()
    assert not stepper.has_unfinished()
    # The EWMA folds a jump in as k steps of its mean duration: close, not exact.
    assert jumper.stats().step_ms == pytest.approx(stepper.stats().step_ms, rel=1e-3)
    assert_drained(jumper)


class _EagerHashing(SimEngine):
    """Reference: the pool hashes every block when it is cached (as it does while blocks cached
    by hash alone exist), so lookups and duplicate checks run on a plain hash -> block map."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.pool._untracked = 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=_workload, blocks=st.integers(30, 90))
def test_lazy_hashing_equals_eager_hashing(workload: list[tuple[int, int, int, int]], blocks: int) -> None:
    """Lazily hashed blocks give the same hits, evictions, KV events and stats as hashing every
    block as soon as it is cached."""
    kw = {
        "gpu": "h100",
        "model": "llama-3-8b",
        "num_gpu_blocks_override": blocks,
        "block_size": 4,
        "max_num_seqs": 5,
    }
    lazy, eager = SimEngine(EngineConfig(**kw)), _EagerHashing(EngineConfig(**kw))  # type: ignore[arg-type]

    def step_both() -> None:
        assert lazy.step().outputs == eager.step().outputs

    def same_state() -> None:
        assert lazy.stats() == eager.stats()
        assert lazy.take_kv_events() == eager.take_kv_events()
        lazy.pool.check_invariants()

    _feed(workload, (lazy, eager), step_both, same_state)
    while lazy.has_unfinished():
        step_both()
    assert lazy.stats() == eager.stats()
    assert lazy.take_kv_events() == eager.take_kv_events()
    assert_drained(lazy)


def test_released_chunk_answers_the_per_block_api() -> None:
    """A finished request's blocks are queued as one chunk without per-block state; the
    per-block API (ref_count, block_hash, touch) still sees them as queued cached blocks."""
    kw = {"gpu": "h100", "model": "llama-3-8b", "num_gpu_blocks_override": 40, "block_size": 4}
    lazy, eager = SimEngine(EngineConfig(**kw)), _EagerHashing(EngineConfig(**kw))  # type: ignore[arg-type]
    for e in (lazy, eager):
        e.add_request("a", range(1000, 1030), 6, seed=1)
        e.add_request("b", range(2000, 2021), 3, seed=2)
        run_to_end(e)
    assert lazy.pool._lazy_live > 0
    lazy.pool.check_invariants()
    for b in range(lazy.pool._fresh):
        assert lazy.pool.ref_count(b) == eager.pool.ref_count(b) == 0
    # A touch of an uncached chunked block (a's partial last block) takes it out of the queue.
    tail = next(b for b in range(lazy.pool._fresh) if eager.pool.block_hash(b) is None)
    for e in (lazy, eager):
        e.pool.touch([tail])
        assert e.pool.ref_count(tail) == 1
    lazy.pool.check_invariants()
    assert [lazy.pool.block_hash(b) for b in range(lazy.pool._fresh)] == [
        eager.pool.block_hash(b) for b in range(eager.pool._fresh)
    ]
    lazy.pool.check_invariants()
    for e in (lazy, eager):
        e.pool.allocate(e.pool.num_free)
    assert lazy.take_kv_events() == eager.take_kv_events()
    lazy.pool.check_invariants()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=_workload, blocks=st.integers(30, 90))
def test_outputs_read_late_equal_outputs_read_at_once(
    workload: list[tuple[int, int, int, int]], blocks: int
) -> None:
    """Decode outputs derive their counts from the decode clock when read: read at the very end
    (after preemptions, chunked prefills, re-admissions and jumps changed the batch), they are
    those of their step."""
    kw = {"num_gpu_blocks_override": blocks, "block_size": 4, "max_num_seqs": 5, "max_num_batched_tokens": 48}
    now, late = make(**kw), make(**kw)
    read: list[list[RequestOutput]] = []
    kept: list[StepOutput | JumpOutput] = []

    def advance() -> None:
        k = now.steps_until_event()
        assert late.steps_until_event() == k
        if k > 1:
            read.append(now.jump(k, collect_tokens=True).outputs)
            kept.append(late.jump(k, collect_tokens=True))
        else:
            read.append(now.step().outputs)
            kept.append(late.step())

    _feed(workload, (now, late), advance)
    while now.has_unfinished():
        advance()
    assert [o.outputs for o in kept] == read


def test_long_run_through_chunks_compacts_the_queue() -> None:
    """Enough traffic through a chunked free queue that its consumed front is dropped several
    times: the pool stays consistent and equal to eager hashing (per-block entries)."""
    kw = {"gpu": "h100", "model": "llama-3-8b", "num_gpu_blocks_override": 600, "block_size": 1}
    lazy, eager = SimEngine(EngineConfig(**kw)), _EagerHashing(EngineConfig(**kw))  # type: ignore[arg-type]
    for i in range(300):
        for e in (lazy, eager):
            e.add_request(f"r{i}", range(i * 1000, i * 1000 + 20 + i % 37), 5 + i % 11, seed=i)
        for _ in range(3):
            if lazy.has_unfinished():
                k = lazy.steps_until_event()
                assert eager.steps_until_event() == k
                if k > 1:
                    assert lazy.jump(k, True).outputs == eager.jump(k, True).outputs
                else:
                    assert lazy.step().outputs == eager.step().outputs
        if i % 10 == 0:
            lazy.pool.check_invariants()
    while lazy.has_unfinished():
        assert lazy.step().outputs == eager.step().outputs
    assert lazy.pool._base > 0  # the front was dropped
    assert lazy.stats() == eager.stats()
    assert lazy.take_kv_events() == eager.take_kv_events()
    assert_drained(lazy)
