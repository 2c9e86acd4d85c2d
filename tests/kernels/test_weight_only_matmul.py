"""w8a16 and w4a16 matmuls against the dequantize-then-matmul reference (interpreter on CPU)."""

import pytest
import torch

from inferforge.kernels import w4a16_matmul, w8a16_matmul
from inferforge.kernels.reference import pack_int4, unpack_int4, weight_only_matmul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


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
    assert torch.equal(ones, (x.long() @ w.long().T).float())     # the int32 accumulation is exact
