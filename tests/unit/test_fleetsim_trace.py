"""Fleet simulator traces: loaders (and their errors), session chaining, rate scaling, hashing, bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_worker.sim.block_pool import block_hashes
from scheduler.fleetsim.bounds import InfiniteCache, PooledLru
from scheduler.fleetsim.trace import (
    ANSWER,
    RANGE,
    PrefixHasher,
    SyntheticSpec,
    Trace,
    TraceRequest,
    chain_sessions,
    load_azure,
    load_mooncake,
    load_trace,
    prompt_token_ids,
    scaled_requests,
    synthetic_trace,
    tier_of,
)

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- Azure ------------------------------------------------------------------------------------


def test_azure_rows_become_single_request_sessions_with_unique_tokens(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "a.csv",
        AZURE_HEADER
        + "2023-11-16 18:15:46.6805900,374,44\n"
        + "2023-11-16 18:15:50.9951690,396,109\n"
        + "2023-11-16 18:15:48.0000000,20,1\n",
    )
    trace = load_azure(p)
    assert [r.prompt_tokens for r in trace.requests] == [374, 20, 396]  # sorted by arrival
    assert trace.requests[0].arrival_s == 0.0
    assert trace.requests[2].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert len({r.session_id for r in trace.requests}) == 3
    assert not trace.shares_prefixes
    tokens = [set(prompt_token_ids(r)) for r in trace.requests]
    assert not (tokens[0] & tokens[1]) and not (tokens[1] & tokens[2])


@pytest.mark.parametrize(
    ("rows", "line", "words"),
    [
        ("2023-11-16 18:15:46.68,374,44\nnot a time,1,1\n", 3, "TIMESTAMP"),
        ("2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.0,abc,1\n", 3, "ContextTokens"),
        ("2023-11-16 18:15:46.68,0,44\n", 2, "ContextTokens must be >= 1"),
        ("2023-11-16 18:15:46.68,5,-1\n", 2, "GeneratedTokens"),
        ("2023-11-16 18:15:46.68,5\n", 2, "expected 3 fields"),
    ],
)
def test_azure_bad_rows_name_their_line(tmp_path: Path, rows: str, line: int, words: str) -> None:
    p = write(tmp_path, "bad.csv", AZURE_HEADER + rows)
    with pytest.raises(ValueError, match=rf"bad\.csv:{line}: .*{words}"):
        load_azure(p)


def test_azure_bad_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r":1: expected header"):
        load_azure(write(tmp_path, "h.csv", "a,b,c\n1,2,3\n"))


# -- Mooncake ---------------------------------------------------------------------------------


def mooncake_line(ts: int, n_in: int, n_out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}) + "\n"


def test_mooncake_hash_ids_become_shared_token_blocks(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "m.jsonl",
        mooncake_line(0, 1000, 5, [1, 2])
        + mooncake_line(500, 1300, 5, [1, 3, 4])
        + mooncake_line(900, 1, 1, [7]),
    )
    trace = load_mooncake(p)
    a, b, c = trace.requests
    assert (a.arrival_s, b.arrival_s, c.arrival_s) == (0.0, 0.5, 0.9)
    ta, tb = prompt_token_ids(a), prompt_token_ids(b)
    assert len(ta) == 1000 and len(tb) == 1300 and len(prompt_token_ids(c)) == 1
    assert ta[:512] == tb[:512] and ta[512] != tb[512]
    ha, hb = block_hashes(ta, 16), block_hashes(tb, 16)
    # 32 engine blocks per shared 512-token hash id, then they diverge.
    assert ha[:32] == hb[:32] and ha[32] != hb[32]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json\n", "not valid JSON"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1}\n', "missing field 'hash_ids'"),
        ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n', "timestamp"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}\n', "input_length"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}\n', "does not match"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": ["x"]}\n', "hash_ids"),
    ],
)
def test_mooncake_bad_lines_name_their_line(tmp_path: Path, text: str, words: str) -> None:
    p = write(tmp_path, "bad.jsonl", mooncake_line(0, 10, 1, [0]) + "\n" + text)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{words}"):
        load_mooncake(p)


def test_mooncake_conversations_chain_on_all_but_the_last_block() -> None:
    sessions = chain_sessions(
        [
            [1, 2, 3],  # s0 turn 0
            [1, 2, 4, 5],  # extends s0 (agrees on all but its partial last block)
            [9],  # new
            [1, 2, 4, 5, 6, 7],  # s0 turn 2
            [1, 2, 3],  # s0's first turn is no longer its tail: a new session
            [9, 10],  # extends the one-block session
            [8, 1, 2],  # shares nothing at the start: new
            [1, 2, 3, 11],  # extends s4 (its tail), not s0
        ]
    )
    assert sessions == ["s0", "s0", "s2", "s0", "s4", "s2", "s6", "s4"]


def test_mooncake_turns_of_a_chain_share_the_session(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "m.jsonl",
        mooncake_line(0, 700, 5, [1, 2])
        + mooncake_line(10, 1200, 5, [1, 3, 4])
        + mooncake_line(20, 1500, 5, [1, 3, 4]),
    )
    reqs = load_mooncake(p).requests
    assert reqs[0].session_id == reqs[1].session_id == reqs[2].session_id
    assert [r.turn for r in reqs] == [0, 1, 2]


def test_the_real_traces_load() -> None:
    for name in ("azure_conv", "azure_code", "mooncake"):
        try:
            trace = load_trace(name)
        except ValueError as exc:
            pytest.skip(str(exc))
        assert trace.requests


# -- rate scaling -----------------------------------------------------------------------------


def small_trace() -> Trace:
    return synthetic_trace(SyntheticSpec(duration_s=60.0, sessions_per_s=1.0), seed=3)


def test_rate_scale_one_is_the_trace() -> None:
    trace = small_trace()
    assert list(scaled_requests(trace, 1.0)) == list(trace.requests)


def test_rate_scale_k_overlays_disjoint_copies() -> None:
    trace = small_trace()
    out = list(scaled_requests(trace, 3.0))
    assert len(out) == 3 * len(trace.requests)
    assert [r.arrival_s for r in out] == sorted(r.arrival_s for r in out)
    assert len({r.request_id for r in out}) == len(out)
    assert len({r.session_id for r in out}) == 3 * trace.sessions()
    assert max(r.arrival_s for r in out) - trace.span_s < trace.span_s / len(trace.requests)
    by_copy: dict[str, set[int]] = {"": set(), "~1": set(), "~2": set()}
    for r in out:
        suffix = r.request_id[r.request_id.find("~") :] if "~" in r.request_id else ""
        by_copy[suffix].update(block_hashes(prompt_token_ids(r), 16))
    assert not (by_copy[""] & by_copy["~1"]) and not (by_copy["~1"] & by_copy["~2"])
    # Within a copy, conversations still share their system prompts and history.
    assert sum(len(block_hashes(prompt_token_ids(r), 16)) for r in trace.requests) > len(by_copy[""])


def test_rate_scale_below_one_thins_whole_sessions_deterministically() -> None:
    trace = small_trace()
    a = list(scaled_requests(trace, 0.5, seed=1))
    assert a == list(scaled_requests(trace, 0.5, seed=1))
    assert a != list(scaled_requests(trace, 0.5, seed=2))
    kept = {r.session_id for r in a}
    assert 0.3 < len(kept) / trace.sessions() < 0.7
    full = [r for r in trace.requests if r.session_id in kept]
    assert a == full  # every turn of a kept session, none of the others


def test_fractional_rate_scale_thins_the_last_copy() -> None:
    trace = small_trace()
    n = len(list(scaled_requests(trace, 2.5)))
    assert 2 * len(trace.requests) < n < 3 * len(trace.requests)
    assert len(list(scaled_requests(trace, 2.5, duration_s=10.0))) < n


def test_rate_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate scale"):
        list(scaled_requests(small_trace(), 0.0))


# -- hashing and tiers ------------------------------------------------------------------------


def test_prefix_hasher_matches_the_engines_block_hashes() -> None:
    hasher = PrefixHasher(16, memo_entries=4)
    reqs = [
        TraceRequest(0, "a", "a", 1000, 5, ((RANGE, 0, 512), (RANGE, 512, 488)), 0),
        TraceRequest(0, "b", "b", 1030, 5, ((RANGE, 0, 512), (RANGE, 4096, 518)), 1),
        TraceRequest(0, "c", "c", 300, 5, ((RANGE, 7, 100), (ANSWER, 3, 50), (RANGE, 900, 150)), 2),
        *small_trace().requests[:20],
    ]
    for _ in range(2):  # second pass: from the memo
        for r in reqs:
            assert hasher.request_hashes(r) == block_hashes(prompt_token_ids(r), 16)


def test_synthetic_next_turn_contains_the_previous_answer() -> None:
    trace = small_trace()
    by_session: dict[str, list[TraceRequest]] = {}
    for r in trace.requests:
        by_session.setdefault(r.session_id, []).append(r)
    multi = next(turns for turns in by_session.values() if len(turns) > 1)
    first, second = multi[0], multi[1]
    assert second.segments[: len(first.segments)] == first.segments
    assert second.segments[len(first.segments)] == (ANSWER, first.seed, first.output_tokens)
    assert second.prompt_tokens > first.prompt_tokens + first.output_tokens


def test_tier_mix_is_stable_and_roughly_70_25_5() -> None:
    tiers = [tier_of(f"s{i}") for i in range(4000)]
    assert tiers == [tier_of(f"s{i}") for i in range(4000)]
    share = {t: tiers.count(t) / len(tiers) for t in ("free", "plus", "enterprise")}
    assert abs(share["free"] - 0.70) < 0.03 and abs(share["plus"] - 0.25) < 0.03
    assert abs(share["enterprise"] - 0.05) < 0.015


# -- bounds -----------------------------------------------------------------------------------


def test_infinite_cache_counts_leading_seen_blocks_never_the_whole_prompt() -> None:
    oracle = InfiniteCache(block_size=16)
    assert oracle.add(64, [1, 2, 3, 4], [1, 2, 3, 4]) == 0
    assert oracle.add(64, [1, 2, 3, 4], [1, 2, 3, 4]) == 3  # the last token is recomputed
    assert oracle.add(80, [1, 2, 9, 4, 5], [1, 2, 9, 4, 5]) == 2  # stops at the first miss
    assert oracle.add(16, [1], [1]) == 0  # a one-block prompt: nothing before its last token
    assert oracle.counter.prompt_tokens == 64 + 64 + 80 + 16
    assert oracle.counter.hit_tokens == (3 + 2) * 16


def test_pooled_lru_evicts_least_recently_used_tails_first() -> None:
    lru = PooledLru(capacity_blocks=4, block_size=16)
    lru.add(49, [1, 2, 3], [1, 2, 3])
    lru.add(33, [7, 8], [7, 8])  # 5 blocks > 4: block 3 (the oldest tail) goes
    assert lru.add(49, [1, 2, 3], [1, 2, 3]) == 2
    # Re-caching 3 evicted the oldest block, 8 (a tail: 7 was touched after it).
    assert lru.add(33, [7, 8], [7, 8]) == 1
    oracle = InfiniteCache(block_size=16)
    for n, blocks in ((49, [1, 2, 3]), (33, [7, 8]), (49, [1, 2, 3]), (33, [7, 8])):
        oracle.add(n, blocks, blocks)
    assert oracle.counter.hit_tokens == (3 + 2) * 16
    assert lru.counter.hit_tokens == (2 + 1) * 16
