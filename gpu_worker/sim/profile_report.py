"""Data behind `kvgate engine-profile`: KV sizing and roofline step times for one GPU/model/TP."""

from __future__ import annotations

from typing import Any

from gpu_worker.sim.profiles import get_gpu, get_model
from gpu_worker.sim.roofline import kv_bytes_per_token, kv_capacity_tokens, step_cost

DECODE_BATCHES = (1, 8, 64, 128)
DECODE_CONTEXT = 2048
PREFILL_TOKENS = (512, 2048, 8192)


def profile_report(gpu: str, model: str, tp: int = 1, block_size: int = 16) -> dict[str, Any]:
    """JSON-ready dict; raises ValueError for unknown names or a model that does not fit.

    Decode rows give `context_tokens` per sequence (each of `batch` sequences attends that
    many tokens); prefill rows are a single fresh prompt (no cached context).
    """
    g = get_gpu(gpu)
    m = get_model(model)
    capacity = kv_capacity_tokens(g, m, tp)
    steps: list[dict[str, Any]] = []
    for batch in DECODE_BATCHES:
        cost = step_cost(g, m, tp, batch * DECODE_CONTEXT, batch, 0, 0)
        steps.append(
            {
                "phase": "decode",
                "batch": batch,
                "context_tokens": DECODE_CONTEXT,
                "new_tokens": batch,
                "step_ms": cost.seconds * 1e3,
                "arithmetic_intensity": cost.arithmetic_intensity,
            }
        )
    for new in PREFILL_TOKENS:
        cost = step_cost(g, m, tp, 0, 0, new, 0)
        steps.append(
            {
                "phase": "prefill",
                "batch": 1,
                "context_tokens": 0,
                "new_tokens": new,
                "step_ms": cost.seconds * 1e3,
                "arithmetic_intensity": cost.arithmetic_intensity,
            }
        )
    return {
        "gpu": g.name,
        "model": m.name,
        "tp": tp,
        "kv_bytes_per_token": kv_bytes_per_token(m),
        "kv_capacity_tokens": capacity,
        "block_size": block_size,
        "num_blocks": capacity // block_size,
        "ridge_flop_per_byte": g.ridge_flop_per_byte,
        "steps": steps,
    }
