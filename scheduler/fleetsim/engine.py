"""The SimEngine as the fleet simulator drives it: one extra query, nothing else changed."""

from __future__ import annotations

from collections.abc import Sequence

from gpu_worker.sim.engine import SimEngine
from gpu_worker.sim.roofline import decode_run_cost


class FleetEngine(SimEngine):
    """SimEngine plus `jump_seconds(k)` and `add_request_hashed`.

    `jump_seconds(k)`: how long k pure-decode steps would take, without taking them.
    The simulator needs it to defer a decode run to its end on the virtual clock: the run is
    only *planned* when it starts, so that a request arriving in the middle can cut it at the
    step in flight (`steps_within`), and telemetry ticks in between see the engine as of the
    last completed step. SimEngine prices runs only inside jump(); this reads the same
    attended-context sum jump() uses (a protected attribute of the base class; kept equal to
    jump(k).duration_s by a unit test). A public SimEngine.jump_seconds would remove this class.
    """

    def jump_seconds(self, k: int) -> float:
        if k <= 0:
            return 0.0
        # Refreshes the decode batch's context sum if a non-decode step left it unknown.
        self._decode_state()
        cost = decode_run_cost(
            self.gpu, self.model_profile, self.config.tp, len(self._running), self._ctx_sum, k
        )
        return cost.seconds

    def add_request_hashed(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        seed: int,
        prompt_block_hashes: list[int],
    ) -> None:
        """add_request with the prompt's block hashes already computed (empty: compute them).

        The scheduler hashes every prompt for the prefix index; for Mooncake's 15k-token
        prompts hashing it again here was a third of the simulation's time. The base method
        does all the checks and bookkeeping with hashing switched off, then the request gets
        the given hashes. They must be block_hashes(prompt, block_size) (PrefixHasher's are;
        a unit test checks the engine behaves identically). A `block_hashes` argument on
        SimEngine.add_request would remove this.
        """
        if not prompt_block_hashes or not self._caching:
            self.add_request(request_id, prompt_token_ids, max_new_tokens, seed)
            return
        self._caching = False
        try:
            self.add_request(request_id, prompt_token_ids, max_new_tokens, seed)
        finally:
            self._caching = True
        self._requests[request_id].hashes = list(prompt_block_hashes)
