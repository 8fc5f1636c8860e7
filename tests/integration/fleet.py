"""Start the three kvgate services in-process on loopback against real Redis and Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import grpc
import redis.asyncio as redis

from gateway.auth import AuthMode
from gateway.client import ChatClient
from gateway.keystore import KeyStore
from gateway.server import GatewayService, GatewaySettings
from gpu_worker.server import WorkerService, WorkerSettings
from kvgate import topics
from kvgate.mqtt_url import MqttUrl
from kvgate.redis_conn import connect_redis
from kvgate.v1 import scheduler_pb2, scheduler_pb2_grpc, telemetry_pb2
from scheduler.server import SchedulerService, SchedulerSettings
from scheduler.store import FleetStore, StoreSettings


async def clear_retained_statuses(mqtt_url: str, quiet_s: float = 0.3) -> int:
    """Delete every worker's retained status on the broker (the session's broker outlives each
    test's fleet, and a retained OFFLINE of an earlier test's worker "b" would take this test's
    "b" out of placement a second after its scheduler starts). Returns how many there were."""
    broker = MqttUrl.parse(mqtt_url)
    topics_seen: list[str] = []
    async with aiomqtt.Client(hostname=broker.host, port=broker.port) as client:
        await client.subscribe(topics.topic("+", topics.STATUS), qos=1)
        # The broker sends the retained messages right after the subscription; then it is quiet.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(quiet_s):
                async for message in client.messages:
                    if message.retain and message.payload:
                        topics_seen.append(str(message.topic))
        for topic in topics_seen:
            await client.publish(topic, b"", qos=1, retain=True)
    return len(topics_seen)


async def report_worker(store: FleetStore, worker_id: str, used_blocks: int, seq: int = 1) -> None:
    """Telemetry of a ready sim worker of model "m" with 1,000 KV blocks, straight into the store."""
    await store.ingest_stats(
        telemetry_pb2.WorkerStats(
            worker_id=worker_id, region="us-east", address=f"{worker_id}:1", model="m", engine="sim",
            state=telemetry_pb2.WORKER_LIFECYCLE_READY, block_size=16, num_blocks_total=1000,
            num_blocks_used=used_blocks, seq=seq,
        )
    )  # fmt: skip


@dataclass
class Fleet:
    redis_url: str
    mqtt_url: str
    workers: dict[str, WorkerService] = field(default_factory=dict)
    schedulers: list[SchedulerService] = field(default_factory=list)
    gateway: GatewayService | None = None
    _redis: redis.Redis | None = None

    async def add_worker(self, worker_id: str, region: str, **overrides: object) -> WorkerService:
        """A sim worker; `overrides` are WorkerSettings fields (e.g. its own mqtt_url)."""
        overrides.setdefault("mqtt_url", self.mqtt_url)
        settings = WorkerSettings(
            worker_id=worker_id,
            region=region,
            listen="127.0.0.1:0",
            stats_interval_s=0.1,
            mqtt_keepalive_s=2,
            drain_grace_s=10,
            **overrides,  # type: ignore[arg-type]
        )
        worker = WorkerService(settings)
        await worker.start()
        self.workers[worker_id] = worker
        return worker

    async def start_scheduler(self, **store_overrides: float) -> SchedulerService:
        scheduler = SchedulerService(
            SchedulerSettings(
                listen="127.0.0.1:0",
                redis_url=self.redis_url,
                mqtt_url=self.mqtt_url,
                store=StoreSettings(**store_overrides),
            )
        )
        await scheduler.start()
        self.schedulers.append(scheduler)
        return scheduler

    async def start_control_plane(
        self,
        *,
        auth: AuthMode = AuthMode.OFF,
        gateway_overrides: dict[str, Any] | None = None,
        http: bool = False,
        **store_overrides: float,
    ) -> None:
        """A scheduler and a gateway (with the OpenAI HTTP API on a free port when `http`). Auth
        is off unless asked for: tests that are not about keys call the gateway without one (as
        tenant "anonymous"); `create_key` makes keys."""
        await self.start_scheduler(**store_overrides)
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "scheduler": self.scheduler.address,
            "redis_url": self.redis_url,
            "grace_s": 2.0,
            "auth": auth,
            "http_listen": "127.0.0.1:0" if http else None,
        }
        self.gateway = GatewayService(GatewaySettings(**{**settings, **(gateway_overrides or {})}))
        await self.gateway.start()

    async def start(
        self,
        workers: dict[str, tuple[str, int]],
        *,
        time_scale: float = 1.0,
        auth: AuthMode = AuthMode.OFF,
        gateway_overrides: dict[str, Any] | None = None,
        http: bool = False,
        **store_overrides: float,
    ) -> None:
        """Workers {id: (region, KV blocks)}, a scheduler and a gateway; returns once all are ready."""
        for worker_id, (region, blocks) in workers.items():
            await self.add_worker(worker_id, region, num_gpu_blocks=blocks, time_scale=time_scale)
        await self.start_control_plane(
            auth=auth, gateway_overrides=gateway_overrides, http=http, **store_overrides
        )
        await self.wait_for_workers(dict.fromkeys(workers, "ready"))

    @property
    def keys(self) -> KeyStore:
        """The gateway's API key records (what `kvgate keys` edits)."""
        if self._redis is None:
            self._redis = connect_redis(self.redis_url)
        return KeyStore(self._redis)

    async def create_key(self, tenant: str, tier: str = "free", label: str = "") -> tuple[str, str]:
        """A new API key for `tenant`: (key id, key)."""
        new = await self.keys.create(tenant, tier, label)
        return new.key_id, new.key

    @property
    def scheduler(self) -> SchedulerService:
        return self.schedulers[0]

    @property
    def http_base_url(self) -> str:
        """The gateway's OpenAI-compatible API root (started with `http=True`)."""
        assert self.gateway is not None and self.gateway.http is not None
        return f"http://{self.gateway.http.address}/v1"

    def client(self, api_key: str = "") -> ChatClient:
        assert self.gateway is not None
        return ChatClient(self.gateway.address, api_key=api_key)

    async def fleet_status(self) -> scheduler_pb2.FleetStatusResponse:
        async with grpc.aio.insecure_channel(self.scheduler.address) as channel:
            return await scheduler_pb2_grpc.SchedulerStub(channel).FleetStatus(
                scheduler_pb2.FleetStatusRequest(), timeout=5
            )

    async def wait_for_workers(self, expected: dict[str, str], timeout_s: float = 20.0) -> None:
        """Wait until the scheduler sees each worker in the expected state (e.g. ready)."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            status = await self.fleet_status()
            seen = {w.worker_id: w.state for w in status.workers}
            if all(seen.get(wid) == state for wid, state in expected.items()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"workers not in the expected states within {timeout_s}s: want {expected}, saw {seen}"
        )

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        for scheduler in self.schedulers:
            await scheduler.stop()
        for worker in self.workers.values():
            await worker.stop()
        if self._redis is not None:
            await self._redis.aclose()
