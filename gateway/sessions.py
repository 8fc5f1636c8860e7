"""Durable conversation history in Redis. A turn is appended (and fsync'd per Redis's AOF
policy) before the gateway acknowledges it to the client.

Every session belongs to the tenant that created it. Reads and writes name the tenant, and
another tenant's session is reported exactly like a missing one, so ids reveal nothing.
"""

from __future__ import annotations

import enum
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis
from redis.asyncio.client import Pipeline

from kvgate.v1 import chat_pb2

log = logging.getLogger(__name__)

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
    """HASH turn id (a client's idempotency key, or one the gateway made) -> index of its turn."""
    return f"kvgate:s:{{{session_id}}}:idem"


def _running(session_id: str, key: str) -> str:
    """STRING owner token: a turn with this idempotency key is running (expires unless kept alive)."""
    return f"kvgate:s:{{{session_id}}}:idem-running:{key}"


# Gateway-made turn ids start with a control character, which a client's idempotency key may not
# contain (validation refuses it): the two kinds share one hash and can never collide.
_GATEWAY_TURN_ID_PREFIX = "\x00turn:"

# Index entries are trimmed once they are older than the idle ttl plus this: clocks of gateway
# replicas and Redis may differ, and a live session must never leave the listing.
INDEX_TRIM_SLACK_MS = 60_000


def new_turn_id() -> str:
    """An id for a turn the client sent without an idempotency key: stored with the turn, so an
    append that Redis applied but whose reply was lost is not applied again when retried."""
    return f"{_GATEWAY_TURN_ID_PREFIX}{uuid.uuid4().hex}"


class SessionGone(Exception):
    """The session was deleted (or expired) while a turn ran: the turn was not stored."""


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
            self._index(pipe, tenant, session_id, created)
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
        session = _session(session_id, raw_meta, tenant)
        if session is not None:
            session.turns.extend(chat_pb2.Turn.FromString(t) for t in raw_turns)
        return session

    async def append_turn(self, tenant: str, session_id: str, turn: chat_pb2.Turn, turn_id: str) -> int:
        """Append one finished turn; returns its index. Refreshes the session's idle TTL.

        `turn_id` is the client's idempotency key or `new_turn_id()`: a turn already stored under
        it is not appended again (its index is returned), so the Redis client's retry of an append
        whose reply was lost stores nothing twice; the id's running-turn lock is released.
        Raises SessionGone when the session was deleted or expired meanwhile (nothing is stored).
        """
        index = int(
            await self._append(
                keys=[
                    _turns(session_id),
                    _meta(session_id),
                    _idempotency(session_id),
                    _running(session_id, turn_id),
                ],
                args=[turn.SerializeToString(), turn.created_unix_ms, self._ttl_ms, turn_id],
            )
        )
        if index < 0:
            raise SessionGone(session_id)
        # After the script, not in one transaction with it: the tenant's index lives in another
        # Redis Cluster slot (a MULTI spanning both is refused), and indexing a session the script
        # found gone would list it again. The index only orders ListSessions: the turn is stored
        # whether or not this write makes it.
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._index(pipe, tenant, session_id, turn.created_unix_ms)
                await pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not update the session index of tenant %s: %s", tenant, exc)
        return index

    def _index(self, pipe: Pipeline, tenant: str, session_id: str, updated_ms: int) -> None:
        """Queue the session's listing entry, and the trim of entries whose session has expired
        (they were idle past the ttl), so the index holds about one entry per live session."""
        index = tenant_sessions(tenant)
        pipe.zadd(index, {session_id: updated_ms})
        pipe.zremrangebyscore(index, "-inf", f"({now_ms() - self._ttl_ms - INDEX_TRIM_SLACK_MS}")

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
        """The tenant's `limit` most recently updated sessions, without their turns: their meta
        hashes only, read in one pipelined round trip after the index."""
        index = tenant_sessions(tenant)
        ids = [
            raw.decode() if isinstance(raw, bytes) else str(raw)
            for raw in await self._redis.zrevrange(index, 0, max(0, limit - 1))
        ]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(_meta(session_id))
            metas = await pipe.execute()
        sessions, gone = [], []
        for session_id, raw_meta in zip(ids, metas, strict=True):
            session = _session(session_id, raw_meta, tenant)
            if session is None:
                gone.append(session_id)  # expired by its idle TTL (or deleted): drop its entry
            else:
                sessions.append(session)
        if gone:
            await self._redis.zrem(index, *gone)
        return sessions


def _session(session_id: str, raw_meta: dict[bytes, bytes], tenant: str) -> chat_pb2.Session | None:
    """The session (without turns) from its meta hash; None when it is missing, another tenant's,
    or a leftover without a model (an older gateway's append could recreate a deleted session's
    hash with nothing but `updated_ms`)."""
    meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
    if "model" not in meta or meta.get("tenant", LEGACY_TENANT) != tenant:
        return None
    return chat_pb2.Session(
        session_id=session_id,
        model=meta["model"],
        system_prompt=meta.get("system_prompt", ""),
        metadata=json.loads(meta.get("metadata", "{}")),
        created_unix_ms=int(meta.get("created_ms", "0")),
        updated_unix_ms=int(meta.get("updated_ms", "0")),
    )
