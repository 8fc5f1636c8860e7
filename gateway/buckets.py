"""Token-bucket arithmetic, and the per-tier limits it is configured with. No I/O.

`take` is the reference model of gateway/lua/rate_limit.lua, which runs the same
arithmetic atomically inside Redis; the unit tests pin the model down and an integration
test checks the script against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Bucket:
    capacity: float  # the burst: what a full bucket holds
    per_ms: float  # refill rate

    @property
    def refill_ms(self) -> int:
        """Time for an empty bucket to fill; an untouched bucket is full after this long."""
        return math.ceil(self.capacity / self.per_ms)


@dataclass(frozen=True)
class Level:
    tokens: float
    at_ms: int


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_ms: int = 0
    limited_by: int = -1  # index of the bucket that said no (the one needing the longest wait)


def level_now(bucket: Bucket, level: Level | None, now_ms: int) -> float:
    if level is None:  # never used, or expired after a full refill: the same thing
        return bucket.capacity
    return min(bucket.capacity, level.tokens + max(0, now_ms - level.at_ms) * bucket.per_ms)


def take(
    buckets: Sequence[tuple[Bucket, Level | None, float]], now_ms: int
) -> tuple[Verdict, list[Level | None]]:
    """Take `cost` from every (bucket, level, cost) or from none of them.

    A cost above a bucket's capacity is charged as the capacity: such a request waits for
    a full bucket and empties it, instead of being refused forever. A negative cost is a
    refund (tokens charged for a turn that was never served): it fills the bucket, at most to
    its capacity.
    Returns the verdict and the new levels (unchanged when refused).
    """
    current = [level_now(bucket, level, now_ms) for bucket, level, _ in buckets]
    costs = [min(cost, bucket.capacity) for bucket, _, cost in buckets]
    waits = [
        0 if have >= cost else math.ceil((cost - have) / bucket.per_ms)
        for (bucket, _, _), have, cost in zip(buckets, current, costs, strict=True)
    ]
    longest = max(waits, default=0)
    if longest > 0:
        return Verdict(False, longest, waits.index(longest)), [level for _, level, _ in buckets]
    return Verdict(True), [
        Level(min(bucket.capacity, have - cost), now_ms)
        for (bucket, _, _), have, cost in zip(buckets, current, costs, strict=True)
    ]


@dataclass(frozen=True)
class TierLimits:
    requests_per_s: float
    request_burst: float
    tokens_per_min: float

    def requests(self) -> Bucket:
        return Bucket(capacity=self.request_burst, per_ms=self.requests_per_s / 1000)

    def tokens(self) -> Bucket:
        # A minute's worth of tokens may be spent at once: chat turns are bursty.
        return Bucket(capacity=self.tokens_per_min, per_ms=self.tokens_per_min / 60_000)


# Sensible starting points; each tier's values can be changed with --limits-<tier>.
DEFAULT_LIMITS: dict[str, TierLimits] = {
    "free": TierLimits(requests_per_s=2, request_burst=10, tokens_per_min=40_000),
    "plus": TierLimits(requests_per_s=10, request_burst=40, tokens_per_min=400_000),
    "enterprise": TierLimits(requests_per_s=100, request_burst=400, tokens_per_min=4_000_000),
}

_SPEC_FIELDS = {"rps": "requests_per_s", "burst": "request_burst", "tpm": "tokens_per_min"}


def parse_limits(spec: str, base: TierLimits) -> TierLimits:
    """`rps=2,burst=10,tpm=40000` (any subset) applied over `base`; ValueError names the problem."""
    changes: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        field = _SPEC_FIELDS.get(name.strip())
        if field is None:
            raise ValueError(f"unknown limit {name.strip()!r} in {spec!r}; use rps=, burst= and tpm=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"limit {name.strip()} must be a number, got {value.strip()!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"limit {name.strip()} must be positive, got {value.strip()!r}")
        changes[field] = number
    return replace(base, **changes)
