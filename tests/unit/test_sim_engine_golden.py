"""Golden digests of everything SimEngine lets a caller observe, on short busy workloads.

Speed work on the engine must not change what it simulates: token ids, durations, cached
tokens, preemptions, KV events and stats are hashed step by step and compared with digests
recorded before the optimisations (jump and step drivers, a small pool that preempts, shared
prefixes and multi-turn prompts, aborts). A deliberate change of the model changes them too:
then re-record them and say so in the commit.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from gpu_worker.sim import EngineConfig, SimEngine, SimTokenizer

Arrival = tuple[float, list[int] | range, int, int]


def _arrivals(seconds: float, rate: float, seed: int, shared: bool) -> list[Arrival]:
    """Poisson arrivals; with `shared`, prompts start with one of a few system prompts and half
    of them continue an earlier conversation (its prompt + its answer + a new message)."""
    rng = random.Random(seed)
    tok = SimTokenizer()
    systems = [list(range(10**7 * (f + 1), 10**7 * (f + 1) + rng.randint(20, 600))) for f in range(4)]
    convs: list[tuple[list[int], int, int]] = []
    out: list[Arrival] = []
    t = 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        i = len(out)
        n_out = rng.randint(1, 250)
        if not shared:
            out.append((t, range(i * 100_000, i * 100_000 + rng.randint(50, 2500)), n_out, i))
            continue
        if convs and rng.random() < 0.5:
            c = rng.randrange(len(convs))
            prev, prev_out, prev_seed = convs[c]
            prompt = prev + tok.sample_many(prev_seed, 0, prev_out) + [rng.randrange(1, 50_000)] * 30
            if len(prompt) > 3000:
                continue
            convs[c] = (prompt, n_out, i)
        else:
            prompt = systems[rng.randrange(4)] + [
                rng.randrange(1, 50_000) for _ in range(rng.randint(1, 300))
            ]
            convs.append((prompt, n_out, i))
        out.append((t, prompt, n_out, i))
    return out


def _digest(engine: SimEngine, arrivals: list[Arrival], horizon: float, jump: bool, abort_p: float) -> str:
    h = hashlib.sha256()
    rng = random.Random(1)
    clock, i, live = 0.0, 0, []
    while clock < horizon:
        while i < len(arrivals) and arrivals[i][0] <= clock:
            _, prompt, n_out, seed = arrivals[i]
            engine.add_request(f"q{i}", prompt, n_out, seed=seed)
            live.append(f"q{i}")
            i += 1
        if live and rng.random() < abort_p:
            h.update(repr(engine.abort(live.pop(rng.randrange(len(live))))).encode())
        next_event = min(arrivals[i][0], horizon) if i < len(arrivals) else horizon
        if not engine.has_unfinished():
            clock = next_event
            continue
        k = engine.steps_until_event() if jump else 0
        if k > 1:
            k = min(k, 1 + engine.steps_within(next_event - clock))
        out = engine.jump(k, collect_tokens=True) if k > 1 else engine.step()
        outputs = [tuple(vars(o).values()) for o in out.outputs]
        events = engine.take_kv_events()
        h.update(repr((k, out.duration_s, out.num_scheduled_tokens, outputs, engine.stats())).encode())
        h.update(repr((events.stored, events.removed, engine.pool.num_free)).encode())
        clock += out.duration_s if out.duration_s > 0 else next_event - clock
    engine.pool.check_invariants()
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("blocks", "shared", "jump", "abort_p", "want"),
    [
        (None, False, True, 0.0, "0977c2e4a103773a"),
        (None, False, False, 0.0, "ffc7d7b3cb8f706e"),
        (1500, False, True, 0.0, "74c7df7123c5c5d0"),
        (450, True, True, 0.1, "fdbc05ed1bbad816"),
        (450, True, False, 0.1, "62b0f9480053199f"),
    ],
)
def test_outputs_match_the_recorded_digests(
    blocks: int | None, shared: bool, jump: bool, abort_p: float, want: str
) -> None:
    engine = SimEngine(EngineConfig(gpu="h100", model="llama-3-8b", num_gpu_blocks_override=blocks))
    arrivals = _arrivals(12.0, 15.0, 3, shared)
    assert _digest(engine, arrivals, 12.0, jump, abort_p) == want
