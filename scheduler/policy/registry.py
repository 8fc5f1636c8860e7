"""Every placement policy by name, for the scheduler's configuration and the fleet simulator."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from scheduler.policy.baselines import (
    LeastKvPolicy,
    LeastRequestPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SessionHashPolicy,
)
from scheduler.policy.config import KvgateConfig
from scheduler.policy.kvgate import KvgatePolicy
from scheduler.policy.model import Decision, FleetView, PlacementRequest


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    # Whether the choice depends on the request's pin and prefix hits. When it does not, the
    # live scheduler decides once, before the lookup answers (and a stateful policy's counter or
    # rng advances once per placement, as in the simulator).
    @property
    def reads_pins_and_prefixes(self) -> bool: ...

    # Tier headroom and candidate count; the live scheduler's commit enforces the same headroom.
    @property
    def config(self) -> KvgateConfig: ...

    def place(self, request: PlacementRequest, fleet: FleetView) -> Decision: ...


# (seed, config) -> a fresh policy. Only `random` uses the seed; every policy uses the config's
# tier headroom and candidate count, so comparisons differ only in how a worker is chosen.
PolicyFactory = Callable[[int, KvgateConfig], Policy]

POLICIES: Mapping[str, PolicyFactory] = MappingProxyType(
    {
        "kvgate": lambda seed, config: KvgatePolicy(config=config),
        "round-robin": lambda seed, config: RoundRobinPolicy(config=config),
        "random": lambda seed, config: RandomPolicy(config=config, seed=seed),
        "least-request": lambda seed, config: LeastRequestPolicy(config=config),
        "least-kv": lambda seed, config: LeastKvPolicy(config=config),
        "session-hash": lambda seed, config: SessionHashPolicy(config=config),
    }
)


def make_policy(name: str, seed: int = 0, config: KvgateConfig | None = None) -> Policy:
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown placement policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return factory(seed, config if config is not None else KvgateConfig())
