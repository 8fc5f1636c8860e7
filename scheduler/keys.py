"""Redis key layout of the scheduler. One worker's keys share a hash tag, as do one session's,
so every Lua script touches a single Redis Cluster slot."""

from __future__ import annotations

WORKERS = "kvgate:workers"  # SET of worker ids ever seen (the registry index)
SHED_BY_TIER = "kvgate:shed_by_tier"  # HASH tier -> requests shed
# STRING: Redis time (ms) at which some scheduler's telemetry ingest was last connected to the
# broker. Worker ages are measured against it, so a broker outage freezes them (see store.py).
TELEMETRY_CLOCK = "kvgate:{telemetry}:clock"
# STRING: Redis time (ms) at which the clock last resumed after a gap (the broker came back):
# ages count from no earlier than this, so workers get time to reconnect. Same slot as the clock.
TELEMETRY_RESUMED = "kvgate:{telemetry}:resumed"


def worker_info(worker_id: str) -> str:
    return f"kvgate:w:{{{worker_id}}}:info"


def worker_reservations(worker_id: str) -> str:
    return f"kvgate:w:{{{worker_id}}}:resv"


def worker_reservation_expiry(worker_id: str) -> str:
    """ZSET request id -> expiry (ms) of the worker's reservations (see lua/reservations.lua)."""
    return f"kvgate:w:{{{worker_id}}}:resvx"


def worker_reservation_keys(worker_id: str) -> list[str]:
    """KEYS of every script touching reservations: info, reservation hash, expiry zset."""
    return [worker_info(worker_id), worker_reservations(worker_id), worker_reservation_expiry(worker_id)]


def session_pin(session_id: str) -> str:
    return f"kvgate:s:{{{session_id}}}:pin"


def worker_blocks(worker_id: str) -> str:
    """SET of the KV block hashes the worker holds (its prefix cache, from its KV events): the
    authoritative copy, updated atomically with the worker's KV event sequence number."""
    return f"kvgate:w:{{{worker_id}}}:blocks"


def block_workers(block_hash: int) -> str:
    """SET of the workers holding one KV block: the prefix index placement reads, so a lookup
    costs one command per prompt block, whatever the fleet's size. Each block hashes to its own
    Cluster slot; it is maintained outside the worker's Lua script (see FleetStore.ingest_kv)."""
    return f"kvgate:b:{{{block_hash}}}"


def worker_pins(worker_id: str) -> str:
    """ZSET session id -> pin expiry (ms): which sessions are pinned here, for status."""
    return f"kvgate:w:{{{worker_id}}}:pins"


PLACEMENTS_BY_OUTCOME = "kvgate:placements_by_outcome"  # HASH outcome -> count
