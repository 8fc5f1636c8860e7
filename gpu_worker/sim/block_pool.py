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

Chunks: a lazy group's blocks need no per-block state even once freed. When a sequence whose
registrations are all still lazy releases its blocks, the ones only it holds join the free
queue as one chunk (a slice of block ids plus the positions they hold); allocation takes them
as a slice and evicts their cached positions as one range. Only materialising the group (the
first time anything could hit them) gives them per-block entries. So in the common case, a
request's blocks cost a few list slices per lifetime instead of set and dict operations per
block on tables as large as the pool.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, islice, repeat
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


@functools.cache
def _block_struct(block_size: int) -> struct.Struct:
    """The payload of hash_block_tokens: parent hash, then the block's token ids."""
    return struct.Struct(f"<Q{block_size}q")


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of token_ids (a trailing partial block is not hashed).

    Same values as chaining hash_block_tokens block by block, but the token ids are packed
    once and each block hashes a slice of that buffer (about twice as fast for long prompts).
    """
    n_tokens = len(token_ids) // block_size * block_size
    if n_tokens == 0:
        return []
    blake2b = hashlib.blake2b
    from_bytes = int.from_bytes
    p = (ROOT_PARENT_HASH if parent is None else parent) & 0xFFFFFFFFFFFFFFFF
    if n_tokens == block_size:
        # One block (a lookup needs only a prompt's first): parent and tokens packed at once.
        payload = _block_struct(block_size).pack(p, *token_ids[:block_size])
        return [from_bytes(blake2b(payload, digest_size=8).digest(), "little")]
    buf = struct.pack(f"<{n_tokens}q", *token_ids[:n_tokens])
    width = 8 * block_size
    prev = p.to_bytes(8, "little")
    out: list[int] = []
    for start in range(0, len(buf), width):
        prev = blake2b(prev + buf[start : start + width], digest_size=8).digest()
        out.append(from_bytes(prev, "little"))
    return out


class BlockPoolError(RuntimeError):
    pass


# (sequence, n) -> the sequence's chained block hashes, at least its first n. A sequence is any
# object the caller registers blocks for (the engine's requests); its content must not change.
Hasher = Callable[[Any, int], Sequence[int]]


class _Group:
    """The cached blocks of all sequences that start with the same first block (`root`)."""

    __slots__ = ("_tracked", "chunks", "count", "owner", "root", "runs")

    def __init__(self, root: int, owner: object | None) -> None:
        self.root = root
        # The only sequence with blocks in the group while it is lazy; None once materialised.
        self.owner = owner
        # Lazy registrations, not pruned on eviction (see _materialize).
        self.runs: list[_Run] = []
        # The owner's released blocks still queued without per-block state.
        self.chunks: list[_Chunk] = []
        self.count = 0  # cached blocks in the group, lazy or not
        self._tracked: _Run | None = None

    def unlink(self) -> None:
        """Drop the references back to the group's runs and chunks once it is empty (they
        point at it), so that nothing it leaves is freed only by the cyclic GC."""
        self.runs = []
        self.chunks = []
        self._tracked = None

    @property
    def tracked(self) -> _Run:
        """The run of the group's hashed (materialised) blocks."""
        if self._tracked is None:
            self._tracked = _Run(self, None, 0, [])
        return self._tracked


class _Run:
    """Blocks one sequence registered in one call: ids[i] holds the block at position start + i."""

    __slots__ = ("_pos", "grp", "ids", "pending", "seq", "start")

    def __init__(self, grp: _Group | None, seq: object, start: int, ids: Sequence[int]) -> None:
        self.grp = grp
        self.seq = seq
        self.start = start
        self.ids = ids
        self._pos: dict[int, int] | None = None
        # Registered while seq holds the blocks, which have no `_run` entries yet (see release).
        self.pending = False

    def position(self, block_id: int) -> int:
        pos = self._pos
        if pos is None:
            pos = self._pos = dict(zip(self.ids, range(self.start, self.start + len(self.ids)), strict=True))
        return pos[block_id]


# The run of blocks cached by hash alone (cache_block): their groups are unknown.
_UNTRACKED = _Run(None, None, 0, [])


class _Chunk:
    """Blocks a sequence released while all its registrations were pending, queued with no
    per-block state: the entries at absolute queue indices start .. end - 1 hold its positions
    top, top - 1, ... (a sequence frees its tail first). Positions lo .. hi - 1 are its cached
    runs, the others blank. Nothing can hit or touch them before their group is materialised
    (which turns them into per-block entries, `dead`), so allocation takes them as a slice and
    evicts them as one position range."""

    __slots__ = ("dead", "end", "grp", "hi", "lo", "runs", "seq", "start", "top")

    def __init__(
        self, grp: _Group, runs: list[_Run], start: int, end: int, top: int, lo: int, hi: int
    ) -> None:
        self.grp = grp
        self.seq = runs[0].seq
        self.runs = runs
        self.start = start
        self.end = end
        self.top = top
        self.lo = lo
        self.hi = hi
        self.dead = False

    @property
    def num_cached(self) -> int:
        """Cached blocks among the live entries."""
        return max(0, min(self.top + 1, self.hi) - self.lo)


# Event entries about a sequence's positions are written inline, four list items after one of
# these markers, rather than as an object each: the events of a run that never takes them
# (a bench) are otherwise the bulk of what the cyclic GC keeps traversing.
# Stored: _SEQ_RANGE, seq, lo, hi -- the hashes of positions lo .. hi - 1.
_SEQ_RANGE = object()
# Removed: _SEQ_DOWN, seq, top, bottom -- the hashes of positions top, top - 1, ..., bottom.
_SEQ_DOWN = object()


def _counts(runs: tuple[_Run, ...]) -> list[tuple[_Run, int]]:
    """(run, occurrences) for each distinct run, in order of first occurrence."""
    return [(run, runs.count(run)) for run in dict.fromkeys(runs)]


class BlockPool:
    """Block states: never used (id >= `_fresh`), queued (in `_queued`: ref count 0) or in use
    (ref count 1 + `_extra_refs`, which only cache hits on running blocks create). A block is
    cached when `_run` holds its registration (one dict for both, so an eviction is one pop
    per block) and `_hash` holds its hash once computed. Blocks queued in a live chunk
    (`_lazy`) are in none of these: the chunk holds their state. Sets and dicts rather than
    per-block lists let a request's blocks change state in a few C calls (set.update,
    dict.update).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True, hasher: Hasher | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._hasher = hasher
        # The free queue (vLLM's doubly linked FreeKVCacheBlockQueue): the never-used blocks as
        # a counter, `_fresh` .. num_blocks - 1, at its head (a thousand-worker fleet simulation
        # spent 5 s and gigabytes on a structure of every block per engine before the counter),
        # then `_queue[_head:]`, where freed blocks join at the tail. A touch (cache hit) takes
        # a block out of the middle by leaving a tombstone: `_tombs` counts them per block, and
        # the oldest entries of a block are its tombstones, so popping skips them. With no
        # tombstones, allocating n blocks is one slice. Indices into the queue are absolute:
        # `_queue[i]` is entry `_base + i` (the consumed front is dropped now and then).
        self._fresh = 0
        self._queue: list[int] = []
        self._head = 0
        self._base = 0
        # Runs of queue entries with no per-block state (see _Chunk), in queue order: their
        # blocks are in neither `_queued` nor `_run`. Dead chunks have per-block entries again.
        self._lazy: deque[_Chunk] = deque()
        self._lazy_live = 0  # entries in live chunks
        self._lazy_cached = 0  # cached blocks among them
        self._tombs: dict[int, int] = {}
        self._num_tombs = 0
        self._queued: set[int] = set()
        self._extra_refs: dict[int, int] = {}
        self._run: dict[int, _Run] = {}  # cached block -> its registration
        # Lazy runs whose sequence still holds their blocks: seq -> its runs, and their size.
        # Until the sequence releases them nothing can evict, hit or free those blocks one by
        # one, so their `_run` entries are written once, at release.
        self._pending: dict[object, list[_Run]] = {}
        self._num_pending = 0
        self._hash: dict[int, int] = {}  # of the cached blocks whose hash is computed
        self._cached: dict[int, int] = {}  # computed block hash -> block id
        self._num_cached_free = 0
        self._groups: dict[int, _Group] = {}  # root -> group
        # Blocks cached by hash alone (cache_block/cache_blocks): their roots are unknown, so
        # while any exist every registration is eager.
        self._untracked = 0
        # Events in order. Stored hashes are ints or _SEQ_RANGE groups; removed hashes come in
        # lists of ints and (run, block) pairs, as (runs, blocks) when all are lazy, or as
        # _SEQ_DOWN groups.
        self._stored: list[Any] = []
        self._removed: list[Any] = []
        self._all_cleared = False

    # -- counters ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocatable right now, including evictable cached ones."""
        return self.num_blocks - self._fresh + len(self._queued) + self._lazy_live

    @property
    def num_cached_unreferenced(self) -> int:
        return self._num_cached_free

    @property
    def num_used(self) -> int:
        """Blocks with ref count > 0."""
        return self._fresh - len(self._queued) - self._lazy_live

    @property
    def num_cached(self) -> int:
        """All cached blocks, referenced or not."""
        return len(self._run) + self._num_pending + self._lazy_cached

    def ref_count(self, block_id: int) -> int:
        if block_id >= self._fresh or block_id in self._queued or self._chunk_of(block_id):
            return 0
        return 1 + self._extra_refs.get(block_id, 0)

    def _chunk_of(self, block_id: int) -> _Chunk | None:
        """The live chunk queuing block_id (a scan: only for the per-block API)."""
        queue, base = self._queue, self._base
        for ch in self._lazy:
            if not ch.dead and block_id in queue[ch.start - base : ch.end - base]:
                return ch
        return None

    def block_hash(self, block_id: int) -> int | None:
        ch = self._chunk_of(block_id) if self._lazy_live else None
        if ch is not None:
            self._unchunk(ch)
        run = self._run.get(block_id)
        if run is None:
            run = next(
                (r for rs in self._pending.values() for r in rs if r.pending and block_id in r.ids), None
            )
            if run is None:
                return None
        if block_id not in self._hash:
            grp = run.grp
            assert grp is not None
            self._materialize(grp)
        return self._hash[block_id]

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
        queued, fresh = self._queued, self._fresh
        return sum(1 for b in block_ids if b in queued or b >= fresh)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache hits, pulling unreferenced ones out of the free queue."""
        queued, extra = self._queued, self._extra_refs
        for b in block_ids:
            if b >= self._fresh:
                self._materialize_fresh()
            if self._lazy_live and b not in queued and b not in self._run:
                # Only uncached blocks can be in a chunk (cache hits are materialised first).
                ch = self._chunk_of(b)
                if ch is not None:
                    self._unchunk(ch)
            if b in queued:
                queued.remove(b)
                self._tombs[b] = self._tombs.get(b, 0) + 1
                self._num_tombs += 1
                if b in self._run:
                    self._num_cached_free -= 1
            else:
                extra[b] = extra.get(b, 0) + 1

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
        if block_id in self._run:
            raise BlockPoolError(f"block {block_id} already cached")
        self._hash[block_id] = block_hash
        self._run[block_id] = _UNTRACKED
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
        block_run = self._run
        if grp.owner is seq:
            run = _Run(grp, seq, start, ids)
            run.pending = True
            pending = self._pending.get(seq)
            if pending is None:
                self._pending[seq] = [run]
            else:
                pending.append(run)
            self._num_pending += len(ids)
            grp.runs.append(run)
            grp.count += len(ids)
            self._stored += (_SEQ_RANGE, seq, start, stop)
            return
        cached, stored, hashes = self._cached, self._stored, self._hash
        tracked = grp.tracked
        n = 0
        for b, h in zip(ids, hasher(seq, stop)[start:stop], strict=True):
            if h in cached:
                continue
            if b in block_run:
                raise BlockPoolError(f"block {b} already cached")
            hashes[b] = h
            block_run[b] = tracked
            cached[h] = b
            stored.append(h)
            n += 1
        grp.count += n
        if not grp.count:
            del groups[root]
            grp.unlink()

    def _require_hasher(self) -> Hasher:
        if self._hasher is None:
            raise BlockPoolError("this pool has no hasher: register blocks with cache_block")
        return self._hasher

    def _materialize(self, grp: _Group) -> None:
        """Compute the hashes of a lazy group's blocks; it is then cached like any other."""
        for ch in grp.chunks:
            if not ch.dead:
                self._unchunk(ch)
        grp.chunks = []
        owner, runs = grp.owner, grp.runs
        grp.owner, grp.runs = None, []
        block_run = self._run
        live = [
            (b, run.start + i)
            for run in runs
            for i, b in enumerate(run.ids)
            if run.pending or block_run.get(b) is run
        ]
        for run in runs:
            if run.pending:
                # Registered now (below) rather than at release.
                run.pending = False
                self._num_pending -= len(run.ids)
        if not live:
            return
        hs = self._require_hasher()(owner, max(j for _, j in live) + 1)
        hashes, cached, tracked = self._hash, self._cached, grp.tracked
        for b, j in live:
            h = hs[j]
            hashes[b] = h
            cached[h] = b
            block_run[b] = tracked

    def _materialize_all(self) -> None:
        for grp in self._groups.values():
            if grp.owner is not None:
                self._materialize(grp)

    def _unchunk(self, ch: _Chunk) -> None:
        """Give a chunk's live blocks per-block entries, as if released one by one."""
        base = self._base
        live = self._queue[ch.start - base : ch.end - base]
        self._queued.update(live)
        block_run = self._run
        for run in ch.runs:
            k = min(len(run.ids), ch.top + 1 - run.start)
            if k > 0:
                block_run.update(zip(run.ids[:k], repeat(run)))
        self._lazy_live -= len(live)
        self._lazy_cached -= ch.num_cached
        ch.dead = True

    # -- allocation -------------------------------------------------------------------

    def _materialize_fresh(self) -> None:
        """Put the never-used blocks into `_queue` (at its head, where they are in the queue)."""
        fresh = range(self._fresh, self.num_blocks)
        self._queue = [*fresh, *self._queue[self._head :]]
        self._queued.update(fresh)
        self._base += self._head - len(fresh)
        self._head = 0
        self._fresh = self.num_blocks

    def _pop(self, n: int, stop: int) -> list[int]:
        """Up to n live per-block entries of `_queue` before index stop, removed."""
        queue, head = self._queue, self._head
        if not self._num_tombs:
            taken = queue[head : min(head + n, stop)]
            head += len(taken)
        else:
            taken = []
            tombs = self._tombs
            while len(taken) < n and head < stop:
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
        self._head = head
        self._queued.difference_update(taken)
        return taken

    def allocate(self, n: int) -> list[int]:
        lazy = self._lazy
        if lazy and self._fresh == self.num_blocks:
            # The steady state: the head of the queue is a chunk with n entries left.
            ch = lazy[0]
            head = self._head
            if not ch.dead and ch.start - self._base == head and n <= ch.end - ch.start:
                out = self._queue[head : head + n]
                head = self._head = head + n
                self._take_from_chunk(ch, n)
                if head > 4096 and 2 * head > len(self._queue):
                    del self._queue[:head]
                    self._base += head
                    self._head = 0
                return out
        if n > self.num_free:
            raise BlockPoolError(f"cannot allocate {n} blocks, {self.num_free} free")
        fresh = self._fresh
        m = min(n, self.num_blocks - fresh)
        if m > 0:
            # Never-used blocks: no hash to evict.
            out = list(range(fresh, fresh + m))
            self._fresh = fresh + m
            if m == n:
                return out
            n -= m
        else:
            out = []
        if self._lazy:
            self._pop_chunked(n, out)
        else:
            taken = self._pop(n, len(self._queue))
            self._drop_registrations(taken)
            out += taken
        head = self._head
        if head > 4096 and 2 * head > len(self._queue):
            del self._queue[:head]
            self._base += head
            self._head = 0
        return out

    def _drop_registrations(self, taken: list[int]) -> None:
        """Evict whichever of these blocks, just taken off the queue's per-block entries, are cached."""
        block_run = self._run
        if block_run:
            # One pass drops the taken blocks' registrations; None marks an uncached block.
            runs = tuple(map(block_run.pop, taken, repeat(None)))
            live = tuple(filter(None, runs))
            if live:
                self._evict(taken if len(live) == len(runs) else list(compress(taken, runs)), live)

    def _pop_chunked(self, n: int, out: list[int]) -> None:
        """Take n queue entries onto out when chunks are queued: per-block entries as _pop does,
        a chunk's as one slice whose cached positions are evicted as one range."""
        lazy, queue = self._lazy, self._queue
        while n:
            while lazy and lazy[0].dead:
                lazy.popleft()
            stop = lazy[0].start - self._base if lazy else len(queue)
            if self._head < stop:
                taken = self._pop(n, stop)
                self._drop_registrations(taken)
                out += taken
                n -= len(taken)
                continue
            ch = lazy[0]
            head = self._head
            m = min(n, ch.end - ch.start)
            out += queue[head : head + m]
            self._head = head + m
            n -= m
            self._take_from_chunk(ch, m)

    def _take_from_chunk(self, ch: _Chunk, m: int) -> None:
        """Account for the next m entries of the chunk at the queue's head, just taken:
        evict their cached positions as one range."""
        ch.start += m
        self._lazy_live -= m
        top = ch.top
        ch.top = top - m
        hi = min(top, ch.hi - 1)
        lo = max(top - m + 1, ch.lo)
        if hi >= lo:
            c = hi - lo + 1
            self._lazy_cached -= c
            self._num_cached_free -= c
            removed = self._removed
            if (
                len(removed) >= 4
                and removed[-4] is _SEQ_DOWN
                and removed[-3] is ch.seq
                and removed[-1] == hi + 1
            ):
                # The rest of the range the last eviction took (decode growth takes a few
                # blocks at a time): one entry per chunk keeps the event backlog small.
                removed[-1] = lo
            else:
                removed += (_SEQ_DOWN, ch.seq, hi, lo)
            grp = ch.grp
            grp.count -= c
            if not grp.count:
                del self._groups[grp.root]
                grp.unlink()
        if ch.start == ch.end:
            ch.dead = True
            self._lazy.popleft()

    def allocate_one(self) -> int:
        """allocate(1)[0] without the list."""
        return self.allocate(1)[0]

    def _evict(self, block_ids: list[int], runs: tuple[_Run, ...]) -> None:
        """Drop the cached hashes of blocks just taken from the free queue (in order), whose
        registrations `runs` were just removed from `_run`."""
        self._num_cached_free -= len(block_ids)
        hashes = self._hash
        if not hashes or hashes.keys().isdisjoint(block_ids):
            # All lazy (the common case when nobody shares a prefix): hashed if ever taken.
            self._removed.append((runs, block_ids))
        else:
            cached = self._cached
            removed: list[Any] = []
            for run, b in zip(runs, block_ids, strict=True):
                h = hashes.pop(b, None)
                if h is None:
                    removed.append((run, b))
                else:
                    del cached[h]
                    removed.append(h)
            self._removed.append(removed)
        groups = self._groups
        # Usually the one or two requests freed longest ago; an identity count of the first
        # settles the common single-run case without hashing every entry.
        first = runs[0]
        n_first = runs.count(first)
        per_run = ((first, n_first),) if n_first == len(runs) else _counts(runs)
        for run, n in per_run:
            grp = run.grp
            if grp is None:
                self._untracked -= n
                continue
            grp.count -= n
            if not grp.count:
                del groups[grp.root]
                grp.unlink()

    def release(self, seq: object, blocks: list[int]) -> None:
        """free(reversed(blocks)) for all the blocks seq holds. When its registrations are all
        pending and consecutive (positions lo .. hi - 1, the usual case), blocks[lo:] (only seq
        holds them) are queued as one chunk with no per-block state; the others are freed one
        by one."""
        runs = self._pending.pop(seq, None) if self._pending else None
        if not runs:
            self.free(blocks[::-1])
            return
        n = 0
        for run in runs:
            if run.pending:
                n += len(run.ids)
        lo = runs[0].start
        hi = runs[-1].start + len(runs[-1].ids)
        block_run = self._run
        chunk = n == hi - lo
        if chunk and hi < len(blocks):
            extra = self._extra_refs
            for b in blocks[hi:]:  # usually the partial last block alone
                if b in block_run or b in extra:
                    chunk = False
                    break
        if chunk:
            for run in runs:
                run.pending = False
            self._num_pending -= n
            grp = runs[0].grp
            assert grp is not None
            queue = self._queue
            start = self._base + len(queue)
            queue += blocks[: lo - 1 if lo else None : -1]
            ch = _Chunk(grp, runs, start, self._base + len(queue), len(blocks) - 1, lo, hi)
            self._lazy.append(ch)
            grp.chunks.append(ch)
            self._lazy_live += len(blocks) - lo
            self._lazy_cached += n
            self._num_cached_free += n
            if lo:
                shared = blocks[lo - 1 :: -1]
                self._free(shared, len(block_run.keys() & shared))
            return
        n_before = len(block_run)
        for run in runs:
            if run.pending:
                block_run.update(zip(run.ids, repeat(run)))
                run.pending = False
        self._num_pending -= n
        if len(block_run) != n_before + n:
            raise BlockPoolError("block already cached")
        self.free(blocks[::-1])

    def free(self, ordered_block_ids: Iterable[int]) -> None:
        """Drop one reference per block (distinct blocks). Blocks reaching zero join the free
        queue in the given order, i.e. the first one is evicted first (callers pass a request's
        blocks reversed so its tail goes before the shared prefix, as vLLM does)."""
        ids = ordered_block_ids if type(ordered_block_ids) is list else list(ordered_block_ids)
        self._free(ids, -1)

    def _free(self, ids: list[int], num_cached: int) -> None:
        """free(ids); num_cached: how many of them are cached, if known (-1: count them)."""
        if not ids:
            return
        queued, extra = self._queued, self._extra_refs
        if max(ids) >= self._fresh:
            raise BlockPoolError(f"double free of a block among {ids}")
        if extra and not extra.keys().isdisjoint(ids):
            # Some are shared with other requests: those only lose a reference.
            last_refs: list[int] = []
            for b in ids:
                r = extra.get(b)
                if r is None:
                    last_refs.append(b)
                elif r == 1:
                    del extra[b]
                else:
                    extra[b] = r - 1
            ids = last_refs
            num_cached = -1
            if not ids:
                return
        n_queued = len(queued)
        queued.update(ids)
        if len(queued) != n_queued + len(ids):
            raise BlockPoolError(f"double free of a block among {ids}")
        self._queue += ids
        self._num_cached_free += num_cached if num_cached >= 0 else len(self._run.keys() & ids)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is referenced (as in vLLM).
        Pending events are dropped: consumers clear their index on all_cleared."""
        if self.num_used:
            return False
        self._hash.clear()
        self._run.clear()
        for ch in self._lazy:
            # The entries stay queued, blank.
            ch.hi = ch.lo
            ch.runs = []
        self._lazy_cached = 0
        self._pending.clear()
        self._num_pending = 0
        for grp in self._groups.values():
            grp.unlink()
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
        it = iter(self._stored)
        for e in it:
            if e is _SEQ_RANGE:
                assert hasher is not None
                seq, lo, hi = next(it), next(it), next(it)
                out += hasher(seq, hi)[lo:hi]
            else:
                out.append(e)
        return out

    def _removed_hashes(self) -> list[int]:
        out: list[int] = []
        hasher = self._hasher
        it = iter(self._removed)
        for e in it:
            if e is _SEQ_DOWN:
                assert hasher is not None
                seq, top, bottom = next(it), next(it), next(it)
                out += hasher(seq, top + 1)[top : bottom - 1 if bottom else None : -1]
                continue
            if type(e) is tuple:
                e = list(zip(*e, strict=True))
            for x in e:
                if type(x) is int:
                    out.append(x)
                else:
                    assert hasher is not None
                    run, b = x
                    j = run.position(b)
                    out.append(hasher(run.seq, j + 1)[j])
        return out

    def check_invariants(self) -> None:
        """O(num_blocks) self-check for tests."""
        tombs = dict(self._tombs)
        free: list[int] = []
        chunked: list[int] = []
        chunks = [ch for ch in self._lazy if not ch.dead]
        head = self._base + self._head
        for ch in chunks:
            if not head <= ch.start < ch.end or ch.end - ch.start != ch.top + 1 - ch.lo:
                raise BlockPoolError("chunks out of queue order or miscounted")
            head = ch.end
        bounds = [(ch.start - self._base, ch.end - self._base) for ch in chunks]
        i = self._head
        for lo, hi in [*bounds, (len(self._queue), len(self._queue))]:
            for b in self._queue[i:lo]:
                if tombs.get(b):
                    tombs[b] -= 1
                else:
                    free.append(b)
            chunked += self._queue[lo:hi]
            i = hi
        if len(chunked) != self._lazy_live or sum(ch.num_cached for ch in chunks) != self._lazy_cached:
            raise BlockPoolError("chunk counters disagree")
        if len(set(chunked) | set(free)) != len(chunked) + len(free):
            raise BlockPoolError("a block is queued twice")
        if any(b >= self._fresh or b in self._run or b in self._extra_refs for b in chunked):
            raise BlockPoolError("a chunked block is never-used, registered or referenced")
        if any(tombs.values()) or sum(self._tombs.values()) != self._num_tombs:
            raise BlockPoolError("tombstones disagree with the queue")
        if len(set(free)) != len(free) or set(free) != self._queued:
            raise BlockPoolError("the queue and the queued set disagree")
        if any(b >= self._fresh for b in free) or any(b >= self._fresh for b in self._run):
            raise BlockPoolError("a never-used block is queued or cached")
        if any(b in self._queued or b >= self._fresh or r < 1 for b, r in self._extra_refs.items()):
            raise BlockPoolError("extra references on a block not in use")
        counts: dict[int, int] = {}
        untracked = 0
        for b in self._run:
            run = self._run[b]
            grp = run.grp
            if grp is None:
                untracked += 1
            else:
                if self._groups.get(grp.root) is not grp:
                    raise BlockPoolError(f"block {b}: its group is not registered")
                counts[grp.root] = counts.get(grp.root, 0) + 1
            h = self._hash.get(b)
            if h is None:
                if grp is None or grp.owner is None or run not in grp.runs or b not in run.ids:
                    raise BlockPoolError(f"lazy block {b} is not in a lazy group")
            elif self._cached.get(h) != b or run is not (grp.tracked if grp else _UNTRACKED):
                raise BlockPoolError(f"block {b}: hash {h} not mapped back")
        for ch in chunks:
            if ch.num_cached:
                grp = ch.grp
                if self._groups.get(grp.root) is not grp or grp.owner is not ch.seq or ch not in grp.chunks:
                    raise BlockPoolError("a chunk with cached blocks is not in its lazy group")
                counts[grp.root] = counts.get(grp.root, 0) + ch.num_cached
        num_pending = 0
        for seq, runs in self._pending.items():
            for run in runs:
                if not run.pending:
                    continue
                grp = run.grp
                if grp is None or grp.owner is not seq or run not in grp.runs or run.seq is not seq:
                    raise BlockPoolError("a pending run is not in its sequence's lazy group")
                for b in run.ids:
                    if b in self._run or b in self._queued or b >= self._fresh or b in self._hash:
                        raise BlockPoolError(f"pending block {b} is registered, free or hashed")
                num_pending += len(run.ids)
                counts[grp.root] = counts.get(grp.root, 0) + len(run.ids)
        if num_pending != self._num_pending:
            raise BlockPoolError(f"pending counter {self._num_pending} != {num_pending}")
        if len(self._cached) != len(self._hash) or not self._run.keys() >= self._hash.keys():
            raise BlockPoolError("cache map and block hashes disagree")
        if untracked != self._untracked or counts != {r: g.count for r, g in self._groups.items()}:
            raise BlockPoolError("group counts disagree")
        n_cached_free = len(self._queued & self._run.keys()) + self._lazy_cached
        if n_cached_free != self._num_cached_free:
            raise BlockPoolError(f"cached-free counter {self._num_cached_free} != {n_cached_free}")
