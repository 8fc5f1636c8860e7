"""Wiring of one scheduler replica: Redis state, MQTT telemetry ingest, gRPC Scheduler service."""

from __future__ import annotations

import itertools
import logging
import os
import socket
from dataclasses import dataclass, field

import grpc

from kvgate.mqtt_url import MqttUrl
from kvgate.redis_conn import connect_redis
from kvgate.service import CHANNEL_OPTIONS, GrpcHost, start_metrics_server
from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler.fleet_cache import FleetCache
from scheduler.ingest_thread import IngestThread
from scheduler.policy import make_policy
from scheduler.servicer import SchedulerServicer
from scheduler.store import FleetStore, StoreSettings

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


@dataclass(frozen=True)
class SchedulerSettings:
    listen: str = "0.0.0.0:50051"
    redis_url: str = "redis://localhost:6379/0"
    mqtt_url: str = "mqtt://localhost:1883"
    metrics_port: int | None = None
    replica_id: str = ""
    policy: str = "kvgate"
    store: StoreSettings = field(default_factory=StoreSettings)
    fleet_cache_s: float = 0.1
    grace_s: float = 5.0


_replicas_in_process = itertools.count(1)


def _default_replica_id() -> str:
    """host-pid, and a number after it for a second replica in one process (tests run two): the
    replica id names its MQTT client, and a broker keeps one connection per client id, so two
    replicas sharing one would disconnect each other in turn and miss telemetry."""
    n = next(_replicas_in_process)
    base = f"{socket.gethostname()}-{os.getpid()}"
    return base if n == 1 else f"{base}-{n}"


class SchedulerService:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings.redis_url)
        self.store = FleetStore(self.redis, settings.store)
        self.fleet = FleetCache(self.store, max_age_s=settings.fleet_cache_s)
        self.host = GrpcHost(settings.listen, [SCHEDULER_SERVICE])
        self.servicer = SchedulerServicer(
            self.store, self.fleet, make_policy(settings.policy), self._drain_worker
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.host.server)
        replica = settings.replica_id or _default_replica_id()
        # Its own thread and asyncio loop: see kvgate/loop_thread.py for why not this (uvloop) loop.
        self.ingest = IngestThread(
            MqttUrl.parse(settings.mqtt_url),
            settings.redis_url,
            settings.store,
            f"kvgate-scheduler-{replica}",
        )

    @property
    def address(self) -> str:
        return self.host.address

    async def _drain_worker(self, worker_id: str) -> None:
        address = await self.store.worker_address(worker_id)
        if not address:
            return
        try:
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                await worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            # The registry already says draining, so no new sessions land there either way.
            log.warning("could not tell worker %s to drain: %s", worker_id, exc.details())

    async def start(self) -> None:
        self.ingest.start()
        await self.host.start()
        start_metrics_server(self.settings.metrics_port)
        log.info("scheduler serving on %s (listen %s)", self.address, self.settings.listen)

    async def stop(self) -> None:
        await self.host.stop(self.settings.grace_s)
        await self.ingest.stop()
        self.fleet.close()
        await self.store.aclose()
        await self.redis.aclose()
