"""w8a16 and w4a16 matmuls against the dequantize-then-matmul reference (interpreter on CPU)."""

import pytest
import torch

from inferforge.kernels import _checks, w4a16_matmul, w8a16_matmul
from inferforge.kernels.reference import (
    dequantize_weight_only_reference,
    pack_int4,
    unpack_int4,
    weight_only_matmul_reference,
)
from inferforge.kernels.weight_only_matmul import TileConfig, _candidates, _run, dequantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel-written buffer starts as NaN (floats) or the most negative integer."""
    monkeypatch.setattr(_checks, "POISON_OUTPUTS", True)


def close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = want.float().abs().max().item() + 1e-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} vs output scale {scale:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("split_k", [1, 3, None])
def test_w8a16(dtype, m, split_k):
    n, k = 80, 160
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scale = torch.rand(n, device=DEVICE) * 0.02
    bias = torch.randn(n, dtype=dtype, device=DEVICE)
    got = w8a16_matmul(x, w, scale, bias, split_k=split_k)
    assert got.shape == (m, n) and got.dtype == dtype
    close(got, weight_only_matmul_reference(x.double(), w, scale.double(), None, bias.double(), bits=8, group_size=k), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, group", [(1, 32), (16, 64), (33, 128)])
def test_w4a16(dtype, m, group):
    n, k = 48, 256
    q = torch.randint(0, 16, (n, k), device=DEVICE)
    packed = pack_int4(q)
    scales = torch.rand(n, k // group, device=DEVICE) * 0.1
    zeros = torch.rand(n, k // group, device=DEVICE) * 15
    x = torch.randn(2, m, k, dtype=dtype, device=DEVICE)          # extra leading dimension
    got = w4a16_matmul(x, packed, scales, zeros, group_size=group, split_k=2)
    assert got.shape == (2, m, n)
    want = weight_only_matmul_reference(x.double(), packed, scales.double(), zeros.double(), None, bits=4,
                                        group_size=group)
    close(got, want, dtype)


def _int4_case(n, k, group, m, dtype):
    packed = pack_int4(torch.randint(0, 16, (n, k), device=DEVICE))
    scales = torch.rand(n, k // group, device=DEVICE) * 0.1
    zeros = torch.rand(n, k // group, device=DEVICE) * 15
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    bias = torch.randn(n, dtype=dtype, device=DEVICE)
    want = weight_only_matmul_reference(x.double(), packed, scales.double(), zeros.double(), bias.double(), bits=4,
                                        group_size=group)
    return x, packed, scales, zeros, bias, want


@pytest.mark.parametrize("split_k", [1, 2, None])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w4a16_bias_with_and_without_split(m, split_k):
    x, packed, scales, zeros, bias, want = _int4_case(72, 192, 64, m, torch.float16)
    got = w4a16_matmul(x, packed, scales, zeros, bias, group_size=64, split_k=split_k)
    close(got, want, torch.float16)


@pytest.mark.parametrize("cfg", [TileConfig(1, 32, 32), TileConfig(16, 32, 32), TileConfig(32, 64, 32),
                                 TileConfig(0, 32, 32, dequantize_first=True)], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_every_tile_shape_computes_the_same_function(cfg, bits):
    # The GPU tuner may pick any of these; each must be right, including BLOCK_M = 1 (the FMA path) at M > 1.
    m, n, k, group = 5, 40, 128, 32
    if bits == 4:
        x, w, scales, zeros, bias, want = _int4_case(n, k, group, m, torch.float16)
    else:
        x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
        scales, zeros, group = torch.rand(n, device=DEVICE) * 0.02, None, k
        bias = torch.randn(n, dtype=torch.float16, device=DEVICE)
        want = weight_only_matmul_reference(x.double(), w, scales.double(), None, bias.double(), bits=8, group_size=k)
    for split_k in (1, 3):
        got = _run(x, w, scales, zeros, bias, n=n, k=k, bits=bits, group=group, cfg=cfg, split_k=split_k)
        close(got, want, torch.float16)


def test_tuner_candidates_respect_the_group():
    for m in (1, 8, 64, 512):
        for cfg in _candidates(m, 4, 64):
            assert cfg.block_k <= 64 and 64 % cfg.block_k == 0
        assert _candidates(m, 8, 4096)
        # Dequantize-then-cuBLAS competes only where the tensor cores have work (M > 16).
        assert any(c.dequantize_first for c in _candidates(m, 4, 128)) == (m > 16)


@pytest.mark.parametrize("bits, k, group", [(8, 100, 100), (4, 192, 64), (4, 256, 32)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_matches_the_reference(bits, k, group, dtype):
    n = 70
    if bits == 8:
        w, scales, zeros = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE), torch.rand(n, device=DEVICE), None
    else:
        w = pack_int4(torch.randint(0, 16, (n, k), device=DEVICE))
        scales, zeros = torch.rand(n, k // group, device=DEVICE), torch.rand(n, k // group, device=DEVICE) * 15
    got = dequantize(w, scales, zeros, bits=bits, group=group, dtype=dtype, k=k)
    want = dequantize_weight_only_reference(w, scales, zeros, bits=bits, group_size=group).to(dtype)
    assert got.shape == (n, k) and got.dtype == dtype
    assert torch.equal(got, want)               # one float32 multiply per weight, then one rounding


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(torch.tensor([[1, 2]])).item() == 0x21


def test_bad_inputs():
    x = torch.randn(2, 64, dtype=torch.float16, device=DEVICE)
    w = torch.zeros(8, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be int8"):
        w8a16_matmul(x, w.float(), torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="x's last dimension must be in_features=64, got 32"):
        w8a16_matmul(x[:, :32], w, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match=r"scale must be float32 \[8\]"):
        w8a16_matmul(x, w, torch.ones(4, device=DEVICE))
    packed = torch.zeros(8, 32, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match=r"in_features \(64\) must be a multiple of group_size \(128\)"):
        w4a16_matmul(x, packed, torch.ones(8, 1, device=DEVICE), torch.ones(8, 1, device=DEVICE), group_size=128)
    with pytest.raises(ValueError, match=r"scales must be contiguous float32 \[8, 2\]"):
        w4a16_matmul(x, packed, torch.ones(8, 3, device=DEVICE), torch.ones(8, 2, device=DEVICE), group_size=32)


@pytest.mark.parametrize("m, n, k", [(1, 40, 96), (33, 64, 160), (70, 17, 64)])
def test_int8_matmul_is_exact_before_scaling(m, n, k):
    from inferforge.kernels import int8_matmul
    from inferforge.kernels.reference import int8_matmul_reference

    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEVICE)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    xs, ws = torch.rand(m, device=DEVICE) * 0.01, torch.rand(n, device=DEVICE) * 0.01
    bias = torch.randn(n, device=DEVICE)
    got = int8_matmul(x, w, xs, ws, bias, out_dtype=torch.float32)
    torch.testing.assert_close(got, int8_matmul_reference(x, w, xs, ws, bias, out_dtype=torch.float32), rtol=1e-6, atol=1e-5)
    ones = int8_matmul(x, w, torch.ones(m, device=DEVICE), torch.ones(n, device=DEVICE), out_dtype=torch.float32)
    assert torch.equal(ones.cpu(), (x.cpu().long() @ w.cpu().long().T).float())   # the int32 accumulation is exact


def test_tuning_reads_weight_copies_beyond_l2(monkeypatch):
    from types import SimpleNamespace

    from inferforge.kernels import weight_only_matmul as wom

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=1000))
    w = torch.randint(-127, 128, (10, 30), dtype=torch.int8)               # 300 bytes: 7 copies read 2100 >= 2 x L2
    copies = wom._weights_beyond_l2(w, "cuda")
    assert len(copies) == 7 and copies[0] is w
    assert all(torch.equal(c, w) and c.data_ptr() != w.data_ptr() for c in copies[1:])
    big = torch.zeros(5000, dtype=torch.int8)
    assert wom._weights_beyond_l2(big, "cuda") == [big]                   # larger than L2 already: no copies
