"""What a simulation run measures, and how it is summarised and printed (pure)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of already sorted values; NaN when empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * n))
    return float(sorted_values[min(rank, n) - 1])


class LogHistogram:
    """Weighted values in logarithmic bins (1 % wide): percentiles of millions of token gaps
    in constant memory. Reported values are bin midpoints, within 0.5 % of the true value."""

    _RATIO = 1.01

    def __init__(self) -> None:
        self._bins: dict[int, float] = {}
        self.total = 0.0
        self._log_ratio = math.log(self._RATIO)

    def add(self, value: float, weight: float = 1.0) -> None:
        if weight <= 0 or value <= 0:
            return
        b = int(math.log(value) / self._log_ratio)
        self._bins[b] = self._bins.get(b, 0.0) + weight
        self.total += weight

    def percentile(self, q: float) -> float:
        if self.total <= 0:
            return math.nan
        target = q / 100.0 * self.total
        acc = 0.0
        for b in sorted(self._bins):
            acc += self._bins[b]
            if acc >= target:
                return math.exp((b + 0.5) * self._log_ratio)
        return math.exp((max(self._bins) + 0.5) * self._log_ratio)


@dataclass
class Series:
    """Fleet-wide samples at telemetry ticks (and per-worker KV use, sampled more sparsely)."""

    t: array[float] = field(default_factory=lambda: array("d"))
    kv_utilisation: array[float] = field(default_factory=lambda: array("d"))
    batch: array[float] = field(default_factory=lambda: array("d"))
    worker_t: array[float] = field(default_factory=lambda: array("d"))
    worker_kv: list[array[float]] = field(default_factory=list)


@dataclass
class RunData:
    """Raw measurements of one run, filled in by the event loop."""

    policy: str
    workers: int
    ttft_s: array[float] = field(default_factory=lambda: array("d"))
    e2e_s: array[float] = field(default_factory=lambda: array("d"))
    # TTFT by placement outcome (new, pinned_hit, moved): where a tail comes from.
    ttft_by_outcome: dict[str, array[float]] = field(default_factory=dict)
    itl: LogHistogram = field(default_factory=LogHistogram)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    served: int = 0
    rejected: int = 0
    shed_by_tier: dict[str, int] = field(default_factory=dict)
    requests_by_tier: dict[str, int] = field(default_factory=dict)
    shed_times: array[float] = field(default_factory=lambda: array("d"))
    outcomes: dict[str, int] = field(default_factory=dict)
    prefill_tokens_by_worker: list[int] = field(default_factory=list)
    preemptions: int = 0
    last_finish_s: float = 0.0
    first_arrival_s: float = 0.0
    gpu_count: int = 0
    series: Series = field(default_factory=Series)
    wall_s: float = 0.0
    place_s: float = 0.0
    place_calls: int = 0


@dataclass(frozen=True)
class PolicyReport:
    policy: str
    trace: str
    workers: int
    requests: int
    served: int
    shed: int
    rejected: int
    prefix_hit_ratio: float
    oracle_hit_ratio: float
    pooled_lru_hit_ratio: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    preemptions: int
    shed_ratio: float
    shed_ratio_by_tier: dict[str, float]
    load_imbalance: float
    kv_utilisation_mean: float
    kv_utilisation_peak: float
    batch_mean: float
    ttft_slo_s: float
    slo_attainment: float
    goodput_per_gpu_s: float
    pinned_hit: int
    moved: int
    ttft_p99_by_outcome_s: dict[str, float]
    simulated_s: float
    wall_s: float
    place_us_mean: float

    def to_json(self) -> dict[str, Any]:
        return {k: _json_value(v) for k, v in asdict(self).items()}


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


def summarise(
    data: RunData, trace_name: str, oracle: float, pooled: float, ttft_slo_s: float
) -> PolicyReport:
    ttft = sorted(data.ttft_s)
    e2e = sorted(data.e2e_s)
    shed = sum(data.shed_by_tier.values())
    by_tier = {
        tier: data.shed_by_tier.get(tier, 0) / n for tier, n in sorted(data.requests_by_tier.items()) if n
    }
    prefill = data.prefill_tokens_by_worker
    mean_prefill = sum(prefill) / len(prefill) if prefill else 0.0
    imbalance = max(prefill) / mean_prefill if mean_prefill > 0 else math.nan
    series = data.series
    kv = series.kv_utilisation
    span = max(data.last_finish_s - data.first_arrival_s, 1e-9)
    met = sum(1 for x in ttft if x <= ttft_slo_s)
    return PolicyReport(
        policy=data.policy,
        trace=trace_name,
        workers=data.workers,
        requests=data.requests,
        served=data.served,
        shed=shed,
        rejected=data.rejected,
        prefix_hit_ratio=data.cached_tokens / data.prompt_tokens if data.prompt_tokens else 0.0,
        oracle_hit_ratio=oracle,
        pooled_lru_hit_ratio=pooled,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=data.itl.percentile(50),
        itl_p99_s=data.itl.percentile(99),
        e2e_p50_s=percentile(e2e, 50),
        e2e_p99_s=percentile(e2e, 99),
        preemptions=data.preemptions,
        shed_ratio=shed / data.requests if data.requests else 0.0,
        shed_ratio_by_tier=by_tier,
        load_imbalance=imbalance,
        kv_utilisation_mean=sum(kv) / len(kv) if kv else 0.0,
        kv_utilisation_peak=max(kv, default=0.0),
        batch_mean=sum(series.batch) / len(series.batch) if series.batch else 0.0,
        ttft_slo_s=ttft_slo_s,
        slo_attainment=met / data.requests if data.requests else 0.0,
        goodput_per_gpu_s=met / (data.gpu_count * span) if data.gpu_count else 0.0,
        pinned_hit=data.outcomes.get("pinned_hit", 0),
        moved=data.outcomes.get("moved", 0),
        ttft_p99_by_outcome_s={k: percentile(sorted(v), 99) for k, v in sorted(data.ttft_by_outcome.items())},
        simulated_s=span,
        wall_s=data.wall_s,
        place_us_mean=data.place_s / data.place_calls * 1e6 if data.place_calls else 0.0,
    )


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, report field, format)
    ("policy", "policy", "{:<14}"),
    ("hit", "prefix_hit_ratio", "{:>6.3f}"),
    ("TTFT p50", "ttft_p50_s", "{:>9.3f}"),
    ("p90", "ttft_p90_s", "{:>8.3f}"),
    ("p99", "ttft_p99_s", "{:>8.3f}"),
    ("ITL p50", "itl_p50_s", "{:>8.4f}"),
    ("p99", "itl_p99_s", "{:>7.4f}"),
    ("E2E p50", "e2e_p50_s", "{:>8.2f}"),
    ("p99", "e2e_p99_s", "{:>7.2f}"),
    ("preempt", "preemptions", "{:>7d}"),
    ("shed", "shed_ratio", "{:>6.3f}"),
    ("imbal", "load_imbalance", "{:>6.2f}"),
    ("KV", "kv_utilisation_mean", "{:>5.2f}"),
    ("batch", "batch_mean", "{:>6.1f}"),
    ("SLO", "slo_attainment", "{:>6.3f}"),
    ("goodput", "goodput_per_gpu_s", "{:>8.4f}"),
)


def format_table(reports: Sequence[PolicyReport]) -> str:
    """A plain-text comparison table, one row per policy, with the bounds in a header line."""
    if not reports:
        return ""
    first = reports[0]
    head = (
        f"trace {first.trace}: {first.requests:,} requests on {first.workers} workers, "
        f"{first.simulated_s:,.0f} s simulated; prefix-hit bounds: infinite cache "
        f"{first.oracle_hit_ratio:.3f}, pooled LRU {first.pooled_lru_hit_ratio:.3f}; "
        f"TTFT SLO {first.ttft_slo_s:g} s (seconds; goodput = requests within SLO per GPU-second)"
    )
    widths = [len(fmt.format(_sample(f))) for _, f, fmt in _COLUMNS]
    header = " ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, ((h, _, _), w) in enumerate(zip(_COLUMNS, widths, strict=True))
    )
    lines = [head, header]
    for r in reports:
        cells = []
        for _, fld, fmt in _COLUMNS:
            v = getattr(r, fld)
            cells.append(fmt.format(v))
        lines.append(" ".join(cells))
    tiers = sorted({t for r in reports for t in r.shed_ratio_by_tier})
    if any(r.shed for r in reports) and tiers:
        lines.append(
            "shed ratio by tier: "
            + "; ".join(
                f"{r.policy} " + ", ".join(f"{t} {r.shed_ratio_by_tier.get(t, 0.0):.3f}" for t in tiers)
                for r in reports
            )
        )
    return "\n".join(lines)


def _sample(field_name: str) -> Any:
    if field_name == "policy":
        return "x" * 14
    if field_name == "preemptions":
        return 0
    return 0.0


def format_markdown(reports: Sequence[PolicyReport]) -> str:
    """The same table as Markdown (for docs/sim.md)."""
    hdr = [h for h, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in reports:
        lines.append("| " + " | ".join(fmt.format(getattr(r, f)).strip() for _, f, fmt in _COLUMNS) + " |")
    return "\n".join(lines)
