"""Placement policy: pure functions of a request and a fleet snapshot (no I/O, no asyncio).

The live scheduler and the fleet simulator share this code.
"""

from scheduler.policy.baselines import (
    LeastKvPolicy,
    LeastRequestPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SessionHashPolicy,
)
from scheduler.policy.config import DEFAULT_TIER_HEADROOM, KvgateConfig
from scheduler.policy.framework import Filter, Pipeline, Scorer, WeightedScorer
from scheduler.policy.kvgate import KvgatePolicy, default_filters, default_pipeline, estimate_shed
from scheduler.policy.model import (
    Decision,
    FleetView,
    Outcome,
    Placed,
    PlacementRequest,
    Shed,
    ShedCode,
    WorkerState,
    WorkerView,
)
from scheduler.policy.registry import POLICIES, Policy, PolicyFactory, make_policy
from scheduler.policy.signals import (
    AcceptsNewSessions,
    Alive,
    BatchSweetSpot,
    Fits,
    FreeTokensAfterPlacement,
    PrefixAffinity,
    SameRegion,
    ServesModel,
)

__all__ = [
    "DEFAULT_TIER_HEADROOM",
    "POLICIES",
    "AcceptsNewSessions",
    "Alive",
    "BatchSweetSpot",
    "Decision",
    "Filter",
    "Fits",
    "FleetView",
    "FreeTokensAfterPlacement",
    "KvgateConfig",
    "KvgatePolicy",
    "LeastKvPolicy",
    "LeastRequestPolicy",
    "Outcome",
    "Pipeline",
    "Placed",
    "PlacementRequest",
    "Policy",
    "PolicyFactory",
    "PrefixAffinity",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SameRegion",
    "Scorer",
    "ServesModel",
    "SessionHashPolicy",
    "Shed",
    "ShedCode",
    "WeightedScorer",
    "WorkerState",
    "WorkerView",
    "default_filters",
    "default_pipeline",
    "estimate_shed",
    "make_policy",
]
