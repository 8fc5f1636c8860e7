"""The scheduler's local pin hints: bounded, most recently remembered kept, forgotten on None."""

from __future__ import annotations

from scheduler.pin_hints import PinHints


def test_remembers_forgets_and_stays_bounded() -> None:
    hints = PinHints(capacity=3)
    for i in range(3):
        hints.remember(f"s{i}", f"w{i}")
    hints.remember("s0", "w9")  # refreshed: now the most recent
    hints.remember("s3", "w3")  # over capacity: the oldest (s1) goes
    assert [hints.get(s) for s in ("s0", "s1", "s2", "s3")] == ["w9", None, "w2", "w3"]
    assert len(hints) == 3
    hints.remember("s2", None)  # the lookup found no pin
    assert hints.get("s2") is None and len(hints) == 2
    hints.remember("", "w1")  # stateless turns have no session to remember
    assert len(hints) == 2
