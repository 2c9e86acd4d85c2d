"""The paged KV cache's allocator: block tables, slots, prefix sharing, copy-on-write, exhaustion."""

import pytest
import torch

from inferforge.kernels import OutOfBlocks, PagedKVCache, append_kv, paged_decode_attention
from inferforge.kernels.reference import attention_reference


def make_cache(**kwargs):
    defaults = dict(num_layers=2, num_blocks=12, n_kv_heads=2, head_dim=32, block_size=4, dtype=torch.float32)
    return PagedKVCache(**{**defaults, **kwargs})


def test_slots_follow_the_block_table():
    cache = make_cache()
    assert cache.add_sequence("a", [1, 2, 3, 4, 5, 6]) == 0
    slots = cache.slots("a", 6)
    table = cache.block_table("a")
    assert len(table) == 2 and cache.num_free_blocks == 10
    assert slots.tolist() == [table[0] * 4 + i for i in range(4)] + [table[1] * 4 + i for i in range(2)]
    more = cache.slots("a", 3)                          # fills block 1, then opens block 2
    assert more.tolist() == [table[1] * 4 + 2, table[1] * 4 + 3, cache.block_table("a")[2] * 4]
    assert cache.seq_len("a") == 9


def test_free_returns_every_block():
    cache = make_cache()
    for name in "abc":
        cache.add_sequence(name, list(range(7)))
        cache.slots(name, 7)
    assert cache.num_free_blocks == 12 - 6
    for name in "abc":
        cache.free(name)
    assert cache.num_free_blocks == 12


def test_out_of_blocks_is_a_clear_error():
    cache = make_cache(num_blocks=2)
    cache.add_sequence("a", [0] * 8)
    cache.slots("a", 8)
    cache.add_sequence("b", [1])
    with pytest.raises(OutOfBlocks, match="needs 1 more blocks of 4 tokens, 0 are free"):
        cache.slots("b", 1)


def test_prefix_sharing_reuses_computed_blocks_only():
    cache = make_cache()
    prompt = list(range(10))                             # 2 full blocks + 2 tokens
    cache.add_sequence("a", prompt)
    cache.slots("a", len(prompt))
    assert cache.add_sequence("early", prompt) == 0      # a's K/V not written yet: nothing to share
    cache.mark_computed("a")
    shared = cache.add_sequence("b", prompt[:8] + [99, 98, 97])
    assert shared == 8
    assert cache.block_table("b") == cache.block_table("a")[:2]
    assert [cache.ref_count(blk) for blk in cache.block_table("a")] == [2, 2, 1]
    cache.slots("b", 3)                                  # b's own tokens go to a new block
    assert cache.block_table("b")[2] != cache.block_table("a")[2]
    cache.free("a")
    assert [cache.ref_count(blk) for blk in cache.block_table("b")] == [1, 1, 1]


def test_prompt_that_is_exactly_shared_keeps_its_last_block_unshared():
    cache = make_cache()
    cache.add_sequence("a", list(range(8)))
    cache.slots("a", 8)
    cache.mark_computed("a")
    assert cache.add_sequence("b", list(range(8))) == 4   # the last prompt token's block is recomputed


def test_fork_copies_on_the_first_divergent_write():
    cache = make_cache()
    cache.add_sequence("a", list(range(6)))
    slots = cache.slots("a", 6)
    k = torch.randn(6, 2, 32)
    for layer in range(2):
        append_kv(k, k, cache.k_pools[layer], cache.v_pools[layer], slots)
    cache.fork("a", "b")
    shared_last = cache.block_table("a")[1]
    assert cache.ref_count(shared_last) == 2
    new_slot = cache.slots("b", 1)
    b_last = cache.block_table("b")[1]
    assert b_last != shared_last and cache.ref_count(shared_last) == 1
    assert int(new_slot) == b_last * 4 + 2
    for pool in (*cache.k_pools, *cache.v_pools):        # the copy carries the tokens written so far
        assert torch.equal(pool[b_last, :2], pool[shared_last, :2])


def test_decode_over_the_cache_equals_attention_over_contiguous_kv():
    """End to end: write three sequences token by token, then decode against dense attention."""
    torch.manual_seed(0)
    cache = make_cache(num_layers=1, num_blocks=40, n_kv_heads=2, head_dim=32, block_size=4, dtype=torch.float16)
    lengths = {"x": 5, "y": 17, "z": 30}
    kv = {}
    for name, n in lengths.items():
        cache.add_sequence(name, list(range(n)))
        k, v = torch.randn(n, 2, 32, dtype=torch.float16), torch.randn(n, 2, 32, dtype=torch.float16)
        for t in range(n):   # one token at a time, interleaving the sequences' blocks in the pool
            append_kv(k[t:t + 1], v[t:t + 1], cache.k_pools[0], cache.v_pools[0], cache.slots(name, 1))
        kv[name] = (k, v)
    names = list(lengths)
    q = torch.randn(3, 8, 32, dtype=torch.float16)
    out = paged_decode_attention(q, cache.k_pools[0], cache.v_pools[0], cache.block_tables(names),
                                 cache.seq_lens(names), num_splits=2)
    for i, name in enumerate(names):
        k, v = kv[name]
        want = attention_reference(q[i][None, None], k[None], v[None])[0, 0]
        torch.testing.assert_close(out[i], want, atol=2e-3, rtol=2e-3)


def test_quantized_cache_has_per_layer_head_scales():
    cache = make_cache(dtype="int8")
    assert cache.k_pools[0].dtype == torch.int8 and cache.k_scales.shape == (2, 2)
    with pytest.raises(ValueError, match=r"k_scales and v_scales must be \[num_layers=2, n_kv_heads=2\]"):
        make_cache(dtype="fp8", k_scales=torch.ones(3))
    with pytest.raises(ValueError, match="dtype must be one of fp16, bf16, fp32, fp8, int8"):
        make_cache(dtype="int4")


def test_a_freed_sequences_blocks_go_to_the_next_in_order():
    """After a free, the next sequence gets consecutive ascending blocks again (the CPU decode path
    reads one sequence's consecutive blocks without a gather)."""
    cache = PagedKVCache(num_layers=1, num_blocks=12, n_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)
    cache.add_sequence("a", list(range(10)), share=False)
    cache.slots("a", 10)
    assert cache.block_table("a") == [0, 1, 2]
    cache.free("a")
    cache.add_sequence("b", list(range(20)), share=False)
    cache.slots("b", 20)
    assert cache.block_table("b") == [0, 1, 2, 3, 4]
