"""A short-lived local snapshot of the fleet, so that a Place does not read the whole fleet.

The snapshot may lag Redis by about `max_age_s` plus one read; that is safe because the Lua
commit re-checks capacity atomically. Once it is older than `max_age_s` a refresh starts in
the background and placements go on with the current snapshot meanwhile: none of them waits
for the read (only the very first, and the first after `invalidate`, when there is none).
Reservations this replica commits are added to the snapshot at once, so a burst spreads over
the fleet instead of piling on the worker that looked emptiest a moment ago.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from scheduler import metrics
from scheduler.policy import FleetView, WorkerView
from scheduler.store import FleetStore

log = logging.getLogger(__name__)


class FleetCache:
    def __init__(self, store: FleetStore, max_age_s: float = 0.1) -> None:
        self._store = store
        self._max_age_s = max_age_s
        self._view: FleetView | None = None
        # The dict inside _view, changed in place by reservations (see _add).
        self._workers: dict[str, WorkerView] = {}
        # Past this age placements wait for the refresh rather than go on without one.
        self._max_stale_s = max(1.0, 10 * max_age_s)
        self._read_at = 0.0
        self._refresh: asyncio.Task[FleetView] | None = None
        self._generation = 0
        # Tokens of this replica's commits still in flight, per worker: a refresh read from
        # Redis does not show them yet, so they are added back on top of every fresh view.
        self._pending: dict[str, int] = {}

    async def get(self) -> FleetView:
        view = self._view
        if view is not None:
            age = time.monotonic() - self._read_at
            if age < self._max_age_s:
                return view
            if self._refresh is None:
                self._refresh = asyncio.create_task(self._read(self._generation))
                self._refresh.add_done_callback(_log_failure)
            if age < self._max_stale_s:
                return view
        elif self._refresh is None:
            self._refresh = asyncio.create_task(self._read(self._generation))
            self._refresh.add_done_callback(_log_failure)
        # No snapshot, or refreshes keep failing: wait for a read (and see its error, if any).
        return await asyncio.shield(self._refresh)

    async def _read(self, generation: int) -> FleetView:
        try:
            view = await self._store.read_fleet()
        finally:
            if self._generation == generation:
                self._refresh = None
        if self._generation != generation:
            return view  # invalidated meanwhile: what it read may predate the reason
        self._read_at = time.monotonic()
        # A private copy of the workers: reservations change it in place, and the caller of
        # read_fleet may hold on to what it returned.
        workers = dict(view.workers)
        self._view = dataclasses.replace(view, workers=workers)
        self._workers = workers
        metrics.observe_fleet(view)  # as read from Redis, before this replica's in-flight commits
        for worker_id, tokens in self._pending.items():
            self._add(worker_id, tokens)
        return self._view

    def invalidate(self) -> None:
        """Forget the snapshot: the next placement waits for a read that starts after this."""
        self._view = None
        self._generation += 1
        self._refresh = None

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None

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

    def adjust(self, worker_id: str, tokens: int) -> None:
        """Count more (or, negative, fewer) reserved tokens on a worker in the current snapshot:
        for a committed reservation that a placement sets aside while it decides, or gives back."""
        self._add(worker_id, tokens)

    def _add(self, worker_id: str, tokens: int) -> None:
        # In place: the policy runs synchronously between awaits, so no decision ever sees a
        # snapshot change under it, and copying the fleet per reservation cost more than placing.
        view = self._view
        if view is None:
            return
        workers = self._workers
        worker = view.workers.get(worker_id)
        if worker is None:
            return
        workers[worker_id] = dataclasses.replace(worker, reserved_tokens=worker.reserved_tokens + tokens)


def _log_failure(task: asyncio.Task[FleetView]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        # The placement that needed this read (if any) gets the error; a background refresh
        # retries on the next Place.
        log.debug("fleet snapshot refresh failed: %r", exc)
