"""Block manager: growth per chunk, free/abort, prefix caching (chained hashes, the len-1 cap,
LRU reuse), and a hypothesis run of random operations that must never leak or double-free."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragged.block_manager import BlockManager
from ragged.sampling import SamplingParams
from ragged.sequence import Sequence

_ids = iter(range(10**9))


def seq(tokens):
    return Sequence(f"s{next(_ids)}", list(tokens), SamplingParams(), 0, 0.0, 0)


def grow(bm, s, n):
    """What a step does: slots for n tokens, compute them, name the full blocks."""
    assert bm.ensure_slots(s, n)
    s.num_computed_tokens += n
    bm.commit(s)


def test_blocks_grow_per_chunk_not_reserved():
    bm = BlockManager(10, 4)
    s = seq(range(3, 13))                      # 10 tokens
    assert bm.ensure_slots(s, 3) and len(s.block_table) == 1
    s.num_computed_tokens = 3
    assert bm.ensure_slots(s, 1) and len(s.block_table) == 1      # fills the first block
    s.num_computed_tokens = 4
    assert bm.ensure_slots(s, 5) and len(s.block_table) == 3
    assert bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 10 and s.block_table == []
    bm.check()


def test_all_or_nothing_when_out_of_blocks():
    bm = BlockManager(3, 4)
    a, b = seq(range(8)), seq(range(8))
    assert bm.ensure_slots(a, 8)
    assert not bm.ensure_slots(b, 8)           # needs 2, one is free
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.check()


def test_double_free_asserts():
    bm = BlockManager(4, 4)
    a = seq(range(5))
    assert bm.ensure_slots(a, 5)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table                      # a stale table freed again
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a)


def test_prefix_hit_chained_and_capped():
    bm = BlockManager(16, 4)
    prompt = list(range(10, 22))               # 12 tokens = 3 full blocks
    a = seq(prompt)
    grow(bm, a, 12)
    # Same 12 tokens: at most 11 may come from the cache -> 2 full blocks.
    b = seq(prompt)
    assert bm.allocate_prefix(b) == 8 and b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == 8
    # A different first block breaks the chain even though block 2 matches.
    c = seq([99] + prompt[1:] + [5])
    assert bm.allocate_prefix(c) == 0
    # A longer prompt with the same prefix hits all three blocks.
    d = seq(prompt + [7])
    assert bm.allocate_prefix(d) == 12 and d.block_table == a.block_table
    assert bm.ref_count[a.block_table[0]] == 3
    for s in (a, b, c, d):
        bm.free(s)
    assert bm.num_free_blocks == 16
    bm.check()


def test_chunk_ending_mid_block_leaves_that_block_unhashed():
    """A prefill chunk that ends inside a block: only the blocks before it are named. The
    partial block's prompt tokens are known, but its later slots hold no KV yet, so a hash of
    it would let another sequence reuse KV that was never written."""
    bm = BlockManager(16, 4)
    prompt = list(range(20, 33))               # 13 tokens: blocks 0-2 full, block 3 partial
    a = seq(prompt)
    grow(bm, a, 6)                             # chunk 1 ends at slot 2 of block 1
    assert len(a.block_hashes) == 1
    assert bm._hash[a.block_table[0]] is not None and bm._hash[a.block_table[1]] is None
    twin = seq(prompt)                         # same prompt, admitted now: block 0 only
    assert bm.allocate_prefix(twin) == 4 and twin.block_table == a.block_table[:1]
    grow(bm, a, 5)                             # chunk 2 ends at slot 3 of block 2 (11 tokens)
    assert len(a.block_hashes) == 2 and bm._hash[a.block_table[2]] is None
    late = seq(prompt)
    assert bm.allocate_prefix(late) == 8 and late.block_table == a.block_table[:2]
    grow(bm, a, 2)                             # the whole prompt: block 2 full, block 3 not
    assert len(a.block_hashes) == 3 and bm._hash[a.block_table[3]] is None
    for s in (a, twin, late):
        bm.free(s)
    bm.check()


def test_freed_cached_blocks_are_free_reused_and_evicted_last():
    bm = BlockManager(4, 4)
    a = seq(range(3, 11))                      # 2 full blocks
    grow(bm, a, 8)
    cached = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4             # cached but unreferenced counts as free
    # A newcomer with other tokens takes the two never-cached blocks first...
    x = seq(range(50, 58))
    assert bm.ensure_slots(x, 8) and not set(x.block_table) & set(cached)
    # ...so the prefix is still there for a repeat of a.
    y = seq(list(range(3, 11)) + [1])
    assert bm.allocate_prefix(y) == 8 and y.block_table == cached
    bm.free(y)
    bm.free(x)
    # Now a big allocation must evict cached blocks; the hash index stays consistent.
    z = seq(range(100, 116))
    assert bm.ensure_slots(z, 16) and bm.num_free_blocks == 0
    bm.check()
    bm.free(z)
    w = seq(list(range(3, 11)) + [1])
    assert bm.allocate_prefix(w) == 0          # evicted
    bm.check()


def test_prefix_caching_off():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = seq(range(9))
    grow(bm, a, 9)
    b = seq(range(9))
    assert bm.allocate_prefix(b) == 0
    bm.free(a)
    assert bm.num_free_blocks == 8
    bm.check()


def test_identical_prefixes_computed_concurrently():
    """Two sequences compute the same block in the same step: one block gets the name, the
    other is freed plainly; neither leaks."""
    bm = BlockManager(8, 4)
    a, b = seq(range(3, 11)), seq(range(3, 11))
    grow(bm, a, 8)
    grow(bm, b, 8)
    assert a.block_table != b.block_table
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check()


@settings()   # profile (tests/conftest.py): "ci" 80 derandomized examples, "dev" 800
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(1, 9)),
                    min_size=1, max_size=60),
       num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]),
       caching=st.booleans())
def test_random_operations_never_leak(ops, num_blocks, block_size, caching):
    """Random admissions (with prefix lookups), growth, and frees over a tiny vocabulary so
    prefixes collide often: invariants hold after every operation, and freeing every live
    sequence returns every block."""
    bm = BlockManager(num_blocks, block_size, caching)
    live: list[Sequence] = []
    for op, pick, n in ops:
        if op == 0 or not live:                              # admit
            s = seq([3 + (pick + i) % 2 for i in range(n)])
            bm.allocate_prefix(s)
            assert s.num_computed_tokens < s.num_tokens
            live.append(s)
        elif op == 1:                                        # compute a chunk
            s = live[pick % len(live)]
            k = min(n, s.num_remaining)
            if k and bm.ensure_slots(s, k):
                s.num_computed_tokens += k
                bm.commit(s)
                if s.num_remaining == 0:
                    s.token_ids.append(3 + pick % 2)         # a decode's sampled token
        else:                                                # finish / abort / preempt
            s = live.pop(pick % len(live))
            bm.free(s)
        used = sum(len(s.block_table) for s in live)
        assert bm.num_free_blocks >= bm.num_blocks - used   # shared blocks counted once
        bm.check()
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == num_blocks
    assert all(r == 0 for r in bm.ref_count)
    bm.check()
