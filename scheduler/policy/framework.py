"""Filters, weighted scorers and a picker, composed the way llm-d's endpoint picker does.

A new placement signal is one class: a Filter (can this worker take the request?)
or a Scorer (how good is it, in [0, 1]?), added to a Pipeline with a weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduler.policy.model import FleetView, PlacementRequest, WorkerView


class Filter(Protocol):
    @property
    def name(self) -> str: ...

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool: ...


class Scorer(Protocol):
    @property
    def name(self) -> str: ...

    def score(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        """One score in [0, 1] per worker (scorers see all candidates, so they can normalise)."""
        ...


@dataclass(frozen=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class Pipeline:
    filters: Sequence[Filter]
    scorers: Sequence[WeightedScorer]

    def feasible(self, request: PlacementRequest, fleet: FleetView) -> list[WorkerView]:
        return [w for w in fleet.workers.values() if all(f.keep(request, w, fleet) for f in self.filters)]

    def rank(self, request: PlacementRequest, fleet: FleetView) -> list[WorkerView]:
        """Feasible workers, best first; ties broken by worker id so decisions are deterministic."""
        workers = self.feasible(request, fleet)
        if len(workers) <= 1:
            return workers
        totals = [0.0] * len(workers)
        for weighted in self.scorers:
            for i, s in enumerate(weighted.scorer.score(request, workers, fleet)):
                totals[i] += weighted.weight * s
        order = sorted(range(len(workers)), key=lambda i: (-totals[i], workers[i].worker_id))
        return [workers[i] for i in order]
