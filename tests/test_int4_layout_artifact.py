"""The int4 layout recorded in quantization.json: old artifacts (no field) load, layouts convert on
load, and every reader of the packed bytes (reference, ONNX MatMulNBits, fused projections) sees the
layout it understands."""

import json

import pytest
import torch
from torch import nn

from inferforge.errors import UserInputError
from inferforge.kernels import int4_layout
from inferforge.optimize import Int4WeightOnly, quantize
from inferforge.optimize.quantize import Int4WeightOnlyLinear, load_quantized, save_quantized


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    return model.eval()


def quantized_mlp():
    model = mlp()
    report = quantize(model, Int4WeightOnly(group_size=32))
    return model, report


def to_interleaved(model):
    for module in model.modules():
        if isinstance(module, Int4WeightOnlyLinear):
            module.packed = module.packed_in(int4_layout.INTERLEAVED)
            module.layout = int4_layout.INTERLEAVED


def test_cpu_quantization_keeps_the_old_layout_and_records_it(tmp_path):
    model, report = quantized_mlp()
    assert all(m.layout == int4_layout.KPAIRS for m in model.modules() if isinstance(m, Int4WeightOnlyLinear))
    save_quantized(model, tmp_path / "q", report)
    layers = json.loads((tmp_path / "q" / "quantization.json").read_text())["layers"]
    assert {info["layout"] for info in layers.values()} == {int4_layout.KPAIRS}


def test_an_artifact_without_the_layout_field_loads_as_the_old_layout(tmp_path):
    model, report = quantized_mlp()
    save_quantized(model, tmp_path / "q", report)
    path = tmp_path / "q" / "quantization.json"
    meta = json.loads(path.read_text())
    for info in meta["layers"].values():
        del info["layout"]                         # as written before the field existed
    path.write_text(json.dumps(meta))
    fresh = load_quantized(mlp(seed=1), tmp_path / "q")
    x = torch.randn(3, 64)
    assert all(m.layout == int4_layout.KPAIRS for m in fresh.modules() if isinstance(m, Int4WeightOnlyLinear))
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_an_unknown_layout_is_refused_naming_the_layer(tmp_path):
    model, report = quantized_mlp()
    save_quantized(model, tmp_path / "q", report)
    path = tmp_path / "q" / "quantization.json"
    meta = json.loads(path.read_text())
    meta["layers"]["2"]["layout"] = "int4-foo-v9"
    path.write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match=r"layer '2'.*int4-foo-v9"):
        load_quantized(mlp(seed=1), tmp_path / "q")


def test_an_interleaved_artifact_converts_on_load(tmp_path):
    model, report = quantized_mlp()
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    old_packed = model[0].packed.clone()
    to_interleaved(model)
    assert not torch.equal(model[0].packed, old_packed)
    with torch.no_grad():                          # the kernel reads the interleaved bytes directly
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    save_quantized(model, tmp_path / "q", report)
    layers = json.loads((tmp_path / "q" / "quantization.json").read_text())["layers"]
    assert {info["layout"] for info in layers.values()} == {int4_layout.INTERLEAVED}
    fresh = load_quantized(mlp(seed=1), tmp_path / "q")      # on the CPU: converted to the CPU layout
    assert fresh[0].layout == int4_layout.KPAIRS and torch.equal(fresh[0].packed, old_packed)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_readers_see_the_layout_they_understand():
    from inferforge.optimize.onnx_quant_graph import int4_nbits
    from inferforge.optimize.onnx_quant_reference import DequantizedLinear
    from inferforge.runtime.llama_quantized import fuse_rows

    model, _ = quantized_mlp()
    old = model[0]
    want_nbits, want_dense = int4_nbits(old), old.dequantized_weight()
    new = Int4WeightOnlyLinear(old.packed_in(int4_layout.INTERLEAVED), old.scales, old.zeros, old.bias,
                               old.group_size, layout=int4_layout.INTERLEAVED)
    assert (new.packed_in(int4_layout.KPAIRS) == old.packed).all()
    assert (int4_nbits(new).packed == want_nbits.packed).all()       # MatMulNBits: always its own order
    assert torch.equal(new.dequantized_weight(), want_dense)
    assert torch.equal(DequantizedLinear(new).weight, DequantizedLinear(old).weight)
    assert fuse_rows([old, new]) is None                             # mixed layouts are not concatenated
    fused = fuse_rows([new, new])
    assert fused.layout == int4_layout.INTERLEAVED and fused.out_features == 2 * new.out_features
