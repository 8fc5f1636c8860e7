"""A scheduler's telemetry ingest stops when cancelled, even when its MQTT client turns the
cancellation into an MQTT error on the way out (aiomqtt's __aexit__ waits for the disconnect and
raises what that disconnect failed with): before, it reconnected and ran on after its scheduler
had stopped, fighting the next scheduler for the broker connection and writing stale telemetry."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, cast

import aiomqtt

from scheduler.ingest import TelemetryIngest


class _Client:
    def __init__(self, connects: list[int]) -> None:
        self._connects = connects

    async def __aenter__(self) -> _Client:
        self._connects.append(1)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        raise aiomqtt.MqttError("Disconnected during message iteration")

    async def subscribe(self, topic: str, qos: int) -> None:
        pass

    @property
    def messages(self) -> Any:
        return self

    def __aiter__(self) -> _Client:
        return self

    async def __anext__(self) -> None:
        await asyncio.sleep(3600)  # no telemetry: waits, as a quiet broker connection does


class _Broker:
    def __init__(self) -> None:
        self.connects: list[int] = []

    def client(self, client_id: str, keepalive_s: int) -> _Client:
        return _Client(self.connects)

    def redacted(self) -> str:
        return "mqtt://fake"


class _Store:
    async def tick_telemetry_clock(self) -> None:
        pass


async def test_a_cancelled_ingest_stops_even_if_the_client_raises_an_mqtt_error_on_exit() -> None:
    broker = _Broker()
    ingest = TelemetryIngest(cast(Any, broker), cast(Any, _Store()), "test")
    task = asyncio.create_task(ingest.run())
    await ingest.connected.wait()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    try:
        assert task.done(), "the ingest swallowed its cancellation and reconnected"
        assert task.cancelled() and broker.connects == [1]
    finally:
        while not task.done():  # a swallowing ingest takes each cancel as a disconnect: insist
            task.cancel()
            await asyncio.sleep(0.01)
