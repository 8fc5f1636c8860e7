"""`kvgate scheduler`: run one scheduler replica."""

from __future__ import annotations

import argparse
import os
import sys

from kvgate.service import run_event_loop, run_until_signalled
from scheduler.policy import POLICIES
from scheduler.server import SchedulerService, SchedulerSettings
from scheduler.store import StoreSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", default="0.0.0.0:50051", help="gRPC listen address (default: %(default)s)"
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVGATE_REDIS_URL", "redis://localhost:6379/0"),
        help="Redis holding the fleet state, redis://[:password@]host:port/db "
        "(default: $KVGATE_REDIS_URL or redis://localhost:6379/0)",
    )
    parser.add_argument(
        "--mqtt-url",
        default=os.environ.get("KVGATE_MQTT_URL", "mqtt://localhost:1883"),
        help="broker carrying worker telemetry, mqtt://[user:password@]host[:port] "
        "(default: $KVGATE_MQTT_URL or mqtt://localhost:1883)",
    )
    parser.add_argument(
        "--pin-ttl",
        type=float,
        default=3600.0,
        help="seconds a session stays pinned to its worker after its last turn (default: %(default)s)",
    )
    parser.add_argument(
        "--reservation-ttl",
        type=float,
        default=30.0,
        help="seconds a reservation lives if never released (default: %(default)s)",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=2.0,
        help="telemetry age (s) after which a worker's free KV is discounted (default: %(default)s)",
    )
    parser.add_argument(
        "--dead-after",
        type=float,
        default=10.0,
        help="telemetry age (s) after which a worker gets no placements (default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        default="kvgate",
        choices=sorted(POLICIES),
        help="placement policy: kvgate (ours) or a baseline for comparison (default: %(default)s)",
    )
    parser.add_argument("--replica-id", default="", help="name of this replica (default: host-pid)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: off)")


def run(args: argparse.Namespace) -> int:
    settings = SchedulerSettings(
        listen=args.listen,
        redis_url=args.redis_url,
        mqtt_url=args.mqtt_url,
        metrics_port=args.metrics_port,
        replica_id=args.replica_id,
        policy=args.policy,
        store=StoreSettings(
            reservation_ttl_s=args.reservation_ttl,
            pin_idle_ttl_s=args.pin_ttl,
            dead_after_s=args.dead_after,
            stale_after_s=args.stale_after,
        ),
    )

    async def main() -> None:
        service = SchedulerService(settings)
        await run_until_signalled("scheduler", service.start, service.stop)

    try:
        run_event_loop(main())  # MQTT runs on its own thread and loop (kvgate/loop_thread.py)
    except ValueError as exc:
        print(f"kvgate scheduler: {exc}", file=sys.stderr)
        return 2
    return 0
