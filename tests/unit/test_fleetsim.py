"""Fleet simulator event loop: timing against the engine model, jumps vs single steps, the
scheduler-side state (reservations, pins, prefix index), determinism, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpu_worker.sim.block_pool import block_hashes
from gpu_worker.sim.engine import EngineConfig
from gpu_worker.sim.profiles import get_gpu, get_model
from gpu_worker.sim.roofline import step_cost
from kvgate.cli import main
from scheduler.fleetsim.cli import parse_weights
from scheduler.fleetsim.engine import FleetEngine
from scheduler.fleetsim.runner import Scenario, run_policies
from scheduler.fleetsim.simulator import FleetSim, SimConfig, WorkerSpec, parse_workers
from scheduler.fleetsim.trace import (
    RANGE,
    SyntheticSpec,
    Trace,
    TraceRequest,
    prompt_token_ids,
    synthetic_trace,
)
from scheduler.policy import make_policy


def req(
    t: float, rid: str, prompt: int, out: int, start: int = 0, session: str | None = None
) -> TraceRequest:
    return TraceRequest(
        t, rid, session or rid, prompt, out, ((RANGE, start, prompt),), seed=sum(map(ord, rid))
    )


def trace_of(requests: Sequence[TraceRequest], shares: bool = True) -> Trace:
    return Trace("hand", list(requests), shares_prefixes=shares, token_stride=10**9, seed_stride=10**6)


def sim(
    requests: Sequence[TraceRequest], workers: int = 1, policy: str = "round-robin", **config: object
) -> FleetSim:
    specs = [WorkerSpec(f"w{i}", "h100", "r") for i in range(workers)]
    trace = trace_of(requests)
    return FleetSim(specs, make_policy(policy), trace, trace.requests, SimConfig(**config))  # type: ignore[arg-type]


def prefill_s(tokens: int) -> float:
    return step_cost(
        get_gpu("h100"),
        get_model("llama-3-8b"),
        1,
        0,
        0,
        tokens,
        0,
        prefill_attention_pairs=tokens * (tokens + 1) / 2,
    ).seconds


def test_one_request_ttft_is_delay_plus_its_prefill_step() -> None:
    s = sim([req(1.0, "a", 1000, 1)], placement_delay_s=0.002)
    data = s.run()
    assert data.served == 1 and data.requests == 1
    assert data.ttft_s[0] == pytest.approx(0.002 + prefill_s(1000), rel=1e-9)
    assert data.e2e_s[0] == data.ttft_s[0]  # one output token: done at the first token


def test_decode_runs_are_jumped_and_match_single_steps() -> None:
    # Requests arrive in the middle of each other's decode runs: every run is cut at the step
    # in flight. Jumping must give the same times as stepping one step per event.
    reqs = [req(0.1 * i, f"r{i}", 200 + 37 * i, 150 + 11 * i, start=10_000 * i) for i in range(12)]
    fast = sim(reqs, workers=2).run()
    slow = sim(reqs, workers=2, use_jumps=False).run()
    assert fast.served == slow.served == 12
    assert list(fast.ttft_s) == pytest.approx(list(slow.ttft_s), rel=1e-9, abs=1e-9)
    assert sorted(fast.e2e_s) == pytest.approx(sorted(slow.e2e_s), rel=1e-9, abs=1e-9)
    assert fast.itl.percentile(50) == pytest.approx(slow.itl.percentile(50), rel=0.02)


def test_jump_seconds_prices_a_run_like_jump() -> None:
    engine = FleetEngine(EngineConfig(gpu="h100", model="llama-3-8b"))
    for i in range(5):
        engine.add_request(f"r{i}", list(range(i * 1000, i * 1000 + 300 + i)), 200)
    engine.step()
    k = engine.steps_until_event()
    assert k > 10
    assert engine.jump_seconds(k - 3) == engine.jump(k - 3).duration_s


def test_add_request_hashed_behaves_like_add_request() -> None:
    def run(hashed: bool) -> list[tuple[str, int, int, int]]:
        engine = FleetEngine(EngineConfig(gpu="h100", model="llama-3-8b", num_gpu_blocks_override=120))
        out = []
        for i in range(6):
            prompt = list(range(400)) + list(range(10_000 * i, 10_000 * i + 37 * i + 5))
            hashes = block_hashes(prompt, 16) if hashed else []
            engine.add_request_hashed(f"r{i}", prompt, 60, i, hashes)
        while engine.has_unfinished():
            for o in engine.step().outputs:
                out.append((o.request_id, o.num_cached_tokens, o.num_output_tokens, o.new_token_ids[0]))
        stats = engine.stats()
        out.append(
            ("stats", stats.preemptions_total, stats.num_blocks_cached, int(stats.prefix_hit_rate * 1e6))
        )
        return out

    assert run(True) == run(False)


def test_same_time_events_keep_trace_order() -> None:
    reqs = [req(0.5, f"r{i}", 100, 5, start=1000 * i) for i in range(4)]
    data = sim(reqs, workers=1).run()
    # The first reaches an idle worker and starts a step at once; the other three arrive
    # while it is in flight and are admitted together by the next step.
    assert data.served == 4
    assert data.ttft_s[0] < data.ttft_s[1] == data.ttft_s[2] == data.ttft_s[3]


def test_reservations_spread_a_burst_before_telemetry_shows_it() -> None:
    # 8 large requests at once; telemetry has not ticked yet, so only reservations keep
    # least-kv from piling them all onto one worker.
    reqs = [req(0.0, f"r{i}", 100_000, 10, start=200_000 * i) for i in range(8)]
    s = sim(reqs, workers=4, policy="least-kv")
    data = s.run()
    assert data.served == 8
    assert sorted(data.prefill_tokens_by_worker) == [200_000] * 4


def test_reservation_released_once_telemetry_shows_the_request() -> None:
    s = sim([req(0.01, "a", 1000, 2000)], workers=1, telemetry_interval_s=0.25)
    heap_run = s.run()
    assert heap_run.served == 1
    w = s.workers[0]
    assert w.reserved == 0 and w.view is not None and w.view.reserved_tokens == 0


def test_pins_and_prefix_index_keep_a_conversation_on_its_worker() -> None:
    # Turn 2 extends turn 1 (same leading tokens) after turn 1 finished: kvgate places it on
    # the same worker (pin) and the engine reuses the cached prefix.
    t1 = TraceRequest(0.0, "t1", "s", 2000, 50, ((RANGE, 0, 2000),), seed=1)
    t2 = TraceRequest(5.0, "t2", "s", 3000, 50, ((RANGE, 0, 2000), (RANGE, 50_000, 1000)), seed=2)
    other = [req(0.5 + 0.1 * i, f"o{i}", 3000, 50, start=100_000 * (i + 1)) for i in range(6)]
    s = sim([t1, *other, t2], workers=4, policy="kvgate")
    data = s.run()
    assert data.outcomes.get("pinned_hit") == 1
    assert data.cached_tokens == 2000  # turn 1's whole prompt (125 full blocks)
    assert data.cached_tokens / data.prompt_tokens == pytest.approx(2000 / (2000 + 6 * 3000 + 3000))


def test_prefix_hits_walk_leading_blocks_per_worker() -> None:
    s = sim([], workers=3)
    s._index.update({11: 0b111, 12: 0b011, 13: 0b001, 14: 0b101})
    assert s._prefix_hits([11, 12, 13, 14]) == {"w2": 1, "w1": 2, "w0": 4}
    assert s._prefix_hits([12, 11]) == {"w0": 2, "w1": 2}
    assert s._prefix_hits([99, 11]) == {}


def test_full_fleet_sheds_by_tier_and_counts_it() -> None:
    reqs = [req(0.0, f"r{i}", 7000, 1000, start=10_000 * i) for i in range(40)]
    data = sim(reqs, workers=1, num_gpu_blocks=2000).run()  # 32k tokens: 4 requests fit
    shed = sum(data.shed_by_tier.values())
    assert shed > 0 and data.served + shed == 40
    assert set(data.shed_by_tier) <= {"free", "plus", "enterprise"}


def scenario(**kw: object) -> Scenario:
    trace = synthetic_trace(SyntheticSpec(duration_s=40.0, sessions_per_s=1.5), seed=5)
    base: dict[str, object] = {"trace": trace, "workers": parse_workers("h100:2,a100:1", ["us", "eu"])}
    base.update(kw)
    return Scenario(**base)  # type: ignore[arg-type]


def test_runs_are_deterministic_for_a_seed() -> None:
    names = ["kvgate", "random"]
    a = [
        dataclasses.replace(r.report, wall_s=0.0, place_us_mean=0.0) for r in run_policies(scenario(), names)
    ]
    b = [
        dataclasses.replace(r.report, wall_s=0.0, place_us_mean=0.0) for r in run_policies(scenario(), names)
    ]
    assert a == b
    assert a[0].requests > 20 and a[0].served > 0
    assert 0.0 < a[0].prefix_hit_ratio <= a[0].oracle_hit_ratio <= 1.0
    assert a[0].pooled_lru_hit_ratio <= a[0].oracle_hit_ratio


def test_parse_workers_and_weights() -> None:
    ws = parse_workers("h100:2,a100:1", ["us", "eu"])
    assert [(w.gpu, w.region) for w in ws] == [("h100", "us"), ("h100", "eu"), ("a100", "us")]
    assert len({w.worker_id for w in ws}) == 3
    assert len(parse_workers("5", ["r"])) == 5
    with pytest.raises(ValueError, match="GPU:COUNT"):
        parse_workers("h100", ["r"])
    with pytest.raises(ValueError, match="unknown GPU"):
        parse_workers("tpu:3", ["r"])
    cfg = parse_weights("prefix=2,free=0.5,knee=32")
    assert cfg is not None and (cfg.prefix_weight, cfg.free_tokens_weight, cfg.batch_knee) == (2.0, 0.5, 32)
    with pytest.raises(ValueError, match="keys"):
        parse_weights("bogus=1")


def test_cli_json_prints_one_object_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "sim",
            "--trace",
            "synthetic",
            "--synthetic-duration",
            "20",
            "--workers",
            "3",
            "--policy",
            "kvgate,least-kv",
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ["kvgate", "least-kv"], strict=True):
        obj = json.loads(line)
        assert obj["policy"] == name
        for key in (
            "requests",
            "prefix_hit_ratio",
            "oracle_hit_ratio",
            "pooled_lru_hit_ratio",
            "ttft_p50_s",
            "ttft_p99_s",
            "shed_ratio",
            "load_imbalance",
        ):
            assert key in obj
        assert not any(isinstance(v, float) and math.isnan(v) for v in obj.values())


def test_cli_rejects_bad_input_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--trace", "/nonexistent/x.csv", "--quiet"]) == 2
    assert main(["sim", "--policy", "nope", "--quiet"]) == 2
    assert main(["sim", "--rate-scale", "-1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("kvgate sim: ") for line in err)


def test_prompt_token_ids_of_hand_requests() -> None:
    assert list(prompt_token_ids(req(0, "a", 5, 1, start=7))) == [7, 8, 9, 10, 11]


def test_prefix_caching_off_changes_nothing_when_no_tokens_are_shared() -> None:
    reqs = [req(0.05 * i, f"r{i}", 300 + 50 * i, 40 + i, start=10_000 * i) for i in range(20)]
    specs = [WorkerSpec(f"w{i}", "h100", "r") for i in range(2)]
    trace = trace_of(reqs, shares=False)

    def run(caching: bool | None) -> tuple[list[float], list[float]]:
        s = FleetSim(specs, make_policy("least-kv"), trace, trace.requests, SimConfig(prefix_caching=caching))
        data = s.run()
        assert s.workers[0].engine.config.enable_prefix_caching is (caching is True)
        return list(data.ttft_s), list(data.e2e_s)

    assert run(None) == run(True)


def test_ignore_pins_hides_pins_from_the_policy() -> None:
    t1 = TraceRequest(0.0, "t1", "s", 2000, 50, ((RANGE, 0, 2000),), seed=1)
    t2 = TraceRequest(5.0, "t2", "s", 3000, 50, ((RANGE, 0, 2000), (RANGE, 50_000, 1000)), seed=2)
    data = sim([t1, t2], workers=3, policy="kvgate", ignore_pins=True).run()
    assert data.policy == "kvgate/no-pins"
    assert data.outcomes == {"new": 2}
    assert data.cached_tokens == 2000  # the prefix index alone found the cached worker


def test_plot_writes_png_charts(tmp_path: Path) -> None:
    out = tmp_path / "plots"
    result = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "sim", "compare", "--trace", "synthetic", "--workers", "4",
         "--synthetic-duration", "20", "--policy", "all", "--quiet", "--plot", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs, result.stdout
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
