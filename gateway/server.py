"""Wiring of one gateway replica: Redis session store, scheduler client, worker relay, Chat service."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc

from gateway.relay import TurnRunner, WorkerChannels
from gateway.servicer import ChatServicer
from gateway.sessions import SessionStore
from gateway.validation import Limits
from kvgate.redis_conn import connect_redis
from kvgate.service import CHANNEL_OPTIONS, GrpcHost, start_metrics_server
from kvgate.v1 import chat_pb2, chat_pb2_grpc, scheduler_pb2_grpc

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "0.0.0.0:50050"
    scheduler: str = "localhost:50051"
    redis_url: str = "redis://localhost:6379/0"
    models: tuple[str, ...] = ("llama-3-8b",)
    session_idle_ttl_s: float = 7 * 24 * 3600
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None
    grace_s: float = 30.0


class GatewayService:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings.redis_url)
        self.scheduler_channel = grpc.aio.insecure_channel(settings.scheduler, options=CHANNEL_OPTIONS)
        self.workers = WorkerChannels()
        runner = TurnRunner(scheduler_pb2_grpc.SchedulerStub(self.scheduler_channel), self.workers)
        sessions = SessionStore(self.redis, settings.session_idle_ttl_s)
        self.host = GrpcHost(settings.listen, [CHAT_SERVICE])
        chat_pb2_grpc.add_ChatServicer_to_server(
            ChatServicer(sessions, runner, settings.models, settings.limits), self.host.server
        )

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        await self.host.start()
        start_metrics_server(self.settings.metrics_port)
        log.info("gateway serving Chat on %s (scheduler %s)", self.address, self.settings.scheduler)

    async def stop(self) -> None:
        # Health goes NOT_SERVING first so load balancers stop sending; in-flight turns get the grace.
        await self.host.stop(self.settings.grace_s)
        await self.workers.close()
        await self.scheduler_channel.close()
        await self.redis.aclose()
