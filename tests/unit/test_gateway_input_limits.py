"""Validation of client input: one fast scan for forbidden characters, and a cap on the size of a
stateless conversation checked before anything else is done with it."""

from __future__ import annotations

import unicodedata

from gateway.validation import Limits, check_messages, check_text
from kvgate.v1 import common_pb2


def _verdict(problem: str) -> str:
    if "control character" in problem:
        return "Cc"
    if "not valid UTF-8" in problem:
        return "Cs"
    assert problem == "", problem
    return ""


def test_the_scan_refuses_exactly_control_characters_and_lone_surrogates() -> None:
    # Every character Unicode has in those two categories lies in the BMP: check them all.
    for code_point in range(0x10000):
        char = chr(code_point)
        category = unicodedata.category(char)
        expected = category if category in ("Cc", "Cs") and char not in "\n\r\t" else ""
        assert _verdict(check_text("content", f"ok {char}", 100)) == expected, hex(code_point)


def test_the_scan_names_the_first_offending_offset() -> None:
    assert check_text("content", "a\tb\nc\x07d\x01", 100) == (
        "content contains a control character (U+0007) at offset 5"
    )
    assert check_text("content", "ab\udc80", 100) == "content is not valid UTF-8 (lone surrogate at offset 2)"
    assert check_text("content", "émoji 😀 fine\r\n", 100) == ""


def _conversation(sizes: list[int], content: str = "x") -> list[common_pb2.Message]:
    return [common_pb2.Message(role="user", content=content * size) for size in sizes]


def test_a_stateless_conversation_is_capped_in_total_bytes_and_messages() -> None:
    limits = Limits(max_message_bytes=100, max_conversation_bytes=250, max_conversation_messages=4)
    assert check_messages(_conversation([100, 100, 50]), limits) == ""
    assert check_messages(_conversation([100, 100, 51]), limits) == (
        "messages total 251 bytes of content; the limit is 250 (--max-conversation-bytes)"
    )
    # Bytes, not characters: "é" is two.
    assert "messages total 300 bytes" in check_messages(_conversation([50, 50, 50], "é"), limits)
    assert check_messages(_conversation([1] * 5), limits) == "messages has 5 entries; the limit is 4"


def test_the_size_cap_is_checked_before_each_message() -> None:
    # An oversized conversation is refused for its size, whatever its messages hold: nothing is
    # scanned first.
    limits = Limits(max_message_bytes=100, max_conversation_bytes=150)
    bad = [common_pb2.Message(role="nobody", content="\x00" * 100)] * 2
    assert check_messages(bad, limits).startswith("messages total 200 bytes")
    assert check_messages(bad[:1], limits).startswith("messages[0].role must be one of")


def test_the_default_cap_is_far_above_any_context_and_far_below_grpcs_message_limit() -> None:
    limits = Limits()
    assert 512 * 1024 <= limits.max_conversation_bytes <= 4 * 1024 * 1024
