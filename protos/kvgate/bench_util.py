"""Pieces every `kvgate bench ...` shares: progress on stderr, results on stdout, free ports."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def print_result(result: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(key) for key in result) + 2
    for key, value in result.items():
        print(f"{key:{width}} {value}")


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for services the benchmark starts itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn_kvgate(*args: str) -> subprocess.Popen[bytes]:
    """A `kvgate ...` service process of this interpreter, quiet but for errors."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvgate.cli", "--log-level", "ERROR", *args], stdout=subprocess.DEVNULL
    )


async def retry_rpc_until_ok(
    attempt: Callable[[], Awaitable[object]], timeout_s: float, pause_s: float
) -> None:
    """Call `attempt` until it completes without a gRPC error (a service that is starting up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await attempt()
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(pause_s)
