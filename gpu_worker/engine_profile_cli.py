"""`kvgate engine-profile`: KV capacity and modelled step times of a GPU/model/TP profile."""

from __future__ import annotations

import argparse
import json
import sys

from gpu_worker.sim import GPUS, MODELS
from gpu_worker.sim.fidelity import fidelity_report, fidelity_table, format_fidelity
from gpu_worker.sim.profile_report import profile_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu", default="h100", help=f"GPU profile: {', '.join(sorted(GPUS))} (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default="llama-3-8b",
        help=f"model profile: {', '.join(sorted(MODELS))} (default: %(default)s)",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--fidelity",
        action="store_true",
        help="compare modelled step times and KV capacity with the pure roofline and published "
        "measurements (published figures for h100 / llama-3-8b / tp 1; see docs/fidelity.md)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = profile_report(args.gpu, args.model, args.tp)
    except ValueError as exc:
        print(f"kvgate engine-profile: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "fidelity", False):
        if args.json:
            print(json.dumps(fidelity_report(args.gpu, args.model, args.tp), indent=2))
        else:
            title = f"{report['model']} on {report['gpu']} x{report['tp']}"
            print(f"{title}: modelled vs pure roofline vs published")
            print(format_fidelity(fidelity_table(args.gpu, args.model, args.tp)))
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['model']} on {report['gpu']} x{report['tp']}: "
        f"{report['kv_bytes_per_token'] // 1024} KiB KV/token, {report['kv_capacity_tokens']:,} tokens "
        f"= {report['num_blocks']:,} blocks of {report['block_size']}; "
        f"ridge {report['ridge_flop_per_byte']:.0f} FLOP/byte"
    )
    print(f"{'phase':8} {'batch':>5} {'context':>8} {'new':>6} {'step ms':>9} {'FLOP/byte':>10}  bound")
    for s in report["steps"]:
        bound = "compute" if s["arithmetic_intensity"] >= report["ridge_flop_per_byte"] else "memory"
        print(
            f"{s['phase']:8} {s['batch']:>5} {s['context_tokens']:>8} {s['new_tokens']:>6} "
            f"{s['step_ms']:>9.2f} {s['arithmetic_intensity']:>10.1f}  {bound}"
        )
    return 0
