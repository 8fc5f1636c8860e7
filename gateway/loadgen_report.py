"""`kvgate bench load`: what one request did (RequestRecord) and what a run adds up to (pure).

Everything here is computed from the records alone, so a Python caller (an end-to-end test
injecting faults) can filter or re-aggregate them, and the CLI's table and `--json` object
are two views of the same `summarise()` result.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from scheduler.fleetsim.metrics import percentile

OK = "ok"
SHED = "shed"
DROPPED = "dropped"
ERROR_PREFIX = "error:"
QUANTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One planned request of the trace, as sent and as answered.

    Times are seconds; `*_s` offsets are from the start of the run. Latencies are measured from
    the request's first attempt (retries included: that is what the user waits), token gaps
    (`itl_s`) from its last attempt only (the stream the user ends up reading).
    """

    index: int  # position in the schedule
    request_id: str  # the trace's request id
    conversation: str  # the trace's session id
    turn: int  # turn of the conversation in this run (0 = first)
    scheduled_s: float  # due by the trace's (scaled) arrival time
    trace_prompt_tokens: int
    trace_output_tokens: int
    max_tokens: int = 0  # asked for: the trace's output length, capped by --max-tokens
    message_tokens: int = 0  # tokens of the user message sent (sim tokenizer)
    prompt_capped: bool = False  # the message was cut to honour --max-prompt-tokens
    ready_s: float = math.nan  # when it could be sent: due, and its previous turn finished
    issued_s: float = math.nan  # when its first attempt started (NaN: never sent)
    late: bool = False  # waited for a --max-in-flight slot
    session_id: str = ""  # gateway session (gRPC) or x-session-id (HTTP)
    turn_index: int | None = None  # Done.turn_index: this turn's place in the stored history
    text: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: array[float] = field(default_factory=lambda: array("d"))
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    # Where the turn was placed (Placement, x-kvgate-worker). A resumed turn was finished by
    # another worker: its stored Turn.worker_id names that one.
    worker_id: str = ""
    region: str = ""
    engine: str = ""  # "sim" or "vllm" over gRPC; unknown ("") over HTTP
    cache_hit: bool = False
    resumed: bool = False  # Done.usage.resumed (gRPC only: HTTP does not carry it)
    outcome: str = ""  # ok | shed | dropped | error:<code>
    shed_reason: str = ""  # at_capacity | rate_limited
    pushback_ms: int | None = None  # the server's retry hint on the last failure
    retries: int = 0
    text_tokens: int | None = None  # tokens of `text` (sim tokenizer); None when not checked

    @property
    def lag_s(self) -> float:
        """How long after it was ready the request went out (the in-flight cap, a busy loop)."""
        return self.issued_s - self.ready_s

    @property
    def text_mismatch(self) -> bool:
        """The streamed text has more or fewer tokens than the gateway says it generated."""
        return self.text_tokens is not None and self.text_tokens != self.completion_tokens

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (decode pace as the client saw it)."""
        if self.ttft_s is None or self.e2e_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def itl_summary(self) -> dict[str, float | int | None]:
        """Gaps between successive text deltas (the gateway coalesces ~15 ms of tokens each)."""
        gaps = sorted(self.itl_s)
        return {
            "count": len(gaps),
            "mean_ms": _ms(statistics.fmean(gaps)) if gaps else None,
            "p50_ms": _ms(percentile(gaps, 50)) if gaps else None,
            "p99_ms": _ms(percentile(gaps, 99)) if gaps else None,
            "max_ms": _ms(gaps[-1]) if gaps else None,
        }

    def to_json(self, include_text: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "request_id": self.request_id,
            "conversation": self.conversation,
            "turn": self.turn,
            "session_id": self.session_id,
            "turn_index": self.turn_index,
            "outcome": self.outcome,
            "shed_reason": self.shed_reason or None,
            "pushback_ms": self.pushback_ms,
            "retries": self.retries,
            "scheduled_s": _round(self.scheduled_s, 4),
            "issued_s": _round(self.issued_s, 4),
            "lag_ms": _ms(self.lag_s),
            "late": self.late,
            "worker_id": self.worker_id,
            "region": self.region,
            "engine": self.engine,
            "cache_hit": self.cache_hit,
            "resumed": self.resumed,
            "trace_prompt_tokens": self.trace_prompt_tokens,
            "trace_output_tokens": self.trace_output_tokens,
            "message_tokens": self.message_tokens,
            "prompt_capped": self.prompt_capped,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "text_tokens": self.text_tokens,
            "ttft_ms": _ms(self.ttft_s),
            "e2e_ms": _ms(self.e2e_s),
            "itl": self.itl_summary(),
        }
        if include_text:
            out["text"] = self.text
        return out


@dataclass
class LoadReport:
    """A finished run: its records plus what the summary needs to know about the run."""

    records: list[RequestRecord]
    trace: str
    transport: str  # "grpc" or "http"
    target: str  # gateway address or HTTP base URL
    planned: int  # requests in the schedule (records beyond `issued` were never due: stopped)
    schedule_span_s: float  # first to last planned arrival
    wall_s: float  # first request out to last answer in

    def summary(self) -> dict[str, Any]:
        return summarise(self.records, self)

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.outcome == OK]


def summarise(records: Sequence[RequestRecord], run: LoadReport | None = None) -> dict[str, Any]:
    """One JSON-ready object: counts, throughput, latency percentiles overall, per region and
    per worker, shed pushback, text integrity. Latencies are over answered (ok) requests."""
    issued = [r for r in records if not math.isnan(r.issued_s)]
    ok = [r for r in records if r.outcome == OK]
    shed = [r for r in records if r.outcome == SHED]
    errors = Counter(
        r.outcome.removeprefix(ERROR_PREFIX) for r in records if r.outcome.startswith(ERROR_PREFIX)
    )
    wall = run.wall_s if run is not None else _wall(issued)
    output_tokens = sum(r.completion_tokens for r in ok)
    pushbacks = [r.pushback_ms for r in shed if r.pushback_ms is not None]
    checked = [r for r in ok if r.text_tokens is not None]
    lags = sorted(r.lag_s for r in issued)
    out: dict[str, Any] = {}
    if run is not None:
        out.update(
            trace=run.trace,
            transport=run.transport,
            target=run.target,
            planned=run.planned,
            schedule_span_s=round(run.schedule_span_s, 3),
            offered_rps=round(_rate(run.planned, run.schedule_span_s), 3),
        )
    out.update(
        issued=len(issued),
        ok=len(ok),
        shed=len(shed),
        shed_by_reason=dict(Counter(r.shed_reason or "unknown" for r in shed)),
        shed_pushback_ms_p50=statistics.median(pushbacks) if pushbacks else None,
        errors=sum(errors.values()),
        errors_by_code=dict(sorted(errors.items())),
        dropped=sum(r.outcome == DROPPED for r in records),
        retried=sum(r.retries > 0 for r in records),
        retries=sum(r.retries for r in records),
        resumed=sum(r.resumed for r in ok),
        late=sum(r.late for r in records),
        lag_ms={f"p{q}": _ms(percentile(lags, q)) if lags else None for q in (50, 99)},
        prompt_capped=sum(r.prompt_capped for r in issued),
        output_capped=sum(r.max_tokens < r.trace_output_tokens for r in issued),
        wall_s=round(wall, 3),
        throughput_rps=round(_rate(len(ok), wall), 3),
        output_tokens=output_tokens,
        output_tokens_per_s=round(output_tokens / wall, 1) if wall > 0 else None,
        cached_token_fraction=_cached_fraction(ok),
        text_checked=len(checked),
        text_mismatches=sum(r.text_mismatch for r in checked),
        latency_ms=latency_stats(ok),
        by_region=breakdown(records, lambda r: r.region, wall),
        by_worker=breakdown(records, lambda r: r.worker_id, wall, with_region=True),
    )
    return out


def latency_stats(records: Iterable[RequestRecord]) -> dict[str, dict[str, float | None]]:
    """p50/p90/p99 in ms of TTFT, ITL (gaps between deltas, all requests pooled), TPOT, E2E."""
    records = list(records)
    ttft = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    e2e = sorted(r.e2e_s for r in records if r.e2e_s is not None)
    tpot = sorted(t for r in records if (t := r.tpot_s) is not None)
    itl = sorted(g for r in records for g in r.itl_s)
    return {
        name: _quantiles(values)
        for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e))
    }


def breakdown(
    records: Iterable[RequestRecord], key: Any, wall_s: float, with_region: bool = False
) -> dict[str, dict[str, Any]]:
    """Per key (region or worker) of the requests that were placed somewhere: counts by outcome,
    output tokens/s, cache and latencies. Unplaced requests (shed, refused) have no key."""
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        k = key(r)
        if k:
            groups[k].append(r)
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(groups):
        rs = groups[k]
        ok = [r for r in rs if r.outcome == OK]
        tokens = sum(r.completion_tokens for r in ok)
        entry: dict[str, Any] = {}
        if with_region:
            entry["region"] = rs[0].region
        entry.update(
            requests=len(rs),
            ok=len(ok),
            resumed=sum(r.resumed for r in ok),
            cache_hits=sum(r.cache_hit for r in ok),
            cached_token_fraction=_cached_fraction(ok),
            output_tokens=tokens,
            output_tokens_per_s=round(tokens / wall_s, 1) if wall_s > 0 else None,
            latency_ms=latency_stats(ok),
        )
        out[k] = entry
    return out


# -- the human view ---------------------------------------------------------------------------


def render(summary: dict[str, Any]) -> Group:
    s = summary
    head = Text(
        f"{s.get('trace', '?')} via {s.get('transport', '?')} {s.get('target', '')}: "
        f"{s['issued']} of {s.get('planned', s['issued'])} planned requests over "
        f"{s.get('schedule_span_s', 0):.1f} s (offered {s.get('offered_rps', 0):.2f} req/s), "
        f"wall {s['wall_s']:.1f} s\n"
        f"ok {s['ok']} · shed {s['shed']}{_pushback(s)} · errors {s['errors']}{_codes(s)} · "
        f"retried {s['retried']} · resumed {s['resumed']} · late {s['late']} · dropped {s['dropped']}\n"
        f"throughput {s['throughput_rps']:.2f} req/s · {s['output_tokens_per_s'] or 0:,.0f} output tok/s · "
        f"cached prompt {_pct(s['cached_token_fraction'])} · "
        f"capped prompts {s['prompt_capped']}, outputs {s['output_capped']}\n"
        f"text integrity: {s['text_checked']} answers checked, {s['text_mismatches']} mismatches"
    )
    table = Table(title="latency (ms) p50 / p90 / p99", title_justify="left")
    for column in ("scope", "requests", "ok", "out tok/s", "TTFT", "ITL", "TPOT", "E2E"):
        table.add_column(column, justify="left" if column == "scope" else "right")
    table.add_row(
        "all", str(s["issued"]), str(s["ok"]), _num(s["output_tokens_per_s"]), *_lat(s["latency_ms"])
    )
    for scope, prefix in (("by_region", "region "), ("by_worker", "")):
        for name, e in s[scope].items():
            label = f"{prefix}{name}" + (f" ({e['region']})" if "region" in e else "")
            table.add_row(
                label,
                str(e["requests"]),
                str(e["ok"]),
                _num(e["output_tokens_per_s"]),
                *_lat(e["latency_ms"]),
            )
    return Group(head, table)


def _lat(latency: dict[str, dict[str, float | None]]) -> list[str]:
    return [" / ".join(_num(latency[m][f"p{q}"]) for q in QUANTILES) for m in ("ttft", "itl", "tpot", "e2e")]


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _pushback(s: dict[str, Any]) -> str:
    return "" if s["shed_pushback_ms_p50"] is None else f" (pushback p50 {s['shed_pushback_ms_p50']:.0f} ms)"


def _codes(s: dict[str, Any]) -> str:
    codes = s["errors_by_code"]
    return " (" + ", ".join(f"{c} {n}" for c, n in codes.items()) + ")" if codes else ""


# -- helpers ----------------------------------------------------------------------------------


def _quantiles(sorted_values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": _ms(percentile(sorted_values, q)) if sorted_values else None for q in QUANTILES}


def _cached_fraction(records: Sequence[RequestRecord]) -> float | None:
    prompt = sum(r.prompt_tokens for r in records)
    return round(sum(r.cached_tokens for r in records) / prompt, 4) if prompt else None


def _wall(issued: Sequence[RequestRecord]) -> float:
    """Without run bookkeeping: first issue to the last answer we can infer."""
    if not issued:
        return 0.0
    start = min(r.issued_s for r in issued)
    end = max(r.issued_s + (r.e2e_s or 0.0) for r in issued)
    return end - start


def _rate(count: int, span_s: float) -> float:
    return count / span_s if span_s > 0 else 0.0


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isnan(seconds):
        return None
    return round(seconds * 1000, 3)


def _round(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)
