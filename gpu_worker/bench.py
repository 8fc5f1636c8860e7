"""`kvgate bench engine`: how cheap the simulated engine is (it must plan fleets of thousands).

Measures CPU time, not wall time, and reports ratios measured side by side in one run
(alternating, several repetitions, medians), because the benchmark machines are shared
and noisy.

Two measurements:

- Engine steps per CPU second for a 256-sequence pure-decode batch (the step() hot path).
- Simulated seconds per CPU second for one busy worker: Poisson arrivals with request
  lengths drawn from the Azure LLM inference trace (conversation service, 2023) at a fixed
  fraction of the worker's capacity, served step by step and with the multi-step jump
  (`steps_until_event`/`steps_within`/`jump` between arrivals and finishes). Both modes see
  the same arrival stream and must simulate the same thing.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_worker.sim import EngineConfig, SimEngine, get_gpu, get_model, kv_capacity_tokens, step_cost
from kvgate.bench_util import print_result, progress

# The shared traces directory sits next to the repository (see its README); CI has it there too.
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_conv_2023.csv"
TRACE_ENV = "KVGATE_BENCH_TRACE"

# Fallback when the trace file is missing: log-normal lengths matched to the Azure
# conversation trace's median and mean (prompt: median 1020, mean 1155 tokens; output:
# median 129, mean 211 tokens), clipped to the trace's range.
SYNTHETIC_PROMPT = (math.log(1020), 0.50, 2, 7000)
SYNTHETIC_OUTPUT = (math.log(129), 0.99, 7, 1000)

BUSY_GPU = "h100"
BUSY_MODEL = "llama-3-8b"
# Offered load as a fraction of the worker's request capacity (see capacity_rps).
BUSY_LOAD = 0.75


@dataclass(frozen=True)
class Lengths:
    """(prompt tokens, output tokens) pairs requests are drawn from, and where they came from."""

    pairs: list[tuple[int, int]]
    source: str

    @property
    def mean_prompt(self) -> float:
        return statistics.fmean(p for p, _ in self.pairs)

    @property
    def mean_output(self) -> float:
        return statistics.fmean(o for _, o in self.pairs)


def load_lengths(path: Path | None = None, max_model_len: int = 8192, seed: int = 0) -> Lengths:
    """Request lengths of the Azure conversation trace (columns TIMESTAMP, ContextTokens,
    GeneratedTokens), dropping the rare rows longer than max_model_len; the synthetic
    distribution above when the file is absent."""
    path = path or Path(os.environ.get(TRACE_ENV, DEFAULT_TRACE))
    if path.is_file():
        with path.open(newline="") as f:
            pairs = [(int(row["ContextTokens"]), int(row["GeneratedTokens"])) for row in csv.DictReader(f)]
        pairs = [(p, o) for p, o in pairs if p >= 1 and o >= 1 and p + o <= max_model_len]
        if pairs:
            return Lengths(pairs, f"{path.name} ({len(pairs):,} requests)")
    rng = random.Random(seed)

    def draw(mu: float, sigma: float, lo: int, hi: int) -> int:
        return min(max(round(rng.lognormvariate(mu, sigma)), lo), hi)

    pairs = [(draw(*SYNTHETIC_PROMPT), draw(*SYNTHETIC_OUTPUT)) for _ in range(20_000)]
    return Lengths(pairs, "synthetic log-normal (trace file not found)")


def capacity_rps(config: EngineConfig, mean_prompt: float, mean_output: float) -> float:
    """Requests per second one worker can serve at most, from the roofline: each request costs
    a prefill of the mean prompt plus its share of mean_output decode steps at the largest
    batch the worker holds (max_num_seqs, or fewer if the KV cache cannot hold them)."""
    gpu, model = get_gpu(config.gpu), get_model(config.model)
    kv_tokens = kv_capacity_tokens(gpu, model, config.tp, config.gpu_memory_utilization)
    batch = max(1, min(config.max_num_seqs, int(kv_tokens // (mean_prompt + mean_output))))
    prefill_s = step_cost(gpu, model, config.tp, 0, 0, mean_prompt, 0).seconds
    context = batch * (mean_prompt + mean_output / 2)
    per_token_s = step_cost(gpu, model, config.tp, context, batch, 0, 0).seconds / batch
    return 1.0 / (prefill_s + mean_output * per_token_s)


@dataclass(frozen=True)
class Arrival:
    time_s: float
    prompt_tokens: int
    output_tokens: int


def poisson_arrivals(rate: float, horizon_s: float, lengths: Lengths, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < horizon_s:
        p, o = rng.choice(lengths.pairs)
        out.append(Arrival(t, p, o))
        t += rng.expovariate(rate)
    return out


@dataclass(frozen=True)
class ServeResult:
    sim_s: float
    cpu_s: float
    steps: int
    calls: int  # step() + jump() calls
    admitted: int
    finished: int
    # Time-weighted mean number of running requests.
    mean_running: float

    @property
    def sim_s_per_cpu_s(self) -> float:
        return self.sim_s / self.cpu_s


def serve(engine: SimEngine, arrivals: Sequence[Arrival], horizon_s: float, use_jump: bool) -> ServeResult:
    """Drive one worker through an arrival stream until horizon_s of engine time.

    Events are arrivals and finishes. Step by step, every step first admits the arrivals
    that happened before it starts. With the jump, the run between events is one jump: k =
    min(steps_until_event(), 1 + steps_within(next arrival - now)), i.e. every step that
    starts before the next arrival (the last of them is in flight when it arrives), which
    simulates the same thing as stepping (up to float rounding of the summed durations).
    """
    clock = 0.0
    i = 0
    n = len(arrivals)
    steps = calls = 0
    running_time = 0.0
    started = time.process_time()
    while clock < horizon_s:
        while i < n and arrivals[i].time_s <= clock:
            a = arrivals[i]
            base = i * 100_000  # unique token ids: the trace has no prompt text to share
            engine.add_request(f"q{i}", range(base, base + a.prompt_tokens), a.output_tokens, seed=i)
            i += 1
        next_event = min(arrivals[i].time_s, horizon_s) if i < n else horizon_s
        if not engine.has_unfinished():
            clock = next_event
            continue
        batch = engine.num_running
        k = engine.steps_until_event() if use_jump else 0
        if k > 1:
            k = min(k, 1 + engine.steps_within(next_event - clock))
        if k > 1:
            dt = engine.jump(k).duration_s
            steps += k
        else:
            dt = engine.step().duration_s
            steps += 1
        calls += 1
        if dt <= 0.0:  # nothing schedulable (cannot happen with requests that fit): idle to the next event
            dt = next_event - clock
        clock += dt
        running_time += batch * dt
    cpu = time.process_time() - started
    unfinished = engine.num_running + engine.num_waiting
    return ServeResult(clock, cpu, steps, calls, i, i - unfinished, running_time / clock if clock else 0.0)


def busy_worker_config() -> EngineConfig:
    return EngineConfig(gpu=BUSY_GPU, model=BUSY_MODEL)


def busy_worker_run(
    use_jump: bool, arrivals: Sequence[Arrival], horizon_s: float, config: EngineConfig | None = None
) -> ServeResult:
    return serve(SimEngine(config or busy_worker_config()), arrivals, horizon_s, use_jump)


def _busy_engine(batch: int, prompt_tokens: int, output_tokens: int) -> SimEngine:
    engine = SimEngine(EngineConfig(gpu="h100", model="llama-3-8b", max_num_seqs=batch))
    for i in range(batch):
        engine.add_request(f"r{i}", [i * 100_000 + t for t in range(prompt_tokens)], output_tokens, seed=i)
    # Admit and prefill everything so the timed part is pure continuous-batching decode.
    while engine.steps_until_event() == 0:
        engine.step()
    return engine


def steps_per_cpu_second(batch: int = 256, steps: int = 500, read_outputs: bool = False) -> float:
    """step() calls per CPU second on a running decode batch. With read_outputs every step's
    outputs (RequestOutput objects with token ids) are materialised and read, as the live
    worker does; without, they are left unread (as a driver that only needs durations)."""
    engine = _busy_engine(batch, prompt_tokens=512, output_tokens=steps + 1000)
    assert engine.num_running == batch, f"only {engine.num_running} of {batch} running"
    started = time.process_time()
    if read_outputs:
        for _ in range(steps):
            for out in engine.step().outputs:
                _ = out.new_token_ids
    else:
        for _ in range(steps):
            engine.step()
    return steps / (time.process_time() - started)


def run_engine_bench(
    progress: Callable[[str], None], repeats: int = 3, horizon_s: float = 300.0, seed: int = 7
) -> dict[str, Any]:
    lengths = load_lengths()
    config = busy_worker_config()
    rate = BUSY_LOAD * capacity_rps(config, lengths.mean_prompt, lengths.mean_output)
    arrivals = poisson_arrivals(rate, horizon_s, lengths, seed)
    step_rates: list[float] = []
    step_rates_read: list[float] = []
    stepwise: list[ServeResult] = []
    jumping: list[ServeResult] = []
    for r in range(repeats):
        progress(
            f"round {r + 1}/{repeats}: 256-sequence decode steps; busy worker step by step, then with jump"
        )
        step_rates.append(steps_per_cpu_second())
        step_rates_read.append(steps_per_cpu_second(read_outputs=True))
        stepwise.append(busy_worker_run(False, arrivals, horizon_s, config))
        jumping.append(busy_worker_run(True, arrivals, horizon_s, config))
    s_rate = statistics.median(x.sim_s_per_cpu_s for x in stepwise)
    j_rate = statistics.median(x.sim_s_per_cpu_s for x in jumping)
    ref, jref = stepwise[0], jumping[0]
    return {
        "steps_per_cpu_s_batch256": round(statistics.median(step_rates), 1),
        "steps_per_cpu_s_batch256_outputs_read": round(statistics.median(step_rates_read), 1),
        "sim_s_per_cpu_s_stepwise": round(s_rate, 1),
        "sim_s_per_cpu_s_jump": round(j_rate, 1),
        "jump_speedup": round(j_rate / s_rate, 2),
        "busy_worker": {
            "gpu": config.gpu,
            "model": config.model,
            "lengths": lengths.source,
            "mean_prompt_tokens": round(lengths.mean_prompt, 1),
            "mean_output_tokens": round(lengths.mean_output, 1),
            "load_fraction": BUSY_LOAD,
            "arrival_rate_per_s": round(rate, 2),
            "sim_seconds": round(ref.sim_s, 1),
            "requests_admitted": ref.admitted,
            "requests_finished": [ref.finished, jref.finished],
            "mean_running": [round(ref.mean_running, 1), round(jref.mean_running, 1)],
            "engine_steps": [ref.steps, jref.steps],
            "engine_calls": [ref.calls, jref.calls],
        },
        "repeats": repeats,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternating rounds; medians are reported (default: %(default)s)",
    )
    parser.add_argument(
        "--sim-seconds",
        type=float,
        default=300.0,
        help="engine seconds of the busy-worker run (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    result = run_engine_bench(progress, repeats=max(1, args.repeats), horizon_s=args.sim_seconds)
    print_result(result, args.json)
    return 0
