"""The trace options that `kvgate sim` and `kvgate bench load` share: one spelling, one help."""

from __future__ import annotations

import argparse

from scheduler.fleetsim.trace import TRACE_ALIASES, SyntheticSpec


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        default="synthetic",
        help=f"synthetic, {', '.join(TRACE_ALIASES)} (from ../shared/traces or $KVGATE_TRACE_DIR), "
        "or a path to an Azure .csv or Mooncake .jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--sessions-per-s",
        type=float,
        default=SyntheticSpec.sessions_per_s,
        help="synthetic trace: new conversations per second (default: %(default)s)",
    )
    parser.add_argument(
        "--synthetic-duration",
        type=float,
        default=SyntheticSpec.duration_s,
        help="synthetic trace: seconds of conversation arrivals (default: %(default)s)",
    )


def synthetic_spec(args: argparse.Namespace, **overrides: float) -> SyntheticSpec:
    """The synthetic workload the options describe (`overrides`: other SyntheticSpec fields)."""
    return SyntheticSpec(
        duration_s=args.synthetic_duration,
        sessions_per_s=args.sessions_per_s,
        **overrides,  # type: ignore[arg-type]
    )
