"""SimTokenizer: a deterministic stand-in tokenizer and chat template for the simulated engine.

This is a SIMULATION, not a real BPE: text is split into word/punctuation/whitespace pieces,
each piece gets a stable 31-bit id (blake2b, identical across processes and machines, which
Python's salted hash() is not). Answers are drawn from a small lorem-ipsum vocabulary so they
decode to readable text and re-encode to the same ids, which is what lets a conversation's
next turn hit the prefix cache on the previous answer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from gpu_worker.engine import ChatMessage

# GPT-2 style pre-tokenisation: a word with its leading space, one symbol with its leading
# space, or a whitespace run (not swallowing the space that belongs to the next word).
_PIECE_RE = re.compile(r" ?\w+| ?[^\w\s]|\s+(?!\S)|\s+")

_MASK64 = (1 << 64) - 1

_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
    "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
    "cillum fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
    "officia deserunt mollit anim id est laborum"
).split()
_ONSETS = ("", "b", "c", "d", "f", "g", "l", "m", "n", "p", "qu", "r", "s", "t", "v")
_NUCLEI = ("a", "e", "i", "o", "u", "ae")
_CODAS = ("", "m", "n", "r", "s", "t", "x")

VOCAB_WORDS = 500
# One answer token in _PERIOD_EVERY ends a sentence, one in _COMMA_EVERY is a comma.
_PERIOD_EVERY = 14
_COMMA_EVERY = 23


def pieces(text: str) -> list[str]:
    """The pieces (word-like units) `text` tokenizes into, one token each."""
    return _PIECE_RE.findall(text)


def piece_id(piece: str) -> int:
    return int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-mixed integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _build_words() -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    for w in _LOREM:
        if w not in seen:
            seen.add(w)
            words.append(w)
    # Fill up with pronounceable latin-looking two-syllable words in a fixed order.
    for o1 in _ONSETS:
        for n1 in _NUCLEI:
            for o2 in _ONSETS[1:]:
                for n2 in _NUCLEI:
                    for c in _CODAS:
                        if len(words) >= VOCAB_WORDS:
                            return words
                        w = o1 + n1 + o2 + n2 + c
                        if w not in seen:
                            seen.add(w)
                            words.append(w)
    return words


class SimTokenizer:
    """Deterministic simulated tokenizer; see the module docstring."""

    UNKNOWN = "\ufffd"

    def __init__(self) -> None:
        pieces = [" " + w for w in _build_words()]
        self._word_ids = [piece_id(p) for p in pieces]
        self._period_id = piece_id(".")
        self._comma_id = piece_id(",")
        self._pieces: dict[int, str] = {}
        for p in [*pieces, ".", ","]:
            pid = piece_id(p)
            if pid in self._pieces:
                raise AssertionError(f"output vocabulary id collision: {p!r} vs {self._pieces[pid]!r}")
            self._pieces[pid] = p

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        return [piece_id(p) for p in pieces(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of output-vocabulary ids; other ids (prompt pieces) render as U+FFFD."""
        pieces = self._pieces
        return "".join(pieces.get(i, self.UNKNOWN) for i in ids)

    def sample(self, seed: int, position: int) -> int:
        """The answer token at `position` for `seed`: pure function, O(1)."""
        h = _mix64(((seed & _MASK64) * 0x100000001B3 + position) & _MASK64)
        if position > 0:
            if h % _PERIOD_EVERY == 0:
                return self._period_id
            if h % _COMMA_EVERY == 0:
                return self._comma_id
        return self._word_ids[(h >> 8) % len(self._word_ids)]

    def sample_many(self, seed: int, start: int, count: int) -> list[int]:
        """[sample(seed, p) for p in range(start, start + count)], with the mixing inlined
        (this runs for every generated token when a finished answer's blocks are hashed)."""
        mask = _MASK64
        base = (seed & mask) * 0x100000001B3 + 0x9E3779B97F4A7C15
        words = self._word_ids
        n_words = len(words)
        period, comma = self._period_id, self._comma_id
        out: list[int] = []
        append = out.append
        for p in range(start, start + count):
            x = (base + p) & mask
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
            h = x ^ (x >> 31)
            if p > 0:
                if h % _PERIOD_EVERY == 0:
                    append(period)
                    continue
                if h % _COMMA_EVERY == 0:
                    append(comma)
                    continue
            append(words[(h >> 8) % n_words])
        return out


def render_chat(messages: Sequence[ChatMessage], assistant_prefix: str = "") -> str:
    """A minimal chat template: "<|role|>\\ncontent\\n" per message, then the assistant header.

    The prompt of turn k is then the prompt of turn k-1 plus its answer plus the new user
    message, so its tokens extend the previous turn's tokens (as long as the stored answer
    is the decoded text verbatim) and the prefix cache hits.
    """
    parts = [f"<|{m.role}|>\n{m.content}\n" for m in messages]
    parts.append("<|assistant|>\n" + assistant_prefix)
    return "".join(parts)
