"""Upper bounds on the prefix-cache hit ratio of a trace, independent of placement.

Both replay requests in arrival order at engine-block granularity and count, like the engine,
the leading prompt blocks already cached, never the whole prompt (the last token is always
recomputed to produce logits): at most (prompt_tokens - 1) // block_size blocks.

- Infinite-cache oracle: every block ever computed stays cached, fleet-wide. No placement and
  no finite cache can reuse more.
- Pooled LRU: the whole fleet's KV capacity as one LRU cache of blocks. What a perfect router
  over one shared memory pool would get with the engines' eviction rule; a per-worker cache
  cannot pool capacity, so a policy can at best approach it (it is not a strict bound: LRU is
  not optimal, and blocks pinned by running requests are ignored).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class HitCounter:
    prompt_tokens: int = 0
    hit_tokens: int = 0

    @property
    def ratio(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class InfiniteCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.counter = HitCounter()
        self._seen: set[int] = set()

    def add(self, prompt_tokens: int, lookup: Sequence[int], insert: Sequence[int]) -> int:
        """Count one request's hit (returned, in blocks), then cache its blocks."""
        seen = self._seen
        limit = min(len(lookup), max(0, (prompt_tokens - 1) // self.block_size))
        hits = 0
        while hits < limit and lookup[hits] in seen:
            hits += 1
        seen.update(insert)
        self.counter.prompt_tokens += prompt_tokens
        self.counter.hit_tokens += hits * self.block_size
        return hits


class PooledLru:
    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity must be >= 1 block, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self.block_size = block_size
        self.counter = HitCounter()
        self._lru: OrderedDict[int, None] = OrderedDict()

    def add(self, prompt_tokens: int, lookup: Sequence[int], insert: Sequence[int]) -> int:
        lru = self._lru
        limit = min(len(lookup), max(0, (prompt_tokens - 1) // self.block_size))
        hits = 0
        while hits < limit and lookup[hits] in lru:
            hits += 1
        move = lru.move_to_end
        # Tail first, as the engine frees a finished request's blocks (its end is the least
        # likely to be shared): the leading, most shareable blocks end up most recently used.
        for h in reversed(insert):
            if h in lru:
                move(h)
            else:
                lru[h] = None
        popitem = lru.popitem
        for _ in range(len(lru) - self.capacity):
            popitem(last=False)
        self.counter.prompt_tokens += prompt_tokens
        self.counter.hit_tokens += hits * self.block_size
        return hits


@dataclass(frozen=True)
class Bounds:
    oracle_hit_ratio: float
    pooled_lru_hit_ratio: float
    pooled_capacity_blocks: int
    requests: int
