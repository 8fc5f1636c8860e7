"""kvgate's placement policy: keep sessions on the worker holding their KV cache, else balance
the fleet by free KV tokens, and shed honestly when nothing fits."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.policy.framework import Pipeline, WeightedScorer
from scheduler.policy.model import Decision, FleetView, Placed, PlacementRequest, Shed
from scheduler.policy.signals import AcceptsNewSessions, Alive, Fits, FreeTokensAfterPlacement, ServesModel

# When the fleet reports no throughput yet (idle or just started), assume one typical
# decode stream frees this many tokens per second per worker.
_IDLE_DRAIN_TOKENS_PER_S = 1000.0
MIN_RETRY_AFTER_S = 0.25
MAX_RETRY_AFTER_S = 30.0


def _default_pipeline() -> Pipeline:
    return Pipeline(
        filters=(ServesModel(), Alive(), AcceptsNewSessions(), Fits()),
        scorers=(WeightedScorer(FreeTokensAfterPlacement(), 1.0),),
    )


@dataclass
class KvgatePolicy:
    name: str = "kvgate"
    pipeline: Pipeline = field(default_factory=_default_pipeline)

    def place(self, request: PlacementRequest, fleet: FleetView) -> Decision:
        ranked = [w.worker_id for w in self.pipeline.rank(request, fleet)]
        pinned = request.pinned_worker
        if pinned is not None and pinned in ranked:
            # The pinned worker holds the session's KV: a hit beats any balance gain.
            ranked.remove(pinned)
            ranked.insert(0, pinned)
        if not ranked:
            return self._shed(request, fleet)
        return Placed(candidates=ranked, pinned_worker=pinned)

    def _shed(self, request: PlacementRequest, fleet: FleetView) -> Shed:
        serving = [w for w in fleet.workers.values() if w.model == request.model and fleet.is_alive(w)]
        if not serving:
            return Shed(retry_after_s=MAX_RETRY_AFTER_S / 6, reason=f"no live worker serves {request.model}")
        # Estimated from the fleet's drain rate: how long until the best worker frees enough.
        best = max(serving, key=lambda w: w.free_tokens)
        deficit = max(1, request.tokens_needed - best.free_tokens)
        rate = best.tokens_per_s or _IDLE_DRAIN_TOKENS_PER_S
        retry = min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, deficit / rate))
        return Shed(retry_after_s=retry, reason="at capacity", details={"deficit_tokens": deficit})
