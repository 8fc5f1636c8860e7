"""The admission wait's bounds: off by default, a cap on waiting turns, and a time budget."""

from __future__ import annotations

import pytest

from gateway.admission import MAX_POLL_S, MIN_POLL_S, AdmissionPolicy, AdmissionQueue


def test_off_by_default_and_bounded_in_waiting_turns() -> None:
    assert not AdmissionQueue(AdmissionPolicy()).enter()
    queue = AdmissionQueue(AdmissionPolicy(wait_s=2.0, max_waiting=2))
    assert queue.enter() and queue.enter() and not queue.enter()
    queue.leave("placed")
    assert queue.enter() and queue.waiting == 2


def test_polls_follow_the_schedulers_hint_within_bounds_and_stop_when_time_is_up() -> None:
    queue = AdmissionQueue(AdmissionPolicy(wait_s=2.0))
    for retry_after_ms, low, high in [
        (1, MIN_POLL_S, MIN_POLL_S),
        (150, 0.15, 0.15),
        (9000, MAX_POLL_S, MAX_POLL_S),
    ]:
        pause = queue.next_poll_s(retry_after_ms, waited_s=0.0, deadline_left_s=None)
        assert low * 0.75 <= pause <= high * 1.25
    assert queue.next_poll_s(100, waited_s=1.99, deadline_left_s=None) <= 0.01 + 1e-9
    assert queue.next_poll_s(100, waited_s=2.0, deadline_left_s=None) == 0.0
    assert queue.next_poll_s(100, waited_s=0.0, deadline_left_s=0.0) == 0.0  # the client's deadline


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="admission wait must be >= 0 s"):
        AdmissionPolicy(wait_s=-1)
    with pytest.raises(ValueError, match="waiting turns must be >= 0"):
        AdmissionPolicy(wait_s=1, max_waiting=-1)
