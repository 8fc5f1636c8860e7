"""Worker telemetry over MQTT: periodic stats, a retained status with a last-will, KV events.

The broker publishes the retained OFFLINE last-will when the worker's connection
dies without a clean disconnect (crash, SIGKILL, network cut), so the scheduler
sees a dead worker within the MQTT keepalive instead of waiting for stale stats.

The MQTT client runs on a thread of its own with asyncio's loop (kvgate/loop_thread.py says
why not the worker's uvloop); the engine stays on the main loop, single-threaded: each tick
asks the main loop for the payloads, so a stuck engine shows as stale stats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass

import aiomqtt

from gpu_worker import metrics
from gpu_worker.engine import Engine
from kvgate import topics
from kvgate.loop_thread import LoopThread
from kvgate.mqtt_url import Backoff, MqttUrl
from kvgate.v1 import telemetry_pb2

log = logging.getLogger(__name__)

READY = telemetry_pb2.WORKER_LIFECYCLE_READY
DRAINING = telemetry_pb2.WORKER_LIFECYCLE_DRAINING
OFFLINE = telemetry_pb2.WORKER_LIFECYCLE_OFFLINE
STATUS_REFRESH_S = 5.0


_last_incarnation = 0


def _new_incarnation() -> int:
    """The publisher's start time (Unix ms): a worker restarted under the same id reports a larger
    one (restarts take far longer than a millisecond, and hosts keep their clocks within that);
    strictly increasing within one process too, for tests that restart a worker in process."""
    global _last_incarnation
    _last_incarnation = max(time.time_ns() // 1_000_000, _last_incarnation + 1)
    return _last_incarnation


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
        self._stopping = False
        self._seq = 0
        self.incarnation = _new_incarnation()
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._thread = LoopThread(f"telemetry-{identity.worker_id}", self._run)
        # Set on the telemetry thread's loop: a state change or stop() to publish now.
        self._wake: asyncio.Event | None = None

    def start(self) -> None:
        """Start publishing from a thread of its own; call on the main (engine's) loop."""
        self._main_loop = asyncio.get_running_loop()
        self._thread.start()

    def set_state(self, state: telemetry_pb2.WorkerLifecycle.ValueType) -> None:
        self._state = state
        self._thread.call_soon(self._wake_up)

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

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
            incarnation=self.incarnation,
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
            incarnation=self.incarnation,
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
            incarnation=self.incarnation,
        ).SerializeToString()

    def _collect(self) -> concurrent.futures.Future[tuple[bytes, bytes | None]]:
        """The stats and KV-event payloads, read on the main loop (the engine is not thread-safe)."""
        future: concurrent.futures.Future[tuple[bytes, bytes | None]] = concurrent.futures.Future()

        def collect() -> None:
            try:
                future.set_result((self._stats_payload(), self._kv_payload()))
            except Exception as exc:
                future.set_exception(exc)

        assert self._main_loop is not None, "start() first"
        try:
            self._main_loop.call_soon_threadsafe(collect)
        except RuntimeError:
            # The main loop is closed: the process is going away without stop(); the broker's
            # last-will says OFFLINE once the connection drops.
            raise asyncio.CancelledError from None
        return future

    async def _run(self) -> None:
        """Publish until stop(); reconnect with capped exponential backoff when the broker is away."""
        self._wake = asyncio.Event()
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
                    await self._publish_loop(client, status_topic)
                    # Clean stop: say OFFLINE ourselves (a clean disconnect does not fire the will).
                    await client.publish(status_topic, self._status_payload(OFFLINE), qos=1, retain=True)
                    break
            except aiomqtt.MqttError as exc:
                delay = backoff.next()
                log.warning(
                    "telemetry: broker %s unavailable (%s); retry in %.1fs",
                    self._broker.redacted(),
                    exc,
                    delay,
                )
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        """Until seconds pass, or sooner on a state change or stop()."""
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

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
            state = self._state
            if published_state != state or loop.time() - published_at >= STATUS_REFRESH_S:
                published_state, published_at = state, loop.time()
                await client.publish(status_topic, self._status_payload(state), qos=1, retain=True)
            stats, kv = await asyncio.wrap_future(self._collect())
            await client.publish(stats_topic, stats, qos=0)
            if kv is not None:
                await client.publish(kv_topic, kv, qos=1)
            await self._sleep(self._interval_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Publish OFFLINE and disconnect (waiting up to timeout_s), else cut the connection."""
        self._stopping = True
        self._thread.call_soon(self._wake_up)
        await self._thread.join(timeout_s)
        await self._thread.stop(timeout_s=1.0)

    async def fall_silent(self) -> None:
        """Stop publishing at once without saying OFFLINE: to the scheduler this looks like a
        network partition (stats stop, the retained status stays), so age alone must tell."""
        self._stopping = True
        await self._thread.stop(timeout_s=5.0)
