"""flash_attention against the PyTorch reference: odd shapes, GQA, masks, varlen, strides, bad input.

On CPU the Triton kernel runs in Triton's interpreter (fp16 and fp32; the interpreter's bf16 dot is
wrong); on a GPU the same tests run compiled, bf16 included.
"""

import math

import pytest
import torch

from inferforge.kernels import attention as attention_module
from inferforge.kernels import attention_reference, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (the interpreter's bf16 dot is wrong)")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Allocate kernel outputs full of NaN so any element the kernel fails to write fails the test."""
    def nan_empty(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(attention_module, "_empty", nan_empty)


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def assert_close_to_reference(q, k, v, **kwargs):
    """FlashAttention's rule: error against float64 at most twice that of the reference computed in
    the input dtype, plus a small floor. Also checks the LSE and that -inf rows agree."""
    out, lse = flash_attention(q, k, v, return_lse=True, **kwargs)
    exact, exact_lse = attention_reference(q, k, v, return_lse=True, compute_dtype=torch.float64, **kwargs)
    same_dtype = attention_reference(q, k, v, compute_dtype=q.dtype if q.dtype != torch.bfloat16 else torch.float32,
                                     **kwargs)
    if q.dtype == torch.bfloat16:
        same_dtype = same_dtype.to(torch.bfloat16)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "unwritten or NaN output elements"
    err = (out.double() - exact).abs().max().item() if out.numel() else 0.0
    ref_err = (same_dtype.double() - exact).abs().max().item() if out.numel() else 0.0
    floor = 1e-5 if q.dtype == torch.float32 else 1e-3
    assert err <= 2 * ref_err + floor, f"max error {err:.3e} vs reference-in-dtype error {ref_err:.3e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(exact_lse)), "rows without visible keys differ"
    finite = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse[finite], exact_lse[finite], atol=2e-3 if q.dtype != torch.float32 else 1e-5,
                               rtol=1e-3)
    return out, lse


# (batch, seq_q, seq_k, n_heads, n_kv_heads, head_dim)
SHAPES = [
    (1, 1, 1, 8, 8, 32),
    (2, 17, 17, 8, 2, 80),
    (1, 128, 128, 8, 1, 64),
    (3, 33, 70, 4, 2, 128),      # seq_q < seq_k (chunk of a longer context)
    (2, 70, 33, 4, 4, 64),       # seq_q > seq_k: causal leaves the first rows without keys
    (1, 1, 255, 8, 2, 64),       # decode-like single query
    (1, 255, 255, 8, 2, 32),
    (2, 5, 9, 2, 1, 96),
    (1, 20, 20, 2, 2, 256),
    (1, 9, 9, 2, 1, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-q{}-k{}-h{}-kv{}-d{}".format(*s))
def test_matches_reference(shape, causal, dtype):
    b, sq, sk, h, hk, d = shape
    assert_close_to_reference(rand(b, sq, h, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype),
                              rand(b, sk, hk, d, dtype=dtype), causal=causal)


@pytest.mark.parametrize("window", [(8, 0), (4, 4), (-1, 3), (16, -1), (0, 0)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqs", [(50, 50), (20, 61), (61, 20)], ids=lambda s: f"q{s[0]}-k{s[1]}")
def test_sliding_window(window, causal, seqs):
    sq, sk = seqs
    dtype = torch.float16
    assert_close_to_reference(rand(2, sq, 4, 64, dtype=dtype), rand(2, sk, 2, 64, dtype=dtype),
                              rand(2, sk, 2, 64, dtype=dtype), causal=causal, window=window)


def test_rows_that_see_no_key_are_zero():
    q, k, v = rand(1, 40, 2, 32, dtype=torch.float32), rand(1, 8, 2, 32, dtype=torch.float32), rand(1, 8, 2, 32, dtype=torch.float32)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :32], torch.zeros_like(out[:, :32]))          # rows 0..31 sit before key 0
    assert torch.isinf(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 32:]).all()
    assert (out[:, 32:].abs().sum(-1) > 0).all()


def test_custom_scale():
    q, k, v = (rand(1, 17, 2, 64, dtype=torch.float32) for _ in range(3))
    out, _ = assert_close_to_reference(q, k, v, sm_scale=0.3)
    default = flash_attention(q, k, v)
    assert not torch.allclose(out, default)
    torch.testing.assert_close(flash_attention(q, k, v, sm_scale=1 / math.sqrt(64)), default)


def _varlen(lens_q, lens_k, h, hk, d, dtype):
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa: E731
    q = rand(sum(lens_q), h, d, dtype=dtype)
    k, v = rand(sum(lens_k), hk, d, dtype=dtype), rand(sum(lens_k), hk, d, dtype=dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_with_uneven_and_zero_lengths(causal, dtype):
    q, k, v, cu_q, cu_k = _varlen([17, 0, 40, 1, 5], [17, 3, 70, 9, 0], 8, 2, 64, dtype)
    out, lse = assert_close_to_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (8, q.shape[0])
    assert torch.equal(out[58:63], torch.zeros_like(out[58:63]))   # the last sequence has no keys


def test_varlen_with_window_and_max_seqlen():
    q, k, v, cu_q, cu_k = _varlen([30, 12], [30, 50], 4, 4, 80, torch.float16)
    assert_close_to_reference(q, k, v, causal=True, window=(7, 0), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=30, max_seqlen_k=50)


def test_varlen_equals_padded_batch():
    q, k, v = (rand(2, 24, 4, 32, dtype=torch.float32) for _ in range(3))
    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=DEVICE)
    packed = flash_attention(q.reshape(48, 4, 32), k.reshape(48, 4, 32), v.reshape(48, 4, 32), causal=True,
                             cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(packed.reshape(2, 24, 4, 32), flash_attention(q, k, v, causal=True))


def test_non_contiguous_inputs():
    # q as a transposed [batch, heads, seq, dim] view; k and v as slices of one packed kv tensor.
    q = rand(2, 8, 19, 64, dtype=torch.float16).transpose(1, 2)
    kv = rand(2, 23, 2, 2, 64, dtype=torch.float16)
    k, v = kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    out, _ = assert_close_to_reference(q, k, v, causal=True)
    torch.testing.assert_close(out, flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))


@pytest.mark.gpu
@gpu_only
def test_bf16_long_sequence_gpu():
    assert_close_to_reference(rand(2, 1000, 16, 128, dtype=torch.bfloat16), rand(2, 1000, 4, 128, dtype=torch.bfloat16),
                              rand(2, 1000, 4, 128, dtype=torch.bfloat16), causal=True)


@pytest.mark.reference_fallback
def test_reference_runs_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(attention_module, "_INTERPRET", False)
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    if q.is_cuda:
        pytest.skip("CPU dispatch only")
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True),
                               rtol=0, atol=0)


def test_works_under_torch_compile_without_graph_breaks():
    q, k, v = (rand(1, 17, 4, 32, dtype=torch.float32) for _ in range(3))

    def layer(q, k, v):
        return flash_attention(q * 2, k, v, causal=True).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))


# ---------------------------------------------------------------------------------------------- bad input

def _qkv(b=1, s=4, h=4, hk=2, d=32, dtype=torch.float16):
    return rand(b, s, h, d, dtype=dtype), rand(b, s, hk, d, dtype=dtype), rand(b, s, hk, d, dtype=dtype)


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v: (q[0], k, v), r"q must have 4 dimensions \[batch, seq_q, n_heads, head_dim\], got shape \(4, 4, 32\)"),
    (lambda q, k, v: (q, k.float(), v), "q, k, v must have the same dtype"),
    (lambda q, k, v: (q.int(), k, v), "q must be one of float16, bfloat16, float32, got int32"),
    (lambda q, k, v: (q, k.to("meta"), v), "q, k, v must have the same device"),
    (lambda q, k, v: (q[:, :, :3], k, v), r"n_heads \(3\) must be a multiple of n_kv_heads \(2\)"),
    (lambda q, k, v: (q, k, v[:, :3]), "k and v must have the same shape"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16]), "q and k must have the same head_dim, got 32 and 16"),
    (lambda q, k, v: (torch.cat([q, q], -1)[..., ::2], k, v), r"q must be contiguous in its last dimension .*q.contiguous\(\)"),
])
def test_bad_input_messages(mutate, message):
    q, k, v = mutate(*_qkv())
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v)


def test_head_dim_over_256():
    with pytest.raises(ValueError, match="head_dim must be between 1 and 256, got 288"):
        flash_attention(*_qkv(d=288))


def test_batch_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same batch size"):
        flash_attention(q.expand(2, -1, -1, -1), k, v)


def test_bad_window():
    with pytest.raises(ValueError, match=r"window must be \(left, right\)"):
        flash_attention(*_qkv(), window=(-2, 0))


@pytest.mark.parametrize("cu_q, cu_k, message", [
    ([0, 4, 8], None, "must be given together"),
    ([0.0, 4.0, 8.0], [0, 4, 8], "cu_seqlens_q must be a 1-D int32 tensor"),
    ([1, 4, 8], [0, 4, 8], "cu_seqlens_q must start at 0, never decrease, and end at the total length 8"),
    ([0, 6, 4, 8], [0, 2, 4, 8], "never decrease"),
    ([0, 4, 8], [0, 4, 7], "cu_seqlens_k must start at 0, never decrease, and end at the total length 8"),
    ([0, 4, 8], [0, 2, 4, 8], "must both have batch \\+ 1 entries"),
])
def test_bad_cu_seqlens(cu_q, cu_k, message):
    q, k, v = rand(8, 4, 32, dtype=torch.float16), rand(8, 2, 32, dtype=torch.float16), rand(8, 2, 32, dtype=torch.float16)

    def as_tensor(x):
        if x is None:
            return None
        return torch.tensor(x, device=DEVICE, dtype=torch.float32 if isinstance(x[0], float) else torch.int32)

    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, cu_seqlens_q=as_tensor(cu_q), cu_seqlens_k=as_tensor(cu_k))


def test_max_seqlen_too_small():
    q, k, v, cu_q, cu_k = _varlen([5, 9], [5, 9], 2, 2, 16, torch.float16)
    with pytest.raises(ValueError, match=r"max_seqlen_q \(4\) is smaller than the longest query sequence"):
        flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=9)


# ---------------------------------------------------------------------------------------------- TMA path

@pytest.mark.parametrize("tma", ["on", "off"])
@pytest.mark.parametrize("case", ["gqa-d80-causal", "varlen-window", "cross-lengths"])
def test_descriptor_and_pointer_paths_agree_with_reference(monkeypatch, tma, case):
    """The tensor-descriptor (TMA) loads and the masked pointer loads both match the reference."""
    monkeypatch.setattr(attention_module, "_TMA_MODE", tma)
    dtype = torch.float16
    if case == "gqa-d80-causal":
        assert_close_to_reference(rand(2, 37, 8, 80, dtype=dtype), rand(2, 37, 2, 80, dtype=dtype),
                                  rand(2, 37, 2, 80, dtype=dtype), causal=True)
    elif case == "varlen-window":
        q, k, v, cu_q, cu_k = _varlen([21, 0, 9], [40, 5, 9], 4, 1, 64, dtype)
        assert_close_to_reference(q, k, v, causal=True, window=(6, 0), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        assert_close_to_reference(rand(1, 50, 4, 128, dtype=dtype), rand(1, 19, 4, 128, dtype=dtype),
                                  rand(1, 19, 4, 128, dtype=dtype), causal=False)


def test_tma_layout_check():
    base = torch.zeros(2, 16, 4, 64, dtype=torch.float16, device=DEVICE)
    assert attention_module._tma_layout_ok(base)
    assert not attention_module._tma_layout_ok(base[..., 1:])            # base address off by 2 bytes
    assert not attention_module._tma_layout_ok(torch.zeros(2, 16, 3, 12, dtype=torch.float16, device=DEVICE)[..., :5])


def _config(bm, bn, warps, stages):
    import triton

    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def test_autotune_pruning_fits_head_dim_256_and_pins_one_config(monkeypatch):
    configs = [_config(128, 128, 4, 3), _config(128, 128, 8, 3), _config(128, 64, 8, 3), _config(64, 64, 4, 2),
               _config(64, 64, 4, 3)]
    monkeypatch.setattr(attention_module, "_FIXED_CONFIG", False)
    kept = attention_module._prune(configs, {}, BLOCK_D=128)
    assert configs[0] not in kept and len(kept) == 4                    # 128x128 needs 8 warps
    assert attention_module._prune(configs, {}, BLOCK_D=256) == [configs[3]]   # only 64x64, 2 stages fits
    monkeypatch.setattr(attention_module, "_FIXED_CONFIG", True)
    assert attention_module._prune(configs, {}, BLOCK_D=64) == [configs[1]]
    assert attention_module._prune(configs, {}, BLOCK_D=256) == [configs[3]]


def test_pruning_follows_the_compile_report(monkeypatch):
    """128-row tiles with 4 warps spill on sm_90; fp32 (ieee dot) gets only its 32-row, 8-warp tiles
    (kernels/compile_report.py measured both; tests/kernels/test_compile_report.py guards them)."""
    fp32_tiles = [_config(32, 32, 8, 1), _config(32, 16, 8, 1)]
    configs = [_config(128, 64, 4, 2), _config(128, 64, 8, 2), _config(64, 64, 4, 2), *fp32_tiles]
    monkeypatch.setattr(attention_module, "_FIXED_CONFIG", False)
    assert attention_module._prune(configs, {}, BLOCK_D=128, DOT_PRECISION="tf32") == configs[1:3]
    assert attention_module._prune(configs, {}, BLOCK_D=128, DOT_PRECISION="ieee") == fp32_tiles
    assert attention_module._prune(configs, {}, BLOCK_D=256, DOT_PRECISION="ieee") == fp32_tiles[1:]
    monkeypatch.setattr(attention_module, "_FIXED_CONFIG", True)
    assert attention_module._prune(configs, {}, BLOCK_D=128, DOT_PRECISION="ieee") == fp32_tiles[:1]


# ---------------------------------------------------------------------------------------------- paged KV (chunked prefill)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 8])
def test_paged_chunked_prefill_matches_reference(dtype, page_size):
    """New chunks (5, 17, 1, 0 tokens) attend to their cached prefix plus themselves, through block tables."""
    n_kv, h, d = 2, 8, 64
    chunks, contexts = [5, 17, 1, 0], [40, 17, 70, 9]           # context = cached prefix + chunk
    num_blocks = 40
    k_cache = rand(num_blocks, page_size, n_kv, d, dtype=dtype)
    v_cache = rand(num_blocks, page_size, n_kv, d, dtype=dtype)
    max_blocks = max(-(-c // page_size) for c in contexts)
    block_table = torch.randperm(num_blocks, device=DEVICE)[:4 * max_blocks].reshape(4, max_blocks).to(torch.int32)
    q = rand(sum(chunks), h, d, dtype=dtype)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa: E731
    kwargs = dict(causal=True, cu_seqlens_q=cu(chunks), cu_seqlens_k=cu(contexts), block_table=block_table)
    assert_close_to_reference(q, k_cache, v_cache, **kwargs)
    # Same result as the packed (unpaged) path on the gathered keys.
    gathered_k = torch.cat([k_cache[block_table[b, :-(-n // page_size)].long()].reshape(-1, n_kv, d)[:n]
                            for b, n in enumerate(contexts)])
    gathered_v = torch.cat([v_cache[block_table[b, :-(-n // page_size)].long()].reshape(-1, n_kv, d)[:n]
                            for b, n in enumerate(contexts)])
    torch.testing.assert_close(flash_attention(q, k_cache, v_cache, **kwargs),
                               flash_attention(q, gathered_k, gathered_v, causal=True, cu_seqlens_q=cu(chunks),
                                               cu_seqlens_k=cu(contexts)))


def test_paged_input_errors():
    q = rand(4, 2, 32, dtype=torch.float16)
    k_cache = rand(3, 16, 2, 32, dtype=torch.float16)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table needs variable-length input"):
        flash_attention(q[None], k_cache[:1], k_cache[:1], block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table must be an int32 tensor \[batch=1, max_blocks\]"):
        flash_attention(q, k_cache, k_cache, cu_seqlens_q=cu, cu_seqlens_k=cu,
                        block_table=torch.zeros(1, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"exceeds block_table's capacity \(max_blocks \* page_size = 16\)"):
        flash_attention(q, k_cache, k_cache, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 20], dtype=torch.int32),
                        block_table=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))
