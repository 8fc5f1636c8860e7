"""Which worker this replica last saw a session pinned to: a guess, never the truth.

The pin lives in Redis (any replica may move a session); this bounded map only lets a placement
guess the worker before the lookup answers, so the guess can be reserved in the same round trip
as the lookup (see SchedulerServicer._place). A wrong or forgotten hint costs that round trip
back, nothing else.
"""

from __future__ import annotations

DEFAULT_CAPACITY = 100_000


class PinHints:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._workers: dict[str, str] = {}

    def get(self, session_id: str) -> str | None:
        return self._workers.get(session_id)

    def remember(self, session_id: str, worker_id: str | None) -> None:
        if not session_id:
            return
        if worker_id is None:
            self._workers.pop(session_id, None)
            return
        # Re-inserted at the end: dict order is recency, and the oldest entries go first.
        self._workers.pop(session_id, None)
        self._workers[session_id] = worker_id
        while len(self._workers) > self._capacity:
            del self._workers[next(iter(self._workers))]

    def __len__(self) -> int:
        return len(self._workers)
