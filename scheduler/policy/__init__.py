"""Placement policy: pure functions of a request and a fleet snapshot (no I/O, no asyncio).

The live scheduler and the fleet simulator share this code.
"""

from scheduler.policy.framework import Filter, Pipeline, Scorer, WeightedScorer
from scheduler.policy.kvgate import KvgatePolicy
from scheduler.policy.model import (
    Decision,
    FleetView,
    Outcome,
    Placed,
    PlacementRequest,
    Shed,
    WorkerState,
    WorkerView,
)

__all__ = [
    "Decision",
    "Filter",
    "FleetView",
    "KvgatePolicy",
    "Outcome",
    "Pipeline",
    "Placed",
    "PlacementRequest",
    "Scorer",
    "Shed",
    "WeightedScorer",
    "WorkerState",
    "WorkerView",
]
