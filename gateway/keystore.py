"""API key records in Redis, by public key id. Keys themselves are never stored, only hashes.

Layout:
    kvgate:key:{<key id>}   HASH hash, tenant, tier, label, created_ms, revoked, quarantined
    kvgate:keys             ZSET key id -> created ms (the index `kvgate keys list` walks)

Records are never deleted: a revoked key stays listed (who had access, and until when).
"""

from __future__ import annotations

import redis.asyncio as redis

from gateway import apikeys
from gateway.apikeys import KeyRecord, NewKey
from gateway.sessions import now_ms
from kvgate.redis_conn import as_str

KEYS_INDEX = "kvgate:keys"

# What redis-py accepts as a hash field or value.
_RedisField = str | bytes | bytearray | memoryview | int | float


def record_key(key_id: str) -> str:
    return f"kvgate:key:{{{key_id}}}"


class KeyStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    async def create(self, tenant: str, tier: str, label: str = "") -> NewKey:
        problem = apikeys.check_tenant(tenant) or apikeys.check_tier(tier)
        if problem:
            raise ValueError(problem)
        new = apikeys.generate()
        while await self._redis.exists(record_key(new.key_id)):  # 48-bit ids: practically never
            new = apikeys.generate()
        record = KeyRecord(
            key_id=new.key_id,
            key_hash=apikeys.hash_key(new.key),
            tenant=tenant,
            tier=tier,
            label=label,
            created_ms=now_ms(),
        )
        fields: dict[_RedisField, _RedisField] = {k: v for k, v in record.to_redis().items()}
        # Not a MULTI: the record and the index are in different Redis Cluster slots. The record
        # goes first; the index only lists keys (authentication reads the record).
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(record_key(new.key_id), mapping=fields)
            pipe.zadd(KEYS_INDEX, {new.key_id: record.created_ms})
            await pipe.execute()
        return new

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._redis.hgetall(record_key(key_id))
        if not raw:
            return None
        return KeyRecord.from_redis(key_id, {as_str(k): as_str(v) for k, v in raw.items()})

    async def revoke(self, key_id: str) -> bool:
        return await self._set_flag(key_id, "revoked", True)

    async def quarantine(self, key_id: str, on: bool) -> bool:
        return await self._set_flag(key_id, "quarantined", on)

    async def list(self, tenant: str | None = None) -> list[KeyRecord]:
        records = []
        for raw_id in await self._redis.zrange(KEYS_INDEX, 0, -1):
            assert isinstance(raw_id, bytes)
            record = await self.get(raw_id.decode())
            if record is not None and (tenant is None or record.tenant == tenant):
                records.append(record)
        return records

    async def _set_flag(self, key_id: str, field: str, on: bool) -> bool:
        """False when there is no such key; a flag is never written onto a missing record."""
        if not await self._redis.exists(record_key(key_id)):
            return False
        await self._redis.hset(record_key(key_id), field, int(on))
        return True
