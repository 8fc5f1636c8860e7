"""Redis key layout of the scheduler. One worker's keys share a hash tag, as do one session's,
so every Lua script touches a single Redis Cluster slot."""

from __future__ import annotations

WORKERS = "kvgate:workers"  # SET of worker ids ever seen (the registry index)
SHED_BY_TIER = "kvgate:shed_by_tier"  # HASH tier -> requests shed


def worker_info(worker_id: str) -> str:
    return f"kvgate:w:{{{worker_id}}}:info"


def worker_reservations(worker_id: str) -> str:
    return f"kvgate:w:{{{worker_id}}}:resv"


def session_pin(session_id: str) -> str:
    return f"kvgate:s:{{{session_id}}}:pin"
