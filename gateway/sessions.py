"""Durable conversation history in Redis. A turn is appended (and fsync'd per Redis's AOF
policy) before the gateway acknowledges it to the client."""

from __future__ import annotations

import json
import time
import uuid

import redis.asyncio as redis

from kvgate.v1 import chat_pb2

SESSIONS_BY_RECENCY = "kvgate:sessions"  # ZSET session id -> last update (ms)


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

    async def create(self, model: str, system_prompt: str, metadata: dict[str, str]) -> chat_pb2.Session:
        session_id = uuid.uuid4().hex
        created = now_ms()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _meta(session_id),
                mapping={
                    "model": model,
                    "system_prompt": system_prompt,
                    "metadata": json.dumps(metadata),
                    "created_ms": created,
                    "updated_ms": created,
                },
            )
            pipe.pexpire(_meta(session_id), self._ttl_ms)
            pipe.zadd(SESSIONS_BY_RECENCY, {session_id: created})
            await pipe.execute()
        return chat_pb2.Session(
            session_id=session_id,
            model=model,
            system_prompt=system_prompt,
            metadata=metadata,
            created_unix_ms=created,
            updated_unix_ms=created,
        )

    async def get(self, session_id: str) -> chat_pb2.Session | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_meta(session_id))
            pipe.lrange(_turns(session_id), 0, -1)
            raw_meta, raw_turns = await pipe.execute()
        if not raw_meta:
            return None
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        return chat_pb2.Session(
            session_id=session_id,
            model=meta["model"],
            system_prompt=meta.get("system_prompt", ""),
            metadata=json.loads(meta.get("metadata", "{}")),
            turns=[chat_pb2.Turn.FromString(t) for t in raw_turns],
            created_unix_ms=int(meta.get("created_ms", "0")),
            updated_unix_ms=int(meta.get("updated_ms", "0")),
        )

    async def append_turn(self, session_id: str, turn: chat_pb2.Turn) -> int:
        """Append one finished turn; returns its index. Refreshes the session's idle TTL."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(_turns(session_id), turn.SerializeToString())
            pipe.hset(_meta(session_id), "updated_ms", turn.created_unix_ms)
            pipe.pexpire(_meta(session_id), self._ttl_ms)
            pipe.pexpire(_turns(session_id), self._ttl_ms)
            pipe.zadd(SESSIONS_BY_RECENCY, {session_id: turn.created_unix_ms})
            length, *_ = await pipe.execute()
        return int(length) - 1

    async def delete(self, session_id: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_meta(session_id), _turns(session_id))
            pipe.zrem(SESSIONS_BY_RECENCY, session_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def list_recent(self, limit: int) -> list[chat_pb2.Session]:
        ids = await self._redis.zrevrange(SESSIONS_BY_RECENCY, 0, max(0, limit - 1))
        sessions = []
        for raw in ids:
            assert isinstance(raw, bytes)
            session = await self.get(raw.decode())
            if session is None:
                # Expired by its idle TTL: drop it from the index too.
                await self._redis.zrem(SESSIONS_BY_RECENCY, raw)
                continue
            del session.turns[:]
            sessions.append(session)
        return sessions
