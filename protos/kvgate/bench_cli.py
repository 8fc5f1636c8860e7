"""`kvgate bench ...`: benchmarks of kvgate's parts, each reporting ratios measured in one run."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("gpu_worker.bench", "simulated engine cost: steps per CPU second, jump speed-up"),
    "worker": (
        "gpu_worker.bench_live",
        "live sim worker: streamed tokens/s over gRPC vs its engine model, real time and CPU-bound",
    ),
    "relay": (
        "gateway.bench",
        "gateway relay: coalescing vs per-chunk tokens/s, added TTFT, RSS at 2,000 streams",
    ),
    "placement": ("scheduler.bench", "placement latency/throughput of scheduler replicas on real Redis"),
    "load": (
        "gateway.loadgen_cli",
        "open-loop load on a running gateway from a trace: TTFT/ITL/E2E, shed, errors, per worker",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_path, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_path)
        child = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(child)
        child.set_defaults(run=module.run)
