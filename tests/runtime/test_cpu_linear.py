"""Dense CPU linears with a oneDNN-packed copy for batched steps (runtime/cpu_linear.py)."""

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.runtime.cpu_linear import DENSE_MAX_ROWS, PackedDenseLinear, packing_unavailable_reason
from inferforge.runtime.engine import LLMEngine
from tests.factories_llama import save_tiny_llama

needs_onednn = pytest.mark.skipif(packing_unavailable_reason(torch.device("cpu"), torch.float32) is not None,
                                  reason="this torch build has no oneDNN linear")
pytestmark = needs_onednn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_a_float64_reference(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(45, 33, generator=g)
    b = torch.randn(45, generator=g) if bias else None
    x = torch.randn(rows, 33, generator=g)
    want = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    got = PackedDenseLinear(weight, b)(x)
    assert got.shape == (rows, 45) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_keeps_leading_dimensions():
    weight, x = torch.randn(20, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(PackedDenseLinear(weight)(x), x @ weight.T, atol=1e-5, rtol=1e-5)


def test_few_rows_read_the_dense_weight_and_more_rows_the_packed_copy():
    """Swap in the packed copy of another weight: which result comes back shows which path ran."""
    weight, other = torch.randn(24, 16), torch.randn(24, 16)
    linear = PackedDenseLinear(weight)
    linear.packed = PackedDenseLinear(other).packed
    for rows in (1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1, 9):
        x = torch.randn(rows, 16)
        expected = weight if rows <= DENSE_MAX_ROWS else other
        torch.testing.assert_close(linear(x), x @ expected.T, atol=1e-5, rtol=1e-5)


def test_the_engine_packs_by_default_on_the_cpu_and_generates_the_same_tokens(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(3, 30)), [9] * 5]
    packed = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=4)
    plain = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=4,
                                      cpu_packed_linears=False)
    layer = packed.model.layers[0]
    assert all(isinstance(layer[n], PackedDenseLinear) for n in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"))
    assert isinstance(packed.model.lm_head, PackedDenseLinear)
    assert isinstance(plain.model.layers[0]["qkv"], torch.Tensor) and isinstance(plain.model.lm_head, torch.Tensor)
    extra = sum(op.packed_bytes for layer in packed.model.layers
                for op in layer.values() if isinstance(op, PackedDenseLinear))
    extra += packed.model.lm_head.packed_bytes
    assert packed.kv_plan.weight_bytes == plain.kv_plan.weight_bytes + extra > plain.kv_plan.weight_bytes
    assert packed.generate(prompts, max_new_tokens=6, stop_token_ids=[]) == \
        plain.generate(prompts, max_new_tokens=6, stop_token_ids=[])


def test_one_sequence_at_a_time_is_not_packed_unless_asked(tiny):
    one = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=1)
    assert isinstance(one.model.layers[0]["qkv"], torch.Tensor)
    asked = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=1, cpu_packed_linears=True)
    assert isinstance(asked.model.layers[0]["qkv"], PackedDenseLinear)


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
