"""Durable conversation history in Redis. A turn is appended (and fsync'd per Redis's AOF
policy) before the gateway acknowledges it to the client.

Every session belongs to the tenant that created it. Reads and writes name the tenant, and
another tenant's session is reported exactly like a missing one, so ids reveal nothing.
"""

from __future__ import annotations

import json
import time
import uuid

import redis.asyncio as redis

from kvgate.v1 import chat_pb2

# Sessions stored before tenancy existed have no tenant field; they are the anonymous tenant's.
LEGACY_TENANT = "anonymous"


def tenant_sessions(tenant: str) -> str:
    """ZSET session id -> last update (ms): one tenant's sessions, for ListSessions."""
    return f"kvgate:t:{{{tenant}}}:sessions"


def _meta(session_id: str) -> str:
    return f"kvgate:s:{{{session_id}}}:meta"


def _turns(session_id: str) -> str:
    return f"kvgate:s:{{{session_id}}}:turns"


def now_ms() -> int:
    return int(time.time() * 1000)


class SessionStore:
    def __init__(self, client: redis.Redis, idle_ttl_s: float) -> None:
        self._redis = client
        self._ttl_ms = int(idle_ttl_s * 1000)

    async def create(
        self, tenant: str, model: str, system_prompt: str, metadata: dict[str, str]
    ) -> chat_pb2.Session:
        session_id = uuid.uuid4().hex
        created = now_ms()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _meta(session_id),
                mapping={
                    "tenant": tenant,
                    "model": model,
                    "system_prompt": system_prompt,
                    "metadata": json.dumps(metadata),
                    "created_ms": created,
                    "updated_ms": created,
                },
            )
            pipe.pexpire(_meta(session_id), self._ttl_ms)
            pipe.zadd(tenant_sessions(tenant), {session_id: created})
            await pipe.execute()
        return chat_pb2.Session(
            session_id=session_id,
            model=model,
            system_prompt=system_prompt,
            metadata=metadata,
            created_unix_ms=created,
            updated_unix_ms=created,
        )

    async def get(self, tenant: str, session_id: str) -> chat_pb2.Session | None:
        """The session, or None when it does not exist or belongs to another tenant."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_meta(session_id))
            pipe.lrange(_turns(session_id), 0, -1)
            raw_meta, raw_turns = await pipe.execute()
        if not raw_meta:
            return None
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        if meta.get("tenant", LEGACY_TENANT) != tenant:
            return None
        return chat_pb2.Session(
            session_id=session_id,
            model=meta["model"],
            system_prompt=meta.get("system_prompt", ""),
            metadata=json.loads(meta.get("metadata", "{}")),
            turns=[chat_pb2.Turn.FromString(t) for t in raw_turns],
            created_unix_ms=int(meta.get("created_ms", "0")),
            updated_unix_ms=int(meta.get("updated_ms", "0")),
        )

    async def append_turn(self, tenant: str, session_id: str, turn: chat_pb2.Turn) -> int:
        """Append one finished turn; returns its index. Refreshes the session's idle TTL."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(_turns(session_id), turn.SerializeToString())
            pipe.hset(_meta(session_id), "updated_ms", turn.created_unix_ms)
            pipe.pexpire(_meta(session_id), self._ttl_ms)
            pipe.pexpire(_turns(session_id), self._ttl_ms)
            pipe.zadd(tenant_sessions(tenant), {session_id: turn.created_unix_ms})
            length, *_ = await pipe.execute()
        return int(length) - 1

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Callers check ownership first (get); this removes the session from `tenant`'s index."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_meta(session_id), _turns(session_id))
            pipe.zrem(tenant_sessions(tenant), session_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def list_recent(self, tenant: str, limit: int) -> list[chat_pb2.Session]:
        index = tenant_sessions(tenant)
        ids = await self._redis.zrevrange(index, 0, max(0, limit - 1))
        sessions = []
        for raw in ids:
            assert isinstance(raw, bytes)
            session = await self.get(tenant, raw.decode())
            if session is None:
                # Expired by its idle TTL: drop it from the index too.
                await self._redis.zrem(index, raw)
                continue
            del session.turns[:]
            sessions.append(session)
        return sessions
