"""The engine protocol the worker service drives: one async interface for SimEngine and vLLM.

The worker's gRPC servicer and telemetry publisher only see this protocol, so a
simulated worker and a real vLLM worker behave identically to the rest of the fleet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    messages: Sequence[ChatMessage]
    max_tokens: int
    # Text the assistant already produced elsewhere (failover): generation continues after it.
    assistant_prefix: str = ""
    seed: int = 0


@dataclass(frozen=True)
class EngineChunk:
    """New output of one request since the previous chunk."""

    text: str
    num_tokens: int
    prompt_tokens: int
    cached_tokens: int
    finished: bool = False
    finish_reason: str = ""


@dataclass(frozen=True)
class EngineStats:
    block_size: int
    num_blocks_total: int
    # Blocks referenced by running or waiting requests.
    num_blocks_used: int
    # Unreferenced blocks still holding a cached prefix (evictable, counted as free).
    num_blocks_cached: int
    running: int
    waiting: int
    preemptions_total: int
    step_ms: float
    tokens_per_s: float
    arithmetic_intensity: float
    prefix_hit_rate: float
    # Requests whose prompt KV is allocated (prefilled), not merely queued: telemetry lists them
    # so the scheduler drops their reservations (the proto field keeps its original name).
    admitted_request_ids: tuple[str, ...] = ()

    @property
    def num_blocks_free(self) -> int:
        return self.num_blocks_total - self.num_blocks_used


@dataclass
class KvEventBatch:
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    all_cleared: bool = False

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.all_cleared)


class EngineError(Exception):
    """A request the engine cannot take (too long, duplicate id, ...); the message names why."""


class Engine(Protocol):
    kind: str  # "sim" or "vllm"
    model: str
    block_size: int
    num_blocks: int
    max_model_len: int

    async def start(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream a request's output; closing the iterator early aborts the request."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    def stats(self) -> EngineStats: ...

    def take_kv_events(self) -> KvEventBatch:
        """Block stored/removed events since the last call (for the scheduler's prefix index)."""
        ...

    async def close(self) -> None: ...
