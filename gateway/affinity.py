"""Session affinity for stateless turns: which placement session id pins a conversation.

Stateless clients (the OpenAI HTTP facade, or gRPC `SendRequest.messages`) send the whole
conversation each turn and the gateway stores nothing. The scheduler can still keep such a
conversation on the worker holding its KV cache if every turn carries the same session id:
that id is derived here from the caller's affinity key, scoped to the tenant so that two
tenants choosing the same key never share (or probe) each other's pin.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from kvgate.v1 import common_pb2

# Real session ids are 32 hex digits; the prefix keeps derived ones visibly apart in Redis.
PREFIX = "aff-"


def placement_session_id(tenant: str, affinity_key: str) -> str:
    """The scheduler session id for a stateless turn; "" (no pin) without a key."""
    if not affinity_key:
        return ""
    # Hashed, not embedded: the key is client text and session ids end up in Redis key names.
    digest = hashlib.sha256(json.dumps([tenant, affinity_key]).encode("utf-8", "surrogatepass"))
    return PREFIX + digest.hexdigest()[:32]


def conversation_key(messages: Iterable[common_pb2.Message]) -> str:
    """An affinity key from the conversation's fixed prefix: its system prompt(s) and first user
    message. Every later turn of the same conversation resends both unchanged, so it maps to the
    same key; the servicer adds the tenant."""
    system: list[str] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content)
        elif message.role == "user":
            prefix = json.dumps([system, message.content]).encode("utf-8", "surrogatepass")
            return "conv-" + hashlib.sha256(prefix).hexdigest()[:32]
    return ""
