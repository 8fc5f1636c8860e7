"""The policy's vocabulary: requests, the fleet snapshot it decides on, and its decisions."""

from __future__ import annotations

import enum
import functools
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
    # FLOPs per byte of the last engine step: below the GPU's ridge point it is memory-bound.
    arithmetic_intensity: float = 0.0
    # Seconds since the last telemetry from this worker.
    age_s: float = 0.0
    address: str = ""
    engine: str = ""
    # Prompt tokens per second this worker prefills, from telemetry; until telemetry reports it,
    # a roofline estimate for a mid-size model on one modern GPU. Prices recomputing a moved
    # conversation's history (pin wait-vs-move decision).
    prefill_tokens_per_s: float = 10_000.0
    # The engine's cap on concurrently running sequences (vLLM max_num_seqs): past it, requests queue.
    max_num_seqs: int = 256

    # Cached on first use (the view is frozen, so they cannot go stale; dataclasses.replace builds
    # a new view): the policy reads them for every worker on every placement.
    @functools.cached_property
    def capacity_tokens(self) -> int:
        return self.num_blocks_total * self.block_size

    @functools.cached_property
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

    def usable_free_tokens_of(self, workers: Sequence[WorkerView]) -> list[int]:
        """`usable_free_tokens` for a list of workers, in one pass (the per-placement hot path):
        fresh telemetry, the common case, needs no discount and no method call. The discount is
        inlined from `usable_free_tokens` (a unit test keeps the two equal)."""
        stale_after = self.stale_after_s
        span = max(self.dead_after_s - stale_after, 1e-9)
        out: list[int] = []
        append = out.append
        for w in workers:
            free = w.free_tokens
            age = w.age_s
            if age > stale_after and free > 0:
                trust = 1.0 - (age - stale_after) / span
                free = int(free * trust) if trust > 0.0 else 0
            append(free)
        return out


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
    # Per worker id: how many leading blocks of `block_hashes` that worker has cached (filled by
    # the live scheduler from its prefix index; workers absent from the map have none).
    prefix_hit_blocks: Mapping[str, int] = field(default_factory=dict)
    # Tokens of the conversation so far that the pinned worker holds in KV, i.e. what another
    # worker would have to prefill again if the session moved. None means "the whole prompt"
    # (see `recompute_tokens`); a None default rather than a copy of prompt_tokens keeps
    # dataclasses.replace(request, prompt_tokens=...) from carrying a stale value along.
    history_tokens: int | None = None

    @property
    def tokens_needed(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def recompute_tokens(self) -> int:
        return self.prompt_tokens if self.history_tokens is None else self.history_tokens


class Outcome(enum.StrEnum):
    NEW = "new"
    PINNED_HIT = "pinned_hit"
    MOVED = "moved"


@dataclass(frozen=True)
class Placed:
    """Candidates best first; the committer tries them in order until a reservation holds."""

    candidates: Sequence[str]
    pinned_worker: str | None = None
    # The pinned worker (candidates[0]) is full right now, but waiting for it to free room is
    # estimated cheaper than recomputing the conversation elsewhere: the committer should reserve
    # on it with a bounded wait (about `expected_wait_s`) before falling back to candidates[1:].
    wait_for_pinned: bool = False
    expected_wait_s: float = 0.0

    def outcome_for(self, worker_id: str) -> Outcome:
        if self.pinned_worker is None:
            return Outcome.NEW
        return Outcome.PINNED_HIT if worker_id == self.pinned_worker else Outcome.MOVED


class ShedCode(enum.StrEnum):
    """Why a request is not placed: what the caller should do differs."""

    # No room for the request's tier right now: retry after the hint (the fleet drains).
    AT_CAPACITY = "at_capacity"
    # No live worker serving the model takes new requests (none runs it, all drain, all excluded).
    NO_WORKER = "no_worker"
    # More tokens than any live worker serving the model can ever hold for the tier: no retry
    # helps, only a smaller request.
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Shed:
    retry_after_s: float
    reason: str
    details: Mapping[str, float] = field(default_factory=dict)
    # The tier whose headroom was applied (unknown tiers are normalised to "free"), so per-tier
    # shed counters only ever see the configured tier names.
    tier: str = ""
    code: ShedCode = ShedCode.AT_CAPACITY
    # TOO_LARGE: the most KV tokens one live worker serving the model can hold for the tier.
    limit_tokens: int = 0


Decision = Placed | Shed
