"""Scheduler state in Redis: worker registry, reservations (atomic Lua), session pins."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis

from kvgate.v1 import telemetry_pb2
from scheduler import keys
from scheduler.policy import FleetView, WorkerState, WorkerView

_LIFECYCLE_TO_STATE = {
    telemetry_pb2.WORKER_LIFECYCLE_READY: WorkerState.READY,
    telemetry_pb2.WORKER_LIFECYCLE_DRAINING: WorkerState.DRAINING,
    telemetry_pb2.WORKER_LIFECYCLE_OFFLINE: WorkerState.OFFLINE,
}


# What redis-py accepts as a hash field or value.
_RedisField = str | bytes | bytearray | memoryview | int | float


def _lua(name: str) -> str:
    return (resources.files("scheduler") / "lua" / name).read_text()


class ReserveStatus(enum.IntEnum):
    RESERVED = 1
    NO_ROOM = 0
    UNKNOWN_WORKER = -1
    NOT_ACCEPTING = -2


@dataclass(frozen=True)
class ReserveResult:
    status: ReserveStatus
    free_after: int


@dataclass(frozen=True)
class StoreSettings:
    reservation_ttl_s: float = 30.0
    pin_idle_ttl_s: float = 3600.0
    dead_after_s: float = 10.0
    stale_after_s: float = 2.0


class FleetStore:
    def __init__(self, client: redis.Redis, settings: StoreSettings) -> None:
        self._redis = client
        self.settings = settings
        self._reserve = client.register_script(_lua("reserve.lua"))
        self._ingest = client.register_script(_lua("ingest_stats.lua"))

    async def ingest_stats(self, stats: telemetry_pb2.WorkerStats) -> None:
        state = _LIFECYCLE_TO_STATE.get(stats.state, WorkerState.READY)
        fields: list[str | int | float] = [
            "region", stats.region, "address", stats.address, "model", stats.model,
            "engine", stats.engine, "gpu", stats.gpu, "block_size", stats.block_size,
            "blocks_total", stats.num_blocks_total, "blocks_used", stats.num_blocks_used,
            "blocks_cached", stats.num_blocks_cached, "running", stats.running,
            "waiting", stats.waiting, "step_ms", stats.step_ms, "tokens_per_s", stats.tokens_per_s,
            "arithmetic_intensity", stats.arithmetic_intensity,
        ]  # fmt: skip
        args = [stats.seq, state.value, *fields, "--", *stats.admitted_request_ids]
        wid = stats.worker_id
        await self._ingest(keys=[keys.worker_info(wid), keys.worker_reservations(wid)], args=args)
        await self._redis.sadd(keys.WORKERS, wid)

    async def ingest_status(self, status: telemetry_pb2.WorkerStatus) -> None:
        state = _LIFECYCLE_TO_STATE.get(status.state, WorkerState.OFFLINE)
        info = keys.worker_info(status.worker_id)
        mapping: dict[_RedisField, _RedisField] = {"state": state.value}
        if state == WorkerState.READY:
            # A (re)started worker counts its telemetry from 1 again.
            mapping["seq"] = -1
        for field in ("region", "address", "model", "engine", "gpu"):
            value = getattr(status, field)
            if value:
                mapping[field] = value
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(info, mapping=mapping)
            if state == WorkerState.OFFLINE:
                # Its KV cache is gone with it: reservations there mean nothing now.
                pipe.delete(keys.worker_reservations(status.worker_id))
            await pipe.execute()
        await self._redis.sadd(keys.WORKERS, status.worker_id)

    async def read_fleet(self) -> FleetView:
        ids = sorted(
            m.decode() if isinstance(m, bytes) else m for m in await self._redis.smembers(keys.WORKERS)
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for wid in ids:
                pipe.hgetall(keys.worker_info(wid))
                pipe.hgetall(keys.worker_reservations(wid))
            replies = await pipe.execute()
        seconds, micros = replies[0]
        now_ms = seconds * 1000 + micros // 1000
        workers: dict[str, WorkerView] = {}
        for i, wid in enumerate(ids):
            info = _decode(replies[1 + 2 * i])
            if "blocks_total" not in info:
                continue
            workers[wid] = WorkerView(
                worker_id=wid,
                region=info.get("region", ""),
                model=info.get("model", ""),
                state=WorkerState(info.get("state", "offline")),
                block_size=int(info.get("block_size", "16")),
                num_blocks_total=int(info["blocks_total"]),
                num_blocks_used=int(info.get("blocks_used", "0")),
                num_blocks_cached=int(info.get("blocks_cached", "0")),
                reserved_tokens=_live_reserved(_decode(replies[2 + 2 * i]), now_ms),
                running=int(info.get("running", "0")),
                waiting=int(info.get("waiting", "0")),
                step_ms=float(info.get("step_ms", "0")),
                tokens_per_s=float(info.get("tokens_per_s", "0")),
                age_s=max(0.0, (now_ms - int(info.get("seen_ms", "0"))) / 1000),
                address=info.get("address", ""),
                engine=info.get("engine", ""),
            )
        return FleetView(
            workers, dead_after_s=self.settings.dead_after_s, stale_after_s=self.settings.stale_after_s
        )

    async def reserve(
        self, worker_id: str, request_id: str, tokens: int, *, allow_draining: bool = False
    ) -> ReserveResult:
        status, free_after = await self._reserve(
            keys=[keys.worker_info(worker_id), keys.worker_reservations(worker_id)],
            args=[
                request_id,
                tokens,
                int(self.settings.reservation_ttl_s * 1000),
                int(self.settings.dead_after_s * 1000),
                "1" if allow_draining else "0",
            ],
        )
        return ReserveResult(ReserveStatus(int(status)), int(free_after))

    async def release(self, worker_id: str, request_id: str) -> bool:
        return bool(await self._redis.hdel(keys.worker_reservations(worker_id), request_id))

    async def get_pin(self, session_id: str) -> str | None:
        value = await self._redis.get(keys.session_pin(session_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set_pin(self, session_id: str, worker_id: str) -> None:
        await self._redis.set(
            keys.session_pin(session_id), worker_id, px=int(self.settings.pin_idle_ttl_s * 1000)
        )

    async def set_draining(self, worker_id: str) -> bool:
        info = keys.worker_info(worker_id)
        if not await self._redis.exists(info):
            return False
        await self._redis.hset(info, "state", WorkerState.DRAINING.value)
        return True

    async def count_shed(self, tier: str) -> None:
        await self._redis.hincrby(keys.SHED_BY_TIER, tier, 1)

    async def shed_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode(await self._redis.hgetall(keys.SHED_BY_TIER)).items()}

    async def ping_ms(self) -> float:
        start = time.perf_counter()
        await self._redis.ping()
        return (time.perf_counter() - start) * 1000


def _decode(
    raw: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


def _live_reserved(entries: dict[str, str], now_ms: int) -> int:
    total = 0
    for value in entries.values():
        tokens, _, expires = value.partition(":")
        if tokens.isdigit() and expires.isdigit() and int(expires) >= now_ms:
            total += int(tokens)
    return total
