"""Fused per-token activation quantization against its torch reference, and the quantized linear layers
that use it on a GPU (native fp8 `_scaled_mm`, W8A8 through the int8 kernel)."""

import pytest
import torch

from inferforge.kernels import _checks, quantize_rows
from inferforge.kernels.reference import quantize_rows_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="native fp8 and the fp8 kernel path need a CUDA GPU "
                                                        "(the interpreter rounds float32 -> fp8 wrongly)")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_checks, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, k", [(1, 17), (5, 255), (3, 1000), (0, 64)])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_rows_match_the_reference_exactly(dtype, m, k, smooth):
    x = torch.randn(m, k, device=DEVICE).mul(torch.rand(k, device=DEVICE) * 8).to(dtype)
    if m:
        x[0, k // 2] = 0.5 * x[0].abs().max()               # exact ties of round-half-even occur in real data too
    divisor = torch.rand(k, device=DEVICE) + 0.5 if smooth else None
    q, scale = quantize_rows(x, torch.int8, divisor=divisor)
    # The reference runs on the CPU: torch on CUDA divides by a Python scalar with a reciprocal
    # multiply, one ulp away from the true quotient that the kernel and torch on the CPU compute.
    q_ref, scale_ref = quantize_rows_reference(x.cpu(), torch.int8, divisor=None if divisor is None else divisor.cpu())
    assert q.dtype == torch.int8 and q.shape == (m, k) and scale.shape == (m,)
    torch.testing.assert_close(scale.cpu(), scale_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu(), q_ref)
    if m:
        assert q.abs().max() == 127                        # each row's largest element maps to +-127


def test_round_half_even_on_exact_ties():
    # Scale 1 (row max 127): x / scale lands exactly on .5 values, rounded to the even neighbour.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], device=DEVICE)
    q, scale = quantize_rows(x, torch.int8)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]


@pytest.mark.parametrize("m", [1, 7, 300])
def test_int8_per_tensor_scale(m):
    x = torch.randn(m, 96, device=DEVICE)
    x[m // 2, 5] = 40.0                                   # the tensor's maximum sits in one row
    q, scale = quantize_rows(x, torch.int8, per_tensor=True)
    q_ref, scale_ref = quantize_rows_reference(x.cpu(), torch.int8, per_tensor=True)
    assert scale.shape == (1,) and scale.item() == scale_ref.item() == pytest.approx(40.0 / 127)
    assert torch.equal(q.cpu(), q_ref)


def test_bad_inputs():
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype must be torch.int8 or torch.float8_e4m3fn"):
        quantize_rows(x, torch.float16)
    with pytest.raises(ValueError, match=r"divisor must be float32 \[32\]"):
        quantize_rows(x, divisor=torch.ones(31, device=DEVICE))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        quantize_rows(x[0])
    with pytest.raises(ValueError, match="one-element float32"):
        quantize_rows(x, scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="either scale .* or per_tensor=True"):
        quantize_rows(x, scale=torch.ones(1, device=DEVICE), per_tensor=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_rows_match_torch_casts(dtype, per_tensor):
    x = torch.randn(37, 300, device=DEVICE, dtype=dtype) * 5
    q, s = quantize_rows(x, torch.float8_e4m3fn, per_tensor=per_tensor)
    q_ref, s_ref = quantize_rows_reference(x.cpu(), torch.float8_e4m3fn, per_tensor=per_tensor)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    if per_tensor:                                     # the same scale given as a static one: same values
        static, _ = quantize_rows(x, torch.float8_e4m3fn, scale=s_ref.to(DEVICE))
        assert torch.equal(static.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_fp8_linear_matches_the_emulation(granularity, dtype):
    from inferforge.optimize.quantize import FP8Linear, quantize_fp8

    w = torch.randn(96, 128, device=DEVICE)
    wf, ws = quantize_fp8(w, granularity)
    layer = FP8Linear(wf, ws, torch.randn(96, device=DEVICE), granularity)
    x = torch.randn(2, 33, 128, device=DEVICE, dtype=dtype)
    assert FP8Linear.native_available(x.device)
    got = layer(x)
    cpu = FP8Linear(wf.cpu(), ws.cpu(), layer.bias.cpu(), granularity)
    want = cpu(x.cpu().float()).to(dtype)                  # the exact emulation, float32 accumulation
    assert got.shape == (2, 33, 96) and got.dtype == dtype
    rel = (got.float().cpu() - want.float()).norm() / want.float().norm()
    assert rel < 1e-2, f"native fp8 vs emulation: relative error {rel:.2e}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_w8a8_linear_on_gpu_matches_cpu(dtype):
    from inferforge.optimize.quantize import W8A8Linear

    n, k = 80, 160
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale, smooth = torch.rand(n) * 0.01, torch.rand(k) + 0.5
    cpu = W8A8Linear(q, scale, smooth, torch.randn(n))
    gpu = W8A8Linear(q.cuda(), scale.cuda(), smooth.cuda(), cpu.bias.cuda())
    x = torch.randn(19, k, dtype=dtype)
    want = cpu(x.float())
    got = gpu(x.cuda()).float().cpu()
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-2, f"W8A8 GPU vs CPU: relative error {rel:.2e}"
