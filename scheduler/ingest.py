"""Worker telemetry from MQTT into Redis. Every scheduler replica ingests; writes are idempotent
(stale or repeated stats are dropped by sequence number inside the Lua script)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiomqtt
import redis.exceptions
from google.protobuf.message import DecodeError

from kvgate import topics
from kvgate.mqtt_url import Backoff, MqttUrl
from kvgate.v1 import telemetry_pb2
from scheduler.metrics import TELEMETRY_MESSAGES
from scheduler.store import FleetStore

log = logging.getLogger(__name__)


class TelemetryIngest:
    def __init__(self, broker: MqttUrl, store: FleetStore, client_id: str) -> None:
        self._broker = broker
        self._store = store
        self._client_id = client_id
        self.connected = asyncio.Event()

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with self._broker.client(self._client_id, keepalive_s=10) as client:
                    for subscription in topics.SUBSCRIPTIONS:
                        await client.subscribe(subscription, qos=1)
                    backoff.reset()
                    self.connected.set()
                    log.info("ingesting telemetry from %s", self._broker.redacted())
                    async for message in client.messages:
                        await self._handle(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                delay = backoff.next()
                log.warning(
                    "telemetry ingest: broker %s unavailable (%s); retry in %.1fs",
                    self._broker.redacted(),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _handle(self, topic: str, payload: object) -> None:
        parsed = topics.parse(topic)
        if parsed is None or not isinstance(payload, bytes | bytearray):
            TELEMETRY_MESSAGES.labels(kind="unknown", outcome="ignored").inc()
            return
        worker_id, kind = parsed
        try:
            if kind == topics.STATS:
                stats = telemetry_pb2.WorkerStats.FromString(bytes(payload))
                if stats.worker_id != worker_id:
                    raise ValueError(f"stats for {stats.worker_id!r} on {worker_id!r}'s topic")
                await self._store.ingest_stats(stats)
            elif kind == topics.STATUS:
                status = telemetry_pb2.WorkerStatus.FromString(bytes(payload))
                if status.worker_id != worker_id:
                    raise ValueError(f"status for {status.worker_id!r} on {worker_id!r}'s topic")
                await self._store.ingest_status(status)
            else:
                events = telemetry_pb2.KvEvents.FromString(bytes(payload))
                if events.worker_id != worker_id:
                    raise ValueError(f"KV events for {events.worker_id!r} on {worker_id!r}'s topic")
                await self._store.ingest_kv(events)
            TELEMETRY_MESSAGES.labels(kind=kind, outcome="ok").inc()
        except (DecodeError, ValueError) as exc:
            TELEMETRY_MESSAGES.labels(kind=kind, outcome="invalid").inc()
            log.warning("dropping bad %s message on %s: %s", kind, topic, exc)
        except redis.exceptions.RedisError as exc:
            # Redis down: drop this sample; the next one (every 250 ms) carries the full state.
            TELEMETRY_MESSAGES.labels(kind=kind, outcome="redis_error").inc()
            with contextlib.suppress(Exception):
                log.warning("telemetry not stored (Redis: %s)", exc)
