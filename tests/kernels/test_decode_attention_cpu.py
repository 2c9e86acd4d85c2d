"""The batched CPU path of paged decode attention (`paged_decode_attention_torch`) against the
per-sequence loop reference, on fresh random caches whose unused slots hold large garbage."""

import pytest
import torch

from inferforge.kernels import decode_attention as decode_module
from inferforge.kernels import paged_decode_attention
from inferforge.kernels.decode_attention import paged_decode_attention_torch
from inferforge.kernels.reference import paged_decode_attention_reference
from tests.kernels.test_decode_attention import FP8, paged_setup


def poisoned_setup(seq_lens, *, n_heads, n_kv, head_dim, block_size=16, dtype=torch.float32, cache_dtype=None):
    """`paged_setup`, then every cache slot no sequence reads (free blocks, the tail of a partly
    filled last block, the padding column the tables point to) set to a large finite value: a mask
    that lets one through moves the output far away. The block tables get one padding column of
    block 0 past what the longest sequence needs, as `PagedKVCache.block_tables` pads."""
    q, k, v, bt, lens, k_scale, v_scale = paged_setup(seq_lens, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                                                      block_size=block_size, dtype=dtype, cache_dtype=cache_dtype)
    used = torch.zeros(k.shape[0], block_size, dtype=torch.bool)
    for b, length in enumerate(seq_lens):
        for t in range(length):
            used[bt[b, t // block_size], t % block_size] = True
    garbage = {torch.int8: 127, FP8: 448.0}.get(k.dtype, 300.0)
    for cache, value in ((k, garbage), (v, -garbage)):
        bits = cache.view(torch.uint8) if cache.dtype == FP8 else cache   # fp8 has no masked_fill
        bits[~used] = torch.tensor(value).to(cache.dtype).view(bits.dtype) if cache.dtype == FP8 else value
    pad = torch.zeros(bt.shape[0], 1, dtype=torch.int32)
    pad[:] = int(torch.nonzero(~used.all(dim=1))[0]) if (~used.all(dim=1)).any() else 0
    return q, k, v, torch.cat([bt, pad], dim=1), lens, k_scale, v_scale


def assert_close_to_reference(q, k, v, bt, lens, k_scale=None, v_scale=None, window=None):
    """FlashAttention's rule: the error against a float64 reference is at most twice that of the
    reference computed in float32 (plus a small floor for fp16 outputs)."""
    args = dict(k_scale=k_scale, v_scale=v_scale, window=window)
    out = paged_decode_attention_torch(q, k, v, bt, lens, sm_scale=q.shape[-1] ** -0.5, **args)
    exact = paged_decode_attention_reference(q, k, v, bt, lens, compute_dtype=torch.float64, **args)
    in_float32 = paged_decode_attention_reference(q, k, v, bt, lens, **args)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    err = (out.double() - exact).abs().max().item()
    ref_err = (in_float32.double() - exact).abs().max().item()
    floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(q.dtype, 2e-3)
    assert err <= 2 * ref_err + floor, f"max error {err:.3e}, reference in float32 {ref_err:.3e}"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(8, 8), (8, 4), (8, 2), (6, 3)], ids=lambda h: f"h{h[0]}-kv{h[1]}")
@pytest.mark.parametrize("block_size", [16, 5])
def test_matches_reference(dtype, heads, block_size):
    q, k, v, bt, lens, _, _ = poisoned_setup([1, 17, 33, 130, 7], n_heads=heads[0], n_kv=heads[1], head_dim=40,
                                             block_size=block_size, dtype=dtype)
    assert_close_to_reference(q, k, v, bt, lens)


def test_float64_is_exact_to_rounding():
    q, k, v, bt, lens, _, _ = poisoned_setup([3, 64, 29], n_heads=4, n_kv=2, head_dim=16, dtype=torch.float32)
    q, k, v = q.double(), k.double(), v.double()
    out = paged_decode_attention_torch(q, k, v, bt, lens, sm_scale=0.25)
    exact = paged_decode_attention_reference(q, k, v, bt, lens, sm_scale=0.25, compute_dtype=torch.float64)
    torch.testing.assert_close(out, exact, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("window", [1, 3, 16, 100, 1000])
def test_sliding_window(window):
    q, k, v, bt, lens, _, _ = poisoned_setup([2, 20, 45, 130], n_heads=8, n_kv=2, head_dim=32, block_size=8)
    assert_close_to_reference(q, k, v, bt, lens, window=window)


@pytest.mark.parametrize("cache_dtype", [torch.int8, FP8], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_quantized_caches(cache_dtype, dtype):
    q, k, v, bt, lens, k_scale, v_scale = poisoned_setup([5, 31, 64], n_heads=8, n_kv=4, head_dim=32, dtype=dtype,
                                                         cache_dtype=cache_dtype)
    assert k.dtype == cache_dtype
    out = assert_close_to_reference(q, k, v, bt, lens, k_scale, v_scale)
    # The scales matter: doubling v's scale doubles the output.
    doubled = paged_decode_attention_torch(q, k, v, bt, lens, sm_scale=32 ** -0.5, k_scale=k_scale,
                                           v_scale=2 * v_scale)
    torch.testing.assert_close(doubled.float(), 2 * out.float(), atol=1e-2, rtol=1e-2)


def test_empty_sequences_get_zeros():
    q, k, v, bt, lens, _, _ = poisoned_setup([0, 9, 0], n_heads=4, n_kv=2, head_dim=16)
    out = assert_close_to_reference(q, k, v, bt, lens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0
    none = paged_decode_attention_torch(q, k, v, bt, torch.zeros(3, dtype=torch.int32), sm_scale=0.25)
    assert torch.equal(none, torch.zeros_like(q))
    assert paged_decode_attention_torch(q[:0], k, v, bt[:0], lens[:0], sm_scale=0.25).shape == (0, 4, 16)


@pytest.mark.reference_fallback
def test_cpu_dispatch_takes_the_batched_path(monkeypatch):
    """Without a GPU and the interpreter, the public op runs the batched path, not the loop."""
    monkeypatch.setattr(decode_module, "_INTERPRET", False)
    q, k, v, bt, lens, _, _ = poisoned_setup([9, 30, 1], n_heads=4, n_kv=2, head_dim=32)
    want = paged_decode_attention_reference(q, k, v, bt, lens)

    def loop_reference(*args, **kwargs):
        raise AssertionError("the per-sequence reference ran")

    monkeypatch.setattr("inferforge.kernels.reference.paged_decode_attention_reference", loop_reference)
    torch.testing.assert_close(paged_decode_attention(q, k, v, bt, lens), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_nan_in_slots_no_sequence_reads_stays_out(window):
    """The engine's pools are not zero-filled: unwritten slots may hold NaN, which a mask alone lets through."""
    q, k, v, bt, lens, _, _ = poisoned_setup([3, 20, 0, 45], n_heads=8, n_kv=2, head_dim=24, block_size=8)
    for cache in (k, v):
        cache[cache.abs() >= 300] = float("nan")       # exactly the garbage slots
    assert torch.isnan(k).any() and torch.isnan(v).any()
    out = assert_close_to_reference(q, k, v, bt, lens, window=window)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.reference_fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("slots", [[5, 0, 17, 40], [-1, 3, -1, 41], [-1, -1, -1, -1]], ids=str)
def test_append_kv_cpu_path_writes_the_slots_and_skips_padding(monkeypatch, dtype, slots):
    from inferforge.kernels import append_kv
    from inferforge.kernels import kv_cache as cache_module
    from inferforge.kernels.reference import append_kv_reference

    monkeypatch.setattr(cache_module, "_INTERPRET", False)
    k, v = (torch.randn(4, 3, 8, dtype=dtype) for _ in range(2))
    caches = torch.randn(2, 6, 7, 3, 8, dtype=dtype)          # 6 blocks of 7 slots, K and V
    want = caches.clone()
    mapping = torch.tensor(slots, dtype=torch.int32)
    append_kv_reference(k, v, want[0], want[1], mapping)
    append_kv(k, v, caches[0], caches[1], mapping)
    assert torch.equal(caches, want)
    for i, slot in enumerate(slots):
        if slot >= 0:
            assert torch.equal(caches[0].view(42, 3, 8)[slot], k[i]) and torch.equal(caches[1].view(42, 3, 8)[slot], v[i])


def consecutive_setup(length, *, first=2, **kwargs):
    """`poisoned_setup` for one sequence, with its blocks moved to `first, first + 1, ...` of the pool
    (as a fresh engine cache hands them out); the garbage blocks fill the rest of the pool."""
    q, k, v, bt, lens, k_scale, v_scale = poisoned_setup([length], **kwargs)
    n = -(-length // k.shape[1])
    own = bt[0, :n].long().tolist()
    others = [b for b in range(k.shape[0]) if b not in own]
    perm = torch.tensor(others[:first] + own + others[first:])
    table = torch.arange(first, first + n + 1, dtype=torch.int32)[None]   # plus one padding column
    return q, k[perm], v[perm], table, lens, k_scale, v_scale


@pytest.mark.parametrize("length", [1, 16, 17, 45])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_one_sequence_in_consecutive_blocks_reads_views_of_the_pool(monkeypatch, length, window):
    """The span path (no gather, no mask) matches the reference, never reads the NaN in the slots
    past the sequence's length, and is what runs: the gather would raise here."""
    q, k, v, bt, lens, _, _ = consecutive_setup(length, n_heads=8, n_kv=2, head_dim=24, block_size=8)
    for cache in (k, v):
        cache[cache.abs() >= 300] = float("nan")
    plan = decode_module.DecodeGather(bt, lens, 8, window=window)
    assert plan.span == (2, max(length - window, 0) if window else 0, length)

    def no_gather(*args):
        raise AssertionError("the gather path ran")

    monkeypatch.setattr(decode_module, "_gather_rows", no_gather)
    assert_close_to_reference(q, k, v, bt, lens, window=window)


@pytest.mark.parametrize("cache_dtype", [torch.int8, FP8], ids=str)
def test_consecutive_blocks_of_a_quantized_cache(cache_dtype):
    q, k, v, bt, lens, k_scale, v_scale = consecutive_setup(37, n_heads=8, n_kv=4, head_dim=32,
                                                            cache_dtype=cache_dtype)
    assert decode_module.DecodeGather(bt, lens, 16).span is not None
    assert_close_to_reference(q, k, v, bt, lens, k_scale, v_scale)


def test_scattered_or_several_sequences_take_the_gather():
    q, k, v, bt, lens, _, _ = consecutive_setup(40, n_heads=4, n_kv=2, head_dim=16, block_size=8)
    scattered = bt.clone()
    scattered[0, 1], scattered[0, 2] = bt[0, 2], bt[0, 1]
    assert decode_module.DecodeGather(scattered, lens, 8).span is None
    two = torch.cat([bt, bt])
    assert decode_module.DecodeGather(two, torch.cat([lens, lens]), 8).span is None
