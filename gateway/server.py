"""Wiring of one gateway replica: Redis session and key stores, rate limiter, scheduler client,
worker relay, quarantine responder, Chat service, and the optional OpenAI HTTP facade."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from gateway import decode_errors
from gateway.admission import AdmissionPolicy
from gateway.auth import Authenticator, AuthMode
from gateway.buckets import DEFAULT_LIMITS, TierLimits
from gateway.gate import Gate
from gateway.keystore import KeyStore
from gateway.openai_http import OpenAIFacade
from gateway.quarantine import FleetLook, Meower, Pace
from gateway.ratelimit import RateLimiter
from gateway.relay import DEFAULT_COALESCE_MS, TurnRunner, WorkerChannels
from gateway.servicer import ChatServicer
from gateway.sessions import SessionStore
from gateway.validation import Limits
from kvgate.redis_conn import connect_redis
from kvgate.service import CHANNEL_OPTIONS, GrpcHost, start_metrics_server
from kvgate.tls import TlsFiles
from kvgate.v1 import chat_pb2, scheduler_pb2_grpc

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
    auth: AuthMode = AuthMode.REQUIRED
    # Per tier; None turns rate limiting off.
    rate_limits: Mapping[str, TierLimits] | None = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    quarantine_pace: Pace = field(default_factory=Pace)
    # 0 relays every worker chunk as its own message (the bench's baseline).
    coalesce_ms: float = DEFAULT_COALESCE_MS
    # HOST:PORT for the OpenAI-compatible HTTP API; None serves gRPC only.
    http_listen: str | None = None
    # TLS for the public gRPC and HTTP ports (None: plaintext).
    tls: TlsFiles | None = None
    # How long a turn the fleet has no room for may wait for some before it is shed (0: never).
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)


class GatewayService:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.redis = connect_redis(settings.redis_url)
        # Round-robin over every address the target resolves to: with dns:///scheduler:50051 and
        # several replicas behind one name, load spreads and a dead replica is skipped.
        self.scheduler_channel = grpc.aio.insecure_channel(
            settings.scheduler, options=[*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
        )
        self.workers = WorkerChannels()
        # What real placements look like, for the quarantine responder to look the same.
        look = FleetLook()
        runner = TurnRunner(
            scheduler_pb2_grpc.SchedulerStub(self.scheduler_channel),
            self.workers,
            coalesce_ms=settings.coalesce_ms,
            admission=settings.admission,
        )
        sessions = SessionStore(self.redis, settings.session_idle_ttl_s)
        limiter = None if settings.rate_limits is None else RateLimiter(self.redis, settings.rate_limits)
        gate = Gate(Authenticator(KeyStore(self.redis), settings.auth), limiter)
        self.host = GrpcHost(
            settings.listen, [CHAT_SERVICE], tls=settings.tls, loopback=settings.tls is not None
        )
        # Not the generated add_ChatServicer_to_server: a request protobuf cannot parse (invalid
        # UTF-8) gets INVALID_ARGUMENT naming the field instead of grpc's INTERNAL.
        decode_errors.add_servicer(
            chat_pb2.DESCRIPTOR.services_by_name["Chat"],
            ChatServicer(
                sessions,
                look.watch(runner),
                settings.models,
                settings.limits,
                gate,
                Meower(settings.quarantine_pace, look=look),
            ),
            self.host.server,
        )
        self.http = (
            None
            if settings.http_listen is None
            else OpenAIFacade(
                settings.http_listen,
                settings.grace_s,
                ssl_context=settings.tls.ssl_context() if settings.tls is not None else None,
                limits=settings.limits,
            )
        )

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        await self.host.start()
        if self.http is not None:
            # The facade calls this replica's own Chat service: one path for auth, limits, placement.
            await self.http.start(self.host.loopback_address)
        start_metrics_server(self.settings.metrics_port)
        log.info(
            "gateway serving Chat on %s (scheduler %s, auth %s, rate limits %s)",
            self.address,
            self.settings.scheduler,
            self.settings.auth.value,
            "off" if self.settings.rate_limits is None else "on",
        )

    async def stop(self) -> None:
        # Health goes NOT_SERVING first so load balancers stop sending; in-flight turns get the grace.
        # Both protocols drain together: HTTP streams ride on in-flight loopback gRPC calls, which
        # the gRPC server keeps serving through the grace while refusing new ones.
        stops = [self.host.stop(self.settings.grace_s)]
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)
        await self.workers.close()
        await self.scheduler_channel.close()
        await self.redis.aclose()
