"""`kvgate bench load` against a real in-process fleet: multi-turn load over gRPC and HTTP, the
CLI's JSON, and a fleet too small for its load shedding with a retry hint.

No timing assertions: the machine is shared and noisy. What must hold regardless of speed is
accounting (every request ends somewhere, per-worker counts add up) and integrity (each answer
has exactly the tokens the gateway counted, and what a client read is what the session stored).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections import defaultdict

import pytest

from gateway.loadgen import LoadConfig, LoadProgress, run_load
from gateway.loadgen_report import LoadReport, RequestRecord
from scheduler.fleetsim.trace import RANGE, SyntheticSpec, Trace, TraceRequest, synthetic_trace
from tests.integration.fleet import Fleet

REQUESTS = 30
# The anonymous tenant (auth off) is tier free, whose default rate limit would shed this load:
# these tests are about the fleet, so the gateway's per-tenant limits are off.
NO_RATE_LIMITS = {"rate_limits": None}
TWO_WORKERS = {"us-1": ("us-east", 4000), "eu-1": ("eu-west", 4000)}


def chat_trace() -> Trace:
    """Short conversations with short turns, a second apart: multi-turn within a few seconds."""
    spec = SyntheticSpec(
        duration_s=30,
        sessions_per_s=1.5,
        mean_turns=3,
        system_prompts=3,
        system_prompt_tokens=(32, 96),
        user_tokens_median=16,
        answer_tokens_median=12,
        max_answer_tokens=24,
        think_time_mean_s=1.0,
        max_context_tokens=1024,
    )
    return synthetic_trace(spec, seed=3)


def load_config(**target: str) -> LoadConfig:
    return LoadConfig(
        trace=chat_trace(),
        rate=12.0,
        requests=REQUESTS,
        max_tokens=16,
        max_prompt_tokens=512,
        timeout_s=60,
        **target,
    )


def conversations(report: LoadReport) -> dict[str, list[RequestRecord]]:
    out: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in report.records:
        out[record.conversation].append(record)
    return {key: sorted(records, key=lambda r: r.turn) for key, records in out.items()}


def assert_all_ok_and_accounted(report: LoadReport) -> dict[str, list[RequestRecord]]:
    s = report.summary()
    assert (s["planned"], s["issued"], s["ok"]) == (REQUESTS, REQUESTS, REQUESTS), s
    assert s["shed"] == s["errors"] == s["dropped"] == 0, s
    assert sum(w["requests"] for w in s["by_worker"].values()) == REQUESTS
    assert sum(r["requests"] for r in s["by_region"].values()) == REQUESTS
    assert set(s["by_region"]) == {"us-east", "eu-west"} or len(s["by_worker"]) == 1
    assert s["text_checked"] == REQUESTS and s["text_mismatches"] == 0
    assert s["output_tokens"] == sum(r.completion_tokens for r in report.records) > 0
    convs = conversations(report)
    multi = [records for records in convs.values() if len(records) > 1]
    assert multi, "the trace should give some conversations more than one turn"
    follow_ups = stayed = 0
    for records in multi:
        # A conversation's turns go out in order ...
        assert all(a.issued_s + (a.e2e_s or 0) <= b.ready_s + 1e-6 for a, b in itertools.pairwise(records))
        # ... and stay on the worker holding their KV cache (the pin), unless that worker is so
        # busy that recomputing the conversation elsewhere is cheaper (the congestion-aware pin
        # rule, which a loaded test machine can trigger).
        for previous, turn in itertools.pairwise(records):
            follow_ups += 1
            stayed += turn.worker_id == previous.worker_id
    # Chance alone would keep about half of them on one of two workers.
    assert stayed >= 0.8 * follow_ups, f"only {stayed} of {follow_ups} follow-up turns stayed pinned"
    return convs


async def test_grpc_multi_turn_load_streams_exactly_what_the_sessions_store(fleet: Fleet) -> None:
    await fleet.start(TWO_WORKERS, gateway_overrides=NO_RATE_LIMITS)
    assert fleet.gateway is not None
    report = await run_load(load_config(gateway=fleet.gateway.address))
    convs = assert_all_ok_and_accounted(report)
    async with fleet.client() as client:
        for records in convs.values():
            stored = await client.get_session(records[0].session_id)
            assert [t.assistant for t in stored.turns] == [r.text for r in records]
            assert [r.turn_index for r in records] == list(range(len(records)))
            assert [t.worker_id for t in stored.turns] == [r.worker_id for r in records]


async def test_http_multi_turn_load_keeps_conversations_on_their_worker(fleet: Fleet) -> None:
    await fleet.start(TWO_WORKERS, http=True, gateway_overrides=NO_RATE_LIMITS)
    report = await run_load(load_config(http=fleet.http_base_url))
    assert report.transport == "http"
    convs = assert_all_ok_and_accounted(report)
    for records in convs.values():
        # x-session-id only where there is a conversation to keep together.
        assert bool(records[0].session_id) == (len(records) > 1)


async def test_the_cli_prints_one_json_object(fleet: Fleet) -> None:
    await fleet.start({"us-1": ("us-east", 4000)}, gateway_overrides=NO_RATE_LIMITS)
    assert fleet.gateway is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate.cli", "--log-level", "ERROR", "bench", "load",
        "--gateway", fleet.gateway.address, "--trace", "synthetic", "--synthetic-duration", "20",
        "--think-time", "0.5", "--rate", "20", "--requests", "20", "--max-tokens", "8",
        "--max-prompt-tokens", "256", "--json", "--quiet",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert (summary["issued"], summary["ok"], summary["text_mismatches"]) == (20, 20, 0)
    assert summary["by_worker"]["us-1"]["ok"] == 20
    assert summary["latency_ms"]["ttft"]["p50"] is not None


async def test_a_worker_killed_mid_run_costs_no_turn_and_no_text(fleet: Fleet) -> None:
    # Slowed 10x so that turns are mid-answer when the worker dies (as in test_failover).
    await fleet.start(
        {"first": ("us-east", 4000), "second": ("eu-west", 2000)},
        time_scale=10.0,
        gateway_overrides=NO_RATE_LIMITS,
    )
    assert fleet.gateway is not None
    kill: list[asyncio.Task[None]] = []

    def on_progress(p: LoadProgress) -> None:
        if p.outcomes["ok"] and not kill:  # some turns done, others streaming: crash the worker
            kill.append(asyncio.get_running_loop().create_task(fleet.workers["first"].host.server.stop(0)))

    config = LoadConfig(
        trace=chat_trace(), rate=4.0, requests=12, max_tokens=40, timeout_s=120, gateway=fleet.gateway.address
    )
    report = await run_load(config, on_progress=on_progress, progress_interval_s=0.05)
    await asyncio.gather(*kill)
    s = report.summary()
    assert kill and (s["issued"], s["ok"], s["text_mismatches"]) == (12, 12, 0), s
    async with fleet.client() as client:
        for record in report.records:
            stored = await client.get_session(record.session_id)
            assert record.turn_index is not None
            assert stored.turns[record.turn_index].assistant == record.text


def burst(n: int, prompt_tokens: int, output_tokens: int) -> Trace:
    """n single-turn requests arriving together."""
    requests = [
        TraceRequest(
            0.0,
            f"b{i}",
            f"b{i}",
            prompt_tokens,
            output_tokens,
            ((RANGE, i * prompt_tokens, prompt_tokens),),
            i,
        )
        for i in range(n)
    ]
    return Trace("burst", requests, shares_prefixes=False, token_stride=n * prompt_tokens, seed_stride=n)


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_a_fleet_too_small_for_the_burst_sheds_with_pushback(fleet: Fleet, transport: str) -> None:
    # 48 blocks of 16 tokens, slowed 3x: about two 64 + 200-token turns fit at once; the rest of
    # a burst of 12 is shed (not retried by default) with the scheduler's retry hint.
    await fleet.start(
        {"tiny": ("us-east", 48)}, time_scale=3.0, http=transport == "http", gateway_overrides=NO_RATE_LIMITS
    )
    assert fleet.gateway is not None
    target = {"http": fleet.http_base_url} if transport == "http" else {"gateway": fleet.gateway.address}
    report = await run_load(LoadConfig(trace=burst(12, 64, 200), max_tokens=200, timeout_s=60, **target))
    s = report.summary()
    assert s["issued"] == 12 and s["ok"] + s["shed"] == 12 and s["errors"] == 0, s
    assert s["shed"] > 0 and s["shed_by_reason"] == {"at_capacity": s["shed"]}
    assert s["shed_pushback_ms_p50"] is not None and s["shed_pushback_ms_p50"] > 0
    assert all(r.retries == 0 for r in report.records)
    assert s["text_mismatches"] == 0
