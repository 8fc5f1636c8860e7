"""The filters and scorers kvgate's policy is built from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.policy.model import FleetView, PlacementRequest, WorkerState, WorkerView


@dataclass(frozen=True)
class ServesModel:
    name: str = "serves-model"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return worker.model == request.model


@dataclass(frozen=True)
class Alive:
    name: str = "alive"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return fleet.is_alive(worker) and worker.worker_id not in request.exclude_workers


@dataclass(frozen=True)
class AcceptsNewSessions:
    """Draining workers finish what they have but take no new placements."""

    name: str = "accepts-new"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return worker.state == WorkerState.READY


@dataclass(frozen=True)
class Fits:
    name: str = "fits"

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        return fleet.usable_free_tokens(worker) >= request.tokens_needed


@dataclass(frozen=True)
class FreeTokensAfterPlacement:
    """Absolute free KV tokens left after placing: an H200 with more room scores above an A100."""

    name: str = "free-kv-tokens"

    def score(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        left = [max(0, fleet.usable_free_tokens(w) - request.tokens_needed) for w in workers]
        top = max(left)
        return [x / top if top > 0 else 0.0 for x in left]
