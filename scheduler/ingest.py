"""Worker telemetry from MQTT into Redis. Every scheduler replica ingests; writes are idempotent
(stale or repeated stats are dropped by sequence number inside the Lua script)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiomqtt
import redis.exceptions
from google.protobuf.message import DecodeError

from kvgate import topics
from kvgate.mqtt_url import Backoff, MqttUrl
from kvgate.v1 import telemetry_pb2
from scheduler.metrics import TELEMETRY_MESSAGES
from scheduler.store import TELEMETRY_CLOCK_TICK_S, Applied, FleetStore, TelemetryResult

log = logging.getLogger(__name__)


# An OFFLINE status is applied this long after it arrives, and only if our own connection to
# the broker is still up by then: a broker that shuts down delivers its clients' last-wills on
# its way out, and those say nothing about the workers.
OFFLINE_CONFIRM_S = 1.0
STALE_LOG_EVERY_S = 60.0


def _cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class TelemetryIngest:
    def __init__(self, broker: MqttUrl, store: FleetStore, client_id: str) -> None:
        self._broker = broker
        self._store = store
        self._client_id = client_id
        self.connected = asyncio.Event()
        self._pending_offline: dict[str, asyncio.Task[None]] = {}
        # Pin invalidations run beside the ingest: a worker with 100k pinned sessions must not
        # hold up everyone else's telemetry.
        self._background: set[asyncio.Task[None]] = set()
        self._stale_logged: dict[str, float] = {}

    async def run(self) -> None:
        # Capped at 2 s: while no ingest is connected the fleet's ages are frozen (placements go
        # on with the last telemetry), so a scheduler back soon after the broker matters more
        # than sparing the broker a handful of replicas' connection attempts.
        backoff = Backoff(cap_s=2.0)
        while True:
            try:
                async with self._broker.client(self._client_id, keepalive_s=10) as client:
                    for subscription in topics.SUBSCRIPTIONS:
                        await client.subscribe(subscription, qos=1)
                    backoff.reset()
                    self.connected.set()
                    log.info("ingesting telemetry from %s", self._broker.redacted())
                    clock = asyncio.create_task(self._tick_clock())
                    try:
                        async for message in client.messages:
                            await self._handle(str(message.topic), message.payload)
                            if _cancel_requested():
                                # Something under _handle swallowed the cancellation (seen in
                                # the test suite, 1 stop in ~15 under load: the ingest then ran
                                # on after its scheduler stopped): stop all the same.
                                raise asyncio.CancelledError
                    finally:
                        clock.cancel()
                        self._discard_pending_offline()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                if _cancel_requested():
                    # Cancelled (the scheduler is stopping) while the client disconnected: aiomqtt's
                    # __aexit__ can turn the CancelledError into an MqttError, and retrying here
                    # would leave this ingest running, unseen, after its scheduler stopped.
                    raise asyncio.CancelledError from exc
                delay = backoff.next()
                log.warning(
                    "telemetry ingest: broker %s unavailable (%s); retry in %.1fs",
                    self._broker.redacted(),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _confirm_offline(self, status: telemetry_pb2.WorkerStatus) -> None:
        await asyncio.sleep(OFFLINE_CONFIRM_S)
        self._pending_offline.pop(status.worker_id, None)
        try:
            self._applied(topics.STATUS, status.worker_id, await self._store.ingest_status(status))
        except redis.exceptions.RedisError as exc:
            TELEMETRY_MESSAGES.labels(kind=topics.STATUS, outcome="redis_error").inc()
            log.warning("offline status of %s not stored (Redis: %s)", status.worker_id, exc)

    def _applied(self, kind: str, worker_id: str, result: TelemetryResult) -> None:
        outcome = {Applied.APPLIED: "ok", Applied.DUPLICATE: "duplicate", Applied.STALE: "stale"}
        TELEMETRY_MESSAGES.labels(kind=kind, outcome=outcome[result.applied]).inc()
        if result.applied == Applied.STALE:
            # Normal for a late last-will or batch of a restarted worker. Every message of a running
            # worker being stale means its host's clock is behind the one it last started on (the
            # incarnation is its start time): worth a warning, once a minute per worker.
            now = time.monotonic()
            if now - self._stale_logged.get(worker_id, -STALE_LOG_EVERY_S) >= STALE_LOG_EVERY_S:
                self._stale_logged[worker_id] = now
                log.warning(
                    "dropping %s telemetry of %s from an older process of it (incarnation behind the "
                    "registry's: a late message, or a host clock behind the previous one's)",
                    kind,
                    worker_id,
                )
        if result.pins_invalid:
            task = asyncio.create_task(self._invalidate_pins(worker_id, int(time.time() * 1000)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _invalidate_pins(self, worker_id: str, before_ms: int) -> None:
        try:
            dropped = await self._store.invalidate_pins(worker_id, before_ms)
        except redis.exceptions.RedisError as exc:
            # Its sessions' next turns see a pin to a dead or restarted worker: the policy moves
            # them off a dead one, and a restarted one only costs them a cache miss.
            log.warning("pins of %s not invalidated (Redis: %s)", worker_id, exc)
            return
        if dropped:
            log.info("invalidated %d session pins of %s (offline or restarted)", dropped, worker_id)

    def _discard_pending_offline(self) -> None:
        if self._pending_offline:
            log.warning(
                "broker connection lost: ignoring OFFLINE statuses of %s delivered just before it",
                ", ".join(sorted(self._pending_offline)),
            )
        for task in self._pending_offline.values():
            task.cancel()
        self._pending_offline.clear()

    async def _tick_clock(self) -> None:
        """While connected, tell the fleet state that the broker is reachable (see
        FleetStore._age_clock_ms): a broker outage must not read as every worker dying."""
        while True:
            try:
                await self._store.tick_telemetry_clock()
            except redis.exceptions.RedisError as exc:
                log.warning("telemetry clock: Redis unavailable (%s)", exc)
            await asyncio.sleep(TELEMETRY_CLOCK_TICK_S)

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
                result = await self._store.ingest_stats(stats)
            elif kind == topics.STATUS:
                status = telemetry_pb2.WorkerStatus.FromString(bytes(payload))
                if status.worker_id != worker_id:
                    raise ValueError(f"status for {status.worker_id!r} on {worker_id!r}'s topic")
                pending = self._pending_offline.pop(worker_id, None)
                if pending is not None:  # a newer status supersedes it
                    pending.cancel()
                if status.state == telemetry_pb2.WORKER_LIFECYCLE_OFFLINE:
                    confirm = asyncio.create_task(self._confirm_offline(status))
                    self._pending_offline[worker_id] = confirm
                    return
                result = await self._store.ingest_status(status)
            else:
                events = telemetry_pb2.KvEvents.FromString(bytes(payload))
                if events.worker_id != worker_id:
                    raise ValueError(f"KV events for {events.worker_id!r} on {worker_id!r}'s topic")
                result = await self._store.ingest_kv(events)
            self._applied(kind, worker_id, result)
        except (DecodeError, ValueError) as exc:
            TELEMETRY_MESSAGES.labels(kind=kind, outcome="invalid").inc()
            log.warning("dropping bad %s message on %s: %s", kind, topic, exc)
        except redis.exceptions.RedisError as exc:
            # Redis down: drop this sample; the next one (every 250 ms) carries the full state.
            TELEMETRY_MESSAGES.labels(kind=kind, outcome="redis_error").inc()
            with contextlib.suppress(Exception):
                log.warning("telemetry not stored (Redis: %s)", exc)
