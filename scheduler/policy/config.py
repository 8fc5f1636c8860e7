"""Tunables of kvgate's placement policy, with the reasoning behind each default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Fraction of each worker's KV capacity a tier may NOT consume. Higher tiers keep that headroom
# for themselves, so as the fleet fills up the free tier is shed first (at 90 % used), then plus
# (95 %), while enterprise can use the last block.
DEFAULT_TIER_HEADROOM: Mapping[str, float] = MappingProxyType({"free": 0.10, "plus": 0.05, "enterprise": 0.0})
# Tiers not in the headroom table get this one's headroom: an unknown (or misspelt) tier must
# not buy priority.
FALLBACK_TIER = "free"


def headroom_fraction(tier_headroom: Mapping[str, float], tier: str) -> float:
    fraction = tier_headroom.get(tier)
    if fraction is None:
        fraction = tier_headroom.get(FALLBACK_TIER, 0.0)
    return fraction


@dataclass(frozen=True)
class KvgateConfig:
    # Absolute free KV tokens after placement: the primary signal. Running out of KV forces the
    # engine to preempt (recompute or swap) running sequences, which costs more than any of the
    # other effects, so balance by room first.
    free_tokens_weight: float = 1.0
    # Fraction of the prompt's blocks already cached on the worker. 1.0: a full prefix hit is
    # worth as much as the whole free-capacity spread across the fleet (that score is normalised
    # to the emptiest worker), so cached conversations follow their cache unless another worker
    # is much emptier, and a hot shared prefix cannot pile every session onto one worker.
    prefix_weight: float = 1.0
    # Running batch against the arithmetic-intensity sweet spot. 0.5: a secondary effect (decode
    # step time grows slowly past the knee) that should break near-ties in free capacity rather
    # than override them.
    batch_weight: float = 0.5
    # Same-region bonus. 0 by default: the fleet's balance beats a few milliseconds of network
    # proximity next to seconds of generation; set it > 0 for latency-sensitive deployments.
    region_weight: float = 0.0
    # Decode is memory-bound: a bigger batch reuses each weight read for more sequences, so
    # throughput grows with the batch up to roughly this many running sequences; past it the
    # step becomes compute-bound and per-token latency grows.
    batch_knee: int = 64
    # How much each waiting (queued) request lowers the batch score: the score is multiplied by
    # 1 / (1 + waiting * penalty), so 4 queued requests halve it. A queue means a new request
    # waits regardless of the batch size.
    waiting_penalty: float = 0.25
    tier_headroom: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TIER_HEADROOM)
    # The committer rarely needs more than a couple of candidates (it takes the next one only on
    # a reservation conflict); returning the top few instead of sorting the whole fleet keeps
    # place() linear in the number of workers. If all of them conflict, the snapshot is stale.
    max_candidates: int = 8
    # Longest wait on a full pinned worker the policy will ask the committer for; beyond it the
    # estimate is too uncertain to hold a request on, and the session moves (or is shed).
    max_pin_wait_s: float = 5.0

    def headroom_fraction(self, tier: str) -> float:
        return headroom_fraction(self.tier_headroom, tier)

    def effective_tier(self, tier: str) -> str:
        """The tier name whose headroom applies (unknown tiers count as the fallback tier)."""
        return tier if tier in self.tier_headroom else FALLBACK_TIER
