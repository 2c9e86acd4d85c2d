"""Static QDQ on a tiny random BERT: calibration on batches of different lengths, QDQ placement, errors."""

import numpy as np
import onnx
import pytest

from inferforge import pipeline
from inferforge.errors import UserInputError
from inferforge.optimize.onnx_quantize import SettingError
from inferforge.optimize.static_qdq import activation_stats, matmul_activations, quantize_static_qdq
from inferforge.recipe import recipe_from_dict
from tests.test_onnx_quantize import batches, run, tiny_onnx  # noqa: F401 (fixture)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_batches_of_different_lengths(tiny_onnx, tmp_path, method):  # noqa: F811
    path, tokenizer = tiny_onnx
    bs = batches(tokenizer)
    assert bs[0]["input_ids"].shape[1] != bs[1]["input_ids"].shape[1]   # ONNX Runtime's calibrators crashed here
    out = tmp_path / "work" / "model.onnx"
    out.parent.mkdir()
    record = quantize_static_qdq(path, out, calibration_batches=bs, calibrate_method=method)
    assert record["calibrate_method"] == method and record["excluded_nodes"] == []
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 16                  # 6 weighted + 2 attention products per layer
    for node in matmuls:
        # QDQ around the inputs, as TensorRT fuses it; the output stays float.
        assert all(producers[i].op_type == "DequantizeLinear" for i in node.input)
        assert {n.op_type for n in model.graph.node if node.output[0] in n.input} != {"QuantizeLinear"}
    for b in bs:
        ref, got = run(path, b), run(out, b)
        mask = b["attention_mask"].astype(bool)
        rel = np.linalg.norm(got[mask] - ref[mask]) / np.linalg.norm(ref[mask])
        assert 0 < rel < 0.1
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]


def test_ranges_ignore_padding(tiny_onnx):  # noqa: F811
    path, tokenizer = tiny_onnx
    bs = batches(tokenizer)
    names = list(matmul_activations(onnx.load(str(path))))
    padded = activation_stats(path, names, bs, "minmax")
    # The same sentences one at a time: no padding anywhere, so the same ranges.
    single = [{k: v[i:i + 1, :int(b["attention_mask"][i].sum())] for k, v in b.items()}
              for b in bs for i in range(len(b["input_ids"]))]
    alone = activation_stats(path, names, single, "minmax")
    for name in names:
        assert padded[name]["range"] == pytest.approx(alone[name]["range"], rel=1e-5)


def test_sensitive_activations_are_kept_in_float_until_the_target(tiny_onnx, tmp_path):  # noqa: F811
    path, tokenizer = tiny_onnx

    def float_matmul_inputs(p):
        model = onnx.load(str(p))
        producers = {o: n for n in model.graph.node for o in n.output}
        return sum(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                   for n in model.graph.node if n.op_type == "MatMul" for i in n.input)

    def score(p):   # every MatMul input left in float is worth +0.01: the target needs two activations
        return (0.97 + 0.01 * min(float_matmul_inputs(p), 2), 0.99)

    out = tmp_path / "work" / "model.onnx"
    out.parent.mkdir()
    record = quantize_static_qdq(path, out, calibration_batches=batches(tokenizer), score=score,
                                 smoothquant_alpha="off", target_min_cosine=0.99, max_auto_excluded=4)
    assert record["calibration_min_cosine"] == pytest.approx(0.99)
    assert len(record["auto_excluded"]) >= 1 and record["excluded_nodes"]
    sqnr = [e["estimated_sqnr_db"] for e in record["auto_excluded"]]
    assert sqnr == sorted(sqnr)                                    # lowest estimated SQNR first
    assert record["auto_excluded"][0]["activation"] == record["lowest_sqnr_activations"][0]["activation"]
    assert all(e["nodes"] and e["activation"] for e in record["auto_excluded"])


def test_unknown_node_and_method_are_setting_errors(tiny_onnx, tmp_path):  # noqa: F811
    path, tokenizer = tiny_onnx
    with pytest.raises(SettingError, match="no node named 'nope'"):
        quantize_static_qdq(path, tmp_path / "m.onnx", calibration_batches=batches(tokenizer), exclude_nodes=["nope"])
    with pytest.raises(SettingError, match="calibrate_method must be one of"):
        quantize_static_qdq(path, tmp_path / "m.onnx", calibration_batches=batches(tokenizer), calibrate_method="kl")


def test_a_bad_setting_is_bad_input_but_an_internal_error_is_not(tmp_path, monkeypatch):
    recipe = {"name": "tiny", "model": "tests.factories:tiny_bert", "output": str(tmp_path / "out"),
              "data": {"calibration_size": 8, "held_out_size": 8}, "gates": {"min_cosine": 0.5},
              "steps": ["export", {"quantize": {"method": "static-qdq", "exclude_nodes": ["nope"]}}, "validate"]}
    with pytest.raises(UserInputError, match="quantize: exclude_nodes: no node named 'nope'"):
        pipeline.run_recipe(recipe_from_dict(recipe))

    def broken(*args, **kwargs):   # a bug inside the quantizer, like numpy's "inhomogeneous shape" was
        raise ValueError("setting an array element with a sequence. The requested array has an inhomogeneous shape")

    monkeypatch.setattr("inferforge.optimize.static_qdq.quantize_static_qdq", broken)
    recipe["steps"][1]["quantize"]["exclude_nodes"] = []
    with pytest.raises(ValueError, match="inhomogeneous") as caught:
        pipeline.run_recipe(recipe_from_dict(recipe))
    assert not isinstance(caught.value, UserInputError)
