"""The per-step shortcuts of the CPU forward pass give the same numbers as the ops they replace:
one RoPE call for q and k, the fused float32 RMSNorm, K/V row writes checked once per step, and a
decode gather built once for every layer."""

import pytest
import torch

from inferforge.kernels import kv_cache as cache_module
from inferforge.kernels.decode_attention import DecodeGather, paged_decode_attention_torch
from inferforge.kernels.kv_cache import append_kv, cpu_row_write_slots, write_kv_rows
from inferforge.kernels.reference import paged_decode_attention_reference
from inferforge.runtime.llama import apply_rope, rms_norm, rope_tables, rotate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotate_equals_apply_rope_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    tokens, heads, d = 7, 5, 32
    x = torch.randn(tokens, heads, d, generator=g).to(dtype)
    positions = torch.randint(0, 5000, (tokens,), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    want = apply_rope(x, freqs.cos(), freqs.sin())
    got = rotate(x, *rope_tables(positions, inv_freq))
    assert got.dtype == dtype and torch.equal(got, want)


def test_fused_float32_rms_norm_equals_the_formula():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 96, generator=g), torch.randn(96, generator=g)
    want = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w
    assert torch.equal(rms_norm(x, w, 1e-6), want)


@pytest.fixture
def cpu_path(monkeypatch):
    monkeypatch.setattr(cache_module, "_INTERPRET", False)


def test_row_writes_equal_append_kv(cpu_path):
    g = torch.Generator().manual_seed(2)
    pools = [torch.randn(6, 4, 2, 8, generator=g) for _ in range(2)]
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([3, 17, 4, 23, 0])
    want = [p.clone() for p in pools]
    append_kv(k, v, *want, slots)
    rows = cpu_row_write_slots(slots, *pools, torch.float32)
    write_kv_rows(k, v, *pools, rows)
    assert torch.equal(pools[0], want[0]) and torch.equal(pools[1], want[1])


@pytest.mark.parametrize("case", ["padding", "out of range", "other dtype", "int8 cache"])
def test_row_writes_leave_the_unusual_cases_to_append_kv(cpu_path, case):
    pools = [torch.zeros(6, 4, 2, 8) for _ in range(2)]
    slots, dtype = torch.tensor([3, 5]), torch.float32
    if case == "padding":
        slots = torch.tensor([3, -1])
    elif case == "out of range":
        slots = torch.tensor([3, 24])
    elif case == "other dtype":
        dtype = torch.float16
    else:
        pools = [torch.zeros(6, 4, 2, 8, dtype=torch.int8) for _ in range(2)]
    assert cpu_row_write_slots(slots, *pools, dtype) is None


def test_a_decode_gather_built_once_serves_every_layer():
    g = torch.Generator().manual_seed(3)
    block_size, n_kv, d = 4, 2, 16
    tables = torch.tensor([[5, 2, 7], [1, 0, 0], [3, 6, 4]], dtype=torch.int32)
    lens = torch.tensor([11, 3, 9], dtype=torch.int32)
    gather = DecodeGather(tables, lens, block_size, window=6)
    for _ in range(3):     # three "layers", each with its own pools and queries
        q = torch.randn(3, 4, d, generator=g)
        kc, vc = torch.randn(8, block_size, n_kv, d, generator=g), torch.randn(8, block_size, n_kv, d, generator=g)
        alone = paged_decode_attention_torch(q, kc, vc, tables, lens, sm_scale=0.25, window=6)
        got = paged_decode_attention_torch(q, kc, vc, tables, lens, sm_scale=0.25, gather=gather)
        assert torch.equal(got, alone)
        # ... and both are the per-sequence reference with the window (64-bit, so the tolerance is tight).
        want = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), tables, lens, sm_scale=0.25,
                                                window=6, compute_dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
