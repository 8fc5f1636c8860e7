from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

from kvgate.containers import MosquittoServer, RedisServer
from scheduler import redis_mux
from scheduler.store import FleetStore, StoreSettings
from tests.integration.fleet import Fleet, clear_retained_statuses
from tests.integration.slow_redis import SlowReplyProxy

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto_server() -> Iterator[MosquittoServer]:
    server = MosquittoServer().start()
    yield server
    server.stop()


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def store(clean_redis: str) -> AsyncIterator[FleetStore]:
    """A scheduler's Redis state store on a clean database, without the services around it."""
    client = redis.asyncio.Redis.from_url(clean_redis)
    s = FleetStore(client, StoreSettings())
    yield s
    await s.aclose()
    await client.aclose()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the Redis connection's writes (one per round trip: commands of one tick share one)."""
    count = [0]
    flush = redis_mux._Protocol.flush

    def counted(self: redis_mux._Protocol) -> None:
        if self.out:
            count[0] += 1
        flush(self)

    monkeypatch.setattr(redis_mux._Protocol, "flush", counted)
    return count


@pytest.fixture
async def fleet(clean_redis: str, mosquitto_server: MosquittoServer) -> AsyncIterator[Fleet]:
    await clear_retained_statuses(mosquitto_server.url)
    f = Fleet(redis_url=clean_redis, mqtt_url=mosquitto_server.url)
    try:
        yield f
    finally:
        await f.stop()


@pytest.fixture
async def slow_proxy(clean_redis: str) -> AsyncIterator[SlowReplyProxy]:
    """A relay to the clean Redis that can hold back chosen replies (see SlowReplyProxy)."""
    proxy = SlowReplyProxy(clean_redis)
    await proxy.start()
    yield proxy
    await proxy.stop()


def _telemetry_threads() -> list[threading.Thread]:
    """The MQTT threads of in-process services (kvgate/loop_thread.py names them)."""
    return [t for t in threading.enumerate() if t.name.startswith("telemetry")]


@pytest.fixture(autouse=True)
def _no_telemetry_thread_outlives_its_test() -> Iterator[None]:
    """A scheduler's ingest or a worker's publisher left running after its test stopped it keeps
    talking to the session's broker and Redis: it once fought the next test's scheduler for its
    MQTT client id and made it miss telemetry. Fail where the leak happens, not downstream."""
    before = set(_telemetry_threads())
    yield
    deadline = time.monotonic() + 5.0
    while (left := [t for t in _telemetry_threads() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    frames = sys._current_frames()
    stacks = "".join(
        f"\n--- {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in left
        if t.ident in frames
    )
    assert not left, f"MQTT threads still running after the test: {[t.name for t in left]}{stacks}"
