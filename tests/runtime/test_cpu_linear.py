"""Dense CPU linears with a packed copy (MKL's or oneDNN's) for batched steps (runtime/cpu_linear.py)."""

import logging
from pathlib import Path

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


def _favour(monkeypatch, layout, seqs):
    """Make `time_layouts` report timings under which `choose_layout` picks `layout` for `seqs`."""
    from inferforge.runtime import cpu_linear

    n = seqs
    fast, slow = 1.0, 2.0
    seconds = {"dense@1": fast if layout != "onednn" else slow, "onednn@1": fast if layout == "onednn" else slow}
    if n > 1:
        seconds[f"onednn@{n}"] = fast if layout == "onednn" else slow
        seconds[f"dense@{n}" if n <= DENSE_MAX_ROWS else f"mkl@{n}"] = fast if layout != "onednn" else slow
    monkeypatch.setattr(cpu_linear, "time_layouts", lambda weights, max_num_seqs, **kw: dict(seconds))
    assert cpu_linear.choose_layout(seconds, n)[0] == layout


def _plain(tiny, seqs):
    return LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs,
                                     cpu_packed_linears=False)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(3, 30)), [9] * 5]


def test_a_measured_copy_layout_packs_a_second_copy_and_generates_the_same_tokens(tiny, monkeypatch):
    _favour(monkeypatch, "dense+copy", 4)
    packed = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=4)
    plain = _plain(tiny, 4)
    layer = packed.model.layers[0]
    assert all(isinstance(layer[n], PackedDenseLinear) for n in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"))
    assert layer["qkv"].layout == "dense+copy" and isinstance(layer["qkv"].weight, torch.Tensor)
    if mkl_packing_available(torch.float32):     # MKL timed faster than oneDNN at 4 rows: packed for them
        assert layer["qkv"].kind == "mkl" and layer["qkv"].batch_rows == 4
    assert isinstance(packed.model.lm_head, PackedDenseLinear)
    assert isinstance(plain.model.layers[0]["qkv"], torch.Tensor) and isinstance(plain.model.lm_head, torch.Tensor)
    extra = sum(op.packed_bytes for layer in packed.model.layers
                for op in layer.values() if isinstance(op, PackedDenseLinear))
    extra += packed.model.lm_head.packed_bytes
    assert packed.kv_plan.weight_bytes == plain.kv_plan.weight_bytes + extra > plain.kv_plan.weight_bytes
    assert packed.cpu_linears["layout"] == "dense+copy" and packed.cpu_linears["extra_bytes"] == extra
    assert packed.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[]) == \
        plain.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])


@pytest.mark.parametrize("seqs", [1, 3, 4, 8])
def test_a_measured_onednn_layout_drops_the_dense_weights_and_generates_the_same_tokens(tiny, monkeypatch, seqs):
    _favour(monkeypatch, "onednn", seqs)
    packed = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs)
    plain = _plain(tiny, seqs)
    ops = [op for layer in packed.model.layers for op in layer.values() if isinstance(op, PackedDenseLinear)]
    assert len(ops) == 4 * len(packed.model.layers) and isinstance(packed.model.lm_head, PackedDenseLinear)
    assert all(op.layout == "onednn" and op.weight is None and op.kind == "onednn" for op in ops)
    # The weights are held once: as many bytes as the unpacked engine's.
    assert packed.kv_plan.weight_bytes == plain.kv_plan.weight_bytes
    assert packed.cpu_linears["layout"] == "onednn" and packed.cpu_linears["extra_bytes"] == 0
    assert set(packed.cpu_linears["seconds"]) >= {"dense@1", "onednn@1"}
    assert packed.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[]) == \
        plain.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])


def test_the_onednn_layout_frees_the_dense_weights(tiny):
    import gc
    import weakref

    from inferforge.runtime.llama import LlamaModel

    model = LlamaModel.load(tiny, dtype=torch.float32, device="cpu")
    dense = [weakref.ref(model.layers[i][n]) for i in range(len(model.layers)) for n in ("qkv", "mlp.down_proj")]
    head = weakref.ref(model.lm_head)
    assert model.pack_dense_linears(dense=False) == 0
    gc.collect()
    assert all(ref() is None for ref in dense) and head() is None


def test_a_tied_lm_head_keeps_the_embedding_and_counts_its_packed_copy(tmp_path):
    from inferforge.runtime.llama import LlamaModel

    model = LlamaModel.load(save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True), dtype=torch.float32,
                            device="cpu")
    assert model.lm_head is model.embed
    extra = model.pack_dense_linears(dense=False)
    assert extra == model.embed.numel() * 4 and isinstance(model.embed, torch.Tensor)
    ids = torch.tensor([3, 4, 5])
    torch.testing.assert_close(model.lm_head(model.embed[ids]), model.embed[ids] @ model.embed.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seqs", [1, 2, 3])
def test_up_to_three_sequences_keep_the_dense_weights_where_f_linear_is_measured_fastest(tiny, seqs, caplog,
                                                                                        monkeypatch):
    _favour(monkeypatch, "dense", seqs)
    with caplog.at_level(logging.INFO, logger="inferforge.runtime.cpu_linear"):
        few = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs)
    assert isinstance(few.model.layers[0]["qkv"], torch.Tensor) and few.cpu_linears["layout"] == "dense"
    assert f"float linears kept dense (F.linear) for max_num_seqs={seqs}: oneDNN's layout was not 5% faster" in caplog.text
    asked = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs, cpu_packed_linears=True)
    assert isinstance(asked.model.layers[0]["qkv"], PackedDenseLinear) and asked.model.layers[0]["qkv"].kind == "onednn"
    assert asked.model.layers[0]["qkv"].layout == "dense+copy" and asked.cpu_linears["seconds"] is None


def test_asking_for_the_onednn_layout_skips_the_timing(tiny, monkeypatch):
    from inferforge.runtime import cpu_linear

    def fail(*args, **kwargs):
        raise AssertionError("timed although a layout was asked for")

    monkeypatch.setattr(cpu_linear, "time_layouts", fail)
    engine = LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=8,
                                       cpu_packed_linears="onednn")
    assert engine.model.layers[0]["gate_up"].layout == "onednn" and engine.cpu_linears["layout"] == "onednn"


@pytest.mark.parametrize(("seconds", "seqs", "want"), [
    ({"dense@1": 1.0, "onednn@1": 0.96}, 1, ("dense", False)),          # within the margin: dense stays
    ({"dense@1": 1.0, "onednn@1": 0.90}, 1, ("onednn", False)),
    ({"dense@1": 1.0, "onednn@1": 0.95}, 1, ("dense", False)),          # exactly 5% faster: dense keeps the tie
    ({"dense@1": 1.0, "onednn@1": 0.5, "dense@3": 1.0, "onednn@3": 2.0}, 3, ("dense", False)),   # both row counts
    ({"dense@1": 1.0, "onednn@1": 1.2, "mkl@8": 2.0, "onednn@8": 3.0}, 8, ("dense+copy", True)),
    ({"dense@1": 1.0, "onednn@1": 1.2, "mkl@8": 2.0, "onednn@8": 1.5}, 8, ("dense+copy", False)),
    ({"dense@1": 1.0, "onednn@1": 0.8, "mkl@8": 2.0, "onednn@8": 1.5}, 8, ("onednn", False)),
    ({"dense@1": 1.0, "onednn@1": 1.1, "mkl@8": 1.5, "onednn@8": 1.5}, 8, ("onednn", False)),  # 2.6 <= 1.05 * 2.5
    ({"dense@1": 1.0, "onednn@1": 1.1, "mkl@8": 1.0, "onednn@8": 1.0}, 8, ("onednn", False)),  # 2.1 = 1.05 * 2.0
    ({"dense@1": 1.0, "onednn@1": 1.5, "onednn@20": 3.0}, 20, ("dense+copy", False)),           # no MKL timing
    ({"dense@1": 1.0, "onednn@1": 1.0, "onednn@20": 3.0}, 20, ("onednn", False)),
])
def test_choose_layout_keeps_the_fastest_in_all(seconds, seqs, want):
    from inferforge.runtime.cpu_linear import choose_layout

    assert choose_layout(seconds, seqs) == want


@pytest.mark.parametrize("seqs", [1, 2, 8, 20])
def test_time_layouts_times_every_candidate(seqs):
    from inferforge.runtime.cpu_linear import time_layouts

    weights = [torch.randn(48, 32), torch.randn(32, 48)]
    seconds = time_layouts(weights, seqs, reps=2)
    want = {"dense@1", "onednn@1"} | ({f"onednn@{seqs}"} if seqs > 1 else set())
    want |= {f"dense@{seqs}"} if 1 < seqs <= DENSE_MAX_ROWS else set()
    want |= {f"mkl@{seqs}"} if MKL_MIN_ROWS <= seqs <= MKL_MAX_ROWS and mkl_packing_available(torch.float32) else set()
    assert set(seconds) == want
    assert all(0 < s < float("inf") for s in seconds.values())      # each candidate ran (no timing limit)


def test_the_timing_sample_takes_whole_layers_up_to_the_limit(tiny):
    from inferforge.runtime.cpu_linear import sample_projections
    from inferforge.runtime.llama import LlamaModel

    model = LlamaModel.load(tiny, dtype=torch.float32, device="cpu")
    one_layer = sum(model.layers[0][n].numel() * 4 for n in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"))
    assert len(sample_projections(model, limit=1)) == 4
    assert len(sample_projections(model, limit=one_layer + 1)) == 8
    assert len(sample_projections(model)) == 4 * len(model.layers)
    for layer in model.layers:                   # quantized layers: the LM head alone
        for name in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"):
            layer[name] = object()
    assert sample_projections(model) == [model.lm_head]


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
        LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=seqs, cpu_packed_linears=True)
    assert f"a packed copy for batched CPU steps ({layout})" in caplog.text and "asked by cpu_packed_linears=True" in caplog.text


def test_the_log_gives_the_measured_timings(tiny, caplog, monkeypatch):
    _favour(monkeypatch, "onednn", 8)
    with caplog.at_level(logging.INFO, logger="inferforge.runtime.cpu_linear"):
        LLMEngine.from_pretrained(tiny, dtype=torch.float32, device="cpu", max_num_seqs=8)
    assert "float linears packed into oneDNN's layout alone, for every step" in caplog.text
    assert "chosen by timing for max_num_seqs=8" in caplog.text and "onednn@8 1000.0 ms" in caplog.text


@pytest.mark.parametrize("kwargs, match", [
    ({"cpu_packed_linears": "yes"}, "cpu_packed_linears must be True, False, 'onednn' or None"),
    ({"cpu_packed_linears": 1}, "cpu_packed_linears must be True, False, 'onednn' or None"),
    ({"cpu_packed_linears": "onednn", "dtype": torch.float16}, "packing here is for float32 and bfloat16"),
    ({"cpu_packed_linears": True, "dtype": torch.float16}, "packing here is for float32 and bfloat16"),
])
def test_bad_packing_requests_are_refused(tiny, kwargs, match):
    kwargs = {"dtype": torch.float32, **kwargs}
    with pytest.raises(UserInputError, match=match):
        LLMEngine.from_pretrained(tiny, device="cpu", **kwargs)


def test_float16_weights_are_left_unpacked_by_default(tiny):
    engine = LLMEngine.from_pretrained(tiny, dtype=torch.float16, device="cpu", max_num_seqs=4)
    assert isinstance(engine.model.layers[0]["qkv"], torch.Tensor)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_the_onednn_layout_matches_a_float64_reference_at_every_row_count(rows, bias):
    g = torch.Generator().manual_seed(100 + rows)
    weight = torch.randn(45, 33, generator=g)
    b = torch.randn(45, generator=g) if bias else None
    x = torch.randn(rows, 33, generator=g)
    linear = PackedDenseLinear(weight, b, batch_rows=8, dense=False)
    assert linear.weight is None and linear.layout == "onednn" and linear.kind == "onednn"
    want = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(linear(x).double(), want, atol=1e-4, rtol=1e-5)


def test_a_bfloat16_engine_can_take_the_onednn_layout(tiny):
    engine = LLMEngine.from_pretrained(tiny, dtype=torch.bfloat16, device="cpu", max_num_seqs=2,
                                       cpu_packed_linears="onednn")
    plain = LLMEngine.from_pretrained(tiny, dtype=torch.bfloat16, device="cpu", max_num_seqs=2, cpu_packed_linears=False)
    assert engine.model.layers[0]["qkv"].layout == "onednn"
    got = engine.generate(PROMPTS[:2], max_new_tokens=4, stop_token_ids=[])
    want = plain.generate(PROMPTS[:2], max_new_tokens=4, stop_token_ids=[])
    assert sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) >= 6     # bf16 sums may break near-ties


def test_the_timing_sample_cuts_a_weight_larger_than_a_quarter_of_the_limit():
    from types import SimpleNamespace

    from inferforge.runtime.cpu_linear import sample_projections

    big, small = torch.randn(1000, 16), torch.randn(10, 16)
    layer = {"qkv": big, "self_attn.o_proj": small, "gate_up": object(), "mlp.down_proj": object()}
    model = SimpleNamespace(layers=[layer, dict(layer)], lm_head=torch.randn(5000, 16))
    limit = 4 * 100 * 16 * 4                     # a quarter of it is 100 rows of 16 floats
    sample = sample_projections(model, limit=limit)
    assert [tuple(w.shape) for w in sample] == [(100, 16), (10, 16), (100, 16), (10, 16)]
    assert sample[0].is_contiguous() and sample[0].data_ptr() == big.data_ptr()     # a view: no copy
    quantized = SimpleNamespace(layers=[{k: object() for k in layer}], lm_head=model.lm_head)
    assert [tuple(w.shape) for w in sample_projections(quantized, limit=limit)] == [(100, 16)]


@pytest.mark.parametrize("asked", [True, "onednn"])
def test_asking_to_pack_a_model_without_dense_projections_packs_nothing(tiny, asked):
    from inferforge.runtime.cpu_linear import pack_dense_linears_if_asked
    from inferforge.runtime.llama import LlamaModel

    model = LlamaModel.load(tiny, dtype=torch.float32, device="cpu")
    for layer in model.layers:
        for name in ("qkv", "gate_up", "self_attn.o_proj", "mlp.down_proj"):
            layer[name] = object()
    model.lm_head = object()
    done = pack_dense_linears_if_asked(model, asked, 8)
    assert done["layout"] == "dense" and done["extra_bytes"] == 0 and "no dense float projection" in done["reason"]


RSS_SCRIPT = """
import gc, sys, torch
from inferforge.runtime.llama import LlamaModel

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

model = LlamaModel.load(sys.argv[1], dtype=torch.float32, device="cpu")
ops = [model.lm_head] + [layer[n] for layer in model.layers for n in ("qkv", "self_attn.o_proj", "gate_up", "mlp.down_proj")]
for t in ops + [model.embed]:
    float(t.sum())                                 # every page resident, as after a generate
dropped = sum(t.numel() * 4 for t in ops)
del ops
gc.collect()
before = rss()
model.pack_dense_linears(dense=False)
gc.collect()
print(rss() - before, dropped)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_the_onednn_layout_does_not_grow_resident_memory(tmp_path):
    import subprocess
    import sys

    model = save_tiny_llama(tmp_path / "wide", vocab_size=16000, hidden_size=256, intermediate_size=512)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model)], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    grew, dropped = int(out[-2]), int(out[-1])
    # The packed copies replace the dense weights: kept dense weights would add all of `dropped` (measured
    # +113%; freed ones +28%, what the allocator keeps of the freed blocks).
    assert grew < 0.5 * dropped, (grew, dropped)


def test_timing_the_layouts_leaves_the_callers_random_state_alone():
    from inferforge.runtime.cpu_linear import time_layouts

    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    time_layouts([torch.ones(8, 16)], 4, reps=1)
    assert torch.equal(torch.rand(3), want)
