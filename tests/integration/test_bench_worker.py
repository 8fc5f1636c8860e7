"""`kvgate bench worker` end to end on a tiny workload: a real worker process, a real broker,
real gRPC streams. No timing assertions (the machine is shared): every stream must deliver
every token, and the JSON must carry its figures."""

from __future__ import annotations

import json
import subprocess
import sys

from gpu_worker.bench_live import model_seconds
from kvgate.containers import MosquittoServer


def test_bench_worker_streams_every_token_and_reports_its_figures(mosquitto_server: MosquittoServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "bench", "worker", "--json", "--mqtt-url", mosquitto_server.url,
         "--streams", "4", "--tokens", "16", "--prompt-words", "20", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["incomplete_streams_tokens"] == []
    for key in ("model_tokens_per_s", "live_tokens_per_s", "realtime_ratio", "fast_tokens_per_s"):
        assert result[key] > 0, key
    assert result["prompt_tokens_mean"] >= 20  # every word is at least one token, plus the template


def test_the_model_baseline_grows_with_the_work() -> None:
    one = model_seconds([512], 64, 1)
    assert 0 < one < model_seconds([512] * 8, 64, 8) < 8 * one  # batching: 8 streams cost < 8x one
    assert model_seconds([512], 128, 1) > one
