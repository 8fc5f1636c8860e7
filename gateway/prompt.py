"""Turn a session into the message list a worker renders, and estimate its size for placement."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from gpu_worker.engine import ChatMessage
from gpu_worker.sim.block_pool import block_hashes
from gpu_worker.sim.tokenizer import piece_id, pieces, render_chat
from kvgate.v1 import chat_pb2, common_pb2

# Placement only needs a size estimate to reserve KV; the worker tokenizes exactly.
# ~4 characters per token is the usual rule of thumb for English BPE vocabularies.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE_OVERHEAD = 4


def conversation(session: chat_pb2.Session, user_content: str) -> list[common_pb2.Message]:
    messages: list[common_pb2.Message] = []
    if session.system_prompt:
        messages.append(common_pb2.Message(role="system", content=session.system_prompt))
    for turn in session.turns:
        messages.append(common_pb2.Message(role="user", content=turn.user))
        messages.append(common_pb2.Message(role="assistant", content=turn.assistant))
    messages.append(common_pb2.Message(role="user", content=user_content))
    return messages


def estimate_tokens(messages: Iterable[common_pb2.Message]) -> int:
    return sum(TOKENS_PER_MESSAGE_OVERHEAD + -(-len(m.content) // CHARS_PER_TOKEN) for m in messages)


# vLLM's default KV block size; prefix hashes only match workers using the same size.
KV_BLOCK_SIZE = 16

# Every turn hashes its whole conversation on the event loop: ~23 ms for 30k tokens with the
# tokenizer as is, two thirds of it hashing each piece. Pieces repeat (words, the answers'
# vocabulary), so a bounded cache of their ids (a few MB) turns most into a dict lookup: ~7 ms.
_piece_id = functools.lru_cache(maxsize=1 << 15)(piece_id)


def sim_token_ids(text: str) -> list[int]:
    """SimTokenizer.encode(text), with piece ids cached."""
    return [_piece_id(piece) for piece in pieces(text)]


def prompt_block_hashes(messages: Sequence[common_pb2.Message], block_size: int = KV_BLOCK_SIZE) -> list[int]:
    """Chained hashes of the prompt's full KV blocks, computed the way the workers' engines do,
    so the scheduler can look up which worker already caches the longest prefix.

    Exact for sim workers (same chat template, tokenizer and hash). vLLM workers hash their own
    tokenizer's ids, so for them this needs the model's tokenizer (not wired yet): the lookup then
    simply finds no prefix and placement falls back to free KV capacity.
    """
    rendered = render_chat([ChatMessage(m.role, m.content) for m in messages])
    return block_hashes(sim_token_ids(rendered), block_size)
