"""`kvgate drain WORKER_ID`: take a worker out of placement through the scheduler.

The scheduler marks it draining in the registry (no new sessions land there, its pins move on
their next turns) and tells the worker to drain (in-flight turns finish, then it goes offline).
The registry keeps it draining until the worker restarts, even if the worker cannot be told.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("worker_id", help="the worker to drain (as `kvgate status` lists it)")
    parser.add_argument(
        "--scheduler", default="localhost:50051", help="scheduler address (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.scheduler) as channel:
        try:
            response = scheduler_pb2_grpc.SchedulerStub(channel).DrainWorker(
                scheduler_pb2.DrainWorkerRequest(worker_id=args.worker_id), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"kvgate drain: {args.scheduler}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if not response.found:
        print(f"kvgate drain: no worker {args.worker_id!r} in the fleet", file=sys.stderr)
        return 1
    print(f"{args.worker_id}: draining (no new sessions; in-flight turns finish)")
    return 0
