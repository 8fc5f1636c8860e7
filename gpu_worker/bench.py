"""`kvgate bench engine`: how cheap the simulated engine is (it must plan fleets of thousands).

Measures CPU time, not wall time, and reports ratios measured side by side in one run,
because the benchmark machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from gpu_worker.sim import EngineConfig, SimEngine


def _busy_engine(batch: int, prompt_tokens: int, output_tokens: int) -> SimEngine:
    engine = SimEngine(EngineConfig(gpu="h100", model="llama-3-8b", max_num_seqs=batch))
    for i in range(batch):
        engine.add_request(f"r{i}", [i * 100_000 + t for t in range(prompt_tokens)], output_tokens, seed=i)
    # Admit and prefill everything so the timed part is pure continuous-batching decode.
    while engine.steps_until_event() == 0:
        engine.step()
    return engine


def steps_per_cpu_second(batch: int = 256, steps: int = 500) -> float:
    engine = _busy_engine(batch, prompt_tokens=512, output_tokens=steps + 1000)
    assert engine.num_running == batch, f"only {engine.num_running} of {batch} running"
    started = time.process_time()
    for _ in range(steps):
        engine.step()
    return steps / (time.process_time() - started)


def _serve_stream(
    engine: SimEngine, use_jump: bool, sim_seconds: float, rng: random.Random
) -> tuple[float, float]:
    """Keep one worker busy with a steady request stream; returns (simulated s, CPU s)."""
    ids = itertools.count()
    target_running = 96

    def top_up() -> None:
        while engine.num_running + engine.num_waiting < target_running:
            n = next(ids)
            prompt = [n * 100_000 + t for t in range(rng.randint(200, 2000))]
            engine.add_request(f"q{n}", prompt, rng.randint(50, 400), seed=n)

    clock = 0.0
    started = time.process_time()
    while clock < sim_seconds:
        top_up()
        k = engine.steps_until_event() if use_jump else 0
        clock += engine.jump(k).duration_s if k > 1 else engine.step().duration_s
    return clock, time.process_time() - started


def sim_seconds_per_cpu_second(use_jump: bool, sim_seconds: float = 60.0, seed: int = 7) -> float:
    engine = SimEngine(EngineConfig(gpu="h100", model="llama-3-8b"))
    simulated, cpu = _serve_stream(engine, use_jump, sim_seconds, random.Random(seed))
    return simulated / cpu


def run_engine_bench(progress: Callable[[str], None]) -> dict[str, Any]:
    progress("engine steps per CPU second, 256-sequence decode batch")
    steps = steps_per_cpu_second()
    progress("simulated seconds per CPU second, one busy worker, step by step")
    stepwise = sim_seconds_per_cpu_second(use_jump=False)
    progress("simulated seconds per CPU second, one busy worker, with multi-step jump")
    jumping = sim_seconds_per_cpu_second(use_jump=True)
    return {
        "steps_per_cpu_s_batch256": round(steps, 1),
        "sim_s_per_cpu_s_stepwise": round(stepwise, 1),
        "sim_s_per_cpu_s_jump": round(jumping, 1),
        "jump_speedup": round(jumping / stepwise, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    result = run_engine_bench(progress)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    return 0
