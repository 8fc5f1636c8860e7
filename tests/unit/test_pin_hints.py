"""The scheduler's pin hints: a bounded map of session -> worker that forgets the least recently
remembered session first."""

from __future__ import annotations

import random

import pytest

from scheduler.pin_hints import PinHints


def test_holds_at_most_its_capacity_and_forgets_the_oldest_first() -> None:
    hints = PinHints(capacity=3)
    for i in range(5):
        hints.remember(f"s{i}", f"w{i}")
    assert len(hints) == 3
    assert [hints.get(f"s{i}") for i in range(5)] == [None, None, "w2", "w3", "w4"]


def test_remembering_a_session_again_makes_it_the_newest() -> None:
    hints = PinHints(capacity=3)
    for session in ("a", "b", "c"):
        hints.remember(session, "w1")
    hints.remember("a", "w2")  # moved: its hint changes and it is now the most recent
    hints.remember("d", "w1")
    assert hints.get("b") is None
    assert (hints.get("a"), hints.get("c"), hints.get("d")) == ("w2", "w1", "w1")
    hints.remember("e", "w1")
    assert hints.get("c") is None and hints.get("a") == "w2"


def test_a_session_with_no_pin_is_forgotten_and_an_empty_id_is_ignored() -> None:
    hints = PinHints(capacity=2)
    hints.remember("a", "w1")
    hints.remember("a", None)
    hints.remember("", "w1")
    assert len(hints) == 0 and hints.get("a") is None


def test_many_evictions_keep_the_most_recently_remembered_sessions() -> None:
    # Against a plain list kept in recency order: 20,000 remembers, forgets and refreshes of 3,000
    # sessions through 500 slots.
    rng = random.Random(7)
    hints = PinHints(capacity=500)
    recency: list[str] = []  # oldest first
    latest: dict[str, str] = {}
    for step in range(20_000):
        session = f"s{rng.randrange(3000)}"
        worker = None if rng.random() < 0.05 else f"w{step % 13}"
        hints.remember(session, worker)
        if session in recency:
            recency.remove(session)
        if worker is not None:
            recency.append(session)
            latest[session] = worker
        del recency[:-500]
        assert len(hints) == len(recency) <= 500
    assert {s: hints.get(s) for s in latest} == {s: latest[s] if s in recency else None for s in latest}


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PinHints(capacity=0)
