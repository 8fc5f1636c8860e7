"""Durable conversation history in Redis. A turn is appended (and fsync'd per Redis's AOF
policy) before the gateway acknowledges it to the client.

Every session belongs to the tenant that created it. Reads and writes name the tenant, and
another tenant's session is reported exactly like a missing one, so ids reveal nothing.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources

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


def _idempotency(session_id: str) -> str:
    """HASH idempotency key -> index of the turn stored under it."""
    return f"kvgate:s:{{{session_id}}}:idem"


def _running(session_id: str, key: str) -> str:
    """STRING owner token: a turn with this idempotency key is running (expires unless kept alive)."""
    return f"kvgate:s:{{{session_id}}}:idem-running:{key}"


def _lua(name: str) -> str:
    return (resources.files("gateway") / "lua" / name).read_text()


class Claim(enum.Enum):
    CLAIMED = "claimed"  # this request runs the turn
    STORED = "stored"  # the turn is already stored: replay it
    RUNNING = "running"  # another request is running it right now


@dataclass(frozen=True)
class TurnClaim:
    outcome: Claim
    turn_index: int = -1
    token: str = ""


def now_ms() -> int:
    return int(time.time() * 1000)


class SessionStore:
    def __init__(self, client: redis.Redis, idle_ttl_s: float) -> None:
        self._redis = client
        self._ttl_ms = int(idle_ttl_s * 1000)
        self._append = client.register_script(_lua("append_turn.lua"))
        self._claim = client.register_script(_lua("claim_turn.lua"))
        self._lock = client.register_script(_lua("turn_lock.lua"))

    async def create(
        self, tenant: str, model: str, system_prompt: str, metadata: dict[str, str]
    ) -> chat_pb2.Session:
        session_id = uuid.uuid4().hex
        created = now_ms()
        # Not a MULTI: the tenant's index is in another Redis Cluster slot than the session.
        # Written after the session, it can only miss one that exists (list_recent also drops
        # entries whose session expired), never list one that does not.
        async with self._redis.pipeline(transaction=False) as pipe:
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

    async def append_turn(
        self, tenant: str, session_id: str, turn: chat_pb2.Turn, idempotency_key: str = ""
    ) -> int:
        """Append one finished turn; returns its index. Refreshes the session's idle TTL.

        With an idempotency key, a turn already stored under it is not appended again (its index
        is returned), and the key's running-turn lock is released.
        """
        # One round trip, not one transaction: the script is atomic on the session's hash tag,
        # and the tenant's listing index lives in another slot (a MULTI spanning both is refused
        # by Redis Cluster); it only orders ListSessions, so it need not commit with the turn.
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._append(
                keys=[
                    _turns(session_id),
                    _meta(session_id),
                    _idempotency(session_id),
                    _running(session_id, idempotency_key),
                ],
                args=[turn.SerializeToString(), turn.created_unix_ms, self._ttl_ms, idempotency_key],
                client=pipe,
            )
            pipe.zadd(tenant_sessions(tenant), {session_id: turn.created_unix_ms})
            index, _ = await pipe.execute()
        return int(index)

    async def claim_turn(self, session_id: str, idempotency_key: str, lock_ttl_s: float) -> TurnClaim:
        """Claim `idempotency_key` for a turn about to run (see Claim)."""
        token = uuid.uuid4().hex
        outcome, index = await self._claim(
            keys=[_idempotency(session_id), _running(session_id, idempotency_key)],
            args=[idempotency_key, token, int(lock_ttl_s * 1000)],
        )
        claim = Claim(outcome.decode() if isinstance(outcome, bytes) else outcome)
        return TurnClaim(claim, int(index), token if claim is Claim.CLAIMED else "")

    async def keep_claim(self, session_id: str, idempotency_key: str, token: str, lock_ttl_s: float) -> bool:
        """Extend a running turn's lock; False when it is no longer this request's."""
        kept = await self._lock(
            keys=[_running(session_id, idempotency_key)], args=[token, max(1, int(lock_ttl_s * 1000))]
        )
        return bool(kept)

    async def release_claim(self, session_id: str, idempotency_key: str, token: str) -> None:
        """Give up a running turn's lock (the turn failed or was cancelled; a retry may run it)."""
        await self._lock(keys=[_running(session_id, idempotency_key)], args=[token, 0])

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Callers check ownership first (get); this removes the session from `tenant`'s index."""
        async with self._redis.pipeline(transaction=False) as pipe:  # two slots: see create()
            pipe.delete(_meta(session_id), _turns(session_id), _idempotency(session_id))
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
