"""Checks on client input. Each returns a message naming the field, or "" when the input is fine."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvgate.v1 import common_pb2

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 32 * 1024
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_system_prompt_bytes: int = 16 * 1024
    max_metadata_entries: int = 32
    max_metadata_key_bytes: int = 128
    max_metadata_value_bytes: int = 2048
    max_idempotency_key_bytes: int = 128
    max_affinity_key_bytes: int = 256
    # A stateless turn's whole conversation (the sum of its messages' UTF-8 bytes) and its number
    # of messages. 1 MiB is ~260k tokens, twice the context of the largest models served; without
    # a cap one key could send 16 MiB (gRPC's message limit) per request and keep the gateway busy
    # validating and hashing it for seconds.
    max_conversation_bytes: int = 1024 * 1024
    max_conversation_messages: int = 4096


# Client values echoed in error messages are cut short: a status message travels in a gRPC
# trailer, and one over the peer's metadata limit (16 KiB) replaces the whole answer with
# RESOURCE_EXHAUSTED "Stream removed".
MAX_ECHO_CHARS = 64


def quoted(value: str) -> str:
    """`value` as repr() for an error message, shortened to MAX_ECHO_CHARS."""
    if len(value) <= MAX_ECHO_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHO_CHARS]!r}… ({len(value)} characters)"


# Unicode's control characters (category Cc) except newline, carriage return and tab, and lone
# surrogates (Cs: what a decoder's surrogateescape leaves for bytes that are not UTF-8). One regex
# scan runs in C: check_text takes ~3 ms per MiB of text, where a Python loop over the characters
# took ~95 ms (this 2-core machine).
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def check_text(field: str, text: str, max_bytes: int, *, required: bool = True) -> str:
    if required and not text.strip():
        return f"{field} must not be empty"
    size = utf8_size(text)
    if size > max_bytes:
        return f"{field} is {size} bytes; the limit is {max_bytes}"
    bad = _FORBIDDEN.search(text)
    if bad is None:
        return ""
    if "\ud800" <= bad.group() <= "\udfff":
        return f"{field} is not valid UTF-8 (lone surrogate at offset {bad.start()})"
    return f"{field} contains a control character (U+{ord(bad.group()):04X}) at offset {bad.start()}"


def check_max_tokens(requested: int, limits: Limits) -> str:
    if requested > limits.max_tokens_limit:
        return f"max_tokens is {requested}; the limit is {limits.max_tokens_limit}"
    return ""


def check_metadata(metadata: Mapping[str, str], limits: Limits) -> str:
    if len(metadata) > limits.max_metadata_entries:
        return f"metadata has {len(metadata)} entries; the limit is {limits.max_metadata_entries}"
    for key in sorted(metadata):
        problem = check_text("metadata key", key, limits.max_metadata_key_bytes)
        if not problem:
            problem = check_text(
                f"metadata[{quoted(key)}]", metadata[key], limits.max_metadata_value_bytes, required=False
            )
        if problem:
            return problem
    return ""


def check_messages(messages: Sequence[common_pb2.Message], limits: Limits) -> str:
    """A stateless conversation: its size first (cheap, so an oversized one costs nothing more),
    then each message."""
    if not messages:
        return "messages must not be empty when session_id is not set"
    if len(messages) > limits.max_conversation_messages:
        return f"messages has {len(messages)} entries; the limit is {limits.max_conversation_messages}"
    total = sum(utf8_size(message.content) for message in messages)
    if total > limits.max_conversation_bytes:
        return (
            f"messages total {total} bytes of content; the limit is {limits.max_conversation_bytes}"
            " (--max-conversation-bytes)"
        )
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            return f"messages[{i}].role must be one of {list(ROLES)}, got {quoted(message.role)}"
        problem = check_text(f"messages[{i}].content", message.content, limits.max_message_bytes)
        if problem:
            return problem
    if messages[-1].role != "user":
        return "messages: the last message must have role 'user'"
    return ""
