"""The gateway's prompt block hashes are exactly what a sim worker's engine computes, and a long
conversation's are computed off the event loop."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from gateway import prompt, relay
from gateway.prompt import prompt_block_hashes, sim_token_ids
from gpu_worker.engine import ChatMessage
from gpu_worker.sim import SimTokenizer
from gpu_worker.sim.block_pool import block_hashes
from gpu_worker.sim.tokenizer import render_chat
from kvgate.v1 import common_pb2

TEXTS = [
    "Tell me about KV caches.",
    "  leading and trailing  \n\n\ttabs, ünïcödé, 数字 123 and punctuation!?…  ",
    "",
    SimTokenizer().decode(SimTokenizer().sample_many(3, 0, 300)),
]


def test_cached_token_ids_match_the_sim_tokenizer_every_time() -> None:
    tokenizer = SimTokenizer()
    for _ in range(2):  # the second pass hits the piece cache
        for text in TEXTS:
            assert sim_token_ids(text) == tokenizer.encode(text)


def test_prompt_block_hashes_match_the_engines() -> None:
    messages = [
        common_pb2.Message(role=r, content=t)
        for r, t in zip(["system", "user", "assistant", "user"], TEXTS, strict=True)
    ]
    rendered = render_chat([ChatMessage(m.role, m.content) for m in messages])
    expected = block_hashes(SimTokenizer().encode(rendered), 16)
    assert len(expected) > 10
    assert prompt_block_hashes(messages) == expected


async def test_a_large_conversation_is_hashed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # ~60 ms per MiB: hashed on the loop, a long conversation would stall every other stream.
    threads: list[threading.Thread] = []
    real = prompt.prompt_block_hashes

    def recording(messages: Sequence[common_pb2.Message]) -> list[int]:
        threads.append(threading.current_thread())
        return real(messages)

    monkeypatch.setattr(prompt, "prompt_block_hashes", recording)
    small = [common_pb2.Message(role="user", content=TEXTS[3])]
    large = [
        common_pb2.Message(role="user", content=TEXTS[3] * (relay.HASH_IN_THREAD_CHARS // len(TEXTS[3]) + 1))
    ]
    assert await relay._prompt_block_hashes(small) == real(small)
    assert await relay._prompt_block_hashes(large) == real(large)
    assert threads[0] is threading.current_thread()
    assert threads[1] is not threading.current_thread()
