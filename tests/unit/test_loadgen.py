"""`kvgate bench load`, the parts that need no gateway: the arrival schedule, the prompts built
to the trace's lengths, report aggregation, config validation, and the runner's retry / shed /
cap / turn-order rules driven by a scripted client."""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import time
from array import array
from collections.abc import Sequence

import pytest
from rich.console import Console

from gateway import loadgen, loadgen_cli
from gateway.loadgen import LoadConfig, next_message, plan, prompt_text, run_load
from gateway.loadgen_clients import Conversation, Status, TurnResult
from gateway.loadgen_report import RequestRecord, render, summarise
from gpu_worker.sim.tokenizer import SimTokenizer
from scheduler.fleetsim.trace import ANSWER, RANGE, Segment, Trace, TraceRequest

TOKENIZER = SimTokenizer()


def request(
    t: float,
    rid: str,
    session: str | None = None,
    prompt: int = 10,
    output: int = 5,
    segments: tuple[Segment, ...] | None = None,
    turn: int = 0,
) -> TraceRequest:
    segs = segments if segments is not None else ((RANGE, 1000 * len(rid), prompt),)
    return TraceRequest(t, rid, session or rid, prompt, output, segs, seed=len(rid), turn=turn)


def trace(requests: Sequence[TraceRequest]) -> Trace:
    return Trace("test", list(requests), shares_prefixes=True, token_stride=10**6, seed_stride=10**3)


# -- schedule ---------------------------------------------------------------------------------


def test_plan_replays_arrivals_from_zero_and_rate_keeps_the_burst_shape() -> None:
    t = trace([request(5.0, "a"), request(6.0, "b"), request(7.0, "c"), request(9.0, "d")])
    assert [p.at_s for p in plan(t)] == [0.0, 1.0, 2.0, 4.0]
    # 3 gaps over 4 s is 0.75/s; at 3/s the same shape takes 1 s.
    assert [p.at_s for p in plan(t, rate=3.0)] == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert [p.request.request_id for p in plan(t, duration_s=2.0)] == ["a", "b", "c"]
    assert [p.request.request_id for p in plan(t, requests=2)] == ["a", "b"]
    # The rate applies to what is replayed: 2 requests, 1 gap, at 4/s.
    assert [p.at_s for p in plan(t, rate=4.0, requests=2)] == pytest.approx([0.0, 0.25])


def test_plan_rate_spreads_a_single_instant_evenly() -> None:
    t = trace([request(0.0, f"r{i}") for i in range(4)])
    assert [p.at_s for p in plan(t)] == [0.0] * 4
    assert [p.at_s for p in plan(t, rate=2.0)] == [0.0, 0.5, 1.0, 1.5]


def test_plan_rate_scale_overlays_copies_with_fresh_conversations() -> None:
    t = trace([request(0.0, "a", "s"), request(1.0, "b", "s", turn=1), request(2.0, "c")])
    doubled = plan(t, rate_scale=2.0)
    assert len(doubled) == 6
    assert [p.at_s for p in doubled] == sorted(p.at_s for p in doubled)
    assert len({p.request.session_id for p in doubled}) == 4  # s, c, s~1, c~1
    assert plan(trace([]), rate=5.0) == []


# -- prompts ----------------------------------------------------------------------------------


def test_prompt_text_has_one_sim_token_per_position_and_shared_ranges_share_text() -> None:
    segments: tuple[Segment, ...] = ((RANGE, 0, 40), (ANSWER, 7, 20), (RANGE, 500, 30))
    for start, end in ((0, 90), (10, 75), (45, 50), (60, 90)):
        assert len(TOKENIZER.encode(prompt_text(segments, start, end))) == end - start
    assert prompt_text(segments, 40, 60) == TOKENIZER.decode(TOKENIZER.sample_many(7, 0, 20))
    # Same token ids, same words: a shared system prompt or Mooncake block is a shared KV prefix.
    other: tuple[Segment, ...] = ((RANGE, 0, 40), (RANGE, 900, 10))
    assert prompt_text(other, 0, 50).startswith(prompt_text(segments, 0, 40))
    assert prompt_text(((RANGE, 900, 10),), 0, 10) != prompt_text(((RANGE, 901, 10),), 0, 10)


def test_next_message_sends_what_the_trace_adds_within_the_prompt_cap() -> None:
    first = request(0.0, "t0", "s", prompt=100, output=20)
    conv = Conversation("s", 2)
    m = next_message(first, conv, max_prompt_tokens=4096)
    assert (m.tokens, m.capped) == (100, False)
    assert len(TOKENIZER.encode(m.text)) == 100
    # The second turn's prompt is the first prompt + its answer + 30 new tokens.
    conv.trace_covered, conv.context_tokens = 120, 120
    second = request(5.0, "t1", "s", prompt=150, output=20, segments=((RANGE, 0, 150),), turn=1)
    m = next_message(second, conv, max_prompt_tokens=4096)
    assert (m.tokens, m.capped) == (30, False)
    assert m.text == prompt_text(second.segments, 120, 150)
    capped = next_message(second, conv, max_prompt_tokens=130)
    assert (capped.tokens, capped.capped) == (10, True)
    # A follow-up adding less than the previous answer still says a few words (its prompt's tail).
    conv.trace_covered = 160
    tail = next_message(second, conv, max_prompt_tokens=4096)
    assert tail.tokens == loadgen.MIN_MESSAGE_TOKENS and tail.text == prompt_text(second.segments, 146, 150)
    assert next_message(first, Conversation("s", 1), max_prompt_tokens=40).tokens == 40


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"rate_scale": 0.0}, "--rate-scale"),
        ({"rate_scale": math.inf}, "--rate-scale"),
        ({"rate": -1.0}, "--rate"),
        ({"rate": 5.0, "rate_scale": 2.0}, "--rate and --rate-scale"),
        ({"duration_s": 0.0}, "--duration"),
        ({"requests": 0}, "--requests"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"max_prompt_tokens": 2}, "--max-prompt-tokens"),
        ({"max_in_flight": 0}, "--max-in-flight"),
        ({"retries": -1}, "--retries"),
        ({"timeout_s": 0.0}, "--timeout"),
        ({"http": "localhost:8080"}, "--http"),
        ({"gateway": "localhost"}, "--gateway"),
    ],
)
def test_config_errors_name_the_option(overrides: dict[str, object], option: str) -> None:
    config = LoadConfig(**overrides)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(option)):
        config.validate()


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadgen_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_maps_options_and_rejects_bad_ones_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    config = loadgen_cli.config_from_args(
        cli_args("--http", "http://h:8080/v1", "--rate", "5", "--max-in-flight", "8", "--on-full", "drop")
    )
    assert (config.http, config.rate, config.max_in_flight, config.on_full) == (
        "http://h:8080/v1",
        5.0,
        8,
        "drop",
    )
    assert loadgen_cli.run(cli_args("--rate", "5", "--rate-scale", "2")) == 2
    assert loadgen_cli.run(cli_args("--trace", "/nonexistent/trace.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--rate-scale" in err[0] and "/nonexistent/trace.csv" in err[1]


# -- report -----------------------------------------------------------------------------------


def record(
    i: int, outcome: str = "ok", worker: str = "w1", region: str = "us-east", **fields: object
) -> RequestRecord:
    r = RequestRecord(
        i, f"r{i}", f"c{i}", 0, scheduled_s=0.1 * i, trace_prompt_tokens=100, trace_output_tokens=10
    )
    r.ready_s, r.issued_s, r.outcome, r.max_tokens = r.scheduled_s, r.scheduled_s, outcome, 10
    if outcome == "ok" or outcome.startswith("error"):
        r.worker_id, r.region = worker, region
    if outcome == "ok":
        r.ttft_s, r.e2e_s, r.completion_tokens, r.text_tokens = 0.1 * (i + 1), 1.0, 10, 10
        r.prompt_tokens, r.cached_tokens = 100, 50
        r.itl_s = array("d", [0.01 * (i + 1)] * 3)
    for key, value in fields.items():
        setattr(r, key, value)
    return r


def test_summary_counts_outcomes_and_breaks_latency_down_by_region_and_worker() -> None:
    records = [
        record(0),
        record(1),
        record(2, retries=2),
        record(3, worker="w2", region="eu-west", resumed=True, text_tokens=9),  # one token missing
        record(4, "shed", pushback_ms=100, shed_reason="at_capacity"),
        record(5, "shed", pushback_ms=300, shed_reason="rate_limited"),
        record(6, "error:DEADLINE_EXCEEDED"),
        record(7, "dropped", issued_s=math.nan, late=True),
    ]
    s = summarise(records)
    assert (s["issued"], s["ok"], s["shed"], s["errors"], s["dropped"]) == (7, 4, 2, 1, 1)
    assert s["errors_by_code"] == {"DEADLINE_EXCEEDED": 1}
    assert s["shed_by_reason"] == {"at_capacity": 1, "rate_limited": 1}
    assert s["shed_pushback_ms_p50"] == 200
    assert (s["retried"], s["retries"], s["resumed"], s["late"]) == (1, 2, 1, 1)
    assert (s["text_checked"], s["text_mismatches"]) == (4, 1)
    assert s["output_tokens"] == 40 and s["cached_token_fraction"] == 0.5
    # Nearest-rank percentiles of 100, 200, 300, 400 ms.
    assert s["latency_ms"]["ttft"] == {"p50": 200.0, "p90": 400.0, "p99": 400.0}
    assert s["latency_ms"]["tpot"]["p50"] == pytest.approx(1000 * (1.0 - 0.3) / 9, abs=1e-3)  # 2nd of 4
    assert s["latency_ms"]["itl"]["p99"] == 40.0
    workers = s["by_worker"]
    assert set(workers) == {"w1", "w2"} and workers["w1"]["region"] == "us-east"
    assert (workers["w1"]["requests"], workers["w1"]["ok"], workers["w2"]["ok"]) == (4, 3, 1)
    assert sum(w["ok"] for w in workers.values()) == s["ok"]
    assert s["by_region"]["eu-west"]["latency_ms"]["ttft"]["p50"] == 400.0
    assert s["by_region"]["us-east"]["latency_ms"]["ttft"]["p50"] == 200.0
    console = Console(record=True, width=200)
    console.print(render(s))
    text = console.export_text()
    assert "w2 (eu-west)" in text and "region us-east" in text and "DEADLINE_EXCEEDED 1" in text


def test_an_empty_run_summarises_without_numbers() -> None:
    s = summarise([])
    assert (s["issued"], s["ok"], s["wall_s"], s["throughput_rps"]) == (0, 0, 0.0, 0.0)
    assert s["latency_ms"]["e2e"] == {"p50": None, "p90": None, "p99": None}
    assert record(0).itl_summary()["count"] == 3


# -- the runner, with a scripted client -------------------------------------------------------


class ScriptedClient:
    """Answers each turn from a script of statuses per conversation (then "ok"), instantly or
    after `delay_s`, with a sim-like answer of `max_tokens` tokens."""

    def __init__(self, script: dict[str, list[Status]] | None = None, delay_s: float = 0.0) -> None:
        self.script = script or {}
        self.delay_s = delay_s
        self.calls: list[tuple[str, str]] = []
        self.keys: list[tuple[str, str, str]] = []  # (conversation, content, idempotency key)
        self.open = 0
        self.most_open = 0
        self.closed = False

    async def turn(
        self, conv: Conversation, content: str, max_tokens: int, timeout_s: float, idempotency_key: str
    ) -> TurnResult:
        self.calls.append((conv.key, content))
        self.keys.append((conv.key, content, idempotency_key))
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.open -= 1
        conv.session_id = conv.session_id or f"session-{conv.key}"
        steps = self.script.get(conv.key, [])
        status = steps.pop(0) if steps else "ok"
        result = TurnResult(status, ended_at=time.monotonic())
        if status != "ok":
            codes = {"retry": "UNAVAILABLE", "shed": "RESOURCE_EXHAUSTED", "error": "INVALID_ARGUMENT"}
            return result.fail(status, codes[status], pushback_ms=1 if status != "error" else None)
        result.worker_id, result.region, result.engine = "w1", "us-east", "sim"
        result.delta(TOKENIZER.decode(TOKENIZER.sample_many(1, 0, max_tokens)))
        result.completion_tokens = max_tokens
        return result

    async def close(self) -> None:
        self.closed = True


def chat(conversations: int, turns: int, gap_s: float = 0.001) -> Trace:
    reqs = [
        request(gap_s * (c + conversations * k), f"c{c}t{k}", f"c{c}", prompt=20 + 10 * k, turn=k)
        for c in range(conversations)
        for k in range(turns)
    ]
    return trace(sorted(reqs, key=lambda r: r.arrival_s))


async def test_runner_retries_unavailable_reports_shed_and_errors_and_keeps_turn_order() -> None:
    client = ScriptedClient({"c0": ["retry", "retry"], "c1": ["shed"], "c2": ["error"]})
    report = await run_load(LoadConfig(trace=chat(3, 2), retries=3), client=client)
    assert client.closed
    by = {r.request_id: r for r in report.records}
    assert (by["c0t0"].outcome, by["c0t0"].retries) == ("ok", 2)
    assert (by["c1t0"].outcome, by["c1t0"].retries, by["c1t0"].pushback_ms) == ("shed", 0, 1)
    assert by["c2t0"].outcome == "error:INVALID_ARGUMENT"
    assert all(by[f"c{c}t1"].outcome == "ok" for c in range(3))  # later turns go on after a failure
    # Turns of one conversation never overlap, and each conversation keeps one session.
    for c in range(3):
        first, second = by[f"c{c}t0"], by[f"c{c}t1"]
        assert second.issued_s >= first.issued_s + (first.e2e_s or 0) - 1e-6
        assert first.session_id == second.session_id == f"session-c{c}"
        assert (first.turn, second.turn) == (0, 1)
    s = report.summary()
    assert (s["ok"], s["shed"], s["errors"], s["retried"], s["text_mismatches"]) == (4, 1, 1, 1, 0)
    # Every attempt at one turn carries the same idempotency key; different turns never share one.
    keys_by_turn: dict[tuple[str, str], set[str]] = {}
    for conversation, content, key in client.keys:
        keys_by_turn.setdefault((conversation, content), set()).add(key)
    assert all(len(keys) == 1 and all(keys) for keys in keys_by_turn.values())
    assert len({key for conversation, content, key in client.keys}) == len(keys_by_turn) == 6


async def test_runner_gives_up_after_the_retries_and_can_retry_shed() -> None:
    client = ScriptedClient({"c0": ["retry"] * 5, "c1": ["shed", "shed"]})
    report = await run_load(LoadConfig(trace=chat(2, 1), retries=2, retry_shed=True), client=client)
    by = {r.conversation: r for r in report.records}
    assert (by["c0"].outcome, by["c0"].retries) == ("error:UNAVAILABLE", 2)
    assert (by["c1"].outcome, by["c1"].retries) == ("ok", 2)


@pytest.mark.parametrize("on_full", ["wait", "drop"])
async def test_max_in_flight_makes_requests_late_or_dropped_never_silently(on_full: str) -> None:
    # Six requests due within 6 ms; each takes 0.3 s: two go at once, four wait (or are dropped).
    client = ScriptedClient(delay_s=0.3)
    config = LoadConfig(trace=chat(6, 1), max_in_flight=2, on_full=on_full)  # type: ignore[arg-type]
    report = await run_load(config, client=client)
    s = report.summary()
    assert client.most_open <= 2
    assert s["late"] == 4 and s["issued"] + s["dropped"] == 6
    if on_full == "wait":
        assert (s["ok"], s["dropped"]) == (6, 0)
        assert s["lag_ms"]["p99"] is not None and s["lag_ms"]["p99"] > 0
    else:
        assert (s["ok"], s["dropped"]) == (2, 4)


async def test_stop_ends_issuing_and_reports_what_was_sent() -> None:
    stop = asyncio.Event()
    seen: list[int] = []

    def on_progress(p: loadgen.LoadProgress) -> None:
        seen.append(p.issued)
        if p.issued >= 1:
            stop.set()

    t = trace([request(0.0, "a"), request(60.0, "b")])
    report = await run_load(
        LoadConfig(trace=t),
        on_progress=on_progress,
        progress_interval_s=0.01,
        stop=stop,
        client=ScriptedClient(),
    )
    assert report.planned == 2 and [r.request_id for r in report.records] == ["a"]
    assert seen[0] == 0 and seen[-1] == 1
