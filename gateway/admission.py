"""Bounded admission wait: hold a shed turn briefly for capacity instead of refusing it at once.

A full fleet frees KV capacity every time a turn finishes, often within a second. A turn that
would be shed may instead wait up to `wait_s` for room, asking the scheduler again every
poll interval (the scheduler's retry-after estimate, clamped). The wait is bounded in time and
in the number of turns waiting at once (each waiting turn polls the scheduler), so a real
overload is still shed promptly and honestly. Off (0 s) by default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

ADMISSION_WAITS = Counter(
    "kvgate_gateway_admission_waits_total",
    "Turns that waited for fleet capacity, by how the wait ended (placed, shed, cancelled)",
    ["outcome"],
)
ADMISSION_WAITING = Gauge("kvgate_gateway_admission_waiting", "Turns waiting for fleet capacity right now")

# Between two placement attempts of one waiting turn; the scheduler's retry-after is clamped into it.
MIN_POLL_S = 0.05
MAX_POLL_S = 0.25


@dataclass(frozen=True)
class AdmissionPolicy:
    wait_s: float = 0.0
    max_waiting: int = 256

    def __post_init__(self) -> None:
        if self.wait_s < 0:
            raise ValueError(f"admission wait must be >= 0 s, got {self.wait_s}")
        if self.max_waiting < 0:
            raise ValueError(f"the number of waiting turns must be >= 0, got {self.max_waiting}")


class AdmissionQueue:
    """Counts waiting turns and says how long a shed turn should sleep before asking again."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.waiting = 0

    def enter(self) -> bool:
        """Start waiting; False when waiting is off or the queue is full (shed now)."""
        if self.policy.wait_s <= 0 or self.waiting >= self.policy.max_waiting:
            return False
        self.waiting += 1
        ADMISSION_WAITING.set(self.waiting)
        return True

    def leave(self, outcome: str) -> None:
        """`outcome`: placed, shed or cancelled."""
        self.waiting -= 1
        ADMISSION_WAITING.set(self.waiting)
        ADMISSION_WAITS.labels(outcome=outcome).inc()

    def next_poll_s(self, retry_after_ms: int, waited_s: float, deadline_left_s: float | None) -> float:
        """Seconds to sleep before the next attempt; 0 means the wait is over: shed."""
        left = self.policy.wait_s - waited_s
        if deadline_left_s is not None:
            left = min(left, deadline_left_s)
        if left <= 0:
            return 0.0
        poll = min(max(retry_after_ms / 1000, MIN_POLL_S), MAX_POLL_S)
        # Jitter keeps a crowd of waiting turns from asking the scheduler in lockstep.
        return min(left, poll * random.uniform(0.75, 1.25))
