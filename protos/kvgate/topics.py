"""MQTT topic names shared by the worker (publisher) and the scheduler (subscriber)."""

from __future__ import annotations

PREFIX = "kvgate/v1/workers"
STATS = "stats"
STATUS = "status"
KV = "kv"
SUBSCRIPTIONS = (f"{PREFIX}/+/{STATS}", f"{PREFIX}/+/{STATUS}", f"{PREFIX}/+/{KV}")


def topic(worker_id: str, kind: str) -> str:
    return f"{PREFIX}/{worker_id}/{kind}"


def parse(topic_name: str) -> tuple[str, str] | None:
    """(worker_id, kind) for one of our topics, None for anything else."""
    parts = topic_name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or parts[4] not in (STATS, STATUS, KV):
        return None
    return parts[3], parts[4]
