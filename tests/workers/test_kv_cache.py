"""The block pool, the two-group KV cache manager and the prefix cache, on their own (no model)."""

import pytest

from model.config import CHUNKED, FULL, preset
from workers.kv_cache import NO_BLOCK, BlockPool, KVCacheManager, plan_num_blocks
from workers.request import Request
from workers.sampling_params import SamplingParams

CONFIG = preset("debug")  # chunk 8; layers 0,2 chunked, 1,3 full


def manager(blocks=64, block_size=4, **kw):
    return KVCacheManager(CONFIG, {CHUNKED: blocks, FULL: blocks}, block_size, {CHUNKED: 1, FULL: 1}, **kw)


def request(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(), max_tokens=100)


def advance(kv, req, n):
    assert kv.allocate(req, n)
    req.computed(n)
    kv.after_step(req)


def test_pool_refcounts_and_lru_eviction():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.num_free == 2 and pool.refs[a] == 1
    pool.register(a, b"ha")
    pool.acquire_cached(a)
    pool.release(a)
    assert pool.refs[a] == 1 and pool.num_free == 2
    pool.release(a)
    pool.release(b)
    assert list(pool.free)[-2:] == [a, b]  # released last, evicted last
    assert pool.cached[b"ha"] == a  # a free block keeps its content until reused
    got = pool.allocate(3)
    assert a in got and b"ha" not in pool.cached and pool.hash_of[a] is None


def test_slots_address_blocks_and_offsets():
    kv = manager(block_size=4)
    req = request(range(10))
    kv.admit(req)
    assert kv.allocate(req, 10)
    s = kv.slots(req, 10)
    table = kv.seqs["r"].tables[FULL]
    start, slots = s.slots[FULL]
    assert start == 0 and slots.tolist() == [table[p // 4] * 4 + p % 4 for p in range(10)]


def test_chunked_blocks_behind_the_window_are_released():
    kv = manager(block_size=3)  # chunk 8, blocks of 3: blocks straddle chunk boundaries
    req = request(range(20))
    kv.admit(req)
    advance(kv, req, 7)  # next position 7: window 0
    assert kv.seqs["r"].tables[CHUNKED].count(NO_BLOCK) == 0
    advance(kv, req, 2)  # next position 9: window 8 -> blocks 0,1 ([0,6)) go, block 2 ([6,9)) stays
    assert kv.seqs["r"].tables[CHUNKED][:3] == [NO_BLOCK, NO_BLOCK, kv.seqs["r"].tables[CHUNKED][2]]
    assert kv.seqs["r"].tables[CHUNKED][2] != NO_BLOCK
    assert NO_BLOCK not in kv.seqs["r"].tables[FULL]
    assert kv.allocate(req, 3)
    start, slots = kv.slots(req, 3).slots[CHUNKED]
    assert start == 8 and len(slots) == 12 - 8
    assert kv.stats().chunked_bytes_saved == 2
    kv.free("r")
    assert kv.pools[CHUNKED].num_used == 0 and kv.pools[FULL].num_used == 0


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(CONFIG, {CHUNKED: 64, FULL: 3}, 4, {CHUNKED: 1, FULL: 1})
    req = request(range(20))
    kv.admit(req)
    assert not kv.allocate(req, 13)  # needs 4 full blocks, 3 exist
    assert kv.pools[CHUNKED].num_used == 0 and kv.pools[FULL].num_used == 0
    assert kv.allocate(req, 12)


def test_hash_chain_names_content_and_position():
    kv = manager(block_size=4)
    a, b, c = request(range(13), "a"), request(range(13), "b"), request([99] + list(range(1, 13)), "c")
    for r in (a, b, c):
        kv.admit(r)
    ha, hb, hc = (kv.seqs[r].hashes for r in "abc")
    assert ha == hb and len(ha) == 3  # (13 - 1) // 4 full blocks may hit
    assert all(x != y for x, y in zip(ha, hc))  # a different first token changes every later block


def test_prefix_hit_and_its_limits():
    kv = manager(block_size=4)
    first = request(range(30), "first")
    kv.admit(first)
    advance(kv, first, 30)
    kv.free("first")
    # same 21 tokens: 5 blocks may hit (the last token is always computed), window(20)=16 -> chunked
    # blocks 4 must be cached (it is: freed blocks keep their content)
    again = request(range(21), "again")
    assert kv.admit(again) == 20
    assert kv.seqs["again"].tables[CHUNKED][:4] == [NO_BLOCK] * 4
    assert kv.pools[FULL].refs[kv.seqs["again"].tables[FULL][0]] == 1
    kv.free("again")
    off = manager(block_size=4, enable_prefix_caching=False)
    r = request(range(21))
    assert off.admit(r) == 0


def test_prefix_hit_without_chunked_blocks_falls_back_to_chunk_boundary():
    kv = manager(block_size=4)
    first = request(range(30), "first")
    kv.admit(first)
    advance(kv, first, 30)
    kv.free("first")
    chunked = kv.pools[CHUNKED]
    for h in list(chunked.cached):  # evict every chunked block
        block = chunked.cached.pop(h)
        chunked.hash_of[block] = None
    assert kv.admit(request(range(21), "x")) == 16  # chunk boundary: no chunked keys needed
    assert kv.admit(request(range(15), "y")) == 8


def test_plan_gives_the_chunked_group_one_window_per_sequence():
    num, per_block = plan_num_blocks(CONFIG, 10_000_000, 16, 4, max_num_seqs=4, max_num_batched_tokens=64)
    assert per_block[CHUNKED] == 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 heads, dim 16
    assert num[CHUNKED] == 4 * (1 + 1) + 4 + 4
    assert num[FULL] * per_block[FULL] <= 10_000_000 - num[CHUNKED] * per_block[CHUNKED]
    same, _ = plan_num_blocks(CONFIG, 10_000_000, 16, 4, 4, 64, free_chunked_blocks=False)
    assert same[CHUNKED] == same[FULL]


@pytest.mark.parametrize("block_size", [3, 4, 8, 5])
def test_memory_of_chunked_group_is_bounded_while_full_grows(block_size):
    kv = manager(blocks=200, block_size=block_size)
    req = request(range(2))
    kv.admit(req)
    advance(kv, req, 2)
    peak = 0
    for _ in range(150):
        req.tokens.append(1)
        advance(kv, req, 1)
        peak = max(peak, kv.pools[CHUNKED].num_used)
    assert peak <= -(-8 // block_size) + 1
    assert kv.pools[FULL].num_used == -(-152 // block_size)
