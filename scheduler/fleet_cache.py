"""A short-lived local snapshot of the fleet, so one Place costs one Redis round trip (the commit).

The snapshot may lag Redis by `max_age_s`; that is safe because the Lua commit
re-checks capacity atomically. Reservations this replica commits are added to the
snapshot at once, so a burst spreads over the fleet instead of piling on the
worker that looked emptiest a moment ago.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from scheduler.policy import FleetView
from scheduler.store import FleetStore


class FleetCache:
    def __init__(self, store: FleetStore, max_age_s: float = 0.1) -> None:
        self._store = store
        self._max_age_s = max_age_s
        self._view: FleetView | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        # Tokens of this replica's commits still in flight, per worker: a refresh read from
        # Redis does not show them yet, so they are added back on top of every fresh view.
        self._pending: dict[str, int] = {}

    async def get(self) -> FleetView:
        if self._view is not None and time.monotonic() - self._read_at < self._max_age_s:
            return self._view
        async with self._lock:
            # Another caller may have refreshed while we waited for the lock.
            if self._view is None or time.monotonic() - self._read_at >= self._max_age_s:
                view = await self._store.read_fleet()
                self._read_at = time.monotonic()
                self._view = view
                for worker_id, tokens in self._pending.items():
                    self._add(worker_id, tokens)
            return self._view

    def invalidate(self) -> None:
        self._view = None

    def begin_reservation(self, worker_id: str, tokens: int) -> None:
        """Count tokens before awaiting their commit, so concurrent placements here see them."""
        self._pending[worker_id] = self._pending.get(worker_id, 0) + tokens
        self._add(worker_id, tokens)

    def end_reservation(self, worker_id: str, tokens: int, committed: bool) -> None:
        """A committed reservation stays counted (Redis has it now); a failed one is taken back."""
        left = self._pending.get(worker_id, 0) - tokens
        if left > 0:
            self._pending[worker_id] = left
        else:
            self._pending.pop(worker_id, None)
        if not committed:
            self._add(worker_id, -tokens)

    def _add(self, worker_id: str, tokens: int) -> None:
        view = self._view
        if view is None or worker_id not in view.workers:
            return
        workers = dict(view.workers)
        worker = workers[worker_id]
        workers[worker_id] = dataclasses.replace(worker, reserved_tokens=worker.reserved_tokens + tokens)
        self._view = dataclasses.replace(view, workers=workers)
