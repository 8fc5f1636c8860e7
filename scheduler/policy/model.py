"""The policy's vocabulary: requests, the fleet snapshot it decides on, and its decisions."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class WorkerState(enum.StrEnum):
    READY = "ready"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass(frozen=True)
class WorkerView:
    """One worker as the scheduler last saw it: telemetry plus outstanding reservations."""

    worker_id: str
    region: str
    model: str
    state: WorkerState
    block_size: int
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_cached: int = 0
    reserved_tokens: int = 0
    running: int = 0
    waiting: int = 0
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    # Seconds since the last telemetry from this worker.
    age_s: float = 0.0
    address: str = ""
    engine: str = ""

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks_total * self.block_size

    @property
    def free_tokens(self) -> int:
        """KV tokens a new request can still get: unreferenced blocks (cached ones are evictable)
        minus what other placements have reserved but the telemetry does not show yet."""
        return (self.num_blocks_total - self.num_blocks_used) * self.block_size - self.reserved_tokens


@dataclass(frozen=True)
class FleetView:
    workers: Mapping[str, WorkerView]
    # Telemetry older than this marks a worker dead: it is not placed on.
    dead_after_s: float = 10.0
    # Telemetry older than this (but not dead) is stale: free capacity is discounted.
    stale_after_s: float = 2.0

    def is_alive(self, worker: WorkerView) -> bool:
        return worker.state != WorkerState.OFFLINE and worker.age_s <= self.dead_after_s

    def usable_free_tokens(self, worker: WorkerView) -> int:
        """Free tokens, discounted as telemetry ages: the older it is, the less we trust it."""
        free = worker.free_tokens
        if worker.age_s <= self.stale_after_s or free <= 0:
            return free
        span = max(self.dead_after_s - self.stale_after_s, 1e-9)
        trust = max(0.0, 1.0 - (worker.age_s - self.stale_after_s) / span)
        return int(free * trust)


@dataclass(frozen=True)
class PlacementRequest:
    request_id: str
    session_id: str
    model: str
    prompt_tokens: int
    max_new_tokens: int
    tier: str = "free"
    block_hashes: Sequence[int] = ()
    exclude_workers: frozenset[str] = frozenset()
    # The worker the session is pinned to (holds its KV cache), if any.
    pinned_worker: str | None = None
    client_region: str = ""

    @property
    def tokens_needed(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


class Outcome(enum.StrEnum):
    NEW = "new"
    PINNED_HIT = "pinned_hit"
    MOVED = "moved"


@dataclass(frozen=True)
class Placed:
    """Candidates best first; the committer tries them in order until a reservation holds."""

    candidates: Sequence[str]
    pinned_worker: str | None = None

    def outcome_for(self, worker_id: str) -> Outcome:
        if self.pinned_worker is None:
            return Outcome.NEW
        return Outcome.PINNED_HIT if worker_id == self.pinned_worker else Outcome.MOVED


@dataclass(frozen=True)
class Shed:
    retry_after_s: float
    reason: str
    details: Mapping[str, float] = field(default_factory=dict)


Decision = Placed | Shed
