"""Dense CPU linears with a packed copy (MKL's or oneDNN's) for batched steps (runtime/cpu_linear.py)."""

import logging

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.runtime.cpu_linear import (
    DENSE_MAX_ROWS,
    MKL_MAX_ROWS,
    MKL_MIN_ROWS,
    PackedDenseLinear,
    mkl_packing_available,
    packing_unavailable_reason,
)
from inferforge.runtime.engine import LLMEngine
from tests.factories_llama import save_tiny_llama

needs_onednn = pytest.mark.skipif(packing_unavailable_reason(torch.device("cpu"), torch.float32) is not None,
                                  reason="this torch build has no oneDNN linear")
needs_mkl = pytest.mark.skipif(not mkl_packing_available(torch.float32), reason="this torch build has no MKL packed SGEMM")
pytestmark = needs_onednn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 37])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch_rows", [None, 4, 8, 16])
def test_matches_a_float64_reference(rows, bias, batch_rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(45, 33, generator=g)
    b = torch.randn(45, generator=g) if bias else None
    x = torch.randn(rows, 33, generator=g)
    want = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    got = PackedDenseLinear(weight, b, batch_rows=batch_rows)(x)
    assert got.shape == (rows, 45) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("batch_rows", [None, 8])
def test_keeps_leading_dimensions(batch_rows):
    weight, x = torch.randn(20, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(PackedDenseLinear(weight, batch_rows=batch_rows)(x), x @ weight.T, atol=1e-5, rtol=1e-5)


def _paths(linear, weight, other, rows):
    """Which weight answered for each row count, after swapping in `other`'s packed copy."""
    out = {}
    for n in rows:
        x = torch.randn(n, weight.shape[1])
        got = linear(x)
        out[n] = ("packed" if torch.allclose(got, x @ other.T, atol=1e-4, rtol=1e-4) else
                  "dense" if torch.allclose(got, x @ weight.T, atol=1e-4, rtol=1e-4) else "neither")
    return out


def test_few_rows_read_the_dense_weight_and_more_rows_the_onednn_copy():
    weight, other = torch.randn(24, 16), torch.randn(24, 16)
    linear = PackedDenseLinear(weight)
    assert linear.kind == "onednn"
    linear.packed = PackedDenseLinear(other).packed
    assert _paths(linear, weight, other, (1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1, 9)) == {
        1: "dense", DENSE_MAX_ROWS: "dense", DENSE_MAX_ROWS + 1: "packed", 9: "packed"}


@needs_mkl
def test_decode_batches_up_to_the_packed_row_count_read_the_mkl_copy_and_larger_steps_the_dense_weight():
    weight, other = torch.randn(24, 16), torch.randn(24, 16)
    linear = PackedDenseLinear(weight, batch_rows=8)
    assert linear.kind == "mkl" and linear.batch_rows == 8
    linear.packed = PackedDenseLinear(other, batch_rows=8).packed
    assert _paths(linear, weight, other, (1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1, 7, 8, 9, 40)) == {
        1: "dense", DENSE_MAX_ROWS: "dense", DENSE_MAX_ROWS + 1: "packed", 7: "packed", 8: "packed", 9: "dense",
        40: "dense"}


@needs_mkl
@pytest.mark.parametrize(("batch_rows", "dtype", "kind"), [
    (MKL_MIN_ROWS, torch.float32, "mkl"), (MKL_MAX_ROWS, torch.float32, "mkl"), (None, torch.float32, "onednn"),
    (MKL_MIN_ROWS - 1, torch.float32, "onednn"), (MKL_MAX_ROWS + 1, torch.float32, "onednn"),
    (8, torch.bfloat16, "onednn")])
def test_mkl_packs_float32_weights_for_small_decode_batches_only(batch_rows, dtype, kind):
    assert PackedDenseLinear(torch.randn(24, 16).to(dtype), batch_rows=batch_rows).kind == kind


def test_the_engine_packs_by_default_on_the_cpu_and_generates_the_same_tokens(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(3, 30)), [9] * 5]
    packed = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=4)
    plain = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=4,
                                      cpu_packed_linears=False)
    layer = packed.model.layers[0]
    assert all(isinstance(layer[n], PackedDenseLinear) for n in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"))
    if mkl_packing_available(torch.float32):     # packed for the 4-row decode batch
        assert layer["qkv"].kind == "mkl" and layer["qkv"].batch_rows == 4
    assert isinstance(packed.model.lm_head, PackedDenseLinear)
    assert isinstance(plain.model.layers[0]["qkv"], torch.Tensor) and isinstance(plain.model.lm_head, torch.Tensor)
    extra = sum(op.packed_bytes for layer in packed.model.layers
                for op in layer.values() if isinstance(op, PackedDenseLinear))
    extra += packed.model.lm_head.packed_bytes
    assert packed.kv_plan.weight_bytes == plain.kv_plan.weight_bytes + extra > plain.kv_plan.weight_bytes
    assert packed.generate(prompts, max_new_tokens=6, stop_token_ids=[]) == \
        plain.generate(prompts, max_new_tokens=6, stop_token_ids=[])


@pytest.mark.parametrize("seqs", [1, 2, 3])
def test_up_to_three_sequences_are_not_packed_unless_asked(tiny, seqs, caplog):
    """Decode steps of up to 3 rows run F.linear: a copy would serve prefill only, for 2x the memory."""
    with caplog.at_level(logging.INFO, logger="inferforge.runtime.cpu_linear"):
        few = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs)
    assert isinstance(few.model.layers[0]["qkv"], torch.Tensor)
    assert f"not packed: max_num_seqs={seqs}" in caplog.text
    asked = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs, cpu_packed_linears=True)
    assert isinstance(asked.model.layers[0]["qkv"], PackedDenseLinear) and asked.model.layers[0]["qkv"].kind == "onednn"


def test_the_row_limits_are_the_measured_ones():
    """F.linear up to 3 rows, MKL packed for decode batches of 4-16 (README: "Engine speed on a CPU")."""
    assert (DENSE_MAX_ROWS, MKL_MIN_ROWS, MKL_MAX_ROWS) == (3, 4, 16)
    assert not mkl_packing_available(torch.bfloat16) and not mkl_packing_available(torch.float16)


def test_the_packed_copy_counts_the_weights_bytes():
    weight = torch.randn(64, 48)
    for batch_rows in (None, 8):
        assert PackedDenseLinear(weight, batch_rows=batch_rows).packed_bytes == weight.numel() * 4


def test_a_weight_mkl_cannot_pack_gets_onednns_layout(monkeypatch):
    from inferforge.runtime import cpu_linear

    def refuse(weight, rows):
        raise RuntimeError("cannot pack")

    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", refuse, raising=False)
    monkeypatch.setattr(cpu_linear, "mkl_packing_available", lambda dtype: True)
    weight, x = torch.randn(24, 16), torch.randn(6, 16)
    linear = PackedDenseLinear(weight, batch_rows=8)
    assert linear.kind == "onednn" and linear.batch_rows is None
    torch.testing.assert_close(linear(x), x @ weight.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("seqs", "layout"), [(4, "MKL, for 4-row decode steps"), (17, "oneDNN")])
def test_the_log_names_the_layout(tiny, seqs, layout, caplog):
    if seqs == 4 and not mkl_packing_available(torch.float32):
        pytest.skip("this torch build has no MKL packed SGEMM")
    with caplog.at_level(logging.INFO, logger="inferforge.runtime.cpu_linear"):
        LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs)
    assert f"dense linears packed for batched CPU steps ({layout})" in caplog.text


@pytest.mark.parametrize("kwargs, match", [
    ({"cpu_packed_linears": "yes"}, "cpu_packed_linears must be True, False or None"),
    ({"cpu_packed_linears": 1}, "cpu_packed_linears must be True, False or None"),
    ({"cpu_packed_linears": True, "dtype": torch.float16}, "packing here is for float32 and bfloat16"),
])
def test_bad_packing_requests_are_refused(tiny, kwargs, match):
    kwargs = {"dtype": torch.float32, **kwargs}
    with pytest.raises(UserInputError, match=match):
        LLMEngine.from_pretrained(tiny, device="cpu", **kwargs)


def test_float16_weights_are_left_unpacked_by_default(tiny):
    engine = LLMEngine.from_pretrained(tiny, dtype=torch.float16, device="cpu", max_num_seqs=4)
    assert isinstance(engine.model.layers[0]["qkv"], torch.Tensor)
