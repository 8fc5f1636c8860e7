"""The MQTT telemetry ingest on a thread of its own, with asyncio's own event loop.

The placement path runs on uvloop; aiomqtt does not (see kvgate/loop_thread.py). The ingest
writes to Redis with its own client, since redis-py connections belong to one event loop.
"""

from __future__ import annotations

from kvgate.loop_thread import LoopThread
from kvgate.mqtt_url import MqttUrl
from kvgate.redis_conn import connect_redis
from scheduler.ingest import TelemetryIngest
from scheduler.store import FleetStore, StoreSettings


class IngestThread:
    def __init__(self, broker: MqttUrl, redis_url: str, store: StoreSettings, client_id: str) -> None:
        self._broker = broker
        self._redis_url = redis_url
        self._store_settings = store
        self._client_id = client_id
        self._thread = LoopThread("telemetry-ingest", self._main)

    def start(self) -> None:
        self._thread.start()

    async def _main(self) -> None:
        redis = connect_redis(self._redis_url)
        store = FleetStore(redis, self._store_settings)
        try:
            await TelemetryIngest(self._broker, store, self._client_id).run()
        finally:
            await store.aclose()
            await redis.aclose()

    async def stop(self, timeout_s: float = 5.0) -> None:
        await self._thread.stop(timeout_s)
