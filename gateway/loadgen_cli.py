"""`kvgate bench load`: the command line of the load generator (gateway/loadgen.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

import aiohttp
from rich.console import Console

from gateway.loadgen import LoadConfig, LoadProgress, run_load
from gateway.loadgen_report import DROPPED, OK, SHED, LoadReport, render
from kvgate.bench_util import print_result, progress
from scheduler.fleetsim.trace import SyntheticSpec
from scheduler.fleetsim.trace_cli import add_trace_options, synthetic_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_trace_options(parser)
    parser.add_argument(
        "--gateway", default="localhost:50050", help="gateway gRPC address (default: %(default)s)"
    )
    parser.add_argument(
        "--http",
        default="",
        metavar="URL",
        help="use the OpenAI-compatible API at this base URL (e.g. http://localhost:8080/v1) instead of gRPC",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("KVGATE_API_KEY", ""),
        help="API key, sent as 'authorization: Bearer ...' (default: $KVGATE_API_KEY)",
    )
    parser.add_argument(
        "--tls-ca", default=None, help="the gateway speaks TLS: verify it with this PEM CA file"
    )
    parser.add_argument("--model", default="", help="model to ask for (default: the gateway's default)")
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="K > 1 overlays K time-shifted copies of the trace (fresh conversations); K < 1 thins it "
        "by conversation, as `kvgate sim` does (default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests/s instead: stretch or squeeze the replayed arrivals to this mean rate, keeping "
        "their burst shape (exclusive with --rate-scale)",
    )
    parser.add_argument("--duration", type=float, default=None, help="replay only the trace's first SECONDS")
    parser.add_argument("--requests", type=int, default=None, help="replay only the first N requests")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="cap on each answer's length; the trace's output length below it (default: %(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=4096,
        help="cap on a conversation's prompt: a message is cut so the conversation stays within it "
        "(default: %(default)s; the gateway takes at most 32 KiB per message)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=512,
        help="most requests open at once; a request due beyond it is late (or dropped, see --on-full) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--on-full",
        choices=("wait", "drop"),
        default="wait",
        help="a request due while --max-in-flight are open: wait for a slot (counted late) or drop it "
        "(counted dropped) (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="times a turn is sent again after UNAVAILABLE, HTTP 5xx or a lost connection "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--retry-shed",
        action="store_true",
        help="also retry shed turns (RESOURCE_EXHAUSTED / 429) after the server's pushback",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one turn may take (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic trace and of thinning")
    parser.add_argument(
        "--no-text-check",
        action="store_true",
        help="skip the check that each answer's text has as many sim-tokenizer tokens as the gateway "
        "counted (meaningless for vLLM workers; over gRPC it only checks sim workers anyway)",
    )
    parser.add_argument(
        "--think-time",
        type=float,
        default=SyntheticSpec.think_time_mean_s,
        help="synthetic trace: mean seconds between an answer and the next turn (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--records", metavar="FILE", default=None, help="also write every request as JSON Lines"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        trace=args.trace,
        gateway=args.gateway,
        http=args.http,
        api_key=args.api_key,
        tls_ca=args.tls_ca,
        model=args.model,
        rate_scale=args.rate_scale,
        rate=args.rate,
        duration_s=args.duration,
        requests=args.requests,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_in_flight=args.max_in_flight,
        on_full=args.on_full,
        retries=args.retries,
        retry_shed=args.retry_shed,
        timeout_s=args.timeout,
        seed=args.seed,
        text_check=not args.no_text_check,
        synthetic=synthetic_spec(args, think_time_mean_s=args.think_time),
    )


def _print_progress(p: LoadProgress) -> None:
    o = p.outcomes
    progress(
        f"load: {p.elapsed_s:,.0f}s · issued {p.issued:,}/{p.planned:,} · in flight {p.in_flight} · "
        f"ok {o[OK]:,} · shed {o[SHED]:,} · errors {o['error']:,} · dropped {o[DROPPED]:,}"
    )


async def _main(config: LoadConfig, quiet: bool) -> LoadReport:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_interrupt() -> None:
        # The first Ctrl-C ends the run with a report; a second one aborts (KeyboardInterrupt).
        progress("stopping: no new requests; waiting for those in flight (Ctrl-C again aborts)")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        return await run_load(config, None if quiet else _print_progress, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        config.validate()
        report = asyncio.run(_main(config, args.quiet))
    except ValueError as exc:  # a bad option, trace or model: nothing was sent
        print(f"kvgate bench load: {exc}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as exc:
        print(f"kvgate bench load: {config.http}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = report.summary()
    if args.records:
        with open(args.records, "w") as out:
            for record in report.records:
                out.write(json.dumps(record.to_json()) + "\n")
    if args.json:
        print_result(summary, as_json=True)
    else:
        Console(width=None if sys.stdout.isatty() else 160).print(render(summary))
    # Exit 1 when nothing got through: a script driving the benchmark should notice.
    return 0 if summary["ok"] or not summary["planned"] else 1
