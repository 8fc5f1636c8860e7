"""Process lifecycle shared by every kvgate service: one place for start, signals and graceful stop.

Each service owns a grpc.aio server with health and reflection, an optional
Prometheus endpoint and background tasks. `run_until_signalled` is what the CLI
calls; tests start and stop services in-process through the same methods.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from kvgate.tls import TlsFiles

log = logging.getLogger(__name__)

# Generous but bounded: a chat history of a long conversation fits, a runaway client does not.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Detect dead peers (a worker host gone without FIN) within ~30 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Gateways ping workers every 5 s (WORKER_CHANNEL_OPTIONS); allow that without strikes.
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients re-connect (GOAWAY) every 5 minutes, so connections spread onto replicas that were
    # added or restarted since (a layer-4 balancer or dns:/// round robin only balances
    # connections); streams in flight get 10 more minutes to finish on the old one.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
    # grpc-core queues calls that arrived before the Python server accepted them and, past
    # 1,000 queued (3,000 hard), cancels new ones at random: a burst of 2,000 streams (clients
    # of a failed gateway reconnecting at once) got ~8% bare CANCELLED, which no client retries.
    # Our admission (rate limits, shedding with a retry hint) is the overload control instead.
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Fail fast to the caller's retry logic instead of queueing on a dead address.
    ("grpc.enable_retries", 0),
]

# Gateway -> worker: a worker cut off by the network sends no RST, so its streams would hang
# until keepalive gives up. Ping every 5 s and give up after 5 more: a turn stalls at most
# ~10 s before it fails over to another worker.
WORKER_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *((name, value) for name, value in CHANNEL_OPTIONS if not name.startswith("grpc.keepalive_time")),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


# A health "service" that stays SERVING while the process runs, draining included: liveness
# probes check it, readiness probes check the overall status (NOT_SERVING while draining), so an
# orchestrator stops routing to a draining process without killing it mid-drain.
LIVENESS_SERVICE = "kvgate.liveness"


class GrpcHost:
    """A grpc.aio server with health (per service, overall and liveness) and reflection."""

    def __init__(
        self, listen: str, service_names: Iterable[str], tls: TlsFiles | None = None, loopback: bool = False
    ) -> None:
        self.listen = listen
        self.tls = tls
        # An extra plaintext port on 127.0.0.1 for in-process callers (the HTTP facade) when the
        # public port speaks TLS: they need no certificate, and nothing off-host can reach it.
        self._loopback = loopback
        self.loopback_port = 0
        self.service_names = list(service_names)
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        self.port = 0

    async def start(self) -> None:
        if self.tls is not None:
            self.port = self.server.add_secure_port(self.listen, self.tls.grpc_credentials())
        else:
            self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen!r}: address in use or invalid")
        if self._loopback:
            self.loopback_port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)

    @property
    def loopback_address(self) -> str:
        """Plaintext address for in-process callers: the loopback port, or the public one without TLS."""
        return f"127.0.0.1:{self.loopback_port}" if self.loopback_port else self.address

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"


def start_metrics_server(port: int | None) -> None:
    if port is None or port < 0:
        return
    start_http_server(port)
    log.info("Prometheus metrics on :%d/metrics", port)


class BackgroundTasks:
    """Named long-running tasks whose crash is logged, not swallowed."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_task_death)
        self._tasks.append(task)

    async def join(self, timeout_s: float) -> None:
        """Wait for the tasks to end on their own, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        await self.cancel_all()

    async def cancel_all(self, timeout_s: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a library that swallows cancellation must not hang shutdown.
            _, stuck = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in stuck:
                log.warning("background task %s did not stop within %.0fs", task.get_name(), timeout_s)
        self._tasks.clear()


def _log_task_death(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %s died: %r", task.get_name(), exc, exc_info=exc)


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a service process's main coroutine on uvloop when it is installed, else on asyncio.
    uvloop saves CPU per RPC and per streamed chunk (the scheduler spent about a sixth less per
    placement, `kvgate bench placement`; a sim worker's first token came ~1.5 ms sooner, `kvgate
    bench relay`); grpc.aio, redis-py and aiohttp run on it unchanged. MQTT does not: each
    process's MQTT client has a thread and asyncio loop of its own (kvgate/loop_thread.py)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def run_until_signalled(
    name: str, start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start a service, wait for SIGTERM/SIGINT, stop it gracefully (the service owns its grace)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await start()
    freeze_startup_heap()
    log.info("%s started", name)
    await stop_requested.wait()
    log.info("%s: shutdown requested, draining", name)
    # A second signal during the drain forces an exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _force_exit)
    await stop()
    log.info("%s stopped", name)


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, protobuf descriptors, grpc, the policy) out of
    the cyclic GC's reach: a full collection otherwise walks that whole heap, a stall of 30-85 ms
    seen in a scheduler under load (`gc.callbacks`), which a latency tail cannot hide. Objects
    created while serving are still collected as before."""
    gc.collect()
    gc.freeze()


def _force_exit() -> None:
    raise SystemExit(1)
