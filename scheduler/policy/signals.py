"""The filters and scorers kvgate's policy is built from.

Each filter has `keep` (one worker, the Filter protocol) and `select` (a whole list in one
comprehension). `select` exists only for speed: the fleet simulator calls place() about a million
times on a thousand workers, and one Python call per worker per filter would dominate. Both must
agree; the property tests check candidates against `keep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter

from scheduler.policy.config import DEFAULT_TIER_HEADROOM, headroom_fraction
from scheduler.policy.model import FleetView, PlacementRequest, WorkerState, WorkerView

# Enum members are singletons and `is` skips StrEnum's slow __eq__ (3x faster on this hot path);
# WorkerView.state is typed WorkerState, so a plain string cannot get here unnoticed by mypy.
_READY = WorkerState.READY
_worker_id = attrgetter("worker_id")
_OFFLINE = WorkerState.OFFLINE


def spare_tokens(fleet: FleetView, worker: WorkerView, headroom: float) -> float:
    """KV tokens a request of a tier with this headroom fraction may still take on the worker."""
    return fleet.usable_free_tokens(worker) - headroom * worker.capacity_tokens


@dataclass(frozen=True)
class ServesModel:
    name: str = "serves-model"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return worker.model == request.model

    def select(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[WorkerView]:
        model = request.model
        return [w for w in workers if w.model == model]


@dataclass(frozen=True)
class Alive:
    name: str = "alive"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return fleet.is_alive(worker) and worker.worker_id not in request.exclude_workers

    def select(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[WorkerView]:
        # Inlines FleetView.is_alive (kept in sync by the property tests).
        dead_after = fleet.dead_after_s
        excluded = request.exclude_workers
        return [
            w
            for w in workers
            if w.state is not _OFFLINE and w.age_s <= dead_after and w.worker_id not in excluded
        ]


@dataclass(frozen=True)
class AcceptsNewSessions:
    """Draining workers finish what they have but take no new placements."""

    name: str = "accepts-new"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return worker.state == _READY

    def select(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[WorkerView]:
        return [w for w in workers if w.state is _READY]


@dataclass(frozen=True)
class Fits:
    """The request's tokens fit in what its tier may use: usable free tokens minus the headroom
    the tier must leave for higher tiers (a fraction of the worker's KV capacity)."""

    name: str = "fits"
    tier_headroom: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TIER_HEADROOM)

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        headroom = headroom_fraction(self.tier_headroom, request.tier)
        return spare_tokens(fleet, worker, headroom) >= request.tokens_needed

    def select(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[WorkerView]:
        headroom = headroom_fraction(self.tier_headroom, request.tier)
        need = request.tokens_needed
        free = fleet.usable_free_tokens_of(workers)
        if headroom == 0.0:
            return [w for w, f in zip(workers, free, strict=True) if f >= need]
        return [w for w, f in zip(workers, free, strict=True) if f - headroom * w.capacity_tokens >= need]


@dataclass(frozen=True)
class FreeTokensAfterPlacement:
    """Absolute free KV tokens left after placing: an H200 with more room scores above an A100."""

    name: str = "free-kv-tokens"

    def score(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        need = request.tokens_needed
        left = [f - need for f in fleet.usable_free_tokens_of(workers)]
        top = max(left, default=0)
        if top <= 0:
            return [0.0] * len(workers)
        scale = 1.0 / top
        return [x * scale if x > 0 else 0.0 for x in left]


@dataclass(frozen=True)
class PrefixAffinity:
    """Fraction of the request's blocks already cached on the worker: each one is prefill work
    (and time to first token) saved."""

    name: str = "prefix-affinity"

    def score(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        hits = request.prefix_hit_blocks
        blocks = len(request.block_hashes)
        if not hits or blocks == 0:
            return [0.0] * len(workers)
        scale = 1.0 / blocks
        # map() with C-level callables: one dict lookup per worker and no Python frame.
        found = map(hits.get, map(_worker_id, workers), repeat(0))
        # A hint can be larger than the request (an index entry for a longer conversation).
        return [(h if h < blocks else blocks) * scale for h in found]


@dataclass(frozen=True)
class BatchSweetSpot:
    """Prefer workers whose running batch is below the arithmetic-intensity knee.

    Decode is memory-bound: each step reads all weights once whatever the batch, so adding a
    sequence below the knee is nearly free throughput (score 1). Past the knee the step turns
    compute-bound and every running sequence slows down: the score falls linearly to 0 at the
    engine's max_num_seqs. A queue (waiting > 0) means the request waits for admission whatever
    the batch, so the score is divided by (1 + waiting * waiting_penalty).
    """

    knee: int = 64
    waiting_penalty: float = 0.25
    name: str = "batch-sweet-spot"

    def score(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        knee = self.knee
        penalty = self.waiting_penalty
        out: list[float] = []
        append = out.append
        for w in workers:
            running = w.running
            waiting = w.waiting
            if running <= knee:
                if not waiting:
                    append(1.0)  # the common case, kept to one comparison each
                    continue
                s = 1.0
            else:
                span = w.max_num_seqs - knee
                s = (w.max_num_seqs - running) / span if span > 0 else 0.0
                if s < 0.0:
                    s = 0.0
            if waiting > 0:
                s /= 1.0 + waiting * penalty
            append(s)
        return out


@dataclass(frozen=True)
class SameRegion:
    """A bonus for the client's own region (network latency to the first token)."""

    name: str = "same-region"

    def score(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        region = request.client_region
        if not region:
            return [0.0] * len(workers)
        return [1.0 if w.region == region else 0.0 for w in workers]
