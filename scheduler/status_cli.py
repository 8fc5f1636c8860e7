"""`kvgate status`: the fleet as the scheduler sees it, live in the terminal or as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc

BAR_WIDTH = 24
STATE_STYLE = {"ready": "green", "draining": "yellow", "stale": "magenta", "offline": "red"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheduler", default="localhost:50051", help="scheduler address (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    parser.add_argument("--once", action="store_true", help="print one table and exit (no live view)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="live refresh period, s (default: %(default)s)"
    )


def kv_bar(worker: scheduler_pb2.WorkerState) -> Text:
    """Used (red), cached-but-evictable (yellow), free (green) KV blocks."""
    total = max(1, worker.num_blocks_total)
    used = round(BAR_WIDTH * worker.num_blocks_used / total)
    cached = min(BAR_WIDTH - used, round(BAR_WIDTH * worker.num_blocks_cached / total))
    bar = Text()
    bar.append("█" * used, style="red")
    bar.append("▓" * cached, style="yellow")
    bar.append("░" * (BAR_WIDTH - used - cached), style="green")
    return bar


def render(status: scheduler_pb2.FleetStatusResponse) -> Group:
    by_region: dict[str, list[scheduler_pb2.WorkerState]] = defaultdict(list)
    for worker in status.workers:
        by_region[worker.region or "?"].append(worker)
    tables = []
    for region in sorted(by_region):
        table = Table(title=f"region {region}", title_justify="left", expand=False)
        for column in ("worker", "state", "KV used/cached/free", "free tok", "reserved", "batch", "waiting",
                       "step ms", "FLOP/B", "tok/s", "pins", "prefix blk", "age s"):  # fmt: skip
            table.add_column(column, justify="left" if column in ("worker", "state") else "right")
        for w in by_region[region]:
            table.add_row(
                w.worker_id, Text(w.state, style=STATE_STYLE.get(w.state, "")), kv_bar(w),
                f"{w.free_tokens:,}", f"{w.reserved_tokens:,}", str(w.running), str(w.waiting),
                f"{w.step_ms:.1f}", f"{w.arithmetic_intensity:.0f}", f"{w.tokens_per_s:,.0f}",
                str(w.pinned_sessions),
                f"{w.blocks_indexed:,}", f"{w.last_seen_age_s:.1f}",
            )  # fmt: skip
        tables.append(table)
    used_pct = 100 * (1 - status.fleet_kv_tokens_free / max(1, status.fleet_kv_tokens_total))
    shed = ", ".join(f"{tier} {n}" for tier, n in sorted(status.shed_by_tier.items())) or "none"
    placed = ", ".join(f"{k} {n}" for k, n in sorted(status.placements_by_outcome.items())) or "none"
    summary = Text(
        f"fleet KV: {status.fleet_kv_tokens_total:,} tokens, {used_pct:.1f}% used · "
        f"placements: {placed} · shed by tier: {shed}"
    )
    return Group(*tables, summary)


async def fetch(address: str) -> scheduler_pb2.FleetStatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: scheduler_pb2.FleetStatusResponse = await scheduler_pb2_grpc.SchedulerStub(
            channel
        ).FleetStatus(scheduler_pb2.FleetStatusRequest(), timeout=5)
        return response


async def _live(args: argparse.Namespace) -> None:
    console = Console()
    with Live(render(await fetch(args.scheduler)), console=console, refresh_per_second=4) as live:
        while True:
            await asyncio.sleep(args.interval)
            live.update(render(await fetch(args.scheduler)))


def run(args: argparse.Namespace) -> int:
    try:
        if args.json:
            print(json.dumps(MessageToDict(asyncio.run(fetch(args.scheduler))), indent=2))
        elif args.once or not sys.stdout.isatty():
            # Piped output has no terminal width; 80 columns would squash the table.
            Console(width=None if sys.stdout.isatty() else 180).print(
                render(asyncio.run(fetch(args.scheduler)))
            )
        else:
            asyncio.run(_live(args))
    except grpc.aio.AioRpcError as exc:
        print(
            f"kvgate status: scheduler at {args.scheduler}: {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
