"""Fidelity table (`kvgate engine-profile --fidelity`) and the busy-worker benchmark helpers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gpu_worker import bench
from gpu_worker.engine_profile_cli import run as profile_cli_run
from gpu_worker.sim import EngineConfig, profile_report
from gpu_worker.sim.fidelity import fidelity_report, fidelity_table, format_fidelity


def _row(report: dict[str, object], phase: str, batch: int, new: int) -> float:
    steps = report["steps"]
    assert isinstance(steps, list)
    return next(
        float(s["step_ms"]) for s in steps if (s["phase"], s["batch"], s["new_tokens"]) == (phase, batch, new)
    )


def test_fidelity_modelled_column_is_profile_report() -> None:
    rows = {r.key: r for r in fidelity_table()}
    report = profile_report("h100", "llama-3-8b", 1)
    assert rows["decode_b1"].modelled == _row(report, "decode", 1, 1)
    assert rows["decode_b64"].modelled == _row(report, "decode", 64, 64)
    assert rows["prefill_2k"].modelled == _row(report, "prefill", 1, 2048)
    assert rows["kv_tokens"].modelled == report["kv_capacity_tokens"]
    for r in rows.values():
        if r.unit == "tokens":
            assert r.roofline > r.modelled  # no activation reserve, all memory
        else:
            assert 0 < r.roofline < r.modelled  # eta = 1, no overhead
    # Only what was found is cited; everything else says so.
    cited = [r for r in rows.values() if r.published is not None]
    assert all(r.published is not None and r.published.source.startswith("https://") for r in cited)
    text = format_fidelity(list(rows.values()))
    assert "no citable figure found" in text and "modelled" in text and "roofline" in text


def test_fidelity_has_no_published_figures_for_other_profiles() -> None:
    assert all(r.published is None for r in fidelity_table("h100", "llama-3-70b", 2))
    assert json.loads(json.dumps(fidelity_report()))["rows"][0]["key"] == "decode_b1"


def test_engine_profile_cli_fidelity(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(gpu="h100", model="llama-3-8b", tp=1, json=False, fidelity=True)
    assert profile_cli_run(args) == 0
    out = capsys.readouterr().out
    modelled = fidelity_table()[0].modelled
    assert f"{modelled:.2f}" in out and "published" in out
    args.json = True
    assert profile_cli_run(args) == 0
    assert (
        json.loads(capsys.readouterr().out)["rows"][3]["modelled"]
        == profile_report("h100", "llama-3-8b")["kv_capacity_tokens"]
    )


def test_bench_lengths_fall_back_to_synthetic(tmp_path: Path) -> None:
    lengths = bench.load_lengths(tmp_path / "missing.csv")
    assert lengths.source.startswith("synthetic")
    assert 800 < lengths.mean_prompt < 1500 and 150 < lengths.mean_output < 300
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nx,100,10\ny,9000,10\nz,50,5\n")
    assert bench.load_lengths(trace).pairs == [(100, 10), (50, 5)]


def test_busy_worker_jump_simulates_the_same_as_stepping() -> None:
    lengths = bench.load_lengths(Path("/nonexistent"))
    config = EngineConfig(gpu="h100", model="llama-3-8b")
    rate = 0.75 * bench.capacity_rps(config, lengths.mean_prompt, lengths.mean_output)
    assert 5 < rate < 40
    arrivals = bench.poisson_arrivals(rate, 8.0, lengths, seed=3)
    stepwise = bench.busy_worker_run(False, arrivals, 8.0, config)
    jumping = bench.busy_worker_run(True, arrivals, 8.0, config)
    assert jumping.calls < stepwise.calls
    assert (jumping.steps, jumping.admitted, jumping.finished) == (
        stepwise.steps,
        stepwise.admitted,
        stepwise.finished,
    )
    assert jumping.sim_s == pytest.approx(stepwise.sim_s, rel=1e-9)
    assert jumping.mean_running == pytest.approx(stepwise.mean_running, rel=1e-9)
