"""Roofline step-time model: KV sizing and the duration of one engine step.

Everything here is O(1) given aggregate sums over the batch, so the engine can price
a step (or a run of k decode steps) without touching individual tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from gpu_worker.sim.profiles import GpuProfile, ModelProfile


class StepCost(NamedTuple):
    """A step's (or a run's) seconds, FLOPs and bytes moved. A named tuple: engines build one
    per step, and a frozen dataclass cost ~5% of a busy simulated worker's time."""

    seconds: float
    flops: float
    bytes: float

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes if self.bytes > 0 else 0.0


def check_tp(model: ModelProfile, tp: int) -> None:
    # vLLM shards KV heads across ranks; replicating heads (tp > kv heads) is not modelled.
    if tp < 1 or model.num_kv_heads % tp != 0:
        raise ValueError(
            f"tensor parallel size {tp} must be >= 1 and divide {model.name}'s {model.num_kv_heads} KV heads"
        )


def kv_bytes_per_token(model: ModelProfile) -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * dtype bytes (whole TP group)."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * model.dtype_bytes


def weight_bytes(model: ModelProfile) -> float:
    return model.total_params * model.dtype_bytes


def expected_experts_touched(num_experts: int, experts_per_token: int, tokens: float) -> float:
    """E * (1 - (1 - k/E)^B): expected distinct experts hit per layer by B tokens routed
    uniformly and independently (real routers are skewed, so this is an upper-ish bound)."""
    if tokens <= 0:
        return 0.0
    miss: float = (1.0 - experts_per_token / num_experts) ** tokens
    return num_experts * (1.0 - miss)


def weight_bytes_read(model: ModelProfile, batch_tokens: float) -> float:
    """Weight bytes one forward pass streams from HBM: all of a dense model; for MoE the
    shared weights plus only the experts the batch routes to."""
    if batch_tokens <= 0:
        return 0.0
    if not model.is_moe:
        return weight_bytes(model)
    touched = expected_experts_touched(model.num_experts, model.experts_per_token, batch_tokens)
    return (model.shared_params + touched * model.expert_params) * model.dtype_bytes


def kv_capacity_tokens(
    gpu: GpuProfile, model: ModelProfile, tp: int = 1, gpu_memory_utilization: float = 0.9
) -> int:
    """Tokens of KV cache the TP group holds after weights and the activation reserve,
    as vLLM sizes it: mem * tp * utilisation - weights - activations, over KV bytes/token."""
    check_tp(model, tp)
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    budget = gpu.memory_bytes * tp * gpu_memory_utilization
    free = budget - weight_bytes(model) - model.activation_reserve_bytes * tp
    if free <= 0:
        raise ValueError(
            f"{model.name} does not fit on {tp} x {gpu.name} at utilisation {gpu_memory_utilization}: "
            f"weights {weight_bytes(model) / 1e9:.1f} GB vs budget {budget / 1e9:.1f} GB"
        )
    return int(free // kv_bytes_per_token(model))


def kv_capacity_blocks(
    gpu: GpuProfile,
    model: ModelProfile,
    tp: int = 1,
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
) -> int:
    return kv_capacity_tokens(gpu, model, tp, gpu_memory_utilization) // block_size


def _comm_seconds(gpu: GpuProfile, model: ModelProfile, tp: int, batch_tokens: float) -> float:
    # Assumption: two all-reduces per layer (after attention and after the MLP), ring
    # algorithm moving 2(tp-1)/tp of the activations, not overlapped with compute.
    if tp <= 1 or batch_tokens <= 0:
        return 0.0
    payload = batch_tokens * model.hidden_size * model.dtype_bytes
    per_allreduce = gpu.allreduce_latency_s + 2 * (tp - 1) / tp * payload / gpu.interconnect_bandwidth
    return 2 * model.num_layers * per_allreduce


def _attention_flops_per_pair(model: ModelProfile) -> float:
    # One query token attending one context token: QK^T and PV are each
    # 2 * hidden FLOPs per layer, so ~4 * layers * hidden (projections are in the params).
    return 4.0 * model.num_layers * model.hidden_size


def step_cost(
    gpu: GpuProfile,
    model: ModelProfile,
    tp: int,
    decode_contexts_sum: float,
    num_decode: int,
    prefill_new_tokens: float,
    prefill_context_tokens: float,
    *,
    prefill_attention_pairs: float | None = None,
) -> StepCost:
    """Cost of one step of a mixed batch.

    decode_contexts_sum: tokens attended summed over decoding requests (context incl. the new one).
    prefill_context_tokens: already-computed tokens (cached prefix, earlier chunks) the prefill
    chunks attend to, summed over chunks.
    prefill_attention_pairs: exact (query, key) pairs of the prefill chunks,
    sum n_i * (ctx_i + (n_i + 1) / 2); when omitted it is computed as if the chunks were one
    request, which is exact for a single prefill.
    """
    batch_tokens = num_decode + prefill_new_tokens
    if batch_tokens <= 0:
        return StepCost(0.0, 0.0, 0.0)
    if prefill_attention_pairs is None:
        prefill_attention_pairs = prefill_new_tokens * (prefill_context_tokens + (prefill_new_tokens + 1) / 2)
    kvb = kv_bytes_per_token(model)
    bytes_moved = (
        weight_bytes_read(model, batch_tokens)
        + kvb * decode_contexts_sum
        + kvb * (prefill_context_tokens + prefill_new_tokens)  # read cached context, write new KV
    )
    flops = 2.0 * model.active_params * batch_tokens + _attention_flops_per_pair(model) * (
        decode_contexts_sum + prefill_attention_pairs
    )
    memory_s = bytes_moved / (gpu.eta_bw * gpu.hbm_bandwidth * tp)
    compute_s = flops / (gpu.eta_compute * gpu.peak_flops * tp)
    seconds = gpu.step_overhead_s + _comm_seconds(gpu, model, tp, batch_tokens) + max(memory_s, compute_s)
    return StepCost(seconds, flops, bytes_moved)


def step_time(
    gpu: GpuProfile,
    model: ModelProfile,
    tp: int,
    decode_contexts_sum: float,
    num_decode: int,
    prefill_new_tokens: float,
    prefill_context_tokens: float,
    *,
    prefill_attention_pairs: float | None = None,
) -> tuple[float, float]:
    """(seconds, arithmetic intensity in FLOP/byte) of one step; see step_cost."""
    cost = step_cost(
        gpu,
        model,
        tp,
        decode_contexts_sum,
        num_decode,
        prefill_new_tokens,
        prefill_context_tokens,
        prefill_attention_pairs=prefill_attention_pairs,
    )
    return cost.seconds, cost.arithmetic_intensity


def _series(a: float, b: float, lo: int, hi: int) -> float:
    """sum_{j=lo}^{hi-1} (a + b*j)."""
    n = hi - lo
    if n <= 0:
        return 0.0
    return n * a + b * n * (lo + hi - 1) / 2.0


class DecodePricer:
    """Prices pure-decode runs of one (GPU, model, TP) setup. The engine asks for the same
    batch twice per run (steps_within, then jump), so the run's parameters are built once per
    (batch, context sum) and the batch-only terms once per batch size."""

    __slots__ = ("_by_batch", "_last", "attn", "comp_rate", "gpu", "kvb", "mem_rate", "model", "tp")

    def __init__(self, gpu: GpuProfile, model: ModelProfile, tp: int) -> None:
        self.gpu = gpu
        self.model = model
        self.tp = tp
        self.kvb = kv_bytes_per_token(model)
        self.mem_rate = gpu.eta_bw * gpu.hbm_bandwidth * tp
        self.comp_rate = gpu.eta_compute * gpu.peak_flops * tp
        self.attn = _attention_flops_per_pair(model)
        # batch -> (weight bytes read, 2 * active params * batch, fixed seconds per step)
        self._by_batch: dict[int, tuple[float, float, float]] = {}
        self._last: DecodeRun | None = None

    def run(self, batch: int, contexts_sum0: float) -> DecodeRun:
        last = self._last
        if last is not None and last.batch == batch and last.contexts_sum0 == contexts_sum0:
            return last
        terms = self._by_batch.get(batch)
        if terms is None:
            gpu, model = self.gpu, self.model
            terms = self._by_batch[batch] = (
                weight_bytes_read(model, batch),
                2.0 * model.active_params * batch,
                gpu.step_overhead_s + _comm_seconds(gpu, model, self.tp, batch),
            )
        weights, linear_flops, fixed = terms
        kvb, attn, mem_rate, comp_rate = self.kvb, self.attn, self.mem_rate, self.comp_rate
        # The same float operations, in the same order, as step_cost for each step.
        bytes0 = weights + kvb * contexts_sum0
        bytes_slope = kvb * batch
        flops0 = linear_flops + attn * contexts_sum0
        flops_slope = attn * batch
        run = self._last = DecodeRun(
            batch,
            contexts_sum0,
            bytes0 / mem_rate,
            bytes_slope / mem_rate,
            flops0 / comp_rate,
            flops_slope / comp_rate,
            fixed,
            bytes0,
            bytes_slope,
            flops0,
            flops_slope,
        )
        return run


class DecodeRun:
    """A decode run of a fixed batch from a given attended-context sum: step j takes
    fixed + max(m0 + mb*j, c0 + cb*j) seconds, moves bytes0 + bytes_slope*j bytes and does
    flops0 + flops_slope*j FLOPs."""

    __slots__ = (
        "batch",
        "bytes0",
        "bytes_slope",
        "c0",
        "cb",
        "contexts_sum0",
        "fixed",
        "flops0",
        "flops_slope",
        "m0",
        "mb",
        "split",
    )

    def __init__(
        self,
        batch: int,
        contexts_sum0: float,
        m0: float,
        mb: float,
        c0: float,
        cb: float,
        fixed: float,
        bytes0: float,
        bytes_slope: float,
        flops0: float,
        flops_slope: float,
    ) -> None:
        self.batch = batch
        self.contexts_sum0 = contexts_sum0
        self.m0, self.mb, self.c0, self.cb, self.fixed = m0, mb, c0, cb, fixed
        self.bytes0, self.bytes_slope, self.flops0, self.flops_slope = (
            bytes0,
            bytes_slope,
            flops0,
            flops_slope,
        )
        # Step index from which the line that is lower at j=0 takes over (None: never).
        self.split: int | None = None
        if mb != cb:
            crossing = (c0 - m0) / (mb - cb)
            if crossing > 0:
                self.split = max(math.ceil(crossing), 0)

    def seconds(self, k: int) -> float:
        """sum_{j<k} fixed + max(m0 + mb*j, c0 + cb*j), in closed form (see decode_run_cost)."""
        split = self.split
        if split is None or split > k:
            split = k
        m0, mb, c0, cb = self.m0, self.mb, self.c0, self.cb
        total = k * self.fixed
        # Each side of the split is one arithmetic series (see _series), on the higher line.
        for lo, hi in ((0, split), (split, k)):
            if hi <= lo:
                total += 0.0
                continue
            mid = (lo + hi - 1) / 2.0
            n = hi - lo
            if m0 + mb * mid >= c0 + cb * mid:
                total += n * m0 + mb * n * (lo + hi - 1) / 2.0
            else:
                total += n * c0 + cb * n * (lo + hi - 1) / 2.0
        return total

    def cost(self, k: int) -> StepCost:
        if k <= 0 or self.batch <= 0:
            return StepCost(0.0, 0.0, 0.0)
        return StepCost(
            self.seconds(k),
            _series(self.flops0, self.flops_slope, 0, k),
            _series(self.bytes0, self.bytes_slope, 0, k),
        )

    def steps_within(self, seconds: float) -> int:
        """See decode_steps_within."""
        if self.batch <= 0 or seconds <= 0:
            return 0
        fixed = self.fixed
        guess = min(
            _series_count(fixed + self.m0, self.mb, seconds), _series_count(fixed + self.c0, self.cb, seconds)
        )
        run_seconds = self.seconds
        # fits(n): n <= 0 or run_seconds(n) <= seconds, the very sum cost(n).seconds computes.
        if guess <= 0 or run_seconds(guess) <= seconds:
            lo = guess
            hi = guess + 1
            while run_seconds(hi) <= seconds:  # only float rounding lands here; gallop up
                lo, hi = hi, hi + (hi - guess) + 1
        else:
            lo, hi = 0, guess
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            if mid <= 0 or run_seconds(mid) <= seconds:
                lo = mid
            else:
                hi = mid
        return lo


def decode_run_cost(
    gpu: GpuProfile, model: ModelProfile, tp: int, batch: int, contexts_sum0: float, k: int
) -> StepCost:
    """Total cost of k consecutive pure-decode steps of a fixed batch whose attended-context
    sum starts at contexts_sum0 and grows by `batch` each step.

    Within one step both the memory and the compute time are affine in the context sum, so
    over the run each is an arithmetic series in the step index j. Their max switches side
    at most once (two lines cross once); the run is split at that integer step and each part
    summed in closed form, which makes this exactly equal to summing step_cost k times.
    """
    if k <= 0 or batch <= 0:
        return StepCost(0.0, 0.0, 0.0)
    return DecodePricer(gpu, model, tp).run(batch, contexts_sum0).cost(k)


def _series_count(first: float, slope: float, budget: float) -> int:
    """Largest n >= 0 with sum_{j<n} (first + slope*j) <= budget (first > 0, slope >= 0)."""
    if slope <= 0.0:
        return int(budget // first)
    half = slope / 2.0
    b = first - half
    return int((-b + math.sqrt(b * b + 4.0 * half * budget)) / (2.0 * half))


def decode_steps_within(
    gpu: GpuProfile, model: ModelProfile, tp: int, batch: int, contexts_sum0: float, seconds: float
) -> int:
    """Largest n such that n consecutive pure-decode steps (as in decode_run_cost) take at most
    `seconds` in total: the steps of a fixed batch that fit before a deadline.

    Each step costs fixed + max(memory line, compute line), both affine in the step index, so
    the run costs at least the arithmetic series of either line alone; the smaller of the two
    closed-form solutions bounds n from above and is exact within one regime. It is then
    checked (and, across a regime change or float rounding, corrected) against decode_run_cost.
    """
    if batch <= 0 or seconds <= 0:
        return 0
    return DecodePricer(gpu, model, tp).run(batch, contexts_sum0).steps_within(seconds)
