"""`kvgate bench placement` reads the schedulers' latency from their cumulative Prometheus
histograms: only what was observed in the measured window may count."""

from __future__ import annotations

import math

import pytest

from scheduler.bench import window_quantiles

INF = math.inf


def test_quantiles_count_only_the_placements_between_the_two_scrapes() -> None:
    # Warm-up: 1,000 slow placements (5-10 ms). Measured window: 100 fast ones (0.5-1 ms).
    before = {0.001: 0.0, 0.005: 0.0, 0.01: 1000.0, INF: 1000.0}
    after = {0.001: 100.0, 0.005: 100.0, 0.01: 1100.0, INF: 1100.0}
    p50, p99 = window_quantiles(before, after, (0.5, 0.99))
    assert p50 == pytest.approx(0.0005) and p99 == pytest.approx(0.00099)


def test_without_a_warm_up_the_window_is_the_whole_histogram() -> None:
    after = {0.001: 50.0, 0.002: 100.0, INF: 100.0}
    assert window_quantiles({}, after, (0.5, 0.75)) == pytest.approx([0.001, 0.0015])


def test_an_empty_window_is_an_error_not_a_zero_latency() -> None:
    with pytest.raises(ValueError, match="no placements"):
        window_quantiles({0.001: 5.0, INF: 5.0}, {0.001: 5.0, INF: 5.0}, (0.5,))
