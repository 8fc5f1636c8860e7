"""Profiles, roofline formulas, tokenizer and the engine-profile report."""

from __future__ import annotations

import math

import pytest

from gpu_worker.engine import ChatMessage
from gpu_worker.sim import (
    SimTokenizer,
    decode_run_cost,
    expected_experts_touched,
    get_gpu,
    get_model,
    kv_bytes_per_token,
    kv_capacity_blocks,
    kv_capacity_tokens,
    profile_report,
    render_chat,
    step_cost,
    step_time,
    weight_bytes,
    weight_bytes_read,
)

H100 = get_gpu("h100")
L8 = get_model("llama-3-8b")
L70 = get_model("llama-3-70b")
MIX = get_model("mixtral-8x7b")


def test_unknown_names_list_known() -> None:
    with pytest.raises(ValueError, match=r"'b200'.*a100, h100, h200"):
        get_gpu("b200")
    with pytest.raises(ValueError, match=r"'gpt-5'.*llama-3-8b"):
        get_model("gpt-5")


def test_kv_bytes_per_token() -> None:
    assert kv_bytes_per_token(L8) == 128 * 1024
    assert kv_bytes_per_token(L70) == 320 * 1024
    assert kv_bytes_per_token(MIX) == 128 * 1024


def test_kv_capacity_llama8b_h100_matches_formula() -> None:
    util = 0.9
    expected = int(
        (H100.memory_bytes * util - weight_bytes(L8) - L8.activation_reserve_bytes) // (128 * 1024)
    )
    tokens = kv_capacity_tokens(H100, L8, 1, util)
    assert tokens == expected
    assert 400_000 <= tokens <= 500_000
    assert kv_capacity_blocks(H100, L8, 1, util, 16) == tokens // 16


def test_kv_capacity_scales_with_tp_and_rejects_misfits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        kv_capacity_tokens(H100, L70, 1)
    t4 = kv_capacity_tokens(H100, L70, 4)
    expected = int(
        (4 * H100.memory_bytes * 0.9 - weight_bytes(L70) - 4 * L70.activation_reserve_bytes)
        // kv_bytes_per_token(L70)
    )
    assert t4 == expected
    with pytest.raises(ValueError, match="tensor parallel"):
        kv_capacity_tokens(H100, L8, 3)


def test_decode_batch1_llama8b_h100_plausible() -> None:
    seconds, intensity = step_time(H100, L8, 1, 2048, 1, 0, 0)
    assert 5e-3 <= seconds <= 9e-3
    assert intensity < 5  # deep in the memory-bound regime


def test_prefill_is_compute_bound() -> None:
    cost = step_cost(H100, L8, 1, 0, 0, 8192, 0)
    assert cost.arithmetic_intensity > H100.ridge_flop_per_byte
    compute_s = cost.flops / (H100.eta_compute * H100.peak_flops)
    assert cost.seconds == pytest.approx(H100.step_overhead_s + compute_s)


def test_moe_reads_touched_experts_but_computes_active_params() -> None:
    assert MIX.shared_params + 8 * MIX.expert_params == pytest.approx(MIX.total_params)
    assert MIX.shared_params + 2 * MIX.expert_params == pytest.approx(MIX.active_params)
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2.0)
    assert expected_experts_touched(8, 2, 1000) == pytest.approx(8.0)
    # Batch 1 reads shared + 2 experts: fewer bytes than the whole model.
    assert weight_bytes_read(MIX, 1) < weight_bytes(MIX)
    assert weight_bytes_read(MIX, 1) == pytest.approx(MIX.active_params * 2)
    assert weight_bytes_read(MIX, 512) == pytest.approx(weight_bytes(MIX), rel=1e-9)
    cost = step_cost(H100, MIX, 1, 0, 0, 1000, 0)
    dense_flops = 2 * MIX.active_params * 1000
    assert dense_flops < cost.flops < dense_flops * 1.1
    assert cost.flops < 2 * MIX.total_params * 1000


def test_tp_adds_allreduce_cost() -> None:
    t2 = step_time(H100, L8, 2, 2048, 1, 0, 0)[0]
    t1 = step_time(H100, L8, 1, 2048, 1, 0, 0)[0]
    roof2 = (weight_bytes(L8) + 2048 * kv_bytes_per_token(L8)) / (H100.eta_bw * H100.hbm_bandwidth * 2)
    assert t2 > H100.step_overhead_s + roof2  # all-reduce is on top of the halved roofline
    assert t2 < t1


@pytest.mark.parametrize(
    ("model", "batch", "ctx0", "k"),
    [
        ("llama-3-8b", 1, 100, 50),
        ("llama-3-8b", 64, 64 * 3000, 200),
        ("mixtral-8x7b", 8, 8 * 10, 300),
        ("llama-3-8b", 256, 256 * 10, 5000),
    ],
)
def test_decode_run_cost_equals_sum_of_steps(model: str, batch: int, ctx0: int, k: int) -> None:
    m = get_model(model)
    total = sum(step_cost(H100, m, 1, ctx0 + batch * j, batch, 0, 0).seconds for j in range(k))
    run = decode_run_cost(H100, m, 1, batch, ctx0, k)
    assert run.seconds == pytest.approx(total, rel=1e-9)


def test_decode_run_cost_crosses_regime() -> None:
    # Large batch: memory-bound at short context, attention FLOPs and KV reads grow with it.
    batch, ctx0, k = 512, 512, 4000
    costs = [step_cost(H100, L8, 1, ctx0 + batch * j, batch, 0, 0) for j in range(k)]
    run = decode_run_cost(H100, L8, 1, batch, ctx0, k)
    assert run.seconds == pytest.approx(math.fsum(c.seconds for c in costs), rel=1e-9)
    assert run.flops == pytest.approx(math.fsum(c.flops for c in costs), rel=1e-9)


def test_profile_report_shape() -> None:
    report = profile_report("h100", "llama-3-8b", 1)
    assert report["kv_bytes_per_token"] == 131072
    assert report["num_blocks"] == report["kv_capacity_tokens"] // report["block_size"]
    assert report["ridge_flop_per_byte"] == pytest.approx(989e12 / 3.35e12)
    phases = [(s["phase"], s["batch"], s["new_tokens"]) for s in report["steps"]]
    assert phases == [
        ("decode", 1, 1),
        ("decode", 8, 8),
        ("decode", 64, 64),
        ("decode", 128, 128),
        ("prefill", 1, 512),
        ("prefill", 1, 2048),
        ("prefill", 1, 8192),
    ]
    ms = [s["step_ms"] for s in report["steps"]]
    assert ms[:4] == sorted(ms[:4]) and ms[4:] == sorted(ms[4:])


def test_tokenizer_roundtrip_and_determinism() -> None:
    tok = SimTokenizer()
    ids = [tok.sample(7, p) for p in range(300)]
    assert ids == [tok.sample(7, p) for p in range(300)]
    assert ids != [tok.sample(8, p) for p in range(300)]
    text = tok.decode(ids)
    assert "." in text and text.startswith(" ")
    assert tok.encode(text) == ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 502
    # Stable across processes: a pinned value, not Python's salted hash().
    assert tok.encode("hello") == tok.encode("hello")
    assert tok.encode("Hi there,\n world!") == [
        *tok.encode("Hi"),
        *tok.encode(" there"),
        *tok.encode(","),
        *tok.encode("\n"),
        *tok.encode(" world"),
        *tok.encode("!"),
    ]


def test_chat_template_turns_extend_prefix() -> None:
    tok = SimTokenizer()
    turn1 = [ChatMessage("system", "Be brief."), ChatMessage("user", "Tell me a story.")]
    p1 = tok.encode(render_chat(turn1, ""))
    answer = tok.decode([tok.sample(3, p) for p in range(40)])
    turn2 = [*turn1, ChatMessage("assistant", answer), ChatMessage("user", "More!")]
    p2 = tok.encode(render_chat(turn2, ""))
    assert p2[: len(p1)] == p1
    assert p2[len(p1) : len(p1) + 40] == [tok.sample(3, p) for p in range(40)]
    assert render_chat(turn1, " Once").endswith("<|assistant|>\n Once")
