"""Prometheus metrics of the gateway."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TURNS = Counter("kvgate_gateway_turns_total", "Send calls by outcome", ["outcome"])
TTFT_SECONDS = Histogram(
    "kvgate_gateway_ttft_seconds",
    "Time to first token seen by the gateway",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
IN_FLIGHT_TURNS = Gauge("kvgate_gateway_inflight_turns", "Turns streaming right now", ["tier"])
FAILOVERS = Counter(
    "kvgate_gateway_failovers_total", "Turns moved to another worker mid-request", ["after_first_token"]
)
AUTH_FAILURES = Counter(
    "kvgate_gateway_auth_failures_total",
    "Rejected API keys by reason (missing, malformed, unknown, revoked)",
    ["reason"],
)
RATE_LIMITED = Counter(
    "kvgate_gateway_rate_limited_total",
    "Calls refused by a tenant's rate limit, by tier and bucket",
    ["tier", "bucket"],
)
QUARANTINED_TURNS = Counter(
    "kvgate_gateway_quarantined_turns_total", "Turns of quarantined keys answered by the canned responder"
)
