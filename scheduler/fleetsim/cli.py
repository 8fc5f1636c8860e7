"""`kvgate sim`: replay a trace on a simulated fleet behind the real placement policies.

Thin: argument parsing, progress on stderr, output formatting. The simulation lives in
scheduler.fleetsim.simulator, traces in .trace, bounds in .bounds, metrics in .metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from gpu_worker.sim import GPUS, MODELS
from scheduler.fleetsim.metrics import format_markdown, format_table
from scheduler.fleetsim.runner import PolicyRun, Scenario, policy_names, run_policies
from scheduler.fleetsim.simulator import SimConfig, parse_workers
from scheduler.fleetsim.trace import expected_requests, load_trace
from scheduler.fleetsim.trace_cli import add_trace_options, synthetic_spec
from scheduler.policy import POLICIES, KvgateConfig

# --kvgate-weights keys -> KvgateConfig fields.
WEIGHT_KEYS = {
    "free": "free_tokens_weight",
    "prefix": "prefix_weight",
    "batch": "batch_weight",
    "region": "region_weight",
    "knee": "batch_knee",
    "waiting": "waiting_penalty",
    "candidates": "max_candidates",
    "pin_wait": "max_pin_wait_s",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "compare"),
        default="run",
        help="run (the --policy given) or compare (every policy on the same trace: --policy all)",
    )
    add_trace_options(parser)
    parser.add_argument(
        "--workers",
        default="16",
        help="a count of --gpu workers, or GPU:COUNT groups like h100:12,a100:4 (default: %(default)s)",
    )
    parser.add_argument(
        "--gpu",
        default="h100",
        help=f"GPU of a plain --workers count: {', '.join(GPUS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--regions",
        default="us-east,eu-west,ap-south",
        help="regions assigned to workers round-robin (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default="llama-3-8b",
        help=f"model every worker serves: {', '.join(MODELS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        default="kvgate",
        help=f"placement policy: {', '.join(POLICIES)}, a comma-separated list, or all "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="K > 1 overlays K time-shifted copies of the trace (fresh sessions, no shared cache "
        "between copies); K < 1 thins it by session (default: %(default)s)",
    )
    parser.add_argument("--duration", type=float, default=None, help="only arrivals in the first SECONDS")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic trace, thinning and random policy"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per policy, one per line (JSON Lines)"
    )
    parser.add_argument("--markdown", action="store_true", help="print the comparison as a Markdown table")
    parser.add_argument(
        "--plot", metavar="DIR", default=None, help="write PNG plots to DIR (needs matplotlib: the sim extra)"
    )
    parser.add_argument(
        "--ttft-slo",
        type=float,
        default=2.0,
        help="time-to-first-token SLO in seconds for goodput (default: %(default)s)",
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=None,
        help="KV blocks (of 16 tokens) per worker instead of the profile's capacity",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="engine context limit (default: the model's, raised to the trace's longest request)",
    )
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=0.25,
        help="seconds between worker telemetry updates the scheduler sees (default: %(default)s)",
    )
    parser.add_argument(
        "--placement-delay",
        type=float,
        default=0.002,
        help="seconds from arrival until the worker has the request (RPCs) (default: %(default)s)",
    )
    parser.add_argument(
        "--pin-ttl",
        type=float,
        default=3600.0,
        help="idle seconds before a session pin expires (default: %(default)s)",
    )
    parser.add_argument(
        "--ignore-pins",
        action="store_true",
        help="experiment: the policy never sees session pins, only the prefix index (not the live behaviour)",
    )
    parser.add_argument(
        "--prefix-caching",
        choices=("auto", "on", "off"),
        default="auto",
        help="engines' prefix caching; auto: off only for traces whose requests share no tokens "
        "(Azure), where it changes nothing but preemption recompute and costs time (default: %(default)s)",
    )
    parser.add_argument(
        "--kvgate-weights",
        default="",
        help="override KvgateConfig for kvgate, e.g. prefix=2,free=1,batch=0.5 "
        f"(keys: {', '.join(WEIGHT_KEYS)})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def parse_weights(text: str) -> KvgateConfig | None:
    if not text.strip():
        return None
    values: dict[str, float | int] = {}
    for part in text.split(","):
        key, sep, raw = part.strip().partition("=")
        field = WEIGHT_KEYS.get(key.strip())
        if not sep or field is None:
            raise ValueError(f"bad --kvgate-weights entry {part!r}; keys: {', '.join(WEIGHT_KEYS)}")
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"--kvgate-weights {key}: not a number: {raw!r}") from None
        values[field] = int(number) if field in ("batch_knee", "max_candidates") else number
    return dataclasses.replace(KvgateConfig(), **values)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    try:
        # Checked up front: the request stream is lazy and would only fail mid-run.
        if not 0 < args.rate_scale < float("inf"):
            raise ValueError(f"--rate-scale must be a positive number, got {args.rate_scale}")
        names = policy_names("all" if args.action == "compare" else args.policy)
        regions = [r.strip() for r in args.regions.split(",") if r.strip()]
        workers = parse_workers(args.workers, regions, args.gpu)
        kvgate_config = parse_weights(args.kvgate_weights)
        trace = load_trace(args.trace, seed=args.seed, synthetic=synthetic_spec(args))
        if args.model not in MODELS:
            raise ValueError(f"unknown model profile {args.model!r}; known: {', '.join(MODELS)}")
        config = SimConfig(
            model=args.model,
            telemetry_interval_s=args.telemetry_interval,
            placement_delay_s=args.placement_delay,
            num_gpu_blocks=args.num_gpu_blocks,
            max_model_len=args.max_model_len,
            pin_idle_ttl_s=args.pin_ttl,
            worker_samples=300 if args.plot else 0,
            ignore_pins=args.ignore_pins,
            prefix_caching={"auto": None, "on": True, "off": False}[args.prefix_caching],
        )
        scenario = Scenario(
            trace=trace,
            workers=workers,
            rate_scale=args.rate_scale,
            seed=args.seed,
            duration_s=args.duration,
            config=config,
            ttft_slo_s=args.ttft_slo,
            kvgate_config=kvgate_config,
        )
        expected = expected_requests(trace, args.rate_scale)
    except ValueError as exc:
        print(f"kvgate sim: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def progress(policy: str, t: float, n: int) -> None:
        if args.quiet:
            return
        print(
            f"kvgate sim: {policy}: t={t:,.0f}s simulated, {n:,}/~{expected:,} requests, "
            f"{time.perf_counter() - started:,.0f}s wall",
            file=sys.stderr,
            flush=True,
        )

    if not args.quiet:
        print(
            f"kvgate sim: {trace.name} x{args.rate_scale:g} (~{expected:,} requests) "
            f"on {len(workers)} workers, policies: {', '.join(names)}",
            file=sys.stderr,
        )
    runs = run_policies(scenario, names, progress)
    _print(runs, args.json, args.markdown)
    if args.plot:
        from scheduler.fleetsim.plot import write_plots

        for path in write_plots(runs, args.plot):
            if not args.quiet:
                print(f"kvgate sim: wrote {path}", file=sys.stderr)
    return 0


def _print(runs: Sequence[PolicyRun], as_json: bool, markdown: bool) -> None:
    if as_json:
        for r in runs:
            print(json.dumps(r.report.to_json(), sort_keys=False))
        return
    if markdown:
        print(format_markdown([r.report for r in runs]))
        return
    print(format_table([r.report for r in runs]))
    timing = ", ".join(
        f"{r.report.policy} {r.report.wall_s:.1f}s (place {r.report.place_us_mean:.0f} us)" for r in runs
    )
    print(f"wall time: {timing}")
