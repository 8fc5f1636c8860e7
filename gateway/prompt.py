"""Turn a session into the message list a worker renders, and estimate its size for placement."""

from __future__ import annotations

from collections.abc import Iterable

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
