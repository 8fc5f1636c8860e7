"""Data behind `kvgate engine-profile --fidelity`: modelled vs pure-roofline vs published figures.

Three columns per metric:

- modelled: what SimEngine uses (roofline with the profile's efficiencies eta_bw/eta_compute,
  per-step overhead, activation reserve and gpu_memory_utilization 0.9), taken from
  profile_report so the table cannot drift from the engine;
- roofline: the same formulas with eta = 1, no step overhead, and for KV capacity all device
  memory minus weights (no activation reserve, utilisation 1.0): the hardware bound;
- published: a measurement someone published, with its source and configuration, or None
  where no citable figure was found (docs/fidelity.md lists what was searched).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gpu_worker.sim.profile_report import DECODE_CONTEXT, profile_report
from gpu_worker.sim.profiles import get_gpu, get_model
from gpu_worker.sim.roofline import kv_bytes_per_token, step_cost, weight_bytes

FIDELITY_GPU = "h100"
FIDELITY_MODEL = "llama-3-8b"
PREFILL_TOKENS = 2048
# Extra decode row matching the one published serving measurement found (see below).
SMALL_BATCH = 10
SMALL_BATCH_CONTEXT = 512


@dataclass(frozen=True)
class Published:
    value: float
    source: str
    configuration: str


@dataclass(frozen=True)
class FidelityRow:
    key: str
    metric: str
    unit: str
    modelled: float
    roofline: float
    published: Published | None = None


# Only figures actually found and read; keyed by row key, for (h100, llama-3-8b, tp 1).
PUBLISHED: dict[str, Published] = {
    f"decode_b{SMALL_BATCH}": Published(
        value=7.558,
        source=(
            "https://github.com/LambdaLabsML/vllm-benchmark/blob/main/results/prompt_10/"
            "1xH100-80GB-SXM/Meta-Llama-3-8B-Instruct_tp1_len2048.json"
        ),
        configuration=(
            "median TPOT of 10 ShareGPT requests sent at once (request rate inf; 4-399 prompt "
            "tokens, 3-741 output tokens), meta-llama/Meta-Llama-3-8B-Instruct, 1x H100-80GB-SXM, "
            "vLLM OpenAI server, max-model-len 2048, gpu-memory-utilization 0.95, 2024-09-07; "
            "TPOT includes the prefills of the other requests, so it bounds the decode step from above"
        ),
    ),
}


def _ideal(gpu_name: str) -> Any:
    g = get_gpu(gpu_name)
    return dataclasses.replace(g, eta_bw=1.0, eta_compute=1.0, step_overhead_s=0.0)


def fidelity_table(gpu: str = FIDELITY_GPU, model: str = FIDELITY_MODEL, tp: int = 1) -> list[FidelityRow]:
    """Rows: decode step (ITL) at batch 1 and 64 with DECODE_CONTEXT tokens each, prefill of
    PREFILL_TOKENS fresh tokens, KV capacity in tokens, and a small-batch decode row that
    matches the published measurement. Published figures only for FIDELITY_GPU/MODEL at tp 1."""
    report = profile_report(gpu, model, tp)
    steps = report["steps"]

    def step_ms(phase: str, batch: int, new_tokens: int) -> float:
        for s in steps:
            if s["phase"] == phase and s["batch"] == batch and s["new_tokens"] == new_tokens:
                return float(s["step_ms"])
        raise KeyError(f"profile_report has no {phase} row for batch {batch}, {new_tokens} new tokens")

    g, m, ideal = get_gpu(gpu), get_model(model), _ideal(gpu)

    def ideal_ms(ctx: float, decode: int, prefill: float) -> float:
        return step_cost(ideal, m, tp, ctx, decode, prefill, 0).seconds * 1e3

    ideal_kv = int((g.memory_bytes * tp - weight_bytes(m)) // kv_bytes_per_token(m))
    rows = [
        FidelityRow(
            "decode_b1",
            f"decode ITL, batch 1, {DECODE_CONTEXT}-token context",
            "ms",
            step_ms("decode", 1, 1),
            ideal_ms(DECODE_CONTEXT, 1, 0),
        ),
        FidelityRow(
            "decode_b64",
            f"decode ITL, batch 64, {DECODE_CONTEXT}-token context each",
            "ms",
            step_ms("decode", 64, 64),
            ideal_ms(64 * DECODE_CONTEXT, 64, 0),
        ),
        FidelityRow(
            "prefill_2k",
            f"prefill, {PREFILL_TOKENS} fresh tokens, one request",
            "ms",
            step_ms("prefill", 1, PREFILL_TOKENS),
            ideal_ms(0, 0, PREFILL_TOKENS),
        ),
        FidelityRow(
            "kv_tokens",
            "KV cache capacity (gpu_memory_utilization 0.9)",
            "tokens",
            float(report["kv_capacity_tokens"]),
            float(ideal_kv),
        ),
        FidelityRow(
            f"decode_b{SMALL_BATCH}",
            f"decode ITL, batch {SMALL_BATCH}, {SMALL_BATCH_CONTEXT}-token context each",
            "ms",
            step_cost(g, m, tp, SMALL_BATCH * SMALL_BATCH_CONTEXT, SMALL_BATCH, 0, 0).seconds * 1e3,
            ideal_ms(SMALL_BATCH * SMALL_BATCH_CONTEXT, SMALL_BATCH, 0),
        ),
    ]
    if (report["gpu"], report["model"], tp) != (FIDELITY_GPU, FIDELITY_MODEL, 1):
        return rows
    return [dataclasses.replace(r, published=PUBLISHED.get(r.key)) for r in rows]


def fidelity_report(gpu: str = FIDELITY_GPU, model: str = FIDELITY_MODEL, tp: int = 1) -> dict[str, Any]:
    """JSON-ready form of fidelity_table."""
    return {
        "gpu": gpu,
        "model": model,
        "tp": tp,
        "rows": [dataclasses.asdict(r) for r in fidelity_table(gpu, model, tp)],
    }


def format_fidelity(rows: list[FidelityRow]) -> str:
    """Plain-text table; published sources are listed as numbered notes under it."""

    def fmt(value: float, unit: str) -> str:
        return f"{value:,.0f}" if unit == "tokens" else f"{value:.2f}"

    lines = [f"{'metric':52} {'unit':>6} {'modelled':>10} {'roofline':>10}  published"]
    notes: list[str] = []
    for r in rows:
        if r.published is None:
            published = "no citable figure found"
        else:
            notes.append(f"[{len(notes) + 1}] {r.published.source}\n    {r.published.configuration}")
            published = f"{fmt(r.published.value, r.unit)} [{len(notes)}]"
        modelled, roofline = fmt(r.modelled, r.unit), fmt(r.roofline, r.unit)
        lines.append(f"{r.metric:52} {r.unit:>6} {modelled:>10} {roofline:>10}  {published}")
    return "\n".join([*lines, *(["", *notes] if notes else [])])
