"""Worker telemetry over MQTT: periodic stats, a retained status with a last-will, KV events.

The broker publishes the retained OFFLINE last-will when the worker's connection
dies without a clean disconnect (crash, SIGKILL, network cut), so the scheduler
sees a dead worker within the MQTT keepalive instead of waiting for stale stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiomqtt

from gpu_worker import metrics
from gpu_worker.engine import Engine
from kvgate import topics
from kvgate.mqtt_url import Backoff, MqttUrl
from kvgate.v1 import telemetry_pb2

log = logging.getLogger(__name__)

READY = telemetry_pb2.WORKER_LIFECYCLE_READY
DRAINING = telemetry_pb2.WORKER_LIFECYCLE_DRAINING
OFFLINE = telemetry_pb2.WORKER_LIFECYCLE_OFFLINE
STATUS_REFRESH_S = 5.0


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    region: str
    address: str
    model: str
    engine: str
    gpu: str
    prefill_tokens_per_s: float = 0.0
    max_num_seqs: int = 0


class TelemetryPublisher:
    def __init__(
        self,
        broker: MqttUrl,
        identity: WorkerIdentity,
        engine: Engine,
        interval_s: float = 0.25,
        keepalive_s: int = 5,
    ) -> None:
        self._broker = broker
        self._id = identity
        self._engine = engine
        self._interval_s = interval_s
        self._keepalive_s = keepalive_s
        self._state: telemetry_pb2.WorkerLifecycle.ValueType = READY
        self._state_changed = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._seq = 0
        self.connected = asyncio.Event()

    def set_state(self, state: telemetry_pb2.WorkerLifecycle.ValueType) -> None:
        self._state = state
        self._state_changed.set()

    def _status_payload(self, state: telemetry_pb2.WorkerLifecycle.ValueType) -> bytes:
        i = self._id
        return telemetry_pb2.WorkerStatus(
            worker_id=i.worker_id,
            state=state,
            region=i.region,
            address=i.address,
            model=i.model,
            engine=i.engine,
            gpu=i.gpu,
            timestamp_ms=int(time.time() * 1000),
        ).SerializeToString()

    def _stats_payload(self) -> bytes:
        stats = self._engine.stats()
        metrics.observe(self._id.engine, stats)
        self._seq += 1
        i = self._id
        return telemetry_pb2.WorkerStats(
            worker_id=i.worker_id,
            region=i.region,
            address=i.address,
            model=i.model,
            engine=i.engine,
            gpu=i.gpu,
            state=self._state,
            block_size=stats.block_size,
            num_blocks_total=stats.num_blocks_total,
            num_blocks_used=stats.num_blocks_used,
            num_blocks_cached=stats.num_blocks_cached,
            running=stats.running,
            waiting=stats.waiting,
            preemptions_total=stats.preemptions_total,
            step_ms=stats.step_ms,
            tokens_per_s=stats.tokens_per_s,
            arithmetic_intensity=stats.arithmetic_intensity,
            prefix_hit_rate=stats.prefix_hit_rate,
            admitted_request_ids=list(stats.admitted_request_ids),
            timestamp_ms=int(time.time() * 1000),
            seq=self._seq,
            max_model_len=self._engine.max_model_len,
            prefill_tokens_per_s=i.prefill_tokens_per_s,
            max_num_seqs=i.max_num_seqs,
        ).SerializeToString()

    def _kv_payload(self) -> bytes | None:
        events = self._engine.take_kv_events()
        if not events:
            return None
        return telemetry_pb2.KvEvents(
            worker_id=self._id.worker_id,
            stored_block_hashes=events.stored,
            removed_block_hashes=events.removed,
            all_cleared=events.all_cleared,
            seq=self._seq,
            block_size=self._engine.block_size,
        ).SerializeToString()

    async def run(self) -> None:
        """Publish until stop(); reconnect with capped exponential backoff when the broker is away."""
        status_topic = topics.topic(self._id.worker_id, topics.STATUS)
        # Capped at 5 s, well inside the scheduler's --dead-after (10 s) grace after a broker
        # outage: every worker is back before its silence would count against it.
        backoff = Backoff(cap_s=5.0)
        while not self._stopping:
            try:
                async with self._broker.client(
                    f"kvgate-worker-{self._id.worker_id}",
                    self._keepalive_s,
                    will=aiomqtt.Will(status_topic, self._status_payload(OFFLINE), qos=1, retain=True),
                ) as client:
                    backoff.reset()
                    log.info("telemetry connected to %s", self._broker.redacted())
                    self.connected.set()
                    await self._publish_loop(client, status_topic)
                    # Clean stop: say OFFLINE ourselves (a clean disconnect does not fire the will).
                    await client.publish(status_topic, self._status_payload(OFFLINE), qos=1, retain=True)
                    break
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                delay = backoff.next()
                log.warning(
                    "telemetry: broker %s unavailable (%s); retry in %.1fs",
                    self._broker.redacted(),
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), delay)
        self.connected.clear()

    async def _publish_loop(self, client: aiomqtt.Client, status_topic: str) -> None:
        stats_topic = topics.topic(self._id.worker_id, topics.STATS)
        kv_topic = topics.topic(self._id.worker_id, topics.KV)
        published_state: telemetry_pb2.WorkerLifecycle.ValueType | None = None
        published_at = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            # Also re-sent every STATUS_REFRESH_S unchanged: a stale OFFLINE that reached the
            # broker after our READY (the last-will of a previous connection, say) would
            # otherwise keep this live worker out of the fleet until its state next changed.
            if published_state != self._state or loop.time() - published_at >= STATUS_REFRESH_S:
                published_state, published_at = self._state, loop.time()
                await client.publish(status_topic, self._status_payload(published_state), qos=1, retain=True)
            await client.publish(stats_topic, self._stats_payload(), qos=0)
            kv = self._kv_payload()
            if kv is not None:
                await client.publish(kv_topic, kv, qos=1)
            self._state_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), self._interval_s)

    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self._state_changed.set()
