"""PyTorch's packed CPU kernels behind the quantized modules (kernels/cpu_packed.py) against float
references: the dequantized weights times x, in float64, on fresh random inputs and odd shapes.

The packed weight-only kernels take bfloat16 activations, so each case checks two things: the output
equals, to bfloat16 output rounding, the float64 product of the *same* bfloat16-rounded inputs (this
pins the weight layout and the scale / zero-point conversion exactly), and its SQNR against the
float32-input reference is far above the quantization's own (~40 dB for int8 per channel)."""

import pytest
import torch

from inferforge.kernels import cpu_packed
from inferforge.kernels.cpu_packed import Int4PackedCPU, int4_scales_and_zeros, int8_linear_cpu, packed_for
from inferforge.kernels.reference import int8_matmul_reference, pack_int4
from inferforge.optimize.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear, W8A8Linear, sqnr_db
from inferforge.runtime.llama_quantized import fused_projection

BF16_OUT = 2.0 ** -7        # bf16 output rounding (2^-9 relative) with headroom, relative to max |out|


@pytest.fixture(autouse=True)
def packed_on_cpu(monkeypatch):
    # The tests run under TRITON_INTERPRET=1, where the modules take the Triton kernels; use the packed path.
    monkeypatch.setattr(cpu_packed, "_INTERPRET", False)
    monkeypatch.delenv("INFERFORGE_CPU_PACKED", raising=False)


def _bf16(t):
    return t.to(torch.bfloat16).double()


def _check(out, exact_same_inputs, reference):
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    scale = exact_same_inputs.abs().max()
    assert (out.double() - exact_same_inputs).abs().max() <= BF16_OUT * scale
    assert sqnr_db(reference, out) > 45.0


def _int8_module(n, k, bias):
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.02 + 1e-3
    return Int8WeightOnlyLinear(weight, scale, torch.randn(n) if bias else None)


def _int4_module(n, k, group, *, symmetric=False, awq=False, bias=False):
    codes = torch.randint(0, 16, (n, k))
    scales = torch.rand(n, k // group) * 0.05 + 1e-3
    zeros = torch.full_like(scales, 8.0) if symmetric else torch.randint(0, 16, (n, k // group)).float()
    input_scale = torch.rand(k) * 2 + 0.25 if awq else None
    return Int4WeightOnlyLinear(pack_int4(codes), scales, zeros, torch.randn(n) if bias else None, group, input_scale)


@pytest.mark.parametrize("n,k", [(37, 100), (5, 33), (48, 1024)])
@pytest.mark.parametrize("m", [1, 3, 8, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_packed_matches_the_dequantized_weights(n, k, m, bias):
    module = _int8_module(n, k, bias)
    x = torch.randn(m, k)
    out = module(x)
    assert isinstance(packed_for(module), cpu_packed.Int8PackedCPU)
    b = module.bias.double() if bias else 0.0
    same = _bf16(x) @ (module.weight_int8.double() * _bf16(module.scale)[:, None]).T + b
    reference = x.double() @ module.dequantized_weight().double().T + b
    _check(out, same, reference)


def _int4_same_inputs(module, x):
    # torch's convention on the bf16 parameters: w = (q - 8) * scale + (8 - zero) * scale.
    from inferforge.kernels.reference import unpack_int4

    g = module.group_size
    sz = int4_scales_and_zeros(module.scales, module.zeros).double()          # [groups, N, 2]
    scale, zero_t = sz[..., 0].T.repeat_interleave(g, 1), sz[..., 1].T.repeat_interleave(g, 1)
    w = (unpack_int4(module.packed).double() - 8) * scale + zero_t
    x = x.double() / module.input_scale.double() if module.input_scale is not None else x
    return _bf16(x.float()) @ w.T + (module.bias.double() if module.bias is not None else 0.0)


@pytest.mark.parametrize("n,k,group", [(37, 96, 32), (5, 192, 64), (16, 384, 128), (33, 256, 256), (20, 1024, 512)])
@pytest.mark.parametrize("m", [1, 3, 8, 33])
def test_int4_packed_matches_the_dequantized_weights(n, k, group, m):
    module = _int4_module(n, k, group, bias=m == 3)
    x = torch.randn(m, k)
    out = module(x)
    assert isinstance(packed_for(module), Int4PackedCPU) and out.shape == (m, n)
    reference = x.double() @ module.dequantized_weight().double().T
    reference = reference + (module.bias.double() if module.bias is not None else 0.0)
    _check(out, _int4_same_inputs(module, x), reference)


@pytest.mark.parametrize("symmetric,awq", [(True, False), (False, True)])
def test_int4_packed_symmetric_and_awq_input_scale(symmetric, awq):
    module = _int4_module(29, 160, 32, symmetric=symmetric, awq=awq, bias=True)
    x = torch.randn(2, 7, 160)                   # leading dimensions are kept
    out = module(x)
    assert out.shape == (2, 7, 29)
    reference = x.double() @ module.dequantized_weight().double().T + module.bias.double()
    _check(out.reshape(14, 29), _int4_same_inputs(module, x.reshape(14, 160)), reference.reshape(14, 29))


def test_int4_group_16_keeps_the_reference_path():
    module = _int4_module(7, 64, 16)
    assert packed_for(module) is None
    x = torch.randn(3, 64)
    torch.testing.assert_close(module(x).double(), x.double() @ module.dequantized_weight().double().T,
                               rtol=1e-5, atol=1e-5)


def test_the_packed_form_follows_changed_buffers():
    module = _int4_module(16, 64, 32)
    x = torch.randn(1, 64)
    first = module(x)
    other = _int4_module(16, 64, 32)
    module.load_state_dict(other.state_dict())           # in-place copies: the packed form is rebuilt
    out = module(x)
    assert not torch.allclose(first, out)
    _check(out, _int4_same_inputs(module, x), x.double() @ module.dequantized_weight().double().T)
    assert "_cpu_packed" not in module.state_dict()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_fused_qkv_projection_packed(kind, m):
    k = 96
    make = (lambda n: _int8_module(n, k, False)) if kind == "int8" else (lambda n: _int4_module(n, k, 32))
    parts = [make(48), make(16), make(16)]          # q | k | v
    fused, bias = fused_projection(parts, [None] * 3)
    assert bias is None and type(fused) is type(parts[0]) and "_cpu_packed" in fused.__dict__   # packed at fusing
    x = torch.randn(m, k)
    out = fused(x)
    weight = torch.cat([p.dequantized_weight() for p in parts]).double()
    same = torch.cat([_int4_same_inputs(p, x) if kind == "int4" else
                      _bf16(x) @ (p.weight_int8.double() * _bf16(p.scale)[:, None]).T for p in parts], dim=-1)
    _check(out, same, x.double() @ weight.T)


@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (3, 5, 33), (8, 64, 256)])
def test_w8a8_int_mm_matches_the_integer_reference(m, n, k):
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    x_scale, w_scale, bias = torch.rand(m) * 0.01, torch.rand(n) * 0.01, torch.randn(n)
    out = int8_linear_cpu(x_q, w_q, x_scale, w_scale, bias, out_dtype=torch.float32)
    want = int8_matmul_reference(x_q, w_q, x_scale, w_scale, bias, out_dtype=torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_w8a8_module_on_the_packed_path_matches_the_previous_path(monkeypatch):
    module = W8A8Linear(torch.randint(-127, 128, (21, 80), dtype=torch.int8), torch.rand(21) * 0.01,
                        torch.rand(80) + 0.5, torch.randn(21))
    x = torch.randn(3, 80)
    out = module(x)
    monkeypatch.setenv("INFERFORGE_CPU_PACKED", "0")      # the previous path (here the Triton interpreter's)
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
