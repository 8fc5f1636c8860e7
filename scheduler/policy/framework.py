"""Filters, weighted scorers and a picker, composed the way llm-d's endpoint picker does.

A new placement signal is one class: a Filter (can this worker take the request?)
or a Scorer (how good is it, in [0, 1]?), added to a Pipeline with a weight.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from scheduler.policy import fleet_index
from scheduler.policy.model import FleetView, PlacementRequest, WorkerView


class Filter(Protocol):
    @property
    def name(self) -> str: ...

    def keep(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool: ...


# A filter may also define `select(request, workers, fleet) -> list[WorkerView]`, the same test
# over a whole list; the Pipeline uses it when present (see signals.py for why).


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


_Selector = Callable[[PlacementRequest, Sequence[WorkerView], FleetView], list[WorkerView]]


@dataclass(frozen=True)
class Pipeline:
    filters: Sequence[Filter]
    scorers: Sequence[WeightedScorer]
    # Per filter, a whole-list selector: the filter's own `select` when it has one (one
    # comprehension per filter), else a comprehension over `keep`. Built once, not per call.
    _selectors: tuple[_Selector, ...] = field(init=False, repr=False, compare=False)
    # Whether top() may use fleet_index.fast_top on an IndexedFleetView (default signals only).
    _indexable: bool = field(init=False, repr=False, compare=False)
    _plan: tuple[tuple[int, object, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_selectors", tuple(_selector(f) for f in self.filters))
        object.__setattr__(self, "_indexable", fleet_index.applies(self))
        object.__setattr__(self, "_plan", fleet_index.scoring_plan(self))

    @property
    def indexable(self) -> bool:
        """Whether top() takes the fleet_index shortcut on an IndexedFleetView."""
        return self._indexable

    def keeps(self, request: PlacementRequest, worker: WorkerView, fleet: FleetView) -> bool:
        """Whether one worker passes every filter."""
        return all(f.keep(request, worker, fleet) for f in self.filters)

    def feasible(self, request: PlacementRequest, fleet: FleetView) -> list[WorkerView]:
        # Filter by filter rather than worker by worker: each pass shrinks the list (put cheap,
        # selective filters first) and costs one comprehension instead of a generator per worker.
        workers: Sequence[WorkerView] = list(fleet.workers.values())
        for select in self._selectors:
            if not workers:
                break
            workers = select(request, workers, fleet)
        return list(workers)

    def totals(
        self, request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[float]:
        """Weighted score per worker; zero-weight scorers are not evaluated at all."""
        totals: list[float] | None = None
        for weighted in self.scorers:
            weight = weighted.weight
            if weight == 0.0:
                continue
            scores = weighted.scorer.score(request, workers, fleet)
            if totals is None:
                totals = [weight * s for s in scores]
            else:
                totals = [t + weight * s for t, s in zip(totals, scores, strict=True)]
        return totals if totals is not None else [0.0] * len(workers)

    def rank(self, request: PlacementRequest, fleet: FleetView) -> list[WorkerView]:
        """Feasible workers, best first; ties broken by a hash of (request, worker) so decisions are
        deterministic yet tied workers share the load (see _tie_break)."""
        return self.top(request, fleet, None)

    def top(self, request: PlacementRequest, fleet: FleetView, k: int | None) -> list[WorkerView]:
        """The best k feasible workers (all of them if k is None), best first, ties by _tie_break.

        Linear in the fleet for a small k: the k-th best total is found with a heap, and only
        workers scoring at least that much are sorted.
        """
        if k is not None and self._indexable and isinstance(fleet, fleet_index.IndexedFleetView):
            fast = fleet_index.fast_top(self, request, fleet, k, _tie_break, self._plan)
            if fast is not None:
                return fast
        workers = self.feasible(request, fleet)
        n = len(workers)
        if n <= 1:
            return workers
        totals = self.totals(request, workers, fleet)
        if k is None or k >= n:
            chosen: list[int] = list(range(n))
        else:
            if k <= 0:
                return []
            chosen = heapq.nlargest(k, range(n), key=totals.__getitem__)
            kth = totals[chosen[-1]]
            if totals.count(kth) > sum(1 for i in chosen if totals[i] == kth):
                # Workers tied with the k-th best but left out: the tie-break must see all of
                # them, or the choice would depend on the fleet's iteration order.
                chosen = [i for i in range(n) if totals[i] >= kth]
        salt = (request.session_id or request.request_id).encode()
        chosen.sort(key=lambda i: (-totals[i], _tie_break(salt, workers[i].worker_id)))
        if k is not None:
            del chosen[k:]
        return [workers[i] for i in chosen]


def _tie_break(salt: bytes, worker_id: str) -> tuple[int, str]:
    """Rendezvous-style order among equally scored workers: on an idle or evenly loaded fleet
    every worker scores the same, and breaking ties by worker id would send all of that traffic
    to the lowest id. crc32, not hash(): str hashes change from process to process."""
    return zlib.crc32(worker_id.encode(), zlib.crc32(salt)), worker_id


def _selector(f: Filter) -> _Selector:
    select = getattr(f, "select", None)
    if callable(select):
        return cast(_Selector, select)
    keep = f.keep

    def by_keep(
        request: PlacementRequest, workers: Sequence[WorkerView], fleet: FleetView
    ) -> list[WorkerView]:
        return [w for w in workers if keep(request, w, fleet)]

    return by_keep
