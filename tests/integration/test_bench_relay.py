"""`kvgate bench relay --json`, tiny: every documented key is there and each mode is what it says.

No timing assertions (the machine is shared). What must hold at any speed: the per-token
baseline really relays one token per client message (no merging at the worker, no coalescing
at the gateway), and the RSS figure is taken with every stream open.
"""

from __future__ import annotations

import json
import subprocess
import sys

REQUIRED = ("coalesced_tokens_per_s", "per_token_tokens_per_s", "added_ttft_p50_ms", "rss_mb_at_2000_streams")


def test_bench_relay_json_has_the_documented_keys_and_an_honest_baseline() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "bench", "relay", "--json", "--streams", "4", "--tokens", "40",
         "--rounds", "1", "--ttft-samples", "3", "--open-streams", "2000"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in REQUIRED:
        assert key in result
    # Every one of a burst of 2,000 streams is admitted and streaming when RSS is sampled (grpc's
    # default pending-call limits used to cancel ~8% of such a burst).
    assert result["streams_streaming_at_rss_sample"] == 2000
    assert result["rss_mb_at_2000_streams"] > 0
    assert result["tokens_per_message_per_token"] == 1.0
    for mode in ("coalesced", "per_token", "gateway_only"):
        assert result[f"{mode}_tokens_per_gateway_cpu_s"] > 0
        assert result[f"tokens_per_message_{mode}"] >= 1.0
    assert result["place_p50_ms"] > 0 and result["ttft_direct_p50_ms"] > 0 and result["grpc_rtt_p50_ms"] > 0
