"""The gateway's prompt block hashes are exactly what a sim worker's engine computes."""

from __future__ import annotations

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
