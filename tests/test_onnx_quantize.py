"""SmoothQuant and int8 quantization on a tiny random BERT exported to ONNX (no downloads)."""

import numpy as np
import onnx
import pytest

from inferforge.encoder import OnnxEncoder
from inferforge.optimize.export import export_onnx
from inferforge.optimize.onnx_quantize import (
    activation_absmax,
    apply_smoothquant,
    quantize_dynamic_int8,
    quantize_onnx_int8,
    smoothable_groups,
)
from tests.factories import tiny_bert

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world.",
             "A somewhat longer sentence, with punctuation; and clauses that go on for a while.", "Short."]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model, tokenizer = tiny_bert()
    src = tmp_path_factory.mktemp("tiny-src")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    path = export_onnx(src, tmp_path_factory.mktemp("tiny-onnx"), opset=17)
    return path, tokenizer


def batches(tokenizer):
    enc = OnnxEncoder.__new__(OnnxEncoder)
    enc.tokenizer, enc.max_length = tokenizer, 32
    return [enc.tokenize(SENTENCES[:2]), enc.tokenize(SENTENCES[2:])]


def run(path, batch):
    enc = OnnxEncoder(path, None)
    return enc.hidden_states(batch)


def test_groups_are_the_norm_fed_matmuls(tiny_onnx):
    path, _ = tiny_onnx
    groups = smoothable_groups(onnx.load(str(path)))
    sizes = sorted(len(nodes) for nodes in groups.values())
    # Per layer: Q, K, V share the LayerNorm output; the FFN up projection has its own.
    assert sizes == [1, 1, 3, 3]


def test_smoothquant_is_exact_in_float(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    bs = batches(tokenizer)
    groups = smoothable_groups(onnx.load(str(path)))
    absmax = activation_absmax(path, list(groups), bs)
    assert all(v.shape == (64,) and (v > 0).all() for v in absmax.values())
    out = tmp_path / "smoothed.onnx"
    assert apply_smoothquant(path, out, absmax, alpha=0.5) == 4
    muls = [n for n in onnx.load(str(out)).graph.node if n.name.endswith("_smoothquant_mul")]
    assert len(muls) == 4
    for b in bs:
        np.testing.assert_allclose(run(out, b), run(path, b), rtol=1e-4, atol=1e-4)


def test_dynamic_int8_replaces_matmuls(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    out = tmp_path / "int8.onnx"
    quantize_dynamic_int8(path, out)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 12          # 6 weighted MatMuls per layer, 2 layers
    b = batches(tokenizer)[0]
    ref, got = run(path, b), run(out, b)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.05                            # quantized: close, but not bit-identical


def float_matmuls(path) -> int:
    return sum(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)


def test_auto_alpha_picks_the_best_scoring_candidate(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    calls = []

    def score(p):   # candidates come as off, 0.4, 0.6: make the third one best on purpose
        calls.append(p.name)
        return (1.0 if len(calls) == 3 else 0.5, 0.0)

    out = tmp_path / "work" / "model.onnx"
    out.parent.mkdir()
    record = quantize_onnx_int8(path, out, calibration_batches=batches(tokenizer), score=score,
                                alpha_grid=(0.4, 0.6))
    assert [c["smoothquant_alpha"] for c in record["candidates"]] == ["off", 0.4, 0.6]
    assert record["smoothquant_alpha"] == 0.6 and record["smoothed_groups"] == 4
    assert record["excluded_nodes"] == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]   # losing candidates removed


def test_auto_exclusion_keeps_outlier_heavy_matmuls_in_float_until_the_target(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    quantize_dynamic_int8(path, tmp_path / "all.onnx")
    all_int8 = float_matmuls(tmp_path / "all.onnx")    # the attention products stay float anyway

    def score(p):   # every MatMul kept in float is worth +0.01: the target needs two of them
        kept = float_matmuls(p) - all_int8
        return (0.97 + 0.01 * kept, 0.99)

    out = tmp_path / "work" / "model.onnx"
    out.parent.mkdir()
    record = quantize_onnx_int8(path, out, calibration_batches=batches(tokenizer), score=score,
                                smoothquant_alpha="off", target_min_cosine=0.99, max_auto_excluded=4)
    assert len(record["auto_excluded_nodes"]) == 2 and record["excluded_nodes"] == record["auto_excluded_nodes"]
    assert record["calibration_min_cosine"] == pytest.approx(0.99)
    assert float_matmuls(out) == all_int8 + 2
    # Only MatMuls that smoothing cannot help (not fed by a LayerNorm) are candidates.
    assert all("attention/output" in n or "/output/dense" in n for n in record["auto_excluded_nodes"])


def test_unknown_excluded_node_is_a_clear_error(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    with pytest.raises(ValueError, match="no node named 'nope'"):
        quantize_onnx_int8(path, tmp_path / "m.onnx", calibration_batches=batches(tokenizer),
                           score=lambda p: (1, 1), exclude_nodes=["nope"])


def test_smoothquant_scope_all_smooths_every_weighted_matmul_exactly_in_float(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    model = onnx.load(str(path))
    groups = smoothable_groups(model, "all")
    # Per layer: Q/K/V share one input; the attention output, the MLP's first and second projections one each.
    assert sorted(len(nodes) for nodes in groups.values()) == [1, 1, 1, 1, 1, 1, 3, 3]
    assert set(smoothable_groups(model)) < set(groups)
    bs = batches(tokenizer)
    absmax = activation_absmax(path, list(groups), bs)
    out = tmp_path / "smoothed-all.onnx"
    assert apply_smoothquant(path, out, absmax, alpha=0.5, scope="all") == 8
    smoothed = onnx.load(str(out))
    muls = {n.output[0] for n in smoothed.graph.node if n.name.endswith("_smoothquant_mul")}
    fed = [n for n in smoothed.graph.node if n.op_type == "MatMul" and n.input[0] in muls]
    assert len(muls) == 8 and len(fed) == 12   # every weighted MatMul now reads a smoothed input
    for b in bs:
        np.testing.assert_allclose(run(out, b), run(path, b), rtol=1e-4, atol=1e-4)


def test_quantize_with_scope_all_smooths_the_non_norm_matmuls_too(tiny_onnx, tmp_path):
    path, tokenizer = tiny_onnx
    out = tmp_path / "work" / "model.onnx"
    out.parent.mkdir()
    record = quantize_onnx_int8(path, out, calibration_batches=batches(tokenizer), score=lambda p: (0.5, 0.5),
                                smoothquant_alpha=0.5, smoothquant_scope="all", target_min_cosine=0.99,
                                max_auto_excluded=4)
    assert record["smoothquant_scope"] == "all" and record["smoothed_groups"] == 8
    assert record["auto_excluded_nodes"] == []   # nothing is left unsmoothed to keep in float
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 12


def test_bad_smoothquant_scope_is_refused(tiny_onnx):
    from inferforge.optimize.onnx_quantize import SettingError
    from inferforge.recipe import QuantizeConfig

    with pytest.raises(SettingError, match="smoothquant_scope 'some': choose norm or all"):
        smoothable_groups(onnx.load(str(tiny_onnx[0])), "some")
    with pytest.raises(ValueError, match="smoothquant_scope must be 'norm' or 'all'"):
        QuantizeConfig(smoothquant_scope="every")
    with pytest.raises(ValueError, match="implemented for method dynamic-int8"):
        QuantizeConfig(method="static-qdq", smoothquant_scope="all")


@pytest.mark.parametrize("extra", [[], ["--onnx"]])
def test_the_quantize_command_passes_smoothquant_scope_on(monkeypatch, extra):
    """`inferforge quantize MODEL` (an ad-hoc recipe) and `inferforge quantize ARTIFACT --onnx` both hand
    --smoothquant-scope to the quantize step."""
    from inferforge import artifact_quantize, pipeline
    from inferforge.cli import build_parser

    class Stop(Exception):
        pass

    seen = {}

    def fake_run_recipe(recipe, **kw):
        seen["quantize"] = next(s for s in recipe.steps if type(s).__name__ == "QuantizeConfig")
        raise Stop

    def fake_quantize_artifact(artifact, out, *, quantize, **kw):
        seen["quantize"] = quantize
        raise Stop

    monkeypatch.setattr(pipeline, "run_recipe", fake_run_recipe)
    monkeypatch.setattr(artifact_quantize, "quantize_artifact", fake_quantize_artifact)
    args = build_parser().parse_args(["quantize", "all-MiniLM-L6-v2", *extra, "--smoothquant-scope", "all", "-o", "o"])
    with pytest.raises(Stop):
        args.func(args)
    assert seen["quantize"].smoothquant_scope == "all"
