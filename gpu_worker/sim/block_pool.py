"""Paged KV block pool with automatic prefix caching, modelled on vLLM V1
(vllm/v1/core/block_pool.py and kv_cache_utils.py).

A block is either referenced (ref count > 0, owned by running requests) or sits in the
free queue. Free blocks that still carry a block hash are cached: a later request with the
same prefix can take them back (touch) instead of recomputing. Allocation pops the head of
the free queue, evicting its cached hash if any, so the queue order is the LRU eviction
order.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from gpu_worker.engine import KvEventBatch

# Parent of a sequence's first block; any fixed 64-bit value works as long as every
# producer of hashes (pool, scheduler prefix index) uses the same one.
ROOT_PARENT_HASH = 0


def hash_block_tokens(parent: int | None, tokens: Sequence[int]) -> int:
    """Stable 64-bit chained hash of one block: H(parent hash, token ids).

    blake2b rather than hash() so the value is the same in every process, which the
    scheduler's prefix index relies on.
    """
    p = ROOT_PARENT_HASH if parent is None else parent
    payload = struct.pack(f"<Q{len(tokens)}q", p & 0xFFFFFFFFFFFFFFFF, *tokens)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of token_ids (a trailing partial block is not hashed).

    Same values as chaining hash_block_tokens block by block, but the token ids are packed
    once and each block hashes a slice of that buffer (about twice as fast for long prompts).
    """
    n_tokens = len(token_ids) // block_size * block_size
    if n_tokens == 0:
        return []
    buf = struct.pack(f"<{n_tokens}q", *token_ids[:n_tokens])
    width = 8 * block_size
    prev = ((ROOT_PARENT_HASH if parent is None else parent) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    blake2b = hashlib.blake2b
    from_bytes = int.from_bytes
    out: list[int] = []
    for start in range(0, len(buf), width):
        prev = blake2b(prev + buf[start : start + width], digest_size=8).digest()
        out.append(from_bytes(prev, "little"))
    return out


class BlockPoolError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # The free queue, standing in for vLLM's doubly linked FreeKVCacheBlockQueue: the blocks
        # never allocated yet, `_fresh` .. num_blocks - 1 (the head of the queue: freed blocks
        # join at the tail), then `_free`, an insertion-ordered set with O(1) removal from the
        # middle (touch of a cached block). Keeping the never-used blocks as a counter saves
        # building (and holding) a dict of every block per engine: a thousand-worker fleet
        # simulation spent 5 s and gigabytes on them.
        self._fresh = 0
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._num_cached_free = 0
        self._stored: list[int] = []
        self._removed: list[int] = []
        self._all_cleared = False

    # -- counters ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocatable right now, including evictable cached ones."""
        return self.num_blocks - self._fresh + len(self._free)

    @property
    def num_cached_unreferenced(self) -> int:
        return self._num_cached_free

    @property
    def num_used(self) -> int:
        """Blocks with ref count > 0."""
        return self._fresh - len(self._free)

    @property
    def num_cached(self) -> int:
        """All blocks carrying a registered hash, referenced or not."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    # -- prefix cache -----------------------------------------------------------------

    def get_computed_blocks(self, hashes: Iterable[int]) -> list[int]:
        """Block ids of the longest prefix of `hashes` present in the cache (refs unchanged)."""
        if not self.enable_caching:
            return []
        out: list[int] = []
        cached = self._cached
        for h in hashes:
            bid = cached.get(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def num_evictable_among(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks sit in the free queue (touching them consumes free blocks)."""
        ref = self._ref
        return sum(1 for b in block_ids if ref[b] == 0)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache hits, pulling unreferenced ones out of the free queue."""
        for b in block_ids:
            if self._ref[b] == 0:
                if b >= self._fresh:
                    self._materialize()
                del self._free[b]
                if self._hash[b] is not None:
                    self._num_cached_free -= 1
            self._ref[b] += 1

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """Register a now-full, computed block under its hash. Returns False when caching is off
        or an identical block is already cached (vLLM keeps duplicates; we keep the first, the
        duplicate then simply frees as an uncached block)."""
        if not self.enable_caching or block_hash in self._cached:
            return False
        if self._hash[block_id] is not None:
            raise BlockPoolError(f"block {block_id} already cached")
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        self._stored.append(block_hash)
        return True

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        """cache_block for each (block, hash) pair, in order."""
        if not self.enable_caching:
            return
        cached, hashes, stored = self._cached, self._hash, self._stored
        for b, h in zip(block_ids, block_hashes, strict=True):
            if h in cached:
                continue
            if hashes[b] is not None:
                raise BlockPoolError(f"block {b} already cached")
            hashes[b] = h
            cached[h] = b
            stored.append(h)

    # -- allocation -------------------------------------------------------------------

    def _materialize(self) -> None:
        """Put the never-used blocks into `_free` (at its head, where they are in the queue)."""
        queue = OrderedDict.fromkeys(range(self._fresh, self.num_blocks))
        queue.update(self._free)
        self._free = queue
        self._fresh = self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise BlockPoolError(f"cannot allocate {n} blocks, {self.num_free} free")
        hashes, ref = self._hash, self._ref
        fresh = self._fresh
        m = min(n, self.num_blocks - fresh)
        if m > 0:
            # Never-used blocks: no hash to evict, ref 0 -> 1.
            out = list(range(fresh, fresh + m))
            ref[fresh : fresh + m] = [1] * m
            self._fresh = fresh + m
            n -= m
        else:
            out = []
        append = out.append
        popitem = self._free.popitem
        for _ in range(n):
            b = popitem(last=False)[0]
            h = hashes[b]
            if h is not None:
                self._evict(b, h)
            ref[b] = 1
            append(b)
        return out

    def allocate_one(self) -> int:
        """allocate(1)[0] without the list (the decode fast path crosses one block boundary)."""
        fresh = self._fresh
        if fresh < self.num_blocks:
            self._fresh = fresh + 1
            self._ref[fresh] = 1
            return fresh
        free = self._free
        if not free:
            raise BlockPoolError("cannot allocate 1 block, 0 free")
        b, _none = free.popitem(last=False)
        h = self._hash[b]
        if h is not None:
            self._evict(b, h)
        self._ref[b] = 1
        return b

    def _evict(self, block_id: int, block_hash: int) -> None:
        self._hash[block_id] = None
        del self._cached[block_hash]
        self._num_cached_free -= 1
        self._removed.append(block_hash)

    def free(self, ordered_block_ids: Iterable[int]) -> None:
        """Drop one reference per block. Blocks reaching zero join the free queue in the given
        order, i.e. the first one is evicted first (callers pass a request's blocks reversed
        so its tail goes before the shared prefix, as vLLM does)."""
        ref = self._ref
        for b in ordered_block_ids:
            if ref[b] <= 0:
                raise BlockPoolError(f"double free of block {b}")
            ref[b] -= 1
            if ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is not None:
                    self._num_cached_free += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is referenced (as in vLLM).
        Pending events are dropped: consumers clear their index on all_cleared."""
        if self.num_used:
            return False
        self._hash = [None] * self.num_blocks
        self._cached.clear()
        self._num_cached_free = 0
        self._stored.clear()
        self._removed.clear()
        self._all_cleared = True
        return True

    # -- events -----------------------------------------------------------------------

    def take_events(self) -> KvEventBatch:
        batch = KvEventBatch(stored=self._stored, removed=self._removed, all_cleared=self._all_cleared)
        self._stored, self._removed, self._all_cleared = [], [], False
        return batch

    def check_invariants(self) -> None:
        """O(num_blocks) self-check for tests."""
        free = self._free
        for b in range(self.num_blocks):
            in_free = b >= self._fresh or b in free
            if b >= self._fresh and (b in free or self._hash[b] is not None):
                raise BlockPoolError(f"never-used block {b} is queued twice or has a hash")
            if in_free == (self._ref[b] > 0) or self._ref[b] < 0:
                raise BlockPoolError(f"block {b}: ref {self._ref[b]} but in_free={in_free}")
            h = self._hash[b]
            if h is not None and self._cached.get(h) != b:
                raise BlockPoolError(f"block {b}: hash {h} not mapped back")
        if len(self._cached) != sum(1 for h in self._hash if h is not None):
            raise BlockPoolError("cache map and block hashes disagree")
        n_cached_free = sum(1 for b in free if self._hash[b] is not None)
        if n_cached_free != self._num_cached_free:
            raise BlockPoolError(f"cached-free counter {self._num_cached_free} != {n_cached_free}")
