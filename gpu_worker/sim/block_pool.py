"""Paged KV block pool with automatic prefix caching, modelled on vLLM V1
(vllm/v1/core/block_pool.py and kv_cache_utils.py).

A block is either referenced (ref count > 0, owned by running requests) or sits in the
free queue. Free blocks that still carry a block hash are cached: a later request with the
same prefix can take them back (touch) instead of recomputing. Allocation pops the head of
the free queue, evicting its cached hash if any, so the queue order is the LRU eviction
order.

Lazy hashing: a block's chained hash is computed only when something needs its value. A
sequence registers its computed blocks by position (`cache_seq_blocks`); the hashes are
computed when a lookup could hit them, when an identical block could be registered, or when
the KV events are taken. Exactness rests on the chain: two blocks can only have equal hashes
if their sequences share the first block, so cached blocks are grouped by the hash of their
sequence's first block (the group's root, one hash per sequence). A group registered by one
sequence alone stays lazy; the first lookup or registration by another sequence (or by the
same one after a preemption) materialises it, after which it behaves exactly as the eager
dict of hash -> block. Lookups for a root no group has miss without hashing further.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice, repeat
from typing import Any

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


# Runs an iterator to its end at C speed: with map(list.__setitem__, ...) and the like, the
# per-block updates of a request's blocks cost a fraction of a Python loop.
_consume: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend


# In BlockPool._hash, a cached block whose hash is not computed yet holds LAZY - (its position in
# its sequence); real hashes are >= 0.
LAZY = -1

# (sequence, n) -> the sequence's chained block hashes, at least its first n. A sequence is any
# object the caller registers blocks for (the engine's requests); its content must not change.
Hasher = Callable[[Any, int], Sequence[int]]


class _Group:
    """The cached blocks of all sequences that start with the same first block (`root`)."""

    __slots__ = ("count", "lazy", "owner", "root", "seq")

    def __init__(self, root: int, owner: object | None) -> None:
        self.root = root
        # The only sequence with blocks in the group while it is lazy; None once materialised.
        self.owner = owner
        # The sequence that created it (kept: lazy removed events name it).
        self.seq = owner
        # Blocks registered lazily, not pruned on eviction: the ones still lazy in this group
        # are those whose _group is this group and whose _hash is negative.
        self.lazy: list[int] = []
        self.count = 0  # cached blocks in the group, lazy or not


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, hasher: Hasher | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._hasher = hasher
        self._ref = [0] * num_blocks
        # A cached block's hash, LAZY - position (lazy), or None (not cached).
        self._hash: list[int | None] = [None] * num_blocks
        # The free queue (vLLM's doubly linked FreeKVCacheBlockQueue): the never-used blocks as
        # a counter, `_fresh` .. num_blocks - 1, at its head (a thousand-worker fleet simulation
        # spent 5 s and gigabytes on a structure of every block per engine before the counter),
        # then `_queue[_head:]`, where freed blocks join at the tail. A touch (cache hit) takes
        # a block out of the middle by leaving a tombstone: `_tombs` counts them per block, and
        # the oldest entries of a block are its tombstones, so popping skips them. With no
        # tombstones, allocating n blocks is one slice.
        self._fresh = 0
        self._queue: list[int] = []
        self._head = 0
        self._tombs: dict[int, int] = {}
        self._num_tombs = 0
        self._cached: dict[int, int] = {}  # computed block hash -> block id
        self._num_cached_free = 0
        self._group: list[_Group | None] = [None] * num_blocks  # of each cached block
        self._groups: dict[int, _Group] = {}  # root -> group
        # Blocks cached by hash alone (cache_block/cache_blocks): their roots are unknown, so
        # while any exist every registration is eager.
        self._untracked = 0
        # Events in order. A lazy stored entry is (sequence, lo, hi); removed hashes come in
        # lists of ints, or of (groups, LAZY - positions) pairs for lazy blocks.
        self._stored: list[Any] = []
        self._removed: list[Any] = []
        self._all_cleared = False

    # -- counters ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocatable right now, including evictable cached ones."""
        return self.num_blocks - self._fresh + len(self._queue) - self._head - self._num_tombs

    @property
    def num_cached_unreferenced(self) -> int:
        return self._num_cached_free

    @property
    def num_used(self) -> int:
        """Blocks with ref count > 0."""
        return self._fresh - (len(self._queue) - self._head - self._num_tombs)

    @property
    def num_cached(self) -> int:
        """All cached blocks, referenced or not."""
        return sum(1 for h in self._hash if h is not None)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        h = self._hash[block_id]
        if h is not None and h < 0:
            grp = self._group[block_id]
            assert grp is not None
            self._materialize(grp)
            h = self._hash[block_id]
        return h

    # -- prefix cache -----------------------------------------------------------------

    def get_computed_blocks(self, hashes: Iterable[int]) -> list[int]:
        """Block ids of the longest prefix of `hashes` present in the cache (refs unchanged)."""
        if not self.enable_caching:
            return []
        it = iter(hashes)
        h = next(it, None)
        if h is None:
            return []
        grp = self._groups.get(h)
        if grp is None:
            if not self._untracked:
                return []
        elif grp.owner is not None:
            self._materialize(grp)
        out: list[int] = []
        cached = self._cached
        bid = cached.get(h)
        while bid is not None:
            out.append(bid)
            h = next(it, None)
            if h is None:
                break
            bid = cached.get(h)
        return out

    def lookup_seq(self, seq: object, limit: int) -> list[int]:
        """get_computed_blocks of seq's first `limit` block hashes, computing only the first
        one when no cached block can share it."""
        if not self.enable_caching or limit <= 0:
            return []
        hasher = self._require_hasher()
        if hasher(seq, 1)[0] not in self._groups and not self._untracked:
            return []
        return self.get_computed_blocks(islice(hasher(seq, limit), limit))

    def num_evictable_among(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks sit in the free queue (touching them consumes free blocks)."""
        ref = self._ref
        return sum(1 for b in block_ids if ref[b] == 0)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache hits, pulling unreferenced ones out of the free queue."""
        for b in block_ids:
            if self._ref[b] == 0:
                if b >= self._fresh:
                    self._materialize_fresh()
                self._tombs[b] = self._tombs.get(b, 0) + 1
                self._num_tombs += 1
                if self._hash[b] is not None:
                    self._num_cached_free -= 1
            self._ref[b] += 1

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """Register a now-full, computed block under its hash. Returns False when caching is off
        or an identical block is already cached (vLLM keeps duplicates; we keep the first, the
        duplicate then simply frees as an uncached block)."""
        if not self.enable_caching:
            return False
        if not self._untracked:
            # Lazy blocks could carry this hash; none are created while untracked ones exist.
            self._materialize_all()
        if block_hash in self._cached:
            return False
        if self._hash[block_id] is not None:
            raise BlockPoolError(f"block {block_id} already cached")
        self._hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        self._untracked += 1
        self._stored.append(block_hash)
        return True

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        """cache_block for each (block, hash) pair, in order."""
        for b, h in zip(block_ids, block_hashes, strict=True):
            self.cache_block(b, h)

    def cache_seq_blocks(self, seq: object, blocks: Sequence[int], start: int, stop: int) -> None:
        """Register blocks[start:stop], the computed blocks at those positions of seq, like
        cache_block with their hashes (which are only computed if they can matter)."""
        if not self.enable_caching or stop <= start:
            return
        hasher = self._require_hasher()
        root = hasher(seq, 1)[0]
        groups = self._groups
        grp = groups.get(root)
        if grp is None:
            grp = groups[root] = _Group(root, None if self._untracked else seq)
        elif grp.owner is not None and grp.owner is not seq:
            self._materialize(grp)
        ids = blocks[start:stop]
        hashes, group_of = self._hash, self._group
        if grp.owner is seq:
            if list(map(hashes.__getitem__, ids)).count(None) != len(ids):
                raise BlockPoolError("block already cached")
            _consume(map(hashes.__setitem__, ids, range(LAZY - start, LAZY - stop, -1)))
            _consume(map(group_of.__setitem__, ids, repeat(grp)))
            grp.lazy += ids
            grp.count += len(ids)
            self._stored.append((seq, start, stop))
            return
        cached, stored = self._cached, self._stored
        n = 0
        for b, h in zip(ids, hasher(seq, stop)[start:stop], strict=True):
            if h in cached:
                continue
            if hashes[b] is not None:
                raise BlockPoolError(f"block {b} already cached")
            hashes[b] = h
            cached[h] = b
            group_of[b] = grp
            stored.append(h)
            n += 1
        grp.count += n
        if not grp.count:
            del groups[root]

    def _require_hasher(self) -> Hasher:
        if self._hasher is None:
            raise BlockPoolError("this pool has no hasher: register blocks with cache_block")
        return self._hasher

    def _materialize(self, grp: _Group) -> None:
        """Compute the hashes of a lazy group's blocks; it is then cached like any other."""
        owner, lazy = grp.owner, grp.lazy
        grp.owner, grp.lazy = None, []
        hashes, group_of = self._hash, self._group
        live = {b: LAZY - h for b in lazy if group_of[b] is grp and (h := hashes[b]) is not None and h < 0}
        if not live:
            return
        hs = self._require_hasher()(owner, max(live.values()) + 1)
        cached = self._cached
        for b, j in live.items():
            h = hs[j]
            hashes[b] = h
            cached[h] = b

    def _materialize_all(self) -> None:
        for grp in self._groups.values():
            if grp.owner is not None:
                self._materialize(grp)

    # -- allocation -------------------------------------------------------------------

    def _materialize_fresh(self) -> None:
        """Put the never-used blocks into `_queue` (at its head, where they are in the queue)."""
        self._queue = [*range(self._fresh, self.num_blocks), *self._queue[self._head :]]
        self._head = 0
        self._fresh = self.num_blocks

    def _pop(self, n: int) -> list[int]:
        """The first n live entries of `_queue`, removed."""
        queue, head = self._queue, self._head
        if not self._num_tombs:
            taken = queue[head : head + n]
            head += n
        else:
            taken = []
            tombs = self._tombs
            while len(taken) < n:
                b = queue[head]
                head += 1
                t = tombs.get(b)
                if t is None:
                    taken.append(b)
                    continue
                self._num_tombs -= 1
                if t == 1:
                    del tombs[b]
                else:
                    tombs[b] = t - 1
        if head > 4096 and 2 * head > len(queue):
            del queue[:head]
            head = 0
        self._head = head
        return taken

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise BlockPoolError(f"cannot allocate {n} blocks, {self.num_free} free")
        ref = self._ref
        fresh = self._fresh
        m = min(n, self.num_blocks - fresh)
        if m > 0:
            # Never-used blocks: no hash to evict, ref 0 -> 1.
            out = list(range(fresh, fresh + m))
            ref[fresh : fresh + m] = [1] * m
            self._fresh = fresh + m
            n -= m
            if not n:
                return out
        else:
            out = []
        taken = self._pop(n)
        self._evict_any(taken)
        _consume(map(ref.__setitem__, taken, repeat(1)))
        out += taken
        return out

    def allocate_one(self) -> int:
        """allocate(1)[0] without the list (the decode fast path crosses one block boundary)."""
        fresh = self._fresh
        if fresh < self.num_blocks:
            self._fresh = fresh + 1
            self._ref[fresh] = 1
            return fresh
        if not self.num_free:
            raise BlockPoolError("cannot allocate 1 block, 0 free")
        (b,) = self._pop(1)
        if self._hash[b] is not None:
            self._evict_any([b])
        self._ref[b] = 1
        return b

    def _evict_any(self, block_ids: list[int]) -> None:
        """Drop the cached hashes (if any) of blocks just taken from the free queue, in order."""
        hashes = self._hash
        hs: list[Any] = list(map(hashes.__getitem__, block_ids))  # ints once the Nones are dropped
        n_none = hs.count(None)
        if n_none == len(hs):
            return
        if n_none:
            block_ids = [b for b, h in zip(block_ids, hs, strict=True) if h is not None]
            hs = [h for h in hs if h is not None]
        group_of = self._group
        grps = list(map(group_of.__getitem__, block_ids))
        _consume(map(hashes.__setitem__, block_ids, repeat(None)))
        _consume(map(group_of.__setitem__, block_ids, repeat(None)))
        self._num_cached_free -= len(hs)
        if max(hs) < 0:  # all lazy (the common case when nobody shares a prefix)
            self._removed.append((grps, hs))
        else:
            cached = self._cached
            self._removed.append(
                [h if h >= 0 else (g.seq, LAZY - h) for g, h in zip(grps, hs, strict=True)]  # type: ignore[union-attr]
            )
            _consume(map(cached.__delitem__, [h for h in hs if h >= 0]))
        groups = self._groups
        distinct = dict.fromkeys(grps)  # usually the one or two requests freed longest ago
        for grp in distinct:
            n = grps.count(grp) if len(distinct) > 1 else len(grps)
            if grp is None:
                self._untracked -= n
                continue
            grp.count -= n
            if not grp.count:
                del groups[grp.root]

    def free(self, ordered_block_ids: Iterable[int]) -> None:
        """Drop one reference per block (distinct blocks). Blocks reaching zero join the free
        queue in the given order, i.e. the first one is evicted first (callers pass a request's
        blocks reversed so its tail goes before the shared prefix, as vLLM does)."""
        ids = ordered_block_ids if type(ordered_block_ids) is list else list(ordered_block_ids)
        ref = self._ref
        hashes = self._hash
        if list(map(ref.__getitem__, ids)).count(1) == len(ids):
            # Nobody else holds any of them: all go to the queue.
            _consume(map(ref.__setitem__, ids, repeat(0)))
            self._queue += ids
            self._num_cached_free += len(ids) - list(map(hashes.__getitem__, ids)).count(None)
            return
        queue = self._queue
        for b in ids:
            r = ref[b]
            if r == 1:
                ref[b] = 0
                queue.append(b)
                if hashes[b] is not None:
                    self._num_cached_free += 1
            elif r > 1:
                ref[b] = r - 1
            else:
                raise BlockPoolError(f"double free of block {b}")

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is referenced (as in vLLM).
        Pending events are dropped: consumers clear their index on all_cleared."""
        if self.num_used:
            return False
        self._hash = [None] * self.num_blocks
        self._group = [None] * self.num_blocks
        self._groups.clear()
        self._untracked = 0
        self._cached.clear()
        self._num_cached_free = 0
        self._stored.clear()
        self._removed.clear()
        self._all_cleared = True
        return True

    # -- events -----------------------------------------------------------------------

    def take_events(self) -> KvEventBatch:
        batch = KvEventBatch(
            stored=self._stored_hashes(), removed=self._removed_hashes(), all_cleared=self._all_cleared
        )
        self._stored, self._removed, self._all_cleared = [], [], False
        return batch

    def _stored_hashes(self) -> list[int]:
        out: list[int] = []
        hasher = self._hasher
        for e in self._stored:
            if type(e) is int:
                out.append(e)
            else:
                assert hasher is not None
                seq, lo, hi = e
                out += hasher(seq, hi)[lo:hi]
        return out

    def _removed_hashes(self) -> list[int]:
        out: list[int] = []
        hasher = self._hasher
        for e in self._removed:
            if type(e) is tuple:
                e = [(g.seq, LAZY - h) for g, h in zip(*e, strict=True)]
            for x in e:
                if type(x) is int:
                    out.append(x)
                else:
                    assert hasher is not None
                    seq, j = x
                    out.append(hasher(seq, j + 1)[j])
        return out

    def check_invariants(self) -> None:
        """O(num_blocks) self-check for tests."""
        tombs = dict(self._tombs)
        free: list[int] = []
        for b in self._queue[self._head :]:
            if tombs.get(b):
                tombs[b] -= 1
            else:
                free.append(b)
        if any(tombs.values()) or sum(self._tombs.values()) != self._num_tombs:
            raise BlockPoolError("tombstones disagree with the queue")
        if len(set(free)) != len(free):
            raise BlockPoolError("a block is queued twice")
        free_set = set(free)
        counts: dict[int, int] = {}
        untracked = 0
        for b in range(self.num_blocks):
            in_free = b >= self._fresh or b in free_set
            if b >= self._fresh and (b in free_set or self._hash[b] is not None):
                raise BlockPoolError(f"never-used block {b} is queued twice or has a hash")
            if in_free == (self._ref[b] > 0) or self._ref[b] < 0:
                raise BlockPoolError(f"block {b}: ref {self._ref[b]} but in_free={in_free}")
            h = self._hash[b]
            grp = self._group[b]
            if h is None:
                if grp is not None:
                    raise BlockPoolError(f"uncached block {b} has a group")
                continue
            if grp is None:
                untracked += 1
            else:
                if self._groups.get(grp.root) is not grp:
                    raise BlockPoolError(f"block {b}: its group is not registered")
                counts[grp.root] = counts.get(grp.root, 0) + 1
            if h < 0:
                if grp is None or grp.owner is None or b not in grp.lazy:
                    raise BlockPoolError(f"lazy block {b} is not in a lazy group")
            elif self._cached.get(h) != b:
                raise BlockPoolError(f"block {b}: hash {h} not mapped back")
        if len(self._cached) != sum(1 for h in self._hash if h is not None and h >= 0):
            raise BlockPoolError("cache map and block hashes disagree")
        if untracked != self._untracked or counts != {r: g.count for r, g in self._groups.items()}:
            raise BlockPoolError("group counts disagree")
        n_cached_free = sum(1 for b in free if self._hash[b] is not None)
        if n_cached_free != self._num_cached_free:
            raise BlockPoolError(f"cached-free counter {self._num_cached_free} != {n_cached_free}")
