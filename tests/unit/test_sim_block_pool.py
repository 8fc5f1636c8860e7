"""Paged KV block pool: hashing, prefix hits, ref counts, LRU eviction and KV events."""

from __future__ import annotations

import pytest

from gpu_worker.sim import BlockPool, BlockPoolError, block_hashes, hash_block_tokens


def test_block_hashes_chain_and_skip_partial_block() -> None:
    tokens = list(range(40))
    hs = block_hashes(tokens, 16)
    assert len(hs) == 2
    assert hs[0] == hash_block_tokens(None, tokens[:16])
    assert hs[1] == hash_block_tokens(hs[0], tokens[16:32])
    # Same block content under a different parent hashes differently.
    assert hash_block_tokens(None, tokens[16:32]) != hs[1]
    # Stable value (blake2b), pinned so a change of hash function is noticed.
    assert hash_block_tokens(None, [1, 2, 3]) == hash_block_tokens(None, [1, 2, 3])
    assert 0 <= hs[0] < 2**64
    # A single block (packed with its parent in one go) chains the same way, from any parent.
    for parent in (None, hs[0], 2**64 - 1):
        assert block_hashes(tokens[16:33], 16, parent) == [hash_block_tokens(parent, tokens[16:32])]
        assert block_hashes(range(16, 32), 16, parent) == [hash_block_tokens(parent, tokens[16:32])]


def test_allocate_free_counts() -> None:
    pool = BlockPool(8)
    a = pool.allocate(3)
    assert (pool.num_used, pool.num_free, pool.num_cached_unreferenced) == (3, 5, 0)
    with pytest.raises(BlockPoolError):
        pool.allocate(6)
    pool.free(reversed(a))
    assert (pool.num_used, pool.num_free) == (0, 8)
    with pytest.raises(BlockPoolError, match="double free"):
        pool.free([a[0]])
    pool.check_invariants()


def test_prefix_hit_touch_and_shared_refs() -> None:
    pool = BlockPool(8)
    hs = block_hashes(list(range(48)), 16)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, hs, strict=True):
        assert pool.cache_block(b, h)
    assert pool.take_events().stored == hs
    # Longest cached prefix only: a different second block stops the match.
    other = block_hashes([*range(16), *range(100, 132)], 16)
    assert pool.get_computed_blocks(other) == blocks[:1]
    assert pool.get_computed_blocks(hs) == blocks
    # A second request shares the blocks while the first still runs.
    pool.touch(blocks)
    assert pool.ref_count(blocks[0]) == 2 and pool.num_used == 3
    pool.free(reversed(blocks))
    assert pool.num_used == 3
    pool.free(reversed(blocks))
    assert (pool.num_used, pool.num_cached_unreferenced) == (0, 3)
    # Unreferenced cached blocks are taken back out of the free queue on a hit.
    hits = pool.get_computed_blocks(hs)
    assert pool.num_evictable_among(hits) == 3
    pool.touch(hits)
    assert (pool.num_used, pool.num_cached_unreferenced, pool.num_free) == (3, 0, 5)
    pool.check_invariants()


def test_lru_eviction_order_tail_first_and_oldest_first() -> None:
    pool = BlockPool(6)
    seq_a = block_hashes(list(range(48)), 16)
    seq_b = block_hashes(list(range(1000, 1048)), 16)
    a = pool.allocate(3)
    b = pool.allocate(3)
    for blk, h in zip(a + b, seq_a + seq_b, strict=True):
        pool.cache_block(blk, h)
    pool.take_events()
    pool.free(reversed(a))  # request A finishes first: its blocks are older
    pool.free(reversed(b))
    assert pool.num_cached_unreferenced == 6
    pool.allocate(2)
    # A's tail goes first, then the block before it; A's first block survives.
    assert pool.take_events().removed == [seq_a[2], seq_a[1]]
    assert pool.get_computed_blocks(seq_a) == [a[0]]
    pool.allocate(2)
    assert pool.take_events().removed == [seq_a[0], seq_b[2]]
    assert pool.get_computed_blocks(seq_b) == b[:2]
    pool.check_invariants()


def test_touch_refreshes_recency() -> None:
    pool = BlockPool(4)
    hs = block_hashes(list(range(64)), 16)
    blocks = pool.allocate(4)
    for blk, h in zip(blocks, hs, strict=True):
        pool.cache_block(blk, h)
    pool.free([blocks[0]])
    pool.free([blocks[1]])
    pool.touch([blocks[0]])  # reused: no longer the oldest free block
    pool.free([blocks[0]])
    pool.take_events()
    pool.allocate(1)
    assert pool.take_events().removed == [hs[1]]


def test_duplicate_hash_is_not_double_registered() -> None:
    pool = BlockPool(4)
    h = block_hashes(list(range(16)), 16)[0]
    x, y = pool.allocate(2)
    assert pool.cache_block(x, h)
    assert not pool.cache_block(y, h)
    pool.free([y, x])
    assert pool.num_cached_unreferenced == 1
    pool.check_invariants()


def test_caching_disabled() -> None:
    pool = BlockPool(4, enable_caching=False)
    (b,) = pool.allocate(1)
    assert not pool.cache_block(b, 123)
    assert pool.get_computed_blocks([123]) == []
    assert not pool.take_events()


def test_reset_prefix_cache() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.cache_block(b, 5)
    assert not pool.reset_prefix_cache()
    pool.free([b])
    assert pool.reset_prefix_cache()
    events = pool.take_events()
    assert events.all_cleared and not events.stored
    assert pool.get_computed_blocks([5]) == []
    pool.check_invariants()


def test_lazy_never_used_blocks_keep_the_queue_order() -> None:
    """The never-used blocks are a counter, not dict entries: allocation order (the LRU order)
    is still that of one queue 0..n-1 with freed blocks joining at the tail."""
    import random
    from collections import OrderedDict

    rng = random.Random(3)
    for caching in (True, False):
        pool = BlockPool(40, enable_caching=caching)
        queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(40))  # the reference
        held: list[int] = []
        next_hash = 1
        for _ in range(400):
            op = rng.random()
            if op < 0.45 and pool.num_free:
                n = rng.randint(1, min(5, pool.num_free))
                got = pool.allocate(n) if n > 1 or rng.random() < 0.5 else [pool.allocate_one()]
                want = [queue.popitem(last=False)[0] for _ in range(n)]
                assert got == want
                held.extend(got)
            elif op < 0.8 and held:
                rng.shuffle(held)
                k = rng.randint(1, len(held))
                out, held = held[:k], held[k:]
                if caching:
                    for b in out:
                        if pool.block_hash(b) is None and rng.random() < 0.5:
                            pool.cache_block(b, next_hash)
                            next_hash += 1
                pool.free(out)
                for b in out:
                    queue[b] = None
            else:
                # A touch of a queued block (a cache hit), never-used ones included.
                b = rng.randrange(40)
                if pool.ref_count(b) == 0:
                    pool.touch([b])
                    del queue[b]
                    held.append(b)
            assert pool.num_free == len(queue)
            pool.check_invariants()


def test_chunks_taken_whole_drop_the_consumed_queue_front() -> None:
    """Sequences released as chunks and allocated again chunk by chunk: the queue's consumed
    front is dropped along the way and the evictions are the released sequences' hashes."""
    seqs = [tuple(range(i * 10**6, i * 10**6 + 300)) for i in range(40)]

    def hasher(seq: tuple[int, ...], n: int) -> list[int]:
        return block_hashes(seq[:n], 1)

    pool = BlockPool(600, hasher=hasher)
    for i, seq in enumerate(seqs):
        blocks = pool.allocate(300)
        pool.cache_seq_blocks(seq, blocks, 0, 300)
        pool.release(seq, blocks)
        pool.check_invariants()
        assert pool.num_free == 600 and pool.num_cached == min(i + 1, 2) * 300
        events = pool.take_events()
        assert events.stored == hasher(seq, 300)
        # The allocation evicted the sequence released two rounds earlier, tail first.
        assert events.removed == (hasher(seqs[i - 2], 300)[::-1] if i >= 2 else [])
    assert pool._base > 0
