"""Baseline policies to compare kvgate against, behind the same `place(request, fleet)` interface.

They share kvgate's feasibility filters (model served, alive, accepting, fits with tier headroom)
and its shed estimate, so a comparison measures only how each one *chooses* among feasible
workers. None of them honours pins or prefix hits (except session-hash, through its own hashing);
each passes the request's pin through to `Placed` so the simulator can count hits and moves.
State (a counter, an rng, a hash ring) lives in the object: pure and deterministic per seed.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.policy.config import KvgateConfig
from scheduler.policy.framework import Pipeline
from scheduler.policy.kvgate import default_filters, estimate_shed
from scheduler.policy.model import Decision, FleetView, Placed, PlacementRequest, WorkerView


@dataclass
class _Baseline:
    config: KvgateConfig = field(default_factory=KvgateConfig)
    name: str = "baseline"
    # session-hash hashes the session id; none of them reads the pin or the prefix index.
    reads_pins_and_prefixes: bool = field(default=False, init=False)
    _pipeline: Pipeline = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pipeline = Pipeline(filters=default_filters(self.config), scorers=())

    def place(self, request: PlacementRequest, fleet: FleetView) -> Decision:
        feasible = self._pipeline.feasible(request, fleet)
        if not feasible:
            return estimate_shed(request, fleet, self.config)
        chosen = self._choose(request, feasible, fleet, max(1, self.config.max_candidates))
        return Placed(candidates=chosen, pinned_worker=request.pinned_worker)

    def _choose(
        self, request: PlacementRequest, feasible: list[WorkerView], fleet: FleetView, k: int
    ) -> list[str]:
        raise NotImplementedError


@dataclass
class RoundRobinPolicy(_Baseline):
    """The next feasible worker in fleet order, by a counter that advances on every placement."""

    name: str = "round-robin"
    _next: int = field(default=0, init=False, repr=False)

    def _choose(
        self, request: PlacementRequest, feasible: list[WorkerView], fleet: FleetView, k: int
    ) -> list[str]:
        n = len(feasible)
        start = self._next % n
        self._next += 1
        return [feasible[(start + j) % n].worker_id for j in range(min(k, n))]


@dataclass
class RandomPolicy(_Baseline):
    """A uniformly random feasible worker (then more random fallbacks); seeded, so replayable."""

    name: str = "random"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._rng = random.Random(self.seed)

    def _choose(
        self, request: PlacementRequest, feasible: list[WorkerView], fleet: FleetView, k: int
    ) -> list[str]:
        return [w.worker_id for w in self._rng.sample(feasible, min(k, len(feasible)))]


@dataclass
class LeastRequestPolicy(_Baseline):
    """Fewest requests running plus waiting (the usual load balancer's least-outstanding)."""

    name: str = "least-request"

    def _choose(
        self, request: PlacementRequest, feasible: list[WorkerView], fleet: FleetView, k: int
    ) -> list[str]:
        best = heapq.nsmallest(k, feasible, key=lambda w: (w.running + w.waiting, w.worker_id))
        return [w.worker_id for w in best]


@dataclass
class LeastKvPolicy(_Baseline):
    """Most free KV tokens, with no pin or prefix affinity: kvgate's balance signal alone."""

    name: str = "least-kv"

    def _choose(
        self, request: PlacementRequest, feasible: list[WorkerView], fleet: FleetView, k: int
    ) -> list[str]:
        usable = fleet.usable_free_tokens
        best = heapq.nsmallest(k, feasible, key=lambda w: (-usable(w), w.worker_id))
        return [w.worker_id for w in best]


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass
class SessionHashPolicy(_Baseline):
    """Consistent hashing of the session id onto a ring of virtual nodes (blake2b).

    A session goes to the first feasible worker clockwise from its hash. Walking the ring of all
    known workers and skipping infeasible ones is the same as hashing onto the ring of feasible
    workers alone, but the ring is built only when a new worker id appears, not per request.
    When a worker leaves, only the sessions whose walk stopped at its virtual nodes move.
    """

    name: str = "session-hash"
    # More virtual nodes spread load more evenly (std dev ~ 1/sqrt(vnodes) of the mean share).
    vnodes: int = 64
    _points: list[int] = field(default_factory=list, init=False, repr=False)
    _owners: list[str] = field(default_factory=list, init=False, repr=False)
    _known: set[str] = field(default_factory=set, init=False, repr=False)

    def _rebuild(self, worker_ids: Sequence[str]) -> None:
        ring = sorted((_hash64(f"{wid}#{v}"), wid) for wid in worker_ids for v in range(self.vnodes))
        self._points = [point for point, _ in ring]
        self._owners = [wid for _, wid in ring]
        self._known = set(worker_ids)

    def _choose(
        self, request: PlacementRequest, feasible: list[WorkerView], fleet: FleetView, k: int
    ) -> list[str]:
        if not self._known.issuperset(fleet.workers):
            # Rebuilt from the current fleet: dropping departed workers changes nothing (they were
            # skipped anyway) and keeps the ring from growing with churn.
            self._rebuild(sorted(fleet.workers))
        wanted = {w.worker_id for w in feasible}
        k = min(k, len(wanted))
        key = _hash64(request.session_id or request.request_id)
        owners = self._owners
        size = len(owners)
        i = bisect.bisect_left(self._points, key)
        chosen: list[str] = []
        for step in range(size):
            owner = owners[(i + step) % size]
            if owner in wanted and owner not in chosen:
                chosen.append(owner)
                if len(chosen) == k:
                    break
        return chosen
